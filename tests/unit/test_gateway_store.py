"""The gateway's job store: idempotent ingest, completion rules, restart survival, STOW-RS parsing."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

from discgeo.errors import InputError
from discgeo.gateway import JobStore, parse_multipart_related, stow_response
from discgeo.io.dicom import write_dicom_series
from discgeo.volume import Volume


@pytest.fixture()
def series(tmp_path):
    volume = Volume(np.random.default_rng(0).integers(0, 1000, (4, 8, 8)).astype(np.float32), np.eye(4))
    return [pydicom.dcmread(f) for f in write_dicom_series(volume, tmp_path / "series")]


def test_ingest_completion_and_idempotency(tmp_path, series):
    store = JobStore(tmp_path / "data")
    keys = {store.add(ds) for ds in series}
    assert len(keys) == 1
    key = keys.pop()
    store.add(series[0])  # the same instance again: stored once
    assert store.job(key)["instances"] == 4 and store.job(key)["state"] == "receiving"
    assert store.promote_idle(0.0) == []  # not released yet
    store.release([key])
    assert store.promote_idle(60.0) == []  # released, but not idle long enough
    assert store.promote_idle(0.0) == [key]
    assert store.claim() == key and store.job(key)["state"] == "processing"
    store.finish(key)
    store.add(series[1])  # the same study sent again after processing: ignored
    assert store.job(key)["state"] == "done" and store.job(key)["instances"] == 4
    assert store.force(key) and store.claim() == key and store.job(key)["attempts"] == 2


def test_processing_jobs_survive_a_restart(tmp_path, series):
    store = JobStore(tmp_path / "data")
    key = next(store.add(ds) for ds in series[:1])
    for ds in series[1:]:
        store.add(ds)
    store.release([key])
    store.promote_idle(0.0)
    assert store.claim() == key
    reopened = JobStore(tmp_path / "data")  # as after a crash
    assert reopened.job(key)["state"] == "queued" and len(reopened.files(key)) == 4


def test_job_table_has_no_raw_uids(tmp_path, series):
    store = JobStore(tmp_path / "data")
    key = store.add(series[0])
    assert series[0].StudyInstanceUID not in str(store.jobs()) and len(key) == 10
    assert time.time() - store.job(key)["created"] < 60


def test_stow_multipart_parsing(series):
    boundary = "xyz"
    raw = [Path(ds.filename).read_bytes() for ds in series[:2]]
    body = (
        b"".join(b"--xyz\r\nContent-Type: application/dicom\r\n\r\n" + r + b"\r\n" for r in raw)
        + b"--xyz--\r\n"
    )
    parts = parse_multipart_related(body, f'multipart/related; type="application/dicom"; boundary={boundary}')
    assert parts == raw
    with pytest.raises(InputError, match="multipart/related"):
        parse_multipart_related(body, "application/dicom")
    answer = stow_response(series[:2], 1)
    assert len(answer["00081199"]["Value"]) == 2 and answer["00081198"]["Value"][0]["00081197"]["Value"] == [
        0xC000
    ]
