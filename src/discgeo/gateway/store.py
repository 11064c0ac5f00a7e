"""The gateway's durable state: the job table, the spool of received instances, the outbox.

Study life cycle (``studies.state``)::

    receiving --(complete: released + idle_s, or stable_s without a release)--> queued
    queued --(claimed by a worker)--> processing
    processing --> done            (results written; no PACS to forward to)
               --> results_ready   (results written, waiting in the outbox) --> forwarded
               --> failed          (the input cannot be analysed: the reason is kept)
               --> queued          (a transient stage failure, retried with backoff until retry_s;
                                    or the claim was lost: its replica stopped, its lease ran out)
               --> dead            (max_attempts internal errors, timeouts or interruptions; or
                                    transient failures for longer than retry_s: dead letter)
    any state --(a new instance of the study)--> receiving, revision + 1

A study is identified by an HMAC of its StudyInstanceUID with the deployment secret (``key``) and
exposed only by a random ``job_id``; instances by an HMAC of their SOPInstanceUID. No raw UID is stored.

Two databases hold the same tables with the same SQL:

* **SQLite** (default): ``jobs.sqlite`` in the data folder, for one gateway process (a laptop,
  ``make up``, a single-replica deployment). A lock file enforces the one process.
* **PostgreSQL** (``DISCGEO_GATEWAY_DATABASE=postgresql://...``): several gateway replicas over one
  database and one data folder on shared storage. Every change is one transaction; workers claim
  studies (and schedulers outbox entries) ``FOR UPDATE SKIP LOCKED``, so each is taken by exactly
  one of them; ingest is idempotent (``ON CONFLICT DO NOTHING`` on the instance).

Each gateway process is a *replica* with a random id that beats in the ``replicas`` table. A claim
records its replica, a random claim token and a lease (the study deadline plus a margin). A study
whose replica stopped beating for ``REPLICA_STALE_S``, or whose lease ran out, was interrupted: it is
queued again (or dead-lettered once interrupted ``max_attempts`` times). The claim token fences the
late outcome of a claim that was taken over: it is logged and dropped.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import logging
import os
import random
import secrets
import shutil
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from discgeo.errors import ConfigurationError

log = logging.getLogger("discgeo.gateway")

TERMINAL = ("done", "forwarded", "failed", "dead")
RESULT_STATES = ("results_ready", "done", "forwarded")
REPLICA_STALE_S = 30.0  # a replica that has not beaten for this long is gone
OUTBOX_LEASE_S = 300.0  # an outbox entry taken for sending is not offered again before this

_SCHEMA = """
CREATE TABLE IF NOT EXISTS studies (
    key TEXT PRIMARY KEY,                 -- HMAC of the StudyInstanceUID
    job_id TEXT NOT NULL UNIQUE,          -- random public handle
    state TEXT NOT NULL,
    revision INTEGER NOT NULL DEFAULT 1,  -- + 1 for each new instance after the study was queued
    processed_revision INTEGER,           -- the revision whose results are in results/<key>
    released INTEGER NOT NULL DEFAULT 0,  -- the sender finished (association released, request done)
    instances INTEGER NOT NULL DEFAULT 0,
    last_received DOUBLE PRECISION NOT NULL,
    created DOUBLE PRECISION NOT NULL,
    updated DOUBLE PRECISION NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,  -- failed or interrupted attempts of this revision
    first_transient DOUBLE PRECISION,     -- when transient stage failures of this revision began
    not_before DOUBLE PRECISION NOT NULL DEFAULT 0,  -- earliest next claim (backoff)
    error TEXT,
    warnings TEXT,
    owner TEXT,                           -- the replica holding the claim
    claim_token TEXT,                     -- the claim's token: a late outcome of a lost claim is dropped
    lease_until DOUBLE PRECISION          -- the claim is lost after this
);
CREATE INDEX IF NOT EXISTS studies_by_state ON studies(state, created);
CREATE TABLE IF NOT EXISTS instances (
    sop_key TEXT PRIMARY KEY,             -- HMAC of the SOPInstanceUID
    key TEXT NOT NULL,                    -- the study's key
    path TEXT NOT NULL,
    received DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_by_study ON instances(key);
CREATE TABLE IF NOT EXISTS outbox (
    key TEXT NOT NULL,
    revision INTEGER NOT NULL,
    state TEXT NOT NULL,                  -- pending | sent | superseded
    attempts INTEGER NOT NULL DEFAULT 0,
    not_before DOUBLE PRECISION NOT NULL DEFAULT 0,
    error TEXT,
    created DOUBLE PRECISION NOT NULL,
    sent DOUBLE PRECISION,
    PRIMARY KEY (key, revision)
);
CREATE TABLE IF NOT EXISTS replicas (
    id TEXT PRIMARY KEY,                  -- host name and a random suffix, new for each process
    started DOUBLE PRECISION NOT NULL,
    beat DOUBLE PRECISION NOT NULL
)
"""
# columns added since the first release (SQLite files created before them are migrated)
_ADDED_COLUMNS = (("owner", "TEXT"), ("claim_token", "TEXT"), ("lease_until", "DOUBLE PRECISION"))


@dataclass(frozen=True)
class Claim:
    """A study taken by a worker: its key, job id, revision, attempt number and claim token."""

    key: str
    job_id: str
    revision: int
    attempt: int
    token: str


class _Query(Protocol):
    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any: ...


class _SQLite:
    """One file, one process (an exclusive lock on ``jobs.lock``); threads are serialised."""

    exclusive = True
    locked = ""  # SQLite has one writer at a time: no row locks to take or skip
    skip_locked = ""

    def __init__(self, data_dir: Path) -> None:
        self._lock_file = (data_dir / "jobs.lock").open("a")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise ConfigurationError(
                f"another gateway process uses {data_dir}: the SQLite job store serves one process; "
                "several replicas need PostgreSQL (DISCGEO_GATEWAY_DATABASE)"
            ) from None
        self.lock = threading.RLock()
        self.db = sqlite3.connect(data_dir / "jobs.sqlite", check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(_SCHEMA)
        have = {row[1] for row in self.db.execute("PRAGMA table_info(studies)")}
        for name, kind in _ADDED_COLUMNS:
            if name not in have:
                self.db.execute(f"ALTER TABLE studies ADD COLUMN {name} {kind}")

    @contextmanager
    def transaction(self) -> Iterator[_Query]:
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    def close(self) -> None:
        self.db.close()
        self._lock_file.close()


class _PostgresQuery:
    """A psycopg cursor that takes the store's ``?`` placeholders."""

    def __init__(self, cursor: Any) -> None:
        self.cursor = cursor

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self.cursor.execute(sql.replace("?", "%s"), tuple(params))


class _Postgres:
    """A connection pool; each transaction on its own connection, rows locked where they change."""

    exclusive = False
    locked = " FOR UPDATE"
    skip_locked = " FOR UPDATE SKIP LOCKED"

    def __init__(self, url: str, connections: int) -> None:
        from psycopg.conninfo import conninfo_to_dict
        from psycopg_pool import ConnectionPool

        self.pool = ConnectionPool(
            url,
            min_size=1,
            max_size=max(2, connections),
            open=False,
            check=ConnectionPool.check_connection,  # a connection the server dropped is replaced
            name="discgeo-jobs",
        )
        try:
            self.pool.open(wait=True, timeout=30)
        except Exception as exc:  # the URL holds a password: name the server, never the URL
            self.pool.close()
            where = conninfo_to_dict(url)
            raise ConfigurationError(
                f"the gateway's PostgreSQL database {where.get('dbname', '?')} at "
                f"{where.get('host', 'localhost')}:{where.get('port', 5432)} did not answer within 30 s "
                f"({type(exc).__name__})"
            ) from None
        with self.transaction() as q:
            q.execute("SELECT pg_advisory_xact_lock(7301)")  # replicas starting at once: one creates
            for statement in _SCHEMA.split(";\n"):
                q.execute(statement)

    @contextmanager
    def transaction(self) -> Iterator[_Query]:
        with self.pool.connection() as conn, conn.cursor() as cursor:  # commit, or roll back on error
            yield _PostgresQuery(cursor)

    def close(self) -> None:
        self.pool.close()


def load_secret(path: Path) -> bytes:
    """The deployment secret (created, mode 0600, when the file does not exist yet; replicas starting
    at once on a shared folder agree on one)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".tmp-{secrets.token_hex(8)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(32) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(tmp, path)  # atomic, and never replaces a secret another process made first
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
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
    """Job table, spool and outbox under ``data_dir``, in SQLite (one process) or in the PostgreSQL
    ``database`` (several replicas sharing ``data_dir``). Safe for many threads; a claim held longer
    than ``lease_s`` is lost."""

    def __init__(
        self,
        data_dir: Path,
        secret: bytes,
        *,
        database: str | None = None,
        lease_s: float = 1830.0,
        connections: int = 8,
    ) -> None:
        self.data_dir = data_dir
        self.spool = data_dir / "spool"
        self.results = data_dir / "results"
        self.incoming = data_dir / "incoming"
        for folder in (self.spool, self.results, self.incoming):
            folder.mkdir(parents=True, exist_ok=True)
        self.secret = secret
        self.lease_s = lease_s
        self.replica = f"{socket.gethostname()[:48]}-{secrets.token_hex(4)}"
        self.db: _SQLite | _Postgres = _Postgres(database, connections) if database else _SQLite(data_dir)
        self.beat()

    def close(self) -> None:
        self.db.close()

    def sql(self, statement: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """One statement in its own transaction (for operators and tests); the rows it returns."""
        with self.db.transaction() as q:
            cursor = q.execute(statement, params)
            return [tuple(r) for r in cursor.fetchall()] if cursor.description else []

    # ---------------------------------------------------------------------------------- identity
    def hashed(self, uid: str) -> str:
        """HMAC-SHA256 of a UID with the deployment secret (32 hex digits)."""
        return hmac.new(self.secret, uid.encode(), hashlib.sha256).hexdigest()[:32]

    def instance_path(self, key: str, sop_key: str) -> Path:
        return self.spool / key / f"{sop_key}.dcm"

    def beat(self) -> None:
        """This replica is alive (the scheduler calls it every few seconds)."""
        now = time.time()
        with self.db.transaction() as q:
            q.execute(
                "INSERT INTO replicas(id, started, beat) VALUES (?, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET beat=excluded.beat",
                (self.replica, now, now),
            )

    # ----------------------------------------------------------------------------------- ingest
    def has_instance(self, sop_key: str) -> bool:
        with self.db.transaction() as q:
            return q.execute("SELECT 1 FROM instances WHERE sop_key=?", (sop_key,)).fetchone() is not None

    def add_instance(self, key: str, sop_key: str, path: Path) -> bool:
        """Record an instance already written to ``path``; False when it was known. A new instance of a
        study that was already queued or finished bumps its revision and sends it back to receiving."""
        now = time.time()
        with self.db.transaction() as q:
            if (
                q.execute(
                    "INSERT INTO instances(sop_key, key, path, received) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (sop_key) DO NOTHING RETURNING sop_key",
                    (sop_key, key, str(path), now),
                ).fetchone()
                is None
            ):
                return False
            if q.execute(
                "INSERT INTO studies(key, job_id, state, instances, last_received, created, updated) "
                "VALUES (?, ?, 'receiving', 1, ?, ?, ?) ON CONFLICT (key) DO NOTHING RETURNING key",
                (key, secrets.token_urlsafe(12), now, now, now),
            ).fetchone():
                return True
            state, job_id, revision = q.execute(
                "SELECT state, job_id, revision FROM studies WHERE key=?" + self.db.locked, (key,)
            ).fetchone()
            if state == "receiving":
                q.execute(
                    "UPDATE studies SET instances=instances+1, last_received=?, updated=?, released=0 "
                    "WHERE key=?",
                    (now, now, key),
                )
                return True
            # new data for a study already queued, in work or finished: a new revision
            q.execute(
                "UPDATE studies SET instances=instances+1, last_received=?, updated=?, released=0, "
                "revision=revision+1, attempts=0, first_transient=NULL, not_before=0, error=NULL, "
                "state=CASE WHEN state='processing' THEN 'processing' ELSE 'receiving' END WHERE key=?",
                (now, now, key),
            )
            q.execute("UPDATE outbox SET state='superseded' WHERE key=? AND state='pending'", (key,))
        log.info(
            "job %s: new instance after %s: revision %d, processed again once stable",
            job_id,
            state,
            revision + 1,
        )
        return True

    def release(self, keys: set[str]) -> None:
        """The sender finished cleanly with these studies (association released, request done)."""
        with self.db.transaction() as q:
            for key in sorted(keys):  # one lock order for every replica
                q.execute(
                    "UPDATE studies SET released=1 WHERE key=? AND state IN ('receiving', 'processing')",
                    (key,),
                )

    def promote(self, idle_s: float, stable_s: float) -> list[str]:
        """Queue complete studies: released and idle for ``idle_s``, or idle for ``stable_s`` without a
        release (an aborted association, a sender that died, a gateway restarted mid-association)."""
        now = time.time()
        with self.db.transaction() as q:
            rows = q.execute(
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
    def recover(self, max_attempts: int, *, startup: bool = False) -> None:
        """Queue interrupted studies again, or dead-letter those interrupted ``max_attempts`` times (a
        study that kills the gateway must not loop). Interrupted: claimed by a replica that stopped
        beating ``REPLICA_STALE_S`` ago or whose lease ran out; at the ``startup`` of the one process
        of a SQLite store, every study found processing."""
        now = time.time()
        params: tuple[float, ...] = ()
        if startup and self.db.exclusive:
            lost = "state='processing'"
        else:
            lost = (
                "state='processing' AND (lease_until<? OR owner NOT IN "
                "(SELECT id FROM replicas WHERE beat>=?))"
            )
            params = (now, now - REPLICA_STALE_S)
        with self.db.transaction() as q:
            dead = q.execute(
                f"UPDATE studies SET state='dead', error=?, updated=? WHERE {lost} AND attempts>=? "
                "RETURNING job_id",
                (f"interrupted {max_attempts} times while processing", now, *params, max_attempts),
            ).fetchall()
            requeued = q.execute(
                f"UPDATE studies SET state='queued', updated=? WHERE {lost} RETURNING job_id", (now, *params)
            ).fetchall()
        if requeued or dead:
            log.warning(
                "%d interrupted study(ies) queued again, %d dead-lettered (%s)",
                len(requeued),
                len(dead),
                "restart" if startup else "replica gone or lease run out",
            )

    def claim(self) -> Claim | None:
        """Atomically take the oldest queued study whose backoff has passed (one taker among all
        workers of all replicas)."""
        now = time.time()
        token = secrets.token_hex(8)
        with self.db.transaction() as q:
            row = q.execute(
                "UPDATE studies SET state='processing', attempts=attempts+1, updated=?, owner=?, "
                "claim_token=?, lease_until=? WHERE key=(SELECT key FROM studies WHERE state='queued' "
                f"AND not_before<=? ORDER BY created LIMIT 1{self.db.skip_locked}) "
                "RETURNING key, job_id, revision, attempts",
                (now, self.replica, token, now + self.lease_s, now),
            ).fetchone()
        return Claim(str(row[0]), str(row[1]), int(row[2]), int(row[3]), token) if row else None

    def _owned(self, q: _Query, claim: Claim) -> bool:
        """Whether the outcome of ``claim`` is to be recorded: False when the claim was lost (taken
        over after its replica or lease was given up) or superseded (new instances arrived while this
        revision was processed: back to receiving, no outcome)."""
        row = q.execute(
            f"SELECT revision, claim_token FROM studies WHERE key=? AND state='processing'{self.db.locked}",
            (claim.key,),
        ).fetchone()
        if row is None or row[1] != claim.token:
            log.warning("job %s: the claim was taken over; this outcome is dropped", claim.job_id)
            return False
        if row[0] == claim.revision:
            return True
        q.execute("UPDATE studies SET state='receiving', updated=? WHERE key=?", (time.time(), claim.key))
        log.info("job %s: revision %d superseded while processing", claim.job_id, claim.revision)
        return False

    def succeeded(self, claim: Claim, *, forward: bool, warnings: list[str]) -> bool:
        """Record the results of ``claim``; False when they were not its to record (see _owned)."""
        now = time.time()
        with self.db.transaction() as q:
            if not self._owned(q, claim):
                return False
            q.execute(
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
                q.execute(
                    "INSERT INTO outbox(key, revision, state, created) VALUES (?, ?, 'pending', ?) "
                    "ON CONFLICT (key, revision) DO UPDATE SET state='pending', attempts=0, not_before=0, "
                    "error=NULL, created=excluded.created, sent=NULL",
                    (claim.key, claim.revision, now),
                )
        return True

    def failed(self, claim: Claim, reason: str) -> None:
        """The input cannot be analysed: no retry (``reprocess`` after fixing the cause)."""
        with self.db.transaction() as q:
            if self._owned(q, claim):
                q.execute(
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
        with self.db.transaction() as q:
            if not self._owned(q, claim):
                return "superseded"
            first = q.execute("SELECT first_transient FROM studies WHERE key=?", (claim.key,)).fetchone()[0]
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
            q.execute(
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
        with self.db.transaction() as q:
            return [
                Path(r[0]) for r in q.execute("SELECT path FROM instances WHERE key=?", (key,)).fetchall()
            ]

    def results_dir(self, key: str, revision: int) -> Path:
        return self.results / key / f"r{revision}"

    # ------------------------------------------------------------------------------------ outbox
    def claim_outbox(self) -> tuple[str, int, int] | None:
        """Take the oldest result waiting to be forwarded whose backoff has passed, for
        ``OUTBOX_LEASE_S`` (one sender among all replicas): (key, revision, attempts so far)."""
        now = time.time()
        with self.db.transaction() as q:
            row = q.execute(
                "UPDATE outbox SET not_before=? WHERE (key, revision)=(SELECT key, revision FROM outbox "
                f"WHERE state='pending' AND not_before<=? ORDER BY created LIMIT 1{self.db.skip_locked}) "
                "RETURNING key, revision, attempts",
                (now + OUTBOX_LEASE_S, now),
            ).fetchone()
        return (str(row[0]), int(row[1]), int(row[2])) if row else None

    def forwarded(self, key: str, revision: int) -> None:
        now = time.time()
        with self.db.transaction() as q:
            q.execute(
                "UPDATE outbox SET state='sent', sent=?, error=NULL WHERE key=? AND revision=?",
                (now, key, revision),
            )
            q.execute(
                "UPDATE studies SET state='forwarded', updated=? WHERE key=? AND revision=? "
                "AND state='results_ready'",
                (now, key, revision),
            )

    def forward_failed(self, key: str, revision: int, error: str) -> None:
        """The PACS did not take the results: try again later (backoff up to 5 minutes), forever."""
        with self.db.transaction() as q:
            attempts = q.execute(
                "UPDATE outbox SET attempts=attempts+1, error=? WHERE key=? AND revision=? "
                "RETURNING attempts",
                (error, key, revision),
            ).fetchone()
            delay = min(300.0, 2.0 ** min(int(attempts[0]) if attempts else 1, 9))
            q.execute(
                "UPDATE outbox SET not_before=? WHERE key=? AND revision=?",
                (time.time() + delay * random.uniform(0.75, 1.25), key, revision),
            )

    # ------------------------------------------------------------------------------------- views
    def job_of_study(self, study_uid: str) -> str | None:
        """The job id of a study, looked up by the HMAC of its StudyInstanceUID."""
        with self.db.transaction() as q:
            row = q.execute("SELECT job_id FROM studies WHERE key=?", (self.hashed(study_uid),)).fetchone()
        return str(row[0]) if row else None

    def key_of(self, job_id: str) -> str | None:
        with self.db.transaction() as q:
            row = q.execute("SELECT key FROM studies WHERE job_id=?", (job_id,)).fetchone()
        return str(row[0]) if row else None

    def job(self, job_id: str) -> dict[str, Any] | None:
        with self.db.transaction() as q:
            cursor = q.execute(
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
        with self.db.transaction() as q:
            ids = [
                r[0]
                for r in q.execute(
                    "SELECT job_id FROM studies ORDER BY created DESC LIMIT ?", (limit,)
                ).fetchall()
            ]
        return [j for j in (self.job(i) for i in ids) if j]

    def counts(self) -> dict[str, int]:
        with self.db.transaction() as q:
            rows = q.execute("SELECT state, COUNT(*) FROM studies GROUP BY state").fetchall()
        return {str(s): int(n) for s, n in rows}

    def queue_depth(self) -> int:
        counts = self.counts()
        return sum(counts.get(s, 0) for s in ("receiving", "queued", "processing"))

    def force(self, job_id: str) -> bool:
        """Process a finished study again (same revision: a PACS receives the same SEG and SR UIDs)."""
        with self.db.transaction() as q:
            return (
                q.execute(
                    "UPDATE studies SET state='queued', error=NULL, attempts=0, first_transient=NULL, "
                    "not_before=0, updated=? WHERE job_id=? AND state IN "
                    "('done', 'forwarded', 'results_ready', 'failed', 'dead') RETURNING key",
                    (time.time(), job_id),
                ).fetchone()
                is not None
            )

    def expire(self, retention_days: float) -> int:
        """Delete the spool, results and rows of studies finished more than ``retention_days`` ago, and
        replicas gone for as long."""
        limit = time.time() - retention_days * 86400
        with self.db.transaction() as q:
            keys = [
                r[0]
                for r in q.execute(
                    f"SELECT key FROM studies WHERE state IN {TERMINAL} AND updated<?{self.db.skip_locked}",
                    (limit,),
                ).fetchall()
            ]
            for key in keys:
                for table in ("instances", "outbox", "studies"):
                    q.execute(f"DELETE FROM {table} WHERE key=?", (key,))
            q.execute("DELETE FROM replicas WHERE beat<?", (limit,))
        for key in keys:
            shutil.rmtree(self.spool / key, ignore_errors=True)
            shutil.rmtree(self.results / key, ignore_errors=True)
        if keys:
            log.info("retention: removed %d finished study(ies)", len(keys))
        return len(keys)
