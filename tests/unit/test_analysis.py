"""Cohort analysis with the shipped encoder: phantom cohort report, SPIDER gradings end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest

from discgeo.analysis import analyze, spider_features, spider_targets, traversal_latents
from discgeo.cli import main
from discgeo.config import Settings
from discgeo.encoding import Encoder
from discgeo.geometry import REFERENCE_FEATURES
from discgeo.phantom import generate_cohort


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    return Encoder.from_artifact(Settings.from_env().artifact("autoencoder"))


def test_spider_gradings_are_read_per_level(spider_dir):
    targets = spider_targets(spider_dir)
    assert list(targets) == ["1_t1"]
    assert targets["1_t1"] == {
        "L5-S1": 0,
        "L4-L5": 0,
        "L3-L4": 0,
        "L2-L3": 0,
        "L1-L2": 0,
        "T12-L1": 0,
        "T11-T12": 1,
    }


def test_spider_end_to_end_features(spider_dir, encoder):
    table = spider_features(spider_dir, encoder)
    assert table.levels == ["L5-S1", "L4-L5", "L3-L4", "L2-L3", "L1-L2", "T12-L1", "T11-T12"]
    assert table.target == [0, 0, 0, 0, 0, 0, 1]  # IVD label 7 (mask label 207) is the narrowed one
    assert set(table.patients) == {"1"}
    x = table.matrix([*REFERENCE_FEATURES, *(f"latent_{i}" for i in range(encoder.latent_dim))])
    assert x.shape == (7, 6 + encoder.latent_dim) and np.all(np.isfinite(x))
    # the narrowed T11-T12 disc is the thinnest of the seven
    heights = table.features["mean_height_mm"]
    assert heights[-1] == min(heights)


def test_traversal_latents_span_the_5th_to_95th_percentile():
    z = np.random.default_rng(0).normal(size=(200, 4))
    grid = traversal_latents(z, steps=5)
    assert grid.shape == (4, 5, 4)
    lo, hi = np.percentile(z, [5, 95], axis=0)
    median = np.median(z, axis=0)
    for i in range(4):
        assert grid[i, 0, i] == pytest.approx(lo[i], abs=1e-5) and grid[i, -1, i] == pytest.approx(
            hi[i], abs=1e-5
        )
        others = [j for j in range(4) if j != i]
        assert np.allclose(grid[i][:, others], median[others])


@pytest.mark.slow
def test_analyze_phantom_cohort_writes_report(tmp_path, encoder):
    generate_cohort(tmp_path / "cohort", cases=14, seed=77, fmt="nifti")
    summary = analyze(tmp_path / "cohort", tmp_path / "report", encoder, bootstrap=100)
    assert summary["patients"] == 14 and summary["discs"] >= 70
    assert len(summary["results"]) == 10  # five feature sets, two models
    pairs = {(d["a"], d["b"]) for d in summary["auc_differences"]["boosting"]}
    assert len(pairs) == 10 and ("latent", "geometric") in pairs  # every pair, paired bootstrap
    for name in (
        "report.md",
        "roc.png",
        "correlations.png",
        "traversals.png",
        "features.csv",
        "results.json",
    ):
        assert (tmp_path / "report" / name).stat().st_size > 200
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| boosting | combined |" in report and "synthetic phantoms" in report
    corr = np.array(summary["correlations"]["spearman"])
    assert corr.shape == (encoder.latent_dim, 6) and np.all(np.abs(corr) <= 1)


def test_analyze_cli_on_spider_root(spider_dir, tmp_path, capsys):
    assert main(["analyze", str(spider_dir), "--out", str(tmp_path), "--quiet"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["kind"] == "spider" and results["discs"] == 7 and results["narrowed"] == 1
    assert "too few" in results["note"]
    assert (tmp_path / "traversals.png").is_file()
    assert "1 patients, 7 discs, 1 narrowed" in capsys.readouterr().out


@pytest.mark.slow
def test_disc_level_cv_leaks_what_patient_grouped_cv_does_not():
    """Narrowing drawn per patient (all its discs alike) and a feature that only identifies the
    patient: folds over discs learn a patient's label from its other discs (the reference study's
    protocol), folds over patients cannot."""
    from sklearn.metrics import roc_auc_score
    from threadpoolctl import threadpool_limits

    from discgeo.analysis import FeatureTable, cross_validate

    rng = np.random.default_rng(0)
    table = FeatureTable()
    for patient in range(120):
        fingerprint, narrowed = rng.normal(), int(rng.random() < 0.4)
        for level in range(7):
            table.add(f"p{patient}", str(level), narrowed, {"a": fingerprint + rng.normal(0, 0.01)}, 1.0)
    with threadpool_limits(limits=1, user_api="openmp"):  # small fits: thread start-up dominates
        grouped, _ = cross_validate(table, ("a",))
        by_disc, _ = cross_validate(table, ("a",), grouped=False)
    assert roc_auc_score(table.y, grouped) < 0.6  # measured 0.50: nothing to learn across patients
    assert roc_auc_score(table.y, by_disc) > 0.65  # measured 0.71: the leak
