"""The reliability suite (``make reliability``) in the test suite: the real stack on loopback, the
generated malformed-input corpus through every entry point, 50 concurrent studies, stage and gateway
kills, and the PHI audit; every goal must hold."""

from __future__ import annotations

import pytest
from bench.corpus import corpus
from bench.reliability import markdown, run

pytestmark = pytest.mark.slow


def test_corpus_covers_every_family_with_forty_cases_or_more():
    cases = corpus([b""], ["a"])
    assert len(cases) >= 40 and len({c.name for c in cases}) == len(cases)
    families = {c.family for c in cases}
    assert families == {"dicom", "nifti", "labels", "zip", "npz", "json", "http"}
    assert {c.expect for c in cases} == {"refuse", "process", "either"}


def test_reliability_goals_hold(tmp_path):
    results = run(tmp_path / "work", progress=lambda text: None)
    failed = {name: goal["measured"] for name, goal in results["goals"].items() if not goal["ok"]}
    assert not failed, failed
    records = [r for r in results["corpus"]["records"] if r["case"] != "(all)"]
    entries = {r["entry"] for r in records}
    assert entries >= {
        "stow",
        "c-store",
        "segment",
        "measure",
        "encode",
        "encode_discs",
        "predict",
        "discgeo run",
    }
    assert results["load"]["studies"] == 50 and results["load"]["forwarded_once"] == 50
    assert len(results["faults"]["stages"]["kills"]) == 4
    assert "| stow |" in markdown(results)
