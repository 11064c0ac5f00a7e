"""Narrowing classifier, grouped cross-validation and bootstrap CIs on phantom truth features."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from discgeo.analysis import (
    FeatureTable,
    bootstrap_ci,
    compare_feature_sets,
    cross_validate,
    operating_threshold,
    paired_auc_differences,
    verdict,
)
from discgeo.classification import (
    DECREASING_FEATURES,
    RELATIVE_FEATURES,
    NarrowingClassifier,
    feature_sets,
    make_model,
    relative_features,
)
from discgeo.errors import ArtifactError, InvalidDataError, ModelMismatchError
from discgeo.geometry import REFERENCE_FEATURES
from discgeo.phantom import make_truth


@pytest.fixture(scope="module")
def table() -> FeatureTable:
    """Truth-derived features of 120 phantom patients; 'latents' are noisy shape summaries."""
    rng = np.random.default_rng(0)
    out = FeatureTable()
    for case in range(120):
        discs = make_truth(31, case)
        relative = relative_features([SimpleNamespace(**d) for d in discs])
        for d, rel in zip(discs, relative, strict=True):
            values = {
                **rel,
                "mean_height_mm": d["mean_height_mm"],
                "ap_width_mm": d["ap_width_mm"],
                "lateral_width_mm": d["lateral_width_mm"],
                "pca_sagittal_angle_deg": d["sagittal_angle_deg"],
                "pca_axial_angle_deg": d["axial_angle_deg"],
                "pca_frontal_angle_deg": d["frontal_angle_deg"],
                "latent_0": d["height_to_width_ratio"] + rng.normal(0, 0.02),
                "latent_1": d["wedge_angle_deg"] + rng.normal(0, 1),
                "latent_2": d["volume_mm3"] / 1000 + rng.normal(0, 1),
                "latent_3": rng.normal(),
            }
            out.add(f"p{case}", d["level"], d["narrowing"], values, 1.0)
    return out


def test_grouped_cv_never_splits_a_patient(table):
    p, labels = cross_validate(table, REFERENCE_FEATURES, model="logistic", folds=5)
    assert p.shape == (len(table),) and set(np.unique(labels)) <= {0, 1}
    assert p.min() > 0 and p.max() < 1


def test_feature_set_comparison_reports_cis(table):
    scores = compare_feature_sets(table, latent_dim=4, folds=5, bootstrap=200, models=("boosting",))
    by = {s.feature_set: s for s in scores}
    assert set(by) == {"latent", "geometric", "combined", "relative", "all"}
    for s in scores:
        estimate, low, high = s.auc
        assert low <= estimate <= high and high - low < 0.3
        # the operating point: specificity near 0.95 on unseen patients (thresholds from training folds)
        assert 0.88 < s.specificity[0] < 0.99
    # the grade is defined against the adjacent discs and the level: the relative features carry it
    # better than absolute geometry, whose level-to-level and patient-to-patient variation hides it
    assert by["relative"].auc[0] > 0.8 and by["relative"].auc[0] > by["geometric"].auc[0]
    y, groups = table.y, np.asarray(table.patients)
    diffs = paired_auc_differences(
        y,
        {"relative": by["relative"].probabilities, "geometric": by["geometric"].probabilities},
        groups,
        n=200,
    )
    estimate, low, high = diffs[0]["difference"]
    assert diffs[0]["a"] == "relative" and low <= estimate <= high and estimate > 0
    assert verdict(diffs)[0].startswith("relative")


def test_relative_features_compare_with_the_patient_and_the_level():
    from discgeo import reference

    levels = ["L5-S1", "L4-L5", "L3-L4"]
    heights = [reference.expected("mean_height_mm", lv) * 1.1 for lv in levels]
    heights[1] *= 0.6
    discs = [
        SimpleNamespace(level=lv, mean_height_mm=h, height_to_width_ratio=0.2)
        for lv, h in zip(levels, heights, strict=True)
    ]
    rel = relative_features(discs)
    assert [r["level_index"] for r in rel] == [0.0, 1.0, 2.0]
    assert rel[1]["height_vs_adjacent"] == pytest.approx(0.6) and rel[1]["height_vs_level"] == pytest.approx(
        0.66
    )
    assert rel[0]["height_vs_adjacent"] == pytest.approx(1 / 0.6)  # its only neighbour is the thin one
    assert rel[0]["height_vs_patient"] == pytest.approx(1.0)
    assert set(rel[0]) == set(RELATIVE_FEATURES)


def test_operating_threshold_holds_the_specificity():
    rng = np.random.default_rng(1)
    y = np.array([0] * 900 + [1] * 100)
    p = np.where(y == 1, rng.uniform(0.3, 1, y.size), rng.uniform(0, 0.7, y.size))
    threshold = operating_threshold(y, p)
    assert np.mean(p[y == 0] < threshold) >= 0.95 and np.mean(p[y == 0] < threshold - 1e-3) < 0.95


def test_bootstrap_ci_is_patient_level():
    y = np.array([0, 1] * 50)
    p = np.where(y == 1, 0.9, 0.1)
    ci = bootstrap_ci(y, p, (p > 0.5).astype(int), np.repeat(np.arange(50), 2), n=100)
    assert ci["auc"] == (1.0, 1.0, 1.0) and ci["f1"][0] == 1.0


def test_classifier_roundtrip_and_input_errors(table, tmp_path):
    names = feature_sets(4)["combined"]
    model = make_model("boosting").fit(table.matrix(names), table.y)
    clf = NarrowingClassifier(model, names, threshold=0.2, metadata={"version": "test-1"})
    clf.save(tmp_path / "clf")
    loaded = NarrowingClassifier.from_artifact(tmp_path / "clf")
    x = table.matrix(names)[:20]
    assert np.allclose(loaded.predict_proba(x), clf.predict_proba(x))
    rows = [dict(zip(names, row, strict=True)) for row in x]
    p, labels = loaded.predict(rows)
    assert np.allclose(p, clf.predict_proba(x)) and np.array_equal(labels, (p >= 0.2).astype(int))
    assert loaded.version == "test-1" and loaded.features == names
    with pytest.raises(InvalidDataError, match="missing feature"):
        loaded.predict([{"latent_0": 1.0}])
    with pytest.raises(InvalidDataError, match="NaN"):
        loaded.predict(np.full((1, len(names)), np.nan))
    with pytest.raises(InvalidDataError, match=r"\[N, 10\]"):
        loaded.predict(np.zeros((1, 3)))
    assert loaded.encoder_version is None  # no encoder recorded: nothing to check
    loaded.check_encoder("any")
    (tmp_path / "clf" / "classifier.skops").write_bytes(b"tampered")
    with pytest.raises(ArtifactError, match="sha256"):
        NarrowingClassifier.from_artifact(tmp_path / "clf")


def test_classifier_refuses_latents_of_another_encoder(table):
    names = feature_sets(4)
    x = table.matrix(names["combined"])
    combined = NarrowingClassifier(
        make_model("logistic").fit(x, table.y), names["combined"], metadata={"encoder_version": "b4-e21"}
    )
    assert combined.encoder_version == "b4-e21"
    combined.check_encoder("b4-e21")
    combined.check_encoder(None)  # version unknown (e.g. an older client): not refused
    expected = r"autoencoder b4-e90.*trained on autoencoder b4-e21"
    with pytest.raises(ModelMismatchError, match=expected) as info:
        combined.check_encoder("b4-e90")
    assert info.value.http_status == 409
    x = table.matrix(names["geometric"])
    geometric = NarrowingClassifier(
        make_model("logistic").fit(x, table.y), names["geometric"], metadata={"encoder_version": "b4-e21"}
    )
    geometric.check_encoder("b4-e90")  # no latent features: any encoder will do


def test_boosting_never_scores_a_relatively_thinner_disc_lower(table):
    """The monotone constraint: along each of DECREASING_FEATURES, with the others held at a real
    disc's values, the probability of narrowing never rises as the disc gets relatively taller;
    without the constraint the same model does rise somewhere on this grid (label noise)."""
    names = feature_sets(4)["relative"]
    x = table.matrix(names)
    rises = {}
    for constrained in (True, False):
        model = make_model("boosting", features=names if constrained else ()).fit(x, table.y)
        worst = 0.0
        for column, name in enumerate(names):
            if name not in DECREASING_FEATURES:
                continue
            grid = np.linspace(*np.percentile(x[:, column], [1, 99]), 60)
            for base in x[::25]:
                probe = np.repeat(base[None], grid.size, axis=0)
                probe[:, column] = grid
                worst = max(worst, float(np.diff(model.predict_proba(probe)[:, 1]).max()))
        rises[constrained] = worst
    assert rises[True] <= 1e-9 < rises[False], rises
