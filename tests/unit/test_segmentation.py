"""Segmentation inference path (windowing, resampling, post-processing, levels) with a hand-built ONNX
model whose output is known exactly, and the CLI evaluation."""

from __future__ import annotations

import numpy as np
import pytest

from discgeo import levels
from discgeo.cli import main
from discgeo.io import write_nifti
from discgeo.phantom import make_case
from discgeo.segmentation import (
    Segmenter,
    binarise,
    dice_per_level,
    resample,
    resize,
    sliding_window,
    split_touching,
)
from discgeo.volume import Volume


@pytest.fixture(scope="module")
def segmenter(threshold_segmenter_artifact) -> Segmenter:
    return Segmenter.from_artifact(threshold_segmenter_artifact)


def test_sliding_window_blends_to_the_exact_answer():
    image = np.random.default_rng(0).random((150, 90)).astype(np.float32)

    def run(batch):
        return np.concatenate([10 * (0.5 - batch), 10 * (batch - 0.5)], axis=1)

    probs = sliding_window(run, image, (64, 64), 2)
    expected = 1 / (1 + np.exp(-20 * (image - 0.5)))
    assert probs.shape == (2, 150, 90) and np.allclose(probs[1], expected, atol=1e-5)
    small = sliding_window(run, image[:30, :20], (64, 64), 2)  # padded up to the ROI
    assert small.shape == (2, 30, 20)


def test_sliding_window_over_slices_batches_them_with_the_same_answer():
    volume = np.random.default_rng(1).random((5, 150, 90)).astype(np.float32)
    calls = []

    def run(batch):  # depends on the whole window, so the blending of windows shows
        calls.append(len(batch))
        centred = batch - batch.mean(axis=(2, 3), keepdims=True)
        return np.concatenate([-centred, centred], axis=1)

    per_slice = np.stack([sliding_window(run, s, (64, 64), 2) for s in volume], axis=1)
    slice_calls, calls[:] = list(calls), []
    batched = sliding_window(run, volume, (64, 64), 2, batch_size=16)
    assert batched.shape == (2, 5, 150, 90) and np.allclose(batched, per_slice, atol=1e-6)
    assert sum(calls) == sum(slice_calls) == 5 * 6 and len(calls) == 2 < len(slice_calls)


def test_resize_maps_voxel_centres():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    up = resize(a, (6, 8))
    assert np.allclose(up[0, 1:-1], np.arange(0.25, 3.0, 0.5))  # half-voxel centre alignment
    assert resize(a, (3, 4)) is a


def test_binarise_keeps_the_volume_where_samples_tie_at_one_half():
    mask = np.zeros((1, 40, 40), np.float32)
    mask[0, 9:30, 6:27] = 1  # 21 x 21 voxels of 0.5 mm: every boundary sample of the 1 mm grid ties
    fraction = resample(mask, (1.0, 0.5, 0.5), (None, 1.0, 1.0))
    assert np.count_nonzero(fraction >= 0.5) == 11 * 11 - 1  # thresholding alone: +9 % area
    kept = binarise(fraction)
    assert np.count_nonzero(kept) == round(mask.sum() / 4)  # 110 of 110.25 mm2
    rows, cols = np.flatnonzero(kept.any(axis=(0, 2))), np.flatnonzero(kept.any(axis=(0, 1)))
    assert len(rows) * len(cols) == np.count_nonzero(kept)  # a filled rectangle: a tied layer is kept
    assert sorted([len(rows), len(cols)]) == [10, 11]  # or dropped whole, never speckled
    assert not binarise(np.zeros((3, 3))).any()


def test_split_touching_discs_and_fragments():
    mask = np.zeros((30, 30, 60), bool)
    mask[5:25, 5:25, 5:15] = True  # disc 1
    mask[5:25, 5:25, 17:27] = True  # disc 2
    mask[14:16, 14:16, 15:17] = True  # thin bridge joining them
    mask[5:25, 5:25, 40:50] = True  # disc 3, separate
    mask[1, 1, 55] = True  # 1 mm3 speck
    parts, dropped = split_touching(mask, voxel_mm3=1.0, min_fragment_mm3=50)
    assert dropped == 1 and parts.max() == 3
    sizes = sorted(np.bincount(parts.ravel())[1:].tolist())
    assert sizes[0] >= 4000 and sizes[-1] <= 4000 + 8  # the bridge went to one side


