"""The reliability suite (``make reliability``) in the test suite: the real stack on loopback, the
generated malformed-input corpus through every entry point, 50 concurrent studies, stage and gateway
kills, and the PHI audit; every goal must hold."""

from __future__ import annotations

import pytest

from bench.corpus import corpus
from bench.reliability import SERVER_ERROR, markdown, run

pytestmark = pytest.mark.slow


def test_corpus_covers_every_family_with_forty_cases_or_more():
    cases = corpus([b""], ["a"])
    assert len(cases) >= 40 and len({c.name for c in cases}) == len(cases)
    families = {c.family for c in cases}
    assert families == {"dicom", "nifti", "labels", "zip", "npz", "json", "http"}
    assert {c.expect for c in cases} == {"refuse", "process", "either"}


def test_server_errors_are_counted_from_bentoml_access_lines():
    line = (
        "2026-12-02T19:01:45+0000 [INFO] [entry_service:discgeo-encoder:1] 127.0.0.1:48358 (scheme=http,"
        "method=POST,path=/encode_discs,type=multipart/form-data,length=3182) (status={},type=text/json,"
        "length=581) 780.933ms"
    )
    assert [bool(SERVER_ERROR.search(line.format(s))) for s in (200, 400, 500, 503)] == [0, 0, 1, 1]


def test_reliability_goals_hold(tmp_path):
    results = run(tmp_path / "work", progress=lambda text: None)
    failed = {name: goal["measured"] for name, goal in results["goals"].items() if not goal["ok"]}
    if failed:
        print("\n".join(results["traceback_excerpts"]))
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
