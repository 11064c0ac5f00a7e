"""The shipped models on real healthy discs (Menezes-Reis et al. 2016: asymptomatic adults aged 20-40):
the figures the export commands recorded are what the models give now, and they meet their goals."""

from __future__ import annotations

import pytest

from discgeo import realdata
from discgeo.analysis import healthy_real_discs
from discgeo.classification import NarrowingClassifier
from discgeo.config import Settings
from discgeo.encoding import Encoder
from discgeo.io import read_volume
from discgeo.pipeline import LocalStages, analyse_study

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shipped() -> tuple[Encoder, NarrowingClassifier]:
    settings = Settings.from_env()
    encoder = Encoder.from_artifact(settings.artifact("autoencoder"))
    return encoder, NarrowingClassifier.from_artifact(settings.artifact("classifier"))


@pytest.fixture(scope="module")
def measured(shipped) -> dict:
    encoder, classifier = shipped
    held_out = encoder.metadata["training"]["data"]["held_out_real_subjects"]
    return healthy_real_discs(encoder, classifier, held_out=held_out)


def test_recorded_real_figures_are_reproduced(shipped, measured):
    encoder, classifier = shipped
    recorded = classifier.metadata["metrics"]["real_healthy_discs"]
    assert measured["all"] == recorded["all"]
    by_encoder = encoder.metadata["metrics"]["real_healthy_discs"]
    for part in ("all", "held_out"):
        assert measured[part]["discs"] == by_encoder[part]["discs"]
        assert measured[part]["mean_iou"] == pytest.approx(by_encoder[part]["mean_iou"], abs=1e-3)
        assert measured[part]["unusual_shape"] == by_encoder[part]["unusual_shape"]


def test_healthy_discs_are_rarely_called_narrowed(measured):
    every = measured["all"]
    assert every["discs"] == 145 and every["subjects"] == 29
    assert every["called_narrowed_share"] <= 0.10  # the goal overall (was 63 %)
    by_level = every["called_narrowed_by_level"]
    # every level but L5-S1 meets the goal of 10 %; L5-S1 calls 3 of 29 (10.3 %, was 5): the three
    # discs that the grading rule itself calls narrowed (discgeo.reference; ivd-14, -23, -29)
    assert max(v for level, v in by_level.items() if level != "L5-S1") <= 0.10
    assert by_level["L5-S1"] <= 3 / 29 + 1e-9


def test_unusual_shape_flags_only_outliers(shipped, measured):
    encoder, _ = shipped
    rule = encoder.metadata["unusual_shape"]
    assert rule["held_out_real_discs"] == 40 and "Tukey" in rule["rule"]
    # the fence of the held-out real distribution flags a handful of healthy discs, not most of them
    assert measured["all"]["unusual_shape"] <= 0.1 * measured["all"]["discs"]


def test_real_t2_cases_through_the_pipeline(shipped):
    """No disc called narrowed in these healthy subjects (the highest probability of the 15 is 0.12,
    against the threshold 0.25)."""
    encoder, classifier = shipped
    stages = LocalStages(encoder=encoder, classifier=classifier)
    called = {}
    for case in realdata.REAL_CASES:
        result, _ = analyse_study(read_volume(realdata.ivd_t2_dir() / f"{case}.nii.gz"), stages, study=case)
        assert len(result.discs) >= 5
        called[case] = [d.level for d in result.discs if d.narrowing]
    assert not any(called.values()), called
