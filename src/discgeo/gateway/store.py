"""The gateway's durable state: a SQLite job table, the spool of received instances, the outbox.

Study life cycle (``studies.state``)::

    receiving --(complete: released + idle_s, or stable_s without a release)--> queued
    queued --(claimed by a worker)--> processing
    processing --> done            (results written; no PACS to forward to)
               --> results_ready   (results written, waiting in the outbox) --> forwarded
               --> failed          (the input cannot be analysed: the reason is kept)
               --> queued          (a transient stage failure, retried with backoff until retry_s)
               --> dead            (max_attempts internal errors, timeouts or interruptions; or
                                    transient failures for longer than retry_s: dead letter)
    any state --(a new instance of the study)--> receiving, revision + 1

A study is identified by an HMAC of its StudyInstanceUID with the deployment secret (``key``) and
exposed only by a random ``job_id``; instances by an HMAC of their SOPInstanceUID. No raw UID is stored.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import random
import secrets
import shutil
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("discgeo.gateway")

TERMINAL = ("done", "forwarded", "failed", "dead")
RESULT_STATES = ("results_ready", "done", "forwarded")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS studies (
    key TEXT PRIMARY KEY,                 -- HMAC of the StudyInstanceUID
    job_id TEXT NOT NULL UNIQUE,          -- random public handle
    state TEXT NOT NULL,
    revision INTEGER NOT NULL DEFAULT 1,  -- + 1 for each new instance after the study was queued
    processed_revision INTEGER,           -- the revision whose results are in results/<key>
    released INTEGER NOT NULL DEFAULT 0,  -- the sender finished (association released, request done)
    instances INTEGER NOT NULL DEFAULT 0,
    last_received REAL NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,  -- failed or interrupted attempts of this revision
    first_transient REAL,                 -- when transient stage failures of this revision began
    not_before REAL NOT NULL DEFAULT 0,   -- earliest next claim (backoff)
    error TEXT,
    warnings TEXT
);
CREATE TABLE IF NOT EXISTS instances (
    sop_key TEXT PRIMARY KEY,             -- HMAC of the SOPInstanceUID
    key TEXT NOT NULL REFERENCES studies(key),
    path TEXT NOT NULL,
    received REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_by_study ON instances(key);
CREATE TABLE IF NOT EXISTS outbox (
    key TEXT NOT NULL,
    revision INTEGER NOT NULL,
    state TEXT NOT NULL,                  -- pending | sent | superseded
    attempts INTEGER NOT NULL DEFAULT 0,
    not_before REAL NOT NULL DEFAULT 0,
    error TEXT,
    created REAL NOT NULL,
    sent REAL,
    PRIMARY KEY (key, revision)
);
"""


@dataclass(frozen=True)
class Claim:
    """A study taken by a worker: its key, job id, revision and attempt number."""

    key: str
    job_id: str
    revision: int
    attempt: int