@pytest.mark.parametrize("spacing", [(3.3, 0.6, 0.6), (1.0, 1.0, 1.0)])
def test_predict_recovers_phantom_discs_and_levels(segmenter, spacing):
    case = make_case(12, 0, spacing=spacing, full_coverage=True)
    image = (case.labels.array > 200).astype(np.float32) * 900.0 + 100.0
    predicted = segmenter.predict(Volume(image, case.labels.affine))
    truth = case.labels.with_array(np.where(case.labels.array > 200, case.labels.array, 0))
    rows = dice_per_level(predicted, truth)
    assert [r["level"] for r in rows] == [d["level"] for d in case.truth["discs"]]
    dice = [r["dice"] for r in rows]
    # 1 mm model grid: resampling costs a little, more on thin (5-7 mm) discs seen in 3.3 mm slices
    assert np.mean(dice) > 0.955 and min(dice) > 0.94
    assert predicted.meta["segmenter"] == "threshold-test"


def test_inference_modes_average_the_model_run_at_each_scale(segmenter):
    from discgeo.errors import ConfigurationError

    case = make_case(13, 1, spacing=(3.0, 0.8, 0.8), full_coverage=True)
    volume = case.labels.with_array((case.labels.array > 200).astype(np.float32) * 500.0 + 50.0).canonical()

    def at(*spacings: float) -> np.ndarray:
        modes = {"fast": [[None, 1.0, 1.0]], "accurate": [[None, s, s] for s in spacings]}
        metadata = {**segmenter.metadata, "inference_spacings_mm": modes}
        return Segmenter(segmenter.folder, metadata, mode="accurate").disc_probability(volume)

    assert segmenter.mode == "fast" and segmenter.inference_spacings == [[None, 1.0, 1.0]]  # no modes listed
    assert np.array_equal(segmenter.disc_probability(volume), at(1.0))
    fine, coarse = at(0.7), at(1.6)
    assert np.abs(fine - coarse).max() > 0.1  # the scales disagree at the boundaries
    assert np.allclose(at(0.7, 1.6), (fine + coarse) / 2, atol=1e-6)
    with pytest.raises(ConfigurationError, match="offers the inference modes fast, not 'accurate'"):
        Segmenter(segmenter.folder, segmenter.metadata, mode="accurate")


def test_segment_and_evaluate_cli(segmenter, tmp_path, capsys):
    case = make_case(13, 1, spacing=(3.0, 0.8, 0.8), full_coverage=True)
    image = case.labels.with_array((case.labels.array > 200).astype(np.float32) * 500.0 + 50.0)
    write_nifti(image, tmp_path / "image.nii.gz")
    write_nifti(case.labels, tmp_path / "truth.nii.gz")
    assert (
        main(
            [
                "segment",
                str(tmp_path / "image.nii.gz"),
                "--out",
                str(tmp_path / "pred.nii.gz"),
                "--model",
                str(segmenter.folder),
            ]
        )
        == 0
    )
    assert main(["evaluate", str(tmp_path / "pred.nii.gz"), str(tmp_path / "truth.nii.gz")]) == 0
    out = capsys.readouterr().out
    assert "L5-S1" in out and "mean" in out
    mean_dice = float(out.strip().splitlines()[-1].split()[1])
    assert mean_dice > 0.95


def test_pieces_at_the_same_height_are_one_disc():
    from discgeo.segmentation import merge_same_level

    parts = np.zeros((40, 40, 60), np.int32)
    parts[5:18, 5:35, 10:18] = 1  # left half of a disc
    parts[22:35, 5:35, 11:19] = 2  # right half, same height
    parts[5:35, 5:35, 40:48] = 3  # the next disc up
    merged = merge_same_level(parts, np.eye(4))
    assert len(np.unique(merged)) == 3  # background + two discs
    assert merged[10, 10, 12] == merged[30, 10, 15] != merged[10, 10, 44]


def _tilted_disc(shape, centre, tilt_deg, *, ap=36.0, lat=44.0, height=8.0):
    """Voxels (1 mm, RAS+) of an elliptic slab whose normal is tilted anteriorly by ``tilt_deg``, and
    each voxel's coordinate along the slab's own anterior axis."""
    r, a, s = np.meshgrid(*[np.arange(n) - c for n, c in zip(shape, centre, strict=True)], indexing="ij")
    t = np.radians(tilt_deg)
    along_normal = s * np.cos(t) + a * np.sin(t)
    along_front = a * np.cos(t) - s * np.sin(t)
    inside = ((along_front / (ap / 2)) ** 2 + (r / (lat / 2)) ** 2 <= 1) & (
        np.abs(along_normal) <= height / 2
    )
    return inside, along_front


