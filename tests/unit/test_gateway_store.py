"""The gateway's job store and ingest: deduplication by SOPInstanceUID, revisions for late instances,
completion rules (released + idle, or stable without a release), atomic claims, retries, dead letters,
the outbox, restart recovery, retention, STOW-RS parsing and failure answers, no raw UID on disk."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

from discgeo.errors import InputError
from discgeo.gateway.ingest import (
    CANNOT_UNDERSTAND,
    NOT_MATCHING,
    Ingest,
    PartWriter,
    boundary_of,
    stow_store,
)
from discgeo.gateway.store import JobStore, load_secret
from discgeo.io.dicom import SeriesTags, write_dicom_series
from discgeo.volume import Volume


def _series(folder: Path, seed: str, n: int = 4) -> list[Path]:
    volume = Volume(np.random.default_rng(0).integers(0, 1000, (n, 8, 8)).astype(np.float32), np.eye(4))
    return write_dicom_series(volume, folder, tags=SeriesTags(uid_seed=seed))


@pytest.fixture()
def store(tmp_path) -> JobStore:
    return JobStore(tmp_path / "data", load_secret(tmp_path / "data" / "secret"))


def test_dedup_revisions_and_completion(tmp_path, store):
    ingest = Ingest(store)
    files = _series(tmp_path / "a", "a")
    got = [ingest.accept(f.read_bytes()) for f in files]
    assert all(r.ok and r.new for r in got) and len({r.key for r in got}) == 1
    key = got[0].key
    job_id = store.job_of_study(str(pydicom.dcmread(files[0]).StudyInstanceUID))
    assert ingest.accept(files[0].read_bytes()).reason == "already stored"  # same SOP: stored once
    assert store.job(job_id)["instances"] == 4 and store.job(job_id)["state"] == "receiving"
    assert store.promote(idle_s=0.0, stable_s=60.0) == []  # not released, not stable yet
    store.release({key})
    assert store.promote(idle_s=60.0, stable_s=60.0) == []  # released, not idle long enough
    assert store.promote(idle_s=0.0, stable_s=60.0) == [job_id]
    claim = store.claim()
    assert claim and claim.revision == 1 and store.claim() is None
    store.succeeded(claim, forward=False, warnings=["x"])
    assert store.job(job_id)["state"] == "done" and store.job(job_id)["warnings"] == ["x"]
    # a late series of the same study: stored, new revision, back to receiving (not dropped)
    late = _series(tmp_path / "late", "a-late")
    for f in late:
        ds = pydicom.dcmread(f)
        ds.StudyInstanceUID = pydicom.dcmread(files[0]).StudyInstanceUID
        ds.save_as(f)
        assert ingest.accept(f.read_bytes()).new
    job = store.job(job_id)
    assert job["state"] == "receiving" and job["revision"] == 2 and job["instances"] == 8
    assert store.promote(idle_s=0.0, stable_s=0.0) == [job_id]  # stable without a release
    assert store.claim().revision == 2


def test_instance_during_processing_supersedes_the_revision(tmp_path, store):
    ingest = Ingest(store)
    files = _series(tmp_path / "a", "b")
    for f in files[:3]:
        ingest.accept(f.read_bytes())
    store.promote(idle_s=0.0, stable_s=0.0)
    claim = store.claim()
    ingest.accept(files[3].read_bytes())  # arrives while revision 1 is being processed
    store.release({claim.key})  # ... and its sender finishes before revision 1 is done
    store.succeeded(claim, forward=True, warnings=[])
    job = store.job(claim.job_id)
    assert job["state"] == "receiving" and job["revision"] == 2 and store.pending_outbox() == []
    # the release was kept: the new revision completes after idle_s, it does not wait for stable_s
    assert store.promote(idle_s=0.0, stable_s=3600.0) == [claim.job_id]


def test_claims_are_atomic(tmp_path, store):
    ingest = Ingest(store)
    for i in range(6):
        ingest.accept(_series(tmp_path / f"s{i}", f"c{i}", n=1)[0].read_bytes())
    store.promote(idle_s=0.0, stable_s=0.0)
    claims: list = []
    threads = [threading.Thread(target=lambda: claims.append(store.claim())) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    taken = [c.key for c in claims if c]
    assert len(taken) == 6 and len(set(taken)) == 6


def test_retries_dead_letters_and_recovery(tmp_path, store):
    ingest = Ingest(store)
    for i, seed in enumerate(("t", "p")):
        ingest.accept(_series(tmp_path / f"r{i}", seed, n=1)[0].read_bytes())
    store.promote(idle_s=0.0, stable_s=0.0)
    transient, poison = store.claim(), store.claim()
    # a stage outage: queued again with a backoff, attempts not counted, until retry_s has passed
    assert store.retry_later(transient, "down", transient=True, retry_s=600, max_attempts=3) == "queued"
    job = store.job(transient.job_id)
    assert job["attempts"] == 0 and store.claim() is None  # backing off
    store.db.execute(
        "UPDATE studies SET not_before=0, first_transient=? WHERE key=?", (time.time() - 601, transient.key)
    )
    again = store.claim()
    assert store.retry_later(again, "down", transient=True, retry_s=600, max_attempts=3) == "dead"
    assert "down (for 60" in store.job(again.job_id)["error"]
    # an internal error: retried until max_attempts, then dead-lettered with its reason
    state = store.retry_later(poison, "internal error: X", transient=False, retry_s=600, max_attempts=2)
    assert state == "queued"
    store.db.execute("UPDATE studies SET not_before=0 WHERE key=?", (poison.key,))
    second = store.claim()
    assert second.attempt == 2
    # a timeout: the next try waits at least as long as the abandoned call may still run
    before = time.time()
    timed_out = "segmenter service did not answer within 900 s"
    kwargs = {"transient": False, "retry_s": 600, "max_attempts": 3}
    assert store.retry_later(second, timed_out, **kwargs, min_delay_s=900) == "queued"
    not_before = store.db.execute("SELECT not_before FROM studies WHERE key=?", (poison.key,)).fetchone()[0]
    assert not_before >= before + 900
    store.db.execute("UPDATE studies SET not_before=0 WHERE key=?", (poison.key,))
    third = store.claim()
    assert store.retry_later(third, timed_out, **kwargs, min_delay_s=900) == "dead"
    assert store.job(poison.job_id)["error"] == timed_out + " (after 3 attempts)"
    store.force(poison.job_id)
    store.db.execute("UPDATE studies SET not_before=0, attempts=1 WHERE key=?", (poison.key,))
    second = store.claim()
    assert second.attempt == 2
    # the gateway dies while processing: recovery dead-letters what was interrupted max_attempts times
    JobStore(store.data_dir, store.secret).recover(max_attempts=2)
    assert store.job(poison.job_id)["state"] == "dead" and "interrupted" in store.job(poison.job_id)["error"]
    assert store.force(poison.job_id) and store.job(poison.job_id)["state"] == "queued"


def test_outbox_until_the_pacs_accepts(tmp_path, store):
    ingest = Ingest(store)
    ingest.accept(_series(tmp_path / "o", "o", n=1)[0].read_bytes())
    store.promote(idle_s=0.0, stable_s=0.0)
    claim = store.claim()
    store.succeeded(claim, forward=True, warnings=[])
    assert store.job(claim.job_id)["state"] == "results_ready"
    assert store.pending_outbox() == [(claim.key, 1, 0)]
    store.forward_failed(claim.key, 1, "PACS down")
    assert store.pending_outbox() == []  # backing off, not given up
    store.db.execute("UPDATE outbox SET not_before=0")
    assert store.pending_outbox() == [(claim.key, 1, 1)]
    store.forwarded(claim.key, 1)
    job = store.job(claim.job_id)
    assert job["state"] == "forwarded" and job["forward_state"] == "sent"


def test_no_raw_uid_on_disk_and_retention(tmp_path, store):
    ingest = Ingest(store)
    files = _series(tmp_path / "u", "u")
    for f in files:
        ingest.accept(f.read_bytes())
    ds = pydicom.dcmread(files[0])
    store.db.execute("PRAGMA wal_checkpoint(FULL)")
    database = b"".join(p.read_bytes() for p in store.data_dir.glob("jobs.sqlite*"))
    assert (
        str(ds.StudyInstanceUID).encode() not in database and str(ds.SOPInstanceUID).encode() not in database
    )
    assert not any(str(ds.StudyInstanceUID) in str(p) for p in store.data_dir.rglob("*"))
    job_id = store.job_of_study(str(ds.StudyInstanceUID))
    assert len(job_id) == 16 and job_id != store.hashed(str(ds.StudyInstanceUID))[:16]
    store.promote(idle_s=0.0, stable_s=0.0)
    store.succeeded(store.claim(), forward=False, warnings=[])
    assert store.expire(retention_days=1) == 0
    store.db.execute("UPDATE studies SET updated=?", (time.time() - 2 * 86400,))
    assert store.expire(retention_days=1) == 1 and not any((store.spool).iterdir())


def test_refusals_carry_reasons(tmp_path, store):
    ingest = Ingest(store)
    files = _series(tmp_path / "m", "m", n=3)
    no_study = pydicom.dcmread(files[0])
    del no_study.StudyInstanceUID
    no_study.save_as(tmp_path / "no-study.dcm")
    bad_uid = pydicom.dcmread(files[1])
    bad_uid.SOPInstanceUID = "1.2.abc"
    bad_uid.save_as(tmp_path / "bad-uid.dcm")
    answers = {
        "no-study": ingest.accept((tmp_path / "no-study.dcm").read_bytes()),
        "bad-uid": ingest.accept((tmp_path / "bad-uid.dcm").read_bytes()),
        "not-dicom": ingest.accept(b"hello"),
        "truncated": ingest.accept(files[2].read_bytes()[:-100]),
        "no-pixels": ingest.accept(files[2].read_bytes()[:700]),
    }
    assert answers["no-study"].status == NOT_MATCHING and answers["no-study"].reason == "no StudyInstanceUID"
    assert answers["bad-uid"].status == NOT_MATCHING and "not a valid UID" in answers["bad-uid"].reason
    assert answers["not-dicom"].status == CANNOT_UNDERSTAND
    assert answers["truncated"].status == CANNOT_UNDERSTAND and "truncated" in answers["truncated"].reason
    assert answers["no-pixels"].status in (CANNOT_UNDERSTAND, NOT_MATCHING)
    assert store.counts() == {}  # nothing half-stored


def test_stow_streamed_parts_and_answer(tmp_path, store):
    files = _series(tmp_path / "s", "s", n=3)
    bad = pydicom.dcmread(files[2])
    del bad.SOPClassUID
    del bad.file_meta.MediaStorageSOPClassUID
    bad.save_as(files[2], enforce_file_format=False)
    boundary = boundary_of('multipart/related; type="application/dicom"; boundary=xyz')
    body = (
        b"".join(
            b"--xyz\r\nContent-Type: application/dicom\r\n\r\n" + f.read_bytes() + b"\r\n" for f in files
        )
        + b"--xyz\r\nContent-Type: text/plain\r\n\r\nhello\r\n--xyz--\r\n"
    )
    writer = PartWriter(boundary, store.incoming)
    for i in range(0, len(body), 1000):  # chunks split headers and boundaries anywhere
        writer.write(body[i : i + 1000])
    writer.close()
    assert [p.read_bytes() for p, _ in writer.parts[:2]] == [f.read_bytes() for f in files[:2]]
    status, answer = stow_store(Ingest(store), writer.parts)
    assert status == 202 and len(answer["00081199"]["Value"]) == 2
    failed = answer["00081198"]["Value"]
    assert [f["00081197"]["Value"][0] for f in failed] == [NOT_MATCHING, CANNOT_UNDERSTAND]
    assert failed[0]["00081155"]["Value"] == [str(bad.SOPInstanceUID)]
    assert failed[0]["00000902"]["Value"] == ["no SOPClassUID"]
    assert not any(store.incoming.iterdir())  # parts moved into the spool or removed
    with pytest.raises(InputError, match="multipart/related"):
        boundary_of("application/dicom")