def load_secret(path: Path) -> bytes:
    """The deployment secret (created, mode 0600, when the file does not exist yet)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(32) + "\n")
    secret = path.read_text().strip().encode()
    if len(secret) < 32:
        raise ValueError(f"the deployment secret in {path} is shorter than 32 characters")
    return secret


def fsync_write(path: Path, data: bytes | Path) -> None:
    """Write ``data`` (bytes, or a file to move) to ``path`` durably: a temporary file in the same
    folder, fsync, atomic rename, fsync of the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{secrets.token_hex(8)}"
    if isinstance(data, Path):
        os.replace(data, tmp)
        with tmp.open("rb+") as handle:
            os.fsync(handle.fileno())
    else:
        with tmp.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    os.replace(tmp, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


class JobStore:
    """Thread-safe job table, spool and outbox under ``data_dir``."""

    def __init__(self, data_dir: Path, secret: bytes) -> None:
        self.data_dir = data_dir
        self.spool = data_dir / "spool"
        self.results = data_dir / "results"
        self.incoming = data_dir / "incoming"
        for folder in (self.spool, self.results, self.incoming):
            folder.mkdir(parents=True, exist_ok=True)
        self.secret = secret
        self.lock = threading.RLock()
        self.db = sqlite3.connect(data_dir / "jobs.sqlite", check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(_SCHEMA)

    # ---------------------------------------------------------------------------------- identity
    def hashed(self, uid: str) -> str:
        """HMAC-SHA256 of a UID with the deployment secret (32 hex digits)."""
        return hmac.new(self.secret, uid.encode(), hashlib.sha256).hexdigest()[:32]

    def instance_path(self, key: str, sop_key: str) -> Path:
        return self.spool / key / f"{sop_key}.dcm"

    # ----------------------------------------------------------------------------------- ingest
    def has_instance(self, sop_key: str) -> bool:
        with self.lock:
            return (
                self.db.execute("SELECT 1 FROM instances WHERE sop_key=?", (sop_key,)).fetchone() is not None
            )

    def add_instance(self, key: str, sop_key: str, path: Path) -> bool:
        """Record an instance already written to ``path``; False when it was known. A new instance of a
        study that was already queued or finished bumps its revision and sends it back to receiving."""
        now = time.time()
        with self.lock:
            inserted = self.db.execute(
                "INSERT OR IGNORE INTO instances(sop_key, key, path, received) VALUES (?, ?, ?, ?)",
                (sop_key, key, str(path), now),
            ).rowcount
            if not inserted:
                return False
            row = self.db.execute(
                "SELECT state, job_id, revision FROM studies WHERE key=?", (key,)
            ).fetchone()
            if row is None:
                self.db.execute(
                    "INSERT INTO studies(key, job_id, state, instances, last_received, created, updated) "
                    "VALUES (?, ?, 'receiving', 1, ?, ?, ?)",
                    (key, secrets.token_urlsafe(12), now, now, now),
                )
                return True
            state, job_id, revision = row
            if state == "receiving":
                self.db.execute(
                    "UPDATE studies SET instances=instances+1, last_received=?, updated=?, released=0 "
                    "WHERE key=?",
                    (now, now, key),
                )
                return True
            # new data for a study already queued, in work or finished: a new revision
            self.db.execute(
                "UPDATE studies SET instances=instances+1, last_received=?, updated=?, released=0, "
                "revision=revision+1, attempts=0, first_transient=NULL, not_before=0, error=NULL, "
                "state=CASE WHEN state='processing' THEN 'processing' ELSE 'receiving' END WHERE key=?",
                (now, now, key),
            )
            self.db.execute("UPDATE outbox SET state='superseded' WHERE key=? AND state='pending'", (key,))
        log.info(
            "job %s: new instance after %s: revision %d, processed again once stable",
            job_id,
            state,
            revision + 1,
        )
        return True

    def release(self, keys: set[str]) -> None:
        """The sender finished cleanly with these studies (association released, request done)."""
        with self.lock:
            for key in keys:
                self.db.execute(
                    "UPDATE studies SET released=1 WHERE key=? AND state IN ('receiving', 'processing')",
                    (key,),
                )

    def promote(self, idle_s: float, stable_s: float) -> list[str]:
        """Queue complete studies: released and idle for ``idle_s``, or idle for ``stable_s`` without a
        release (an aborted association, a sender that died, a gateway restarted mid-association)."""
        now = time.time()
        with self.lock:
            rows = self.db.execute(
                "UPDATE studies SET state='queued', updated=? WHERE state='receiving' AND "
                "((released=1 AND last_received<=?) OR last_received<=?) RETURNING job_id, released",
                (now, now - idle_s, now - stable_s),
            ).fetchall()
        for job_id, released in rows:
            log.info(
                "job %s queued (%s)",
                job_id,
                "sender finished" if released else "stable, sender never finished",
            )
        return [r[0] for r in rows]

    # ----------------------------------------------------------------------------------- workers
    def recover(self, max_attempts: int) -> None:
        """After a restart: studies found processing were interrupted; queue them again, or dead-letter
        those interrupted ``max_attempts`` times (a study that kills the gateway must not loop)."""
        with self.lock:
            dead = self.db.execute(
                "UPDATE studies SET state='dead', error=? WHERE state='processing' AND attempts>=? "
                "RETURNING job_id",
                (f"interrupted {max_attempts} times while processing", max_attempts),
            ).fetchall()
            requeued = self.db.execute("UPDATE studies SET state='queued' WHERE state='processing'").rowcount
        if requeued or dead:
            log.warning(
                "restart: %d interrupted study(ies) queued again, %d dead-lettered", requeued, len(dead)
            )

    def claim(self) -> Claim | None:
        """Atomically take the oldest queued study whose backoff has passed."""
        now = time.time()
        with self.lock:
            row = self.db.execute(
                "UPDATE studies SET state='processing', attempts=attempts+1, updated=? WHERE key=("
                "SELECT key FROM studies WHERE state='queued' AND not_before<=? ORDER BY created LIMIT 1) "
                "RETURNING key, job_id, revision, attempts",
                (now, now),
            ).fetchone()
        return Claim(*row) if row else None

    def _current(self, claim: Claim) -> bool:
        row = self.db.execute("SELECT revision, state FROM studies WHERE key=?", (claim.key,)).fetchone()
        return row is not None and row[0] == claim.revision and row[1] == "processing"

    def _superseded(self, claim: Claim) -> bool:
        """New instances arrived while this revision was processed: back to receiving, no outcome."""
        if self._current(claim):
            return False
        self.db.execute(
            "UPDATE studies SET state='receiving', updated=? WHERE key=? AND state='processing'",
            (time.time(), claim.key),
        )
        log.info("job %s: revision %d superseded while processing", claim.job_id, claim.revision)
        return True

    def succeeded(self, claim: Claim, *, forward: bool, warnings: list[str]) -> None:
        now = time.time()
        with self.lock:
            if self._superseded(claim):
                return
            self.db.execute(
                "UPDATE studies SET state=?, processed_revision=?, error=NULL, warnings=?, updated=? "
                "WHERE key=?",
                (
                    "results_ready" if forward else "done",
                    claim.revision,
                    json.dumps(warnings),
                    now,
                    claim.key,
                ),
            )
            if forward:
                self.db.execute(
                    "INSERT OR REPLACE INTO outbox(key, revision, state, created) "
                    "VALUES (?, ?, 'pending', ?)",
                    (claim.key, claim.revision, now),
                )

    def failed(self, claim: Claim, reason: str) -> None:
        """The input cannot be analysed: no retry (``reprocess`` after fixing the cause)."""
        with self.lock:
            if not self._superseded(claim):
                self.db.execute(
                    "UPDATE studies SET state='failed', error=?, updated=? WHERE key=?",
                    (reason, time.time(), claim.key),
                )

    def retry_later(
        self,
        claim: Claim,
        reason: str,
        *,
        transient: bool,
        retry_s: float,
        max_attempts: int,
        min_delay_s: float = 0.0,
    ) -> str:
        """A transient stage failure (retried with backoff until ``retry_s`` has passed since the first)
        or an internal error or timeout (retried until ``max_attempts``, not before ``min_delay_s``:
        a timed-out service may still be busy with the abandoned call); returns the new state."""
        now = time.time()
        with self.lock:
            if self._superseded(claim):
                return "receiving"
            first = self.db.execute(
                "SELECT first_transient FROM studies WHERE key=?", (claim.key,)
            ).fetchone()[0]
            if transient:
                first = first or now
                dead = now - first > retry_s
                attempts_sql = "attempts=attempts-1"  # waiting for a service is not the study's fault
                delay = min(60.0, max(2.0, (now - first) / 2))  # 2 s, then about half the outage so far
            else:
                dead = claim.attempt >= max_attempts
                attempts_sql = "attempts=attempts"
                delay = min(300.0, 10.0 * 2.0 ** (claim.attempt - 1))
            state = "dead" if dead else "queued"
            error = (
                f"{reason} (for {now - first:.0f} s)"
                if dead and transient
                else f"{reason} (after {claim.attempt} attempts)"
                if dead
                else reason
            )
            self.db.execute(
                f"UPDATE studies SET state=?, error=?, {attempts_sql}, first_transient=?, not_before=?, "
                "updated=? WHERE key=?",
                (
                    state,
                    error,
                    first if transient else None,
                    now + max(min_delay_s, delay * random.uniform(0.75, 1.25)),
                    now,
                    claim.key,
                ),
            )
        return state

    def files(self, key: str) -> list[Path]:
        with self.lock:
            return [Path(r[0]) for r in self.db.execute("SELECT path FROM instances WHERE key=?", (key,))]

    def results_dir(self, key: str, revision: int) -> Path:
        return self.results / key / f"r{revision}"

    # ------------------------------------------------------------------------------------ outbox
    def pending_outbox(self) -> list[tuple[str, int, int]]:
        """(key, revision, attempts) of results waiting to be forwarded whose backoff has passed."""
        with self.lock:
            return [
                (r[0], int(r[1]), int(r[2]))
                for r in self.db.execute(
                    "SELECT key, revision, attempts FROM outbox WHERE state='pending' AND not_before<=? "
                    "ORDER BY created",
                    (time.time(),),
                )
            ]

    def forwarded(self, key: str, revision: int) -> None:
        now = time.time()
        with self.lock:
            self.db.execute(
                "UPDATE outbox SET state='sent', sent=?, error=NULL WHERE key=? AND revision=?",
                (now, key, revision),
            )
            self.db.execute(
                "UPDATE studies SET state='forwarded', updated=? WHERE key=? AND revision=? "
                "AND state='results_ready'",
                (now, key, revision),
            )

    def forward_failed(self, key: str, revision: int, error: str) -> None:
        """The PACS did not take the results: try again later (backoff up to 5 minutes), forever."""
        with self.lock:
            attempts = self.db.execute(
                "UPDATE outbox SET attempts=attempts+1, error=? WHERE key=? AND revision=? "
                "RETURNING attempts",
                (error, key, revision),
            ).fetchone()
            delay = min(300.0, 2.0 ** min(int(attempts[0]) if attempts else 1, 9))
            self.db.execute(
                "UPDATE outbox SET not_before=? WHERE key=? AND revision=?",
                (time.time() + delay * random.uniform(0.75, 1.25), key, revision),
            )

    # ------------------------------------------------------------------------------------- views
    def job_of_study(self, study_uid: str) -> str | None:
        """The job id of a study, looked up by the HMAC of its StudyInstanceUID."""
        with self.lock:
            row = self.db.execute(
                "SELECT job_id FROM studies WHERE key=?", (self.hashed(study_uid),)
            ).fetchone()
        return str(row[0]) if row else None

    def key_of(self, job_id: str) -> str | None:
        with self.lock:
            row = self.db.execute("SELECT key FROM studies WHERE job_id=?", (job_id,)).fetchone()
        return str(row[0]) if row else None

    def job(self, job_id: str) -> dict[str, Any] | None:
        with self.lock:
            cursor = self.db.execute(
                "SELECT s.job_id, s.state, s.revision, s.processed_revision, s.instances, s.attempts, "
                "s.error, s.warnings, s.created, s.updated, s.key, o.state AS forward_state, "
                "o.attempts AS forward_attempts, o.error AS forward_error "
                "FROM studies s LEFT JOIN outbox o ON o.key=s.key AND o.revision=s.processed_revision "
                "WHERE s.job_id=?",
                (job_id,),
            )
            row = cursor.fetchone()
            if row is None:
                return None
            names = [d[0] for d in cursor.description]
        job = dict(zip(names, row, strict=True))
        key = job.pop("key")
        job["warnings"] = json.loads(job["warnings"]) if job["warnings"] else []
        revision = job["processed_revision"]
        folder = self.results_dir(key, revision) if revision else None
        job["files"] = sorted(p.name for p in folder.iterdir()) if folder and folder.is_dir() else []
        return job

    def jobs(self, limit: int = 500) -> list[dict[str, Any]]:
        with self.lock:
            ids = [
                r[0]
                for r in self.db.execute("SELECT job_id FROM studies ORDER BY created DESC LIMIT ?", (limit,))
            ]
        return [j for j in (self.job(i) for i in ids) if j]

    def counts(self) -> dict[str, int]:
        with self.lock:
            return {
                str(s): int(n)
                for s, n in self.db.execute("SELECT state, COUNT(*) FROM studies GROUP BY state")
            }

    def queue_depth(self) -> int:
        counts = self.counts()
        return sum(counts.get(s, 0) for s in ("receiving", "queued", "processing"))

    def force(self, job_id: str) -> bool:
        """Process a finished study again (same revision: a PACS receives the same SEG and SR UIDs)."""
        with self.lock:
            return bool(
                self.db.execute(
                    "UPDATE studies SET state='queued', error=NULL, attempts=0, first_transient=NULL, "
                    "not_before=0, updated=? WHERE job_id=? AND state IN "
                    "('done', 'forwarded', 'results_ready', 'failed', 'dead')",
                    (time.time(), job_id),
                ).rowcount
            )

    def expire(self, retention_days: float) -> int:
        """Delete the spool, results and rows of studies finished more than ``retention_days`` ago."""
        limit = time.time() - retention_days * 86400
        with self.lock:
            keys = [
                r[0]
                for r in self.db.execute(
                    f"SELECT key FROM studies WHERE state IN {TERMINAL} AND updated<?", (limit,)
                )
            ]
            for key in keys:
                for table in ("instances", "outbox", "studies"):
                    self.db.execute(f"DELETE FROM {table} WHERE key=?", (key,))
        for key in keys:
            shutil.rmtree(self.spool / key, ignore_errors=True)
            shutil.rmtree(self.results / key, ignore_errors=True)
        if keys:
            log.info("retention: removed %d finished study(ies)", len(keys))
        return len(keys)