def test_a_steep_disc_split_front_and_back_is_one_disc_and_neighbours_stay_apart():
    from discgeo.segmentation import merge_same_level

    shape = (50, 70, 110)
    parts = np.zeros(shape, np.int32)
    low, front = _tilted_disc(shape, (25, 35, 25), 40)  # L5-S1, steep, cut into front and back
    parts[low & (front >= 0)] = 1
    parts[low & (front < 0)] = 2
    parts[_tilted_disc(shape, (25, 38, 62), 25)[0]] = 3  # L4-L5 above it
    parts[_tilted_disc(shape, (25, 40, 98), 10)[0]] = 4  # L3-L4
    # along the superior axis the two pieces overlap by under half the thinner: the old rule kept two
    s = np.nonzero(parts)[2]
    (f0, f1), (b0, b1) = ((s[parts[parts > 0] == v].min(), s[parts[parts > 0] == v].max()) for v in (1, 2))
    assert min(f1, b1) - max(f0, b0) < 0.5 * min(f1 - f0, b1 - b0)
    merged = merge_same_level(parts, np.eye(4))
    assert merged[parts == 1].max() == merged[parts == 2].min()
    assert len(np.unique(merged[merged > 0])) == 3


def test_blobs_much_smaller_than_a_disc_do_not_shift_the_levels(segmenter):
    """Six bright blobs of ~14 % of a disc (over the absolute fragment limit, and numerous enough to pull
    the median of all components down) must be dropped, so L5-S1 stays the lowest disc."""
    case = make_case(12, 0, spacing=(1.0, 1.0, 1.0), full_coverage=True)
    labels = case.labels.canonical()
    discs = np.asarray(labels.array) > 200
    image = discs.astype(np.float32) * 900.0 + 100.0
    nx, ny, nz = image.shape
    corners = [
        (2, 2, 2),
        (2, ny - 10, 2),
        (nx - 10, 2, nz // 2),
        (nx - 10, ny - 10, nz // 3),
        (2, 2, nz - 10),
        (nx - 10, ny - 10, nz - 10),
    ]
    for x, y, z in corners:
        assert not discs[x : x + 8, y : y + 8, z : z + 8].any()
        image[x : x + 8, y : y + 8, z : z + 8] = 1000.0  # 512 mm3 blobs
    disc_sizes = np.bincount(np.asarray(labels.array)[discs])[201:]
    assert 0.2 * np.median(disc_sizes[disc_sizes > 0]) > 512
    predicted = segmenter.predict(Volume(image, labels.affine))
    truth = labels.with_array(np.where(discs, labels.array, 0))
    rows = dice_per_level(predicted, truth)
    assert [r["level"] for r in rows] == [d["level"] for d in case.truth["discs"]]
    assert min(r["dice"] for r in rows) > 0.9
    assert predicted.meta["dropped_fragments"] >= len(corners)


@pytest.mark.parametrize("anterior_mm, kept", [(35.0, False), (0.0, True)])
def test_smaller_components_off_the_disc_column_are_dropped(segmenter, anterior_mm, kept):
    """A component of ~35 % of a disc just below L5-S1 is a sacral or vascular fragment when it lies 35 mm
    in front of the disc column, and a partly seen disc when it lies on the column."""
    case = make_case(12, 0, spacing=(1.0, 1.0, 1.0), full_coverage=True)
    labels = case.labels.canonical()
    discs = np.asarray(labels.array) > 200
    image = discs.astype(np.float32) * 900.0 + 100.0
    lowest = np.argwhere(np.asarray(labels.array) == 201)
    x, y, _ = np.rint(lowest.mean(axis=0)).astype(int)
    z_blob = lowest[:, 2].min() - 16  # 1 mm voxels: 12 mm gap below the lowest disc
    y_blob = y + int(anterior_mm)
    block = (slice(x - 8, x + 8), slice(y_blob - 7, y_blob + 7), slice(z_blob - 3, z_blob + 3))
    assert image[block].size == 1344 and not discs[block].any()
    image[block] = 1000.0  # 16 x 14 x 6 = 1344 mm3
    disc_sizes = np.bincount(np.asarray(labels.array)[discs])[201:]
    assert 0.2 < 1344 / np.median(disc_sizes[disc_sizes > 0]) < 0.5
    predicted = segmenter.predict(Volume(image, labels.affine))
    found = len(np.unique(predicted.array)) - 1
    assert found == len(case.truth["discs"]) + (1 if kept else 0)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fast", "accurate"])
def test_shipped_segmenter_reproduces_its_recorded_real_case_figures(ivd_dir, mode):
    """The shipped model on real case-25 through the inference path gives the per-level Dice its
    metadata records (phantom-trained model, manual reference masks)."""
    from discgeo.config import Settings
    from discgeo.io import read_labels, read_volume

    shipped = Segmenter.from_artifact(Settings().artifact("segmenter"), mode=mode)
    metrics = shipped.metadata["metrics"]
    recorded = (metrics if mode == "fast" else metrics[f"{mode}_mode"])["real_t2_cases"]["case-25"]
    predicted = shipped.predict(read_volume(ivd_dir / "case-25.nii.gz"))
    rows = dice_per_level(predicted, read_labels(ivd_dir / "case-25_discs.nii.gz"))
    dice = {r["level"]: round(r["dice"], 3) for r in rows}
    assert dice == pytest.approx(recorded["dice_by_level"], abs=2e-3)
    assert min(r["dice"] for r in rows) > 0.88


def test_segmentation_metadata_travels_as_a_header_and_bad_headers_are_refused():
    from discgeo.errors import InvalidDataError
    from discgeo.segmentation import segmentation_header, with_segmentation_header

    labels = Volume(np.zeros((2, 3, 4), np.uint8), np.eye(4), meta={"segmenter": "x"})
    named = labels.with_array(
        labels.array, dropped_fragments=2, levels_from="sacrum", levels_uncertain=True, level_notes=["a 'b'"]
    )
    header = segmentation_header(named)
    assert header.isascii() and "\n" not in header and "segmenter" not in header
    back = with_segmentation_header(labels, header)
    assert back.meta["level_notes"] == ["a 'b'"] and back.meta["levels_uncertain"] is True
    assert back.meta["dropped_fragments"] == 2 and back.meta["segmenter"] == "x"
    assert with_segmentation_header(labels, None) is labels
    for bad in ("{not json", "[1, 2]"):
        with pytest.raises(InvalidDataError, match="X-Discgeo-Segmentation"):
            with_segmentation_header(labels, bad)


@pytest.mark.parametrize(
    ("variant", "named_from", "uncertain", "lowest"),
    [
        ({}, "sacrum", False, "L5-S1"),
        ({"lordosis_deg": 25.0, "scoliosis_deg": 12.0}, "sacrum", False, "L5-S1"),
        ({"view": "no-sacrum"}, "lowest body", True, "L4-L5"),
    ],
)
def test_a_model_of_the_vertebrae_names_levels_from_the_chain(
    anatomy_segmenter_artifact, variant, named_from, uncertain, lowest
):
    """The inference path of an anatomy model (exact stand-in: intensity bands): levels from the
    sacrum, or from the lowest body and flagged when the sacrum is out of view; every disc in view
    labelled with its true level."""
    from conftest import anatomy_image
    from discgeo.phantom import Variant
    from discgeo.segmentation import Segmenter

    case = make_case(77, 1, spacing=(3.0, 1.0, 1.0), n_discs=6, variant=Variant(**variant))
    segmenter = Segmenter.from_artifact(anatomy_segmenter_artifact)
    assert segmenter.anatomy
    predicted = segmenter.predict(anatomy_image(case))
    assert predicted.meta["levels_from"] == named_from and predicted.meta["levels_uncertain"] is uncertain
    truth = case.labels.array
    in_view = sorted(int(v) for v in np.unique(truth) if v > 200)
    assert levels.level_of_disc_label(in_view[0]) == lowest
    for value in in_view:  # each true disc's voxels carry its own label
        labelled = predicted.array[truth == value]
        assert np.mean(labelled == value) > 0.9, (value, np.unique(labelled, return_counts=True))


def test_segment_cli_says_how_the_levels_were_named(anatomy_segmenter_artifact, tmp_path, capsys):
    from conftest import anatomy_image
    from discgeo.phantom import Variant

    case = make_case(77, 2, spacing=(3.0, 1.0, 1.0), n_discs=6, variant=Variant(view="no-sacrum"))
    write_nifti(anatomy_image(case), tmp_path / "image.nii.gz")
    args = ["segment", str(tmp_path / "image.nii.gz"), "--out", str(tmp_path / "pred.nii.gz")]
    assert main([*args, "--model", str(anatomy_segmenter_artifact)]) == 0
    out = capsys.readouterr().out
    assert "levels from the lowest body (uncertain)" in out and "no sacrum in view" in out
