"""The gateway's engine: a bounded pool of workers over the job store, a scheduler (completion,
outbox, retention, heartbeat) and the C-STORE listener.

Each worker owns its stages (one HTTP client per worker) and runs :func:`discgeo.api.process_study`
on one claimed study at a time, within the study's deadline. Outcomes: results written (forwarded
through the outbox when a PACS is configured), the input refused (``failed``), a transient stage
failure (queued again with backoff and jitter, for up to ``retry_s``), an internal error or a timeout
(queued again until ``max_attempts``, then ``dead``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from discgeo.config import Settings
from discgeo.errors import DiscgeoError
from discgeo.gateway.forward import forward
from discgeo.gateway.ingest import Ingest, start_scp
from discgeo.gateway.store import Claim, JobStore, load_secret
from discgeo.io.provenance import device_uid
from discgeo.pipeline import RemoteStageError, Stages

log = logging.getLogger("discgeo.gateway")

POLL_S = 0.5
HEARTBEAT_LIMIT_S = 30.0
REPLICA_BEAT_S = 5.0  # the replica's beat in the job store (stale after store.REPLICA_STALE_S)
RECOVER_EVERY_S = 10.0  # how often claims of replicas gone or leases run out are taken back
EXPIRE_EVERY_S = 3600.0


class Gateway:
    """Ingest, completion, processing and forwarding around a :class:`JobStore`."""

    def __init__(self, settings: Settings, stages_factory: Callable[[], Stages]) -> None:
        self.settings = settings
        self.config = settings.gateway
        data = self.config.data()
        secret = load_secret(self.config.secret_file or data / "secret")
        self.store = JobStore(
            data,
            secret,
            database=self.config.database,
            lease_s=self.config.study_timeout_s + HEARTBEAT_LIMIT_S,
            connections=self.config.workers + 8,  # workers, scheduler, HTTP and C-STORE threads
        )
        self.ingest = Ingest(self.store)
        self.device_uid = device_uid(settings.device_uid, secret=secret)
        self.stages_factory = stages_factory
        self.on_job_done: Callable[[str], None] = lambda state: None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._scp: Any = None
        # per thread, the time.monotonic() by which it must beat again: an idle worker or the scheduler
        # within HEARTBEAT_LIMIT_S, a busy worker within its study's deadline plus that limit
        self._beat_by: dict[str, float] = {}

    # ---------------------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Recover interrupted studies, start the workers, the scheduler and the C-STORE listener."""
        self.store.recover(self.config.max_attempts, startup=True)
        for i in range(self.config.workers):
            self._threads.append(threading.Thread(target=self._work, name=f"discgeo-worker-{i}", daemon=True))
        self._threads.append(threading.Thread(target=self._schedule, name="discgeo-scheduler", daemon=True))
        for thread in self._threads:
            self._beat_by[thread.name] = time.monotonic() + HEARTBEAT_LIMIT_S
            thread.start()
        if self.config.allowed_aes:
            self._scp = start_scp(self.ingest, self.config)
            log.info(
                "C-STORE SCP %s on %s:%d",
                self.config.ae_title,
                self.config.dicom_host,
                self.config.dicom_port,
            )
        else:
            log.warning("C-STORE disabled: no calling AE title allowed (DISCGEO_GATEWAY_ALLOWED_AES)")

    def stop(self) -> None:
        self._stop.set()
        if self._scp is not None:
            self._scp.shutdown()
        for thread in self._threads:
            thread.join(timeout=30)
        self.store.close()

    def ready(self) -> bool:
        """Ready while every worker and the scheduler live and beat in time (a worker hung past its
        study's deadline, or a stuck scheduler, makes the readiness probe fail)."""
        now = time.monotonic()
        return bool(self._threads) and all(
            t.is_alive() and now < self._beat_by[t.name] for t in self._threads
        )

    def _beat(self, busy: bool = False) -> None:
        limit = HEARTBEAT_LIMIT_S + (self.config.study_timeout_s if busy else 0.0)
        self._beat_by[threading.current_thread().name] = time.monotonic() + limit

    # ---------------------------------------------------------------------------------- scheduler
    def _schedule(self) -> None:
        last = {"beat": time.monotonic(), "recover": time.monotonic(), "expire": 0.0}

        def due(what: str, every_s: float) -> bool:
            if time.monotonic() - last[what] < every_s:
                return False
            last[what] = time.monotonic()
            return True

        while not self._stop.is_set():
            try:
                if due("beat", REPLICA_BEAT_S):
                    self.store.beat()
                if due("recover", RECOVER_EVERY_S):
                    self.store.recover(self.config.max_attempts)
                self.store.promote(self.config.idle_s, self.config.stable_s)
                if self.config.forward:
                    self._forward_pending()
                if due("expire", EXPIRE_EVERY_S):
                    self.store.expire(self.config.retention_days)
                self._beat()
            except Exception:  # the scheduler must keep beating; readiness shows if it cannot
                log.exception("scheduler step failed")
            self._stop.wait(POLL_S)

    def _forward_pending(self) -> None:
        assert self.config.forward is not None
        while (taken := self.store.claim_outbox()) is not None:
            key, revision, attempts = taken
            folder = self.store.results_dir(key, revision)
            try:
                forward(
                    self.config.forward,
                    [folder / "seg.dcm", folder / "sr.dcm"],
                    calling_ae=self.config.ae_title,
                )
            except (DiscgeoError, OSError) as exc:
                message = exc.message if isinstance(exc, DiscgeoError) else type(exc).__name__
                self.store.forward_failed(key, revision, message)
                log.warning("forwarding failed (try %d), retried later: %s", attempts + 1, message)
                return  # the PACS is down: do not hammer it with the rest of the outbox
            self.store.forwarded(key, revision)
            self.on_job_done("forwarded")
            self._beat()  # a long outbox must not read as a stuck scheduler

    # ------------------------------------------------------------------------------------ workers
    def _work(self) -> None:
        stages: Stages | None = None
        while not self._stop.is_set():
            self._beat()
            try:
                claim = self.store.claim()
                if claim is None:
                    self._stop.wait(POLL_S)
                    continue
                self._beat(busy=True)
                if stages is None:
                    stages = self.stages_factory()
                self.process(claim, stages)
            except Exception:  # the job store is unreachable: keep trying; a claim held is leased
                log.exception("worker step failed")
                self._stop.wait(POLL_S)

    def process(self, claim: Claim, stages: Stages) -> str:
        """Run the pipeline on one claimed study and record the outcome; returns the new state."""
        from discgeo.api import process_study

        start = time.perf_counter()
        if hasattr(stages, "deadline"):
            stages.deadline = time.monotonic() + self.config.study_timeout_s
        state = "failed"
        try:
            processed = process_study(
                self.store.files(claim.key),
                stages=stages,
                out=self.store.results_dir(claim.key, claim.revision),
                study=claim.job_id,
                settings=self.settings,
                device=self.device_uid,
            )
        except RemoteStageError as exc:
            if exc.transient or exc.http_status >= 500:
                state = self._retry(claim, exc.message, transient=exc.transient, min_delay_s=exc.busy_for_s)
            else:
                self.store.failed(claim, exc.message)
        except DiscgeoError as exc:
            self.store.failed(claim, exc.message)
            log.info("job %s failed: %s", claim.job_id, exc.code)
        except Exception as exc:  # a bug or a resource problem: retried, then dead-lettered
            log.exception("job %s: internal error", claim.job_id)
            state = self._retry(claim, f"internal error: {type(exc).__name__}", transient=False)
        else:
            forward_it = bool(self.config.forward) and "seg" in processed.files
            if not self.store.succeeded(claim, forward=forward_it, warnings=processed.result.warnings):
                self.on_job_done("superseded")
                return "superseded"
            state = "results_ready" if forward_it else "done"
            log.info(
                "job %s revision %d: %d discs in %.1f s",
                claim.job_id,
                claim.revision,
                len(processed.result.discs),
                time.perf_counter() - start,
            )
        self.on_job_done(state)
        return state

    def _retry(self, claim: Claim, reason: str, *, transient: bool, min_delay_s: float = 0.0) -> str:
        state = self.store.retry_later(
            claim,
            reason,
            transient=transient,
            retry_s=self.config.retry_s,
            max_attempts=self.config.max_attempts,
            min_delay_s=min_delay_s,
        )
        log.warning("job %s: %s -> %s", claim.job_id, reason, state)
        return state
