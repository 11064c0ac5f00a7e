"""The gateway's job store and ingest: deduplication by SOPInstanceUID, revisions for late instances,
completion rules (released + idle, or stable without a release), atomic claims, retries, dead letters,
the outbox, restart recovery, lost claims, retention, STOW-RS parsing and failure answers, no raw UID
stored. The store's tests run on both databases: SQLite and a real PostgreSQL server; several replicas
over one PostgreSQL database take each study and each outbox entry exactly once."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pydicom
import pytest

from discgeo.errors import ConfigurationError, InputError
from discgeo.gateway.ingest import (
    CANNOT_UNDERSTAND,
    NOT_MATCHING,
    Ingest,
    PartWriter,
    boundary_of,
    stow_store,
)
from discgeo.gateway.store import REPLICA_STALE_S, JobStore, load_secret
from discgeo.phantom import SeriesTags, write_dicom_series
from discgeo.volume import Volume


def _series(folder: Path, seed: str, n: int = 4) -> list[Path]:
    volume = Volume(np.random.default_rng(0).integers(0, 1000, (n, 8, 8)).astype(np.float32), np.eye(4))
    return write_dicom_series(volume, folder, tags=SeriesTags(uid_seed=seed))


@contextmanager
def _replicas(tmp_path: Path, database: str | None) -> Iterator[Callable[[], JobStore]]:
    """Opens stores (gateway replicas) on one data folder and, when given, one PostgreSQL database."""
    opened: list[JobStore] = []

    def open_store() -> JobStore:
        opened.append(
            JobStore(tmp_path / "data", load_secret(tmp_path / "data" / "secret"), database=database)
        )
        return opened[-1]

    try:
        yield open_store
    finally:
        for store in opened:
            store.close()


def _database(server: str) -> str:
    from discgeo.local import new_database

    return new_database(server, f"t{secrets.token_hex(6)}")


@pytest.fixture(params=["sqlite", "postgres"])
def replica(request, tmp_path) -> Iterator[Callable[[], JobStore]]:
    database = _database(request.getfixturevalue("postgres_server")) if request.param == "postgres" else None
    with _replicas(tmp_path, database) as open_store:
        yield open_store


@pytest.fixture()
def store(replica) -> JobStore:
    return replica()


def _restarted(store: JobStore, replica: Callable[[], JobStore]) -> JobStore:
    """The gateway process dies and a new one starts on the same data (and database)."""
    store.close()
    again = replica()
    if not again.db.exclusive:  # PostgreSQL: the dead replica's beat is REPLICA_STALE_S old by now
        again.sql("UPDATE replicas SET beat=beat-? WHERE id=?", (REPLICA_STALE_S + 1, store.replica))
    again.recover(max_attempts=2, startup=True)
    return again


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
    assert job["state"] == "receiving" and job["revision"] == 2 and store.claim_outbox() is None
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


def test_retries_dead_letters_and_recovery(tmp_path, store, replica):
    ingest = Ingest(store)
    for i, seed in enumerate(("t", "p")):
        ingest.accept(_series(tmp_path / f"r{i}", seed, n=1)[0].read_bytes())
    store.promote(idle_s=0.0, stable_s=0.0)
    transient, poison = store.claim(), store.claim()
    # a stage outage: queued again with a backoff, attempts not counted, until retry_s has passed
    assert store.retry_later(transient, "down", transient=True, retry_s=600, max_attempts=3) == "queued"
    job = store.job(transient.job_id)
    assert job["attempts"] == 0 and store.claim() is None  # backing off
    store.sql(
        "UPDATE studies SET not_before=0, first_transient=? WHERE key=?", (time.time() - 601, transient.key)
    )
    again = store.claim()
    assert store.retry_later(again, "down", transient=True, retry_s=600, max_attempts=3) == "dead"
    assert "down (for 60" in store.job(again.job_id)["error"]
    # an internal error: retried until max_attempts, then dead-lettered with its reason
    state = store.retry_later(poison, "internal error: X", transient=False, retry_s=600, max_attempts=2)
    assert state == "queued"
    store.sql("UPDATE studies SET not_before=0 WHERE key=?", (poison.key,))
    second = store.claim()
    assert second.attempt == 2
    # a timeout: the next try waits at least as long as the abandoned call may still run
    before = time.time()
    timed_out = "segmenter service did not answer within 900 s"
    kwargs = {"transient": False, "retry_s": 600, "max_attempts": 3}
    assert store.retry_later(second, timed_out, **kwargs, min_delay_s=900) == "queued"
    not_before = store.sql("SELECT not_before FROM studies WHERE key=?", (poison.key,))[0][0]
    assert not_before >= before + 900
    store.sql("UPDATE studies SET not_before=0 WHERE key=?", (poison.key,))
    third = store.claim()
    assert store.retry_later(third, timed_out, **kwargs, min_delay_s=900) == "dead"
    assert store.job(poison.job_id)["error"] == timed_out + " (after 3 attempts)"
    store.force(poison.job_id)
    store.sql("UPDATE studies SET not_before=0, attempts=1 WHERE key=?", (poison.key,))
    second = store.claim()
    assert second.attempt == 2
    # the gateway dies while processing: recovery dead-letters what was interrupted max_attempts times
    store = _restarted(store, replica)
    assert store.job(poison.job_id)["state"] == "dead" and "interrupted" in store.job(poison.job_id)["error"]
    assert store.force(poison.job_id) and store.job(poison.job_id)["state"] == "queued"


def test_outbox_until_the_pacs_accepts(tmp_path, store):
    ingest = Ingest(store)
    ingest.accept(_series(tmp_path / "o", "o", n=1)[0].read_bytes())
    store.promote(idle_s=0.0, stable_s=0.0)
    claim = store.claim()
    store.succeeded(claim, forward=True, warnings=[])
    assert store.job(claim.job_id)["state"] == "results_ready"
    assert store.claim_outbox() == (claim.key, 1, 0)
    assert store.claim_outbox() is None  # taken: not offered twice while it is being sent
    store.forward_failed(claim.key, 1, "PACS down")
    assert store.claim_outbox() is None  # backing off, not given up
    store.sql("UPDATE outbox SET not_before=0")
    assert store.claim_outbox() == (claim.key, 1, 1)
    store.forwarded(claim.key, 1)
    job = store.job(claim.job_id)
    assert job["state"] == "forwarded" and job["forward_state"] == "sent"


def test_a_lost_claim_is_queued_again_and_its_late_outcome_dropped(tmp_path, store):
    ingest = Ingest(store)
    ingest.accept(_series(tmp_path / "l", "l", n=1)[0].read_bytes())
    store.promote(idle_s=0.0, stable_s=0.0)
    first = store.claim()
    store.recover(max_attempts=3)
    assert store.job(first.job_id)["state"] == "processing"  # its replica beats, its lease holds
    store.sql("UPDATE studies SET lease_until=0")  # the worker hung past its lease
    store.recover(max_attempts=3)
    assert store.job(first.job_id)["state"] == "queued"
    second = store.claim()
    assert second.attempt == 2 and second.token != first.token
    assert not store.succeeded(first, forward=True, warnings=[])  # the hung worker comes back: dropped
    store.failed(first, "late")
    assert store.job(first.job_id)["state"] == "processing" and store.claim_outbox() is None
    assert store.succeeded(second, forward=False, warnings=[])
    assert store.job(first.job_id)["state"] == "done"


def test_sqlite_serves_one_process(tmp_path):
    with _replicas(tmp_path, None) as replica:
        replica()
        with pytest.raises(ConfigurationError, match="several replicas need PostgreSQL"):
            replica()


@pytest.fixture()
def replicas(tmp_path, postgres_server) -> Iterator[list[JobStore]]:
    """Two gateway replicas over one PostgreSQL database and one data folder."""
    with _replicas(tmp_path, _database(postgres_server)) as replica:
        yield [replica(), replica()]


def test_replicas_ingest_idempotently_and_take_each_study_once(tmp_path, replicas):
    ingests = [Ingest(store) for store in replicas]
    studies = [_series(tmp_path / f"s{i}", f"rep{i}", n=6) for i in range(8)]
    # every instance sent to both replicas at once: each stored once, one study each
    answers: list = []

    def send(ingest: Ingest, files: list[Path]) -> None:
        answers.extend(ingest.accept(f.read_bytes()) for f in files)

    threads = [threading.Thread(target=send, args=(ingest, files)) for files in studies for ingest in ingests]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(answers) == 2 * 8 * 6 and all(a.ok for a in answers)
    assert sum(a.new for a in answers) == 8 * 6  # the other copy: "already stored"
    assert replicas[0].counts() == {"receiving": 8}
    assert all(replicas[1].job(j["job_id"])["instances"] == 6 for j in replicas[0].jobs())
    # both promote (their schedulers run at once); 8 workers over both replicas claim concurrently
    promoted = [replicas[0].promote(0.0, 0.0), replicas[1].promote(0.0, 0.0)]
    assert sorted(promoted[0] + promoted[1]) == sorted(j["job_id"] for j in replicas[0].jobs())
    claims: list = []

    def work(store: JobStore) -> None:
        while (claim := store.claim()) is not None:
            claims.append(claim)
            time.sleep(0.01)
            assert store.succeeded(claim, forward=True, warnings=[])

    threads = [threading.Thread(target=work, args=(replicas[i % 2],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(claims) == 8 and len({c.key for c in claims}) == 8
    assert replicas[1].counts() == {"results_ready": 8}
    # both schedulers drain the outbox at once: each result sent by one of them
    sent: list = []

    def forward(store: JobStore) -> None:
        while (taken := store.claim_outbox()) is not None:
            sent.append(taken)
            store.forwarded(taken[0], taken[1])

    threads = [threading.Thread(target=forward, args=(store,)) for store in replicas for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(sent) == 8 and len(set(sent)) == 8 and replicas[0].counts() == {"forwarded": 8}


def test_a_replica_that_stops_loses_its_claims_to_the_others(tmp_path, replicas):
    alive, dying = replicas
    Ingest(dying).accept(_series(tmp_path / "d", "dying", n=1)[0].read_bytes())
    dying.promote(0.0, 0.0)
    claim = dying.claim()
    alive.recover(max_attempts=3, startup=True)  # a replica starting next to a live one takes nothing
    assert alive.job(claim.job_id)["state"] == "processing"
    dying.close()  # the process is killed: its beat stops
    alive.sql("UPDATE replicas SET beat=beat-? WHERE id=?", (REPLICA_STALE_S + 1, dying.replica))
    alive.beat()
    alive.recover(max_attempts=3)
    assert alive.job(claim.job_id)["state"] == "queued"
    taken = alive.claim()
    assert taken.key == claim.key and taken.attempt == 2
    assert alive.succeeded(taken, forward=False, warnings=[])


def test_no_raw_uid_on_disk_and_retention(tmp_path, store):
    ingest = Ingest(store)
    files = _series(tmp_path / "u", "u")
    for f in files:
        ingest.accept(f.read_bytes())
    ds = pydicom.dcmread(files[0])
    uids = (str(ds.StudyInstanceUID), str(ds.SOPInstanceUID))
    stored = repr([store.sql(f"SELECT * FROM {t}") for t in ("studies", "instances", "outbox", "replicas")])
    assert not any(uid in stored for uid in uids)
    if store.db.exclusive:  # SQLite: not in the database file either (its free pages included)
        store.db.db.execute("PRAGMA wal_checkpoint(FULL)")  # outside a transaction
        database = b"".join(p.read_bytes() for p in store.data_dir.glob("jobs.sqlite*"))
        assert not any(uid.encode() in database for uid in uids)
    assert not any(str(ds.StudyInstanceUID) in str(p) for p in store.data_dir.rglob("*"))
    job_id = store.job_of_study(str(ds.StudyInstanceUID))
    assert len(job_id) == 16 and job_id != store.hashed(str(ds.StudyInstanceUID))[:16]
    store.promote(idle_s=0.0, stable_s=0.0)
    store.succeeded(store.claim(), forward=False, warnings=[])
    assert store.expire(retention_days=1) == 0
    store.sql("UPDATE studies SET updated=?", (time.time() - 2 * 86400,))
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
