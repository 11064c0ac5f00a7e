"""Synthetic phantoms: determinism, conventions, ranges, truth against the voxels, speed."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest

from discgeo import levels
from discgeo.cli import main
from discgeo.io import read_volume
from discgeo.phantom import Slab, disc_truth, frame_basis, make_case, make_truth


def test_deterministic_per_seed_and_anatomy_independent_of_grid():
    a, b = make_case(11, 2), make_case(11, 2)
    assert np.array_equal(a.image.array, b.image.array) and a.truth == b.truth
    assert not np.array_equal(make_case(12, 2).labels.array.shape, a.labels.array.shape) or (
        make_case(12, 2).truth != a.truth
    )
    iso = make_case(11, 2, spacing=(1.0, 1.0, 1.0), contrast="t1")
    aniso = make_case(11, 2, spacing=(3.3, 0.6, 0.6), contrast="t2")
    for d1, d2 in zip(iso.truth["discs"], aniso.truth["discs"], strict=True):
        assert d1["volume_mm3"] == d2["volume_mm3"] and d1["narrowing"] == d2["narrowing"]


def test_truth_of_a_plain_elliptic_slab_is_analytic():
    slab = Slab(center=np.zeros(3), basis=frame_basis(0.0), a=20.0, b=25.0, p=2.0, h=10.0, wedge_deg=0.0)
    t = disc_truth(slab)
    assert t["volume_mm3"] == pytest.approx(math.pi * 20 * 25 * 10, rel=2e-3)
    assert t["mean_height_mm"] == pytest.approx(10.0, abs=1e-6)
    assert t["lateral_width_mm"] == pytest.approx(50.0, abs=1e-3)
    assert t["midsagittal_area_mm2"] == pytest.approx(400.0, rel=1e-3)
    wedged = Slab(center=np.zeros(3), basis=frame_basis(-20.0), a=20.0, b=25.0, p=2.0, h=10.0, wedge_deg=8.0)
    t = disc_truth(wedged)
    g = 2 * math.tan(math.radians(4.0))
    assert t["anterior_height_mm"] - t["posterior_height_mm"] == pytest.approx(g * 32.0, abs=1e-6)
    assert t["sagittal_angle_deg"] == pytest.approx(-20.0, abs=1e-9)
    assert t["wedge_angle_deg"] == 8.0
    for args, key in (((0.0, 3.0, 0.0), "frontal_angle_deg"), ((0.0, 0.0, 4.0), "axial_angle_deg")):
        turned = Slab(
            center=np.zeros(3), basis=frame_basis(*args), a=20.0, b=25.0, p=2.0, h=10.0, wedge_deg=0.0
        )
        assert disc_truth(turned)[key] == pytest.approx(max(args), abs=1e-9)


def test_ranges_and_label_conventions_over_a_cohort():
    counts, slices, spacings = [], [], []
    for case in range(14):
        c = make_case(5, case)
        labels = set(np.unique(c.labels.array).tolist())
        discs = [d["label"] for d in c.truth["discs"]]
        counts.append(len(discs))
        slices.append(c.image.shape[0])
        spacings.extend(c.image.spacing)
        assert discs == [levels.disc_label(i) for i in range(len(discs))]
        assert set(discs) <= labels and levels.CANAL_LABEL in labels
        assert [d["level"] for d in c.truth["discs"]][:2] == ["L5-S1", "L4-L5"]
        assert levels.SACRUM_LABEL in labels  # the view always reaches the sacrum
        special = (levels.CANAL_LABEL, levels.SACRUM_LABEL)
        vertebrae = sorted(v % 100 for v in labels if 0 < v < 200 and v not in special)
        assert vertebrae == list(range(1, len(vertebrae) + 1)) and len(vertebrae) >= len(discs) - 1
        # the bodies map: each vertebra's body alone (inside its labelled vertebra) and the sacrum
        bodies = c.bodies.array
        assert set(np.unique(bodies).tolist()) == {0, levels.SACRUM_LABEL, *vertebrae}
        assert np.array_equal(bodies == levels.SACRUM_LABEL, c.labels.array == levels.SACRUM_LABEL)
        body = (bodies > 0) & (bodies != levels.SACRUM_LABEL)
        assert np.all(c.labels.array[body] % 100 == bodies[body])
        assert 0.3 < body.sum() / np.isin(c.labels.array % 100, vertebrae).sum() < 0.9  # no posterior parts
        # the truth volume agrees with the rasterised label map (voxel-centre sampling)
        vox = np.prod(c.labels.spacing)
        errors = [
            abs(d["voxels"] * vox / d["volume_mm3"] - 1) for d in c.truth["discs"] if d["fully_in_view"]
        ]
        assert not errors or np.median(errors) < 0.02, errors
        assert 180 < c.image.array.max() <= 4095
    assert set(counts) == {5, 6, 7}
    assert min(slices) >= 12 and max(slices) <= 60
    assert 0.5 <= min(spacings) < 0.8 and 3.8 < max(spacings) <= 4.5


def test_narrowing_prevalence_and_realism():
    discs = [d for case in range(200) for d in make_truth(9, case)]
    case = make_case(9, 3)
    assert make_truth(9, 3) == [
        {
            **{k: v for k, v in d.items() if k not in ("voxels", "fully_in_view")},
            "population": case.truth["population"],
        }
        for d in case.truth["discs"]
    ]
    graded = np.array([d["narrowing"] for d in discs])
    generator = np.array([d["narrowing_generator"] for d in discs])
    assert 0.12 < graded.mean() < 0.28
    assert 0.02 < (graded != generator).mean() < 0.14  # label noise
    heights = np.array([d["mean_height_mm"] for d in discs])
    assert heights[generator == 1].mean() < 0.8 * heights[generator == 0].mean()
    # real disc sizes (training/results/real-discs.md); severely narrowed discs of older patients ~1-2 mm
    assert all(15.0 < d["ap_width_mm"] < 55 and 0.8 < d["mean_height_mm"] < 13 for d in discs)
    normal = np.array([d["mean_height_mm"] for d in discs if not d["narrowing_generator"]])
    assert 5.0 < np.median(normal) < 7.0


def test_t1_and_t2_contrast_differ_where_expected():
    t1 = make_case(4, 0, contrast="t1", spacing=(2.0, 1.0, 1.0))
    t2 = make_case(4, 0, contrast="t2", spacing=(2.0, 1.0, 1.0))
    canal = t1.labels.array == levels.CANAL_LABEL
    disc = t1.labels.array == 202
    # CSF is dark on T1 and bright on T2, relative to the disc
    assert t1.image.array[canal].mean() < t1.image.array[disc].mean()
    assert t2.image.array[canal].mean() > 1.5 * t2.image.array[disc].mean()


@pytest.mark.slow
def test_cohort_cli_writes_layout_fast(tmp_path):
    start = time.perf_counter()
    assert main(["phantom", str(tmp_path), "--cases", "20", "--seed", "3", "--quiet"]) == 0
    elapsed = time.perf_counter() - start
    assert elapsed < 60, f"20-case cohort took {elapsed:.1f} s"
    case = tmp_path / "case-0007"
    truth = json.loads((case / "truth.json").read_text())
    assert {"patient_id", "contrast", "spacing_mm", "discs"} <= set(truth)
    assert {
        "level",
        "label",
        "volume_mm3",
        "mean_height_mm",
        "middle_height_mm",
        "anterior_height_mm",
        "posterior_height_mm",
        "ap_width_mm",
        "lateral_width_mm",
        "wedge_angle_deg",
        "sagittal_angle_deg",
        "narrowing",
    } <= set(truth["discs"][0])
    image = read_volume(case / "dicom")
    labels = read_volume(case / "labels.nii.gz", labels=True)
    assert image.shape == labels.shape and np.allclose(image.affine, labels.affine, atol=1e-4)
    assert image.spacing == pytest.approx(truth["spacing_mm"], abs=1e-4)
    cohort = json.loads((tmp_path / "cohort.json").read_text())
    assert len(cohort["cases"]) == 20


def test_nifti_format(tmp_path):
    assert (
        main(["phantom", str(tmp_path), "--cases", "1", "--format", "nifti", "--contrast", "t2", "--quiet"])
        == 0
    )
    image = read_volume(tmp_path / "case-0000" / "image.nii.gz")
    assert image.shape == read_volume(tmp_path / "case-0000" / "labels.nii.gz", labels=True).shape
