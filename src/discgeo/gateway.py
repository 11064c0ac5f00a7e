"""The DICOM gateway: receive studies (DICOMweb STOW-RS, DICOM C-STORE), decide when a study is
complete, run the pipeline, store the outputs and optionally send SEG + SR back to a PACS.

State lives in SQLite (``<data>/jobs.sqlite``) and received instances in ``<data>/spool``, so a job
survives a restart: studies found ``processing`` at start-up are queued again. A study is complete
when its sender has released the association (C-STORE) or finished the request (STOW-RS) and no new
instance has arrived for ``idle_s`` seconds. The same study sent twice is processed once: instances
of a study already ``done`` are acknowledged and ignored unless the job is forced again.
Log lines and the job table expose only hashed UIDs.
"""

from __future__ import annotations

import email.parser
import email.policy
import io
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset

from discgeo.errors import DiscgeoError, InputError, hashed_uid

log = logging.getLogger("discgeo.gateway")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS studies (
    key TEXT PRIMARY KEY,            -- hashed StudyInstanceUID
    study_uid TEXT NOT NULL,
    state TEXT NOT NULL,             -- receiving | queued | processing | done | failed
    released INTEGER NOT NULL DEFAULT 0,
    instances INTEGER NOT NULL DEFAULT 0,
    last_received REAL NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    forwarded INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS instances (
    sop_uid TEXT PRIMARY KEY,
    key TEXT NOT NULL REFERENCES studies(key),
    path TEXT NOT NULL
);
"""


@dataclass(frozen=True, kw_only=True)
class GatewayConfig:
    """Gateway settings (``DISCGEO_GATEWAY_*`` environment variables, see :meth:`from_env`)."""

    data_dir: Path
    ae_title: str = "DISCGEO"
    dicom_port: int = 11112
    allowed_aes: tuple[str, ...] = ()
    idle_s: float = 10.0
    forward: str | None = None
    poll_s: float = 0.5

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> GatewayConfig:
        """``DISCGEO_GATEWAY_DATA`` (folder, required), ``_AE_TITLE``, ``_DICOM_PORT``, ``_ALLOWED_AES``
        (comma-separated calling AE titles; empty = any), ``_IDLE_S``, ``_FORWARD``
        (``dicom://AET@host:port`` or a DICOMweb base URL)."""
        import os

        env = dict(os.environ) if env is None else env

        def get(name: str, default: str = "") -> str:
            return env.get(f"DISCGEO_GATEWAY_{name}", default).strip()

        data = get("DATA")
        if not data:
            raise InputError("DISCGEO_GATEWAY_DATA must name the gateway's data folder")
        aes = tuple(a.strip() for a in get("ALLOWED_AES").split(",") if a.strip())
        return cls(
            data_dir=Path(data),
            ae_title=get("AE_TITLE", "DISCGEO"),
            dicom_port=int(get("DICOM_PORT", "11112")),
            allowed_aes=aes,
            idle_s=float(get("IDLE_S", "10")),
            forward=get("FORWARD") or None,
        )


class JobStore:
    """SQLite job table plus the spool of received instances (thread-safe)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.spool = data_dir / "spool"
        self.results = data_dir / "results"
        self.spool.mkdir(parents=True, exist_ok=True)
        self.results.mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()
        self.db = sqlite3.connect(data_dir / "jobs.sqlite", check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(_SCHEMA)
        with self.lock:
            requeued = self.db.execute("UPDATE studies SET state='queued' WHERE state='processing'").rowcount
        if requeued:
            log.info("re-queued %d study(ies) interrupted by a restart", requeued)

    def add(self, ds: Dataset) -> str:
        """Store one instance; returns the study key. Instances of finished studies are ignored."""
        study_uid = str(ds.StudyInstanceUID)
        sop_uid = str(ds.SOPInstanceUID)
        key = hashed_uid(study_uid).removeprefix("uid:")
        now = time.time()
        with self.lock:
            row = self.db.execute("SELECT state FROM studies WHERE key=?", (key,)).fetchone()
            if row is None:
                self.db.execute(
                    "INSERT INTO studies(key, study_uid, state, last_received, created, updated) "
                    "VALUES (?, ?, 'receiving', ?, ?, ?)",
                    (key, study_uid, now, now, now),
                )
            elif row[0] in ("done", "failed", "processing", "queued"):
                log.info("study %s already %s: instance ignored", key, row[0])
                return key
            if self.db.execute("SELECT 1 FROM instances WHERE sop_uid=?", (sop_uid,)).fetchone():
                return key
            folder = self.spool / key
            folder.mkdir(exist_ok=True)
            path = folder / f"{hashed_uid(sop_uid).removeprefix('uid:')}.dcm"
            ds.save_as(path, enforce_file_format=True)
            self.db.execute(
                "INSERT INTO instances(sop_uid, key, path) VALUES (?, ?, ?)", (sop_uid, key, str(path))
            )
            self.db.execute(
                "UPDATE studies SET instances=instances+1, last_received=?, updated=?, released=0 "
                "WHERE key=?",
                (now, now, key),
            )
        return key

    def release(self, keys: Iterable[str]) -> None:
        """The sender is done with these studies (association released, request finished)."""
        with self.lock:
            for key in set(keys):
                self.db.execute("UPDATE studies SET released=1 WHERE key=? AND state='receiving'", (key,))

    def promote_idle(self, idle_s: float) -> list[str]:
        """Queue released studies idle for ``idle_s`` seconds."""
        limit = time.time() - idle_s
        with self.lock:
            keys = [
                r[0]
                for r in self.db.execute(
                    "SELECT key FROM studies WHERE state='receiving' AND released=1 AND last_received<=?",
                    (limit,),
                )
            ]
            for key in keys:
                self.db.execute(
                    "UPDATE studies SET state='queued', updated=? WHERE key=?", (time.time(), key)
                )
        return keys

    def claim(self) -> str | None:
        """Take the oldest queued study for processing."""
        with self.lock:
            row = self.db.execute(
                "SELECT key FROM studies WHERE state='queued' ORDER BY created LIMIT 1"
            ).fetchone()
            if row is None:
                return None
            self.db.execute(
                "UPDATE studies SET state='processing', attempts=attempts+1, updated=? WHERE key=?",
                (time.time(), row[0]),
            )
            return str(row[0])

    def finish(self, key: str, *, error: str | None = None, forwarded: bool = False) -> None:
        with self.lock:
            self.db.execute(
                "UPDATE studies SET state=?, error=?, forwarded=?, updated=? WHERE key=?",
                ("failed" if error else "done", error, int(forwarded), time.time(), key),
            )

    def force(self, key: str) -> bool:
        """Process a finished study again."""
        with self.lock:
            return bool(
                self.db.execute(
                    "UPDATE studies SET state='queued', error=NULL, updated=? "
                    "WHERE key=? AND state IN ('done', 'failed')",
                    (time.time(), key),
                ).rowcount
            )

    def files(self, key: str) -> list[Path]:
        with self.lock:
            return [Path(r[0]) for r in self.db.execute("SELECT path FROM instances WHERE key=?", (key,))]

    def job(self, key: str) -> dict[str, Any] | None:
        with self.lock:
            cursor = self.db.execute(
                "SELECT key, state, instances, attempts, error, forwarded, created, updated "
                "FROM studies WHERE key=?",
                (key,),
            )
            row = cursor.fetchone()
            if row is None:
                return None
            names = [d[0] for d in cursor.description]
        job = dict(zip(names, row, strict=True))
        folder = self.results / key
        job["files"] = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        return job

    def jobs(self) -> list[dict[str, Any]]:
        with self.lock:
            keys = [r[0] for r in self.db.execute("SELECT key FROM studies ORDER BY created")]
        return [j for j in (self.job(k) for k in keys) if j]

    def queue_depth(self) -> int:
        with self.lock:
            row = self.db.execute(
                "SELECT COUNT(*) FROM studies WHERE state IN ('receiving', 'queued')"
            ).fetchone()
        return int(row[0])


class Gateway:
    """Ingest, completion, processing and forwarding around a :class:`JobStore`."""

    def __init__(self, config: GatewayConfig, stages_factory: Callable[[], Any]) -> None:
        self.config = config
        self.store = JobStore(config.data_dir)
        self.stages_factory = stages_factory
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self._scp: Any = None
        self.on_job_done: Callable[[str, str], None] = lambda key, state: None

    # ---------------------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Start the C-STORE listener and the worker thread."""
        self._scp = start_scp(self)
        self._worker = threading.Thread(target=self._loop, name="discgeo-gateway-worker", daemon=True)
        self._worker.start()

    def stop(self) -> None:
        self._stop.set()
        if self._scp is not None:
            self._scp.shutdown()
        if self._worker is not None:
            self._worker.join(timeout=10)

    def _loop(self) -> None:
        stages = None
        while not self._stop.is_set():
            self.store.promote_idle(self.config.idle_s)
            key = self.store.claim()
            if key is None:
                self._stop.wait(self.config.poll_s)
                continue
            if stages is None:
                stages = self.stages_factory()
            self.process(key, stages)

    # -------------------------------------------------------------------------------- processing
    def process(self, key: str, stages: Any) -> None:
        """Run the pipeline on one claimed study and record the outcome."""
        from discgeo.io.dicom import read_dicom_study
        from discgeo.io.outputs import write_outputs
        from discgeo.pipeline import analyse_study

        start = time.perf_counter()
        try:
            volume, sources = read_dicom_study(self.store.files(key))
            result, labels = analyse_study(volume, stages, study=key)
            files = write_outputs(self.store.results / key, result, volume, labels, sources)
            forwarded = False
            if self.config.forward and "seg" in files:
                forward(self.config.forward, [files["seg"], files["sr"]], calling_ae=self.config.ae_title)
                forwarded = True
            self.store.finish(key, forwarded=forwarded)
            log.info(
                "study %s done in %.1f s (%d discs)", key, time.perf_counter() - start, len(result.discs)
            )
            self.on_job_done(key, "done")
        except DiscgeoError as exc:
            self.store.finish(key, error=exc.message)
            log.warning("study %s failed: %s", key, exc.code)
            self.on_job_done(key, "failed")
        except Exception as exc:  # keep the worker alive; the job says what happened
            self.store.finish(key, error=f"internal error: {type(exc).__name__}")
            log.exception("study %s failed unexpectedly", key)
            self.on_job_done(key, "failed")

    # ----------------------------------------------------------------------------------- STOW-RS
    def stow(self, body: bytes, content_type: str) -> tuple[int, dict[str, Any]]:
        """Store the instances of a STOW-RS request; returns the HTTP status and the DICOM JSON answer."""
        stored, failed, keys = [], [], []
        for part in parse_multipart_related(body, content_type):
            try:
                ds = pydicom.dcmread(io.BytesIO(part))
                keys.append(self.store.add(ds))
                stored.append(ds)
            except Exception as exc:  # a bad part fails alone
                failed.append(str(type(exc).__name__))
        self.store.release(keys)
        status = 200 if stored and not failed else (202 if stored else 409)
        return status, stow_response(stored, len(failed))


# --------------------------------------------------------------------------------------- helpers
def parse_multipart_related(body: bytes, content_type: str) -> list[bytes]:
    """The DICOM parts of a ``multipart/related; type="application/dicom"`` body."""
    if "multipart/related" not in content_type.lower() or "boundary=" not in content_type.lower():
        raise InputError("STOW-RS needs Content-Type multipart/related with a boundary")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body
    )
    parts = [p.get_payload(decode=True) for p in message.iter_parts()] if message.is_multipart() else []
    if not parts:
        raise InputError("the STOW-RS request holds no parts")
    return [p for p in parts if isinstance(p, bytes)]


def stow_response(stored: Sequence[Dataset], failures: int) -> dict[str, Any]:
    """DICOM JSON store response: ReferencedSOPSequence, and FailedSOPSequence when some failed."""
    referenced = [
        {
            "00081150": {"vr": "UI", "Value": [str(ds.SOPClassUID)]},
            "00081155": {"vr": "UI", "Value": [str(ds.SOPInstanceUID)]},
        }
        for ds in stored
    ]
    answer: dict[str, Any] = {"00081199": {"vr": "SQ", "Value": referenced}}
    if failures:
        answer["00081198"] = {"vr": "SQ", "Value": [{"00081197": {"vr": "US", "Value": [0xC000]}}] * failures}
    return answer


def start_scp(gateway: Gateway) -> Any:
    """Start the C-STORE SCP (non-blocking); only allowed calling AE titles may associate."""
    from pynetdicom import AE, AllStoragePresentationContexts, evt
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    ae = AE(ae_title=gateway.config.ae_title)
    ae.supported_contexts = AllStoragePresentationContexts
    ae.add_supported_context(Verification)
    if gateway.config.allowed_aes:
        ae.require_calling_aet = list(gateway.config.allowed_aes)
    received: dict[int, set[str]] = {}

    def on_store(event: Any) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        try:
            key = gateway.store.add(ds)
        except Exception:
            log.exception("could not store an instance")
            return 0xA700  # out of resources
        received.setdefault(id(event.assoc), set()).add(key)
        return 0x0000

    def on_release(event: Any) -> None:
        gateway.store.release(received.pop(id(event.assoc), set()))

    handlers: list[Any] = [
        (evt.EVT_C_STORE, on_store),
        (evt.EVT_RELEASED, on_release),
        (evt.EVT_ABORTED, on_release),
    ]
    return ae.start_server(("0.0.0.0", gateway.config.dicom_port), block=False, evt_handlers=handlers)


def stow_body(files: Sequence[Path], boundary: str = "discgeo-boundary") -> tuple[bytes, str]:
    """A STOW-RS request body (multipart/related of application/dicom parts) and its Content-Type."""
    parts = [
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + f.read_bytes() + b"\r\n"
        for f in files
    ]
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


def forward(target: str, files: list[Path], *, calling_ae: str) -> None:
    """Send files to a PACS: ``dicom://AET@host:port`` (C-STORE) or a DICOMweb base URL (STOW-RS)."""
    datasets = [pydicom.dcmread(f) for f in files]
    if target.startswith("dicom://"):
        from pynetdicom import AE

        called, _, address = target.removeprefix("dicom://").partition("@")
        host, _, port = address.partition(":")
        ae = AE(ae_title=calling_ae)
        for ds in datasets:
            ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        assoc = ae.associate(host, int(port), ae_title=called)
        if not assoc.is_established:
            raise InputError(f"PACS {called}@{host}:{port} refused the association")
        try:
            for ds in datasets:
                status = assoc.send_c_store(ds)
                if not status or status.Status != 0:
                    raise InputError(
                        f"PACS rejected {ds.Modality} (status {getattr(status, 'Status', None)})"
                    )
        finally:
            assoc.release()
        return
    import httpx

    body, content_type = stow_body(files)
    response = httpx.post(
        target.rstrip("/") + "/studies",
        content=body,
        timeout=60,
        headers={"Content-Type": content_type, "Accept": "application/dicom+json"},
    )
    if response.status_code >= 300:
        raise InputError(f"DICOMweb PACS answered {response.status_code}: {response.text[:200]}")
