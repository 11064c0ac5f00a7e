"""Instances in: validation, durable storage, STOW-RS (streamed to disk) and the C-STORE SCP.

An instance is acknowledged only after it is on disk (fsync and atomic rename, outside the store
lock) and recorded; a duplicate SOPInstanceUID is acknowledged and not stored again; discgeo's own SEG
and SR sent back by a PACS are acknowledged and ignored. Failures carry a status of the right class:
0xA900 (the dataset lacks an identifying attribute), 0xC000 (cannot be parsed), 0xA700 (out of
resources: the disk).
"""

from __future__ import annotations

import io
import ipaddress
import logging
import secrets
import threading
from collections.abc import Iterator, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import UID

from discgeo.config import GatewaySettings
from discgeo.errors import InputError
from discgeo.gateway.store import JobStore, fsync_write

log = logging.getLogger("discgeo.gateway")

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
NOT_MATCHING = 0xA900  # data set does not match SOP class (an identifying attribute is missing)
CANNOT_UNDERSTAND = 0xC000
IDENTIFIERS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID")


@dataclass(frozen=True)
class Received:
    """What became of one instance."""

    status: int
    reason: str
    sop_class: str | None = None
    sop_uid: str | None = None
    key: str | None = None
    new: bool = False

    @property
    def ok(self) -> bool:
        return self.status == SUCCESS


class Ingest:
    """Validate, store and record instances of a :class:`JobStore`."""

    def __init__(self, store: JobStore) -> None:
        self.store = store

    def accept(self, data: bytes | Path) -> Received:
        """One DICOM instance (PS3.10 file bytes, or a file to move into the spool)."""
        try:
            source = io.BytesIO(data) if isinstance(data, bytes) else data
            ds = pydicom.dcmread(source, stop_before_pixels=False)
        except Exception:
            self._discard(data)
            return Received(CANNOT_UNDERSTAND, "not a DICOM instance, or truncated")
        meta = getattr(ds, "file_meta", None)
        sop_class = ds.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta else None)
        values = {
            "SOPClassUID": sop_class,
            "SOPInstanceUID": ds.get("SOPInstanceUID"),
            "StudyInstanceUID": ds.get("StudyInstanceUID"),
        }
        sop_uid = str(values["SOPInstanceUID"]) if values["SOPInstanceUID"] else None
        for name in IDENTIFIERS:
            value = values[name]
            if not value:
                self._discard(data)
                return Received(NOT_MATCHING, f"no {name}", str(sop_class or "") or None, sop_uid)
            if not UID(str(value)).is_valid:
                self._discard(data)
                return Received(
                    NOT_MATCHING, f"{name} is not a valid UID", str(sop_class or "") or None, sop_uid
                )
        assert sop_uid is not None
        if ds.get("Manufacturer") == "discgeo" and ds.get("Modality") in ("SEG", "SR"):
            self._discard(data)
            return Received(SUCCESS, "discgeo's own result: ignored", str(sop_class), sop_uid)
        problem = _pixel_problem(ds, UID(str(sop_class)))
        if problem == "not an image":
            self._discard(data)  # reports, presentation states...: nothing to analyse, the PACS keeps them
            return Received(SUCCESS, "not an image: nothing to analyse", str(sop_class), sop_uid)
        if problem:
            self._discard(data)
            return Received(CANNOT_UNDERSTAND, problem, str(sop_class), sop_uid)
        key = self.store.hashed(str(values["StudyInstanceUID"]))
        sop_key = self.store.hashed(sop_uid)
        if self.store.has_instance(sop_key):
            self._discard(data)
            return Received(SUCCESS, "already stored", str(sop_class), sop_uid, key)
        path = self.store.instance_path(key, sop_key)
        try:
            fsync_write(path, data)
        except OSError as exc:
            log.error("could not write an instance to the spool: %s", exc.strerror)
            self._discard(data)
            return Received(OUT_OF_RESOURCES, "could not be written to disk", str(sop_class), sop_uid)
        new = self.store.add_instance(key, sop_key, path)
        return Received(SUCCESS, "stored" if new else "already stored", str(sop_class), sop_uid, key, new)

    @staticmethod
    def _discard(data: bytes | Path) -> None:
        if isinstance(data, Path):
            with suppress(OSError):
                data.unlink()


def _pixel_problem(ds: Any, sop_class: UID) -> str | None:
    """Why an instance's pixel data cannot be used (None when it can); 'not an image' for objects
    without pixel data whose SOP class is no image storage class."""
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        return "no pixel data (truncated?)" if "Image Storage" in sop_class.name else "not an image"
    meta = getattr(ds, "file_meta", None)
    syntax = UID(str(meta.get("TransferSyntaxUID", ""))) if meta else UID("")
    if "PixelData" in ds and syntax.is_valid and not syntax.is_compressed:
        try:
            expected = (
                int(ds.Rows)
                * int(ds.Columns)
                * int(ds.get("SamplesPerPixel", 1))
                * int(ds.get("NumberOfFrames", 1) or 1)
                * int(ds.BitsAllocated)
                // 8
            )
        except (AttributeError, TypeError, ValueError):
            return "image without Rows, Columns or BitsAllocated"
        if len(ds.PixelData) < expected:
            return f"pixel data truncated ({len(ds.PixelData)} of {expected} bytes)"
    return None


# ------------------------------------------------------------------------------------------ STOW-RS
def boundary_of(content_type: str) -> bytes:
    """The boundary of a ``multipart/related; type="application/dicom"`` request."""
    from python_multipart.multipart import parse_options_header

    kind, options = parse_options_header(content_type)
    if kind.lower() != b"multipart/related" or not options.get(b"boundary"):
        raise InputError(
            'STOW-RS needs Content-Type multipart/related; type="application/dicom" with a boundary'
        )
    part_type = options.get(b"type", b"application/dicom").lower()
    if part_type != b"application/dicom":
        raise InputError(f"STOW-RS parts of type {part_type.decode(errors='replace')} are not supported")
    return options[b"boundary"]


@dataclass
class PartWriter:
    """A streaming multipart parser that writes each part to its own file under ``folder`` (memory stays
    bounded by the chunk size, whatever the body size)."""

    boundary: bytes
    folder: Path
    parts: list[tuple[Path, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        from python_multipart.multipart import MultipartParser

        self._handle: Any = None
        self._field = b""
        self._value = b""
        self._type = b""
        self.parser = MultipartParser(
            self.boundary,
            {
                "on_part_begin": self._begin,
                "on_part_data": lambda data, start, end: self._handle.write(data[start:end]),
                "on_part_end": self._end,
                "on_header_field": lambda data, start, end: self._add("_field", data[start:end]),
                "on_header_value": lambda data, start, end: self._add("_value", data[start:end]),
                "on_header_end": self._header_end,
            },
        )

    def _add(self, name: str, data: bytes) -> None:
        setattr(self, name, getattr(self, name) + data)

    def _header_end(self) -> None:
        if self._field.strip().lower() == b"content-type":
            self._type = self._value.strip().split(b";")[0].lower()
        self._field = self._value = b""

    def _begin(self) -> None:
        path = self.folder / f"part-{secrets.token_hex(8)}"
        self._handle = path.open("wb")
        self._type = b""
        self.parts.append((path, ""))

    def _end(self) -> None:
        self._handle.close()
        path, _ = self.parts[-1]
        self.parts[-1] = (path, self._type.decode(errors="replace"))

    def write(self, chunk: bytes) -> None:
        self.parser.write(chunk)

    def close(self) -> None:
        if self._handle is not None and not self._handle.closed:
            self._handle.close()

    def discard(self) -> None:
        self.close()
        for path, _ in self.parts:
            with suppress(OSError):
                path.unlink()


def stow_store(ingest: Ingest, parts: list[tuple[Path, str]]) -> tuple[int, dict[str, Any]]:
    """Store the parts of a finished STOW-RS request; the HTTP status and the DICOM JSON response
    (PS3.18 Store Instances Response: ReferencedSOPSequence, FailedSOPSequence with the
    ReferencedSOPInstanceUID where known, the FailureReason and a text reason)."""
    if not parts:
        raise InputError("the STOW-RS request holds no parts")
    results: list[Received] = []
    for path, part_type in parts:
        if part_type not in ("", "application/dicom"):
            Ingest._discard(path)
            results.append(Received(CANNOT_UNDERSTAND, f"part of type {part_type}, not application/dicom"))
            continue
        results.append(ingest.accept(path))
    ingest.store.release({r.key for r in results if r.ok and r.key})
    stored = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    for r in failed:
        log.info("STOW-RS instance refused: %s", r.reason)

    def ref(r: Received) -> dict[str, Any]:
        item: dict[str, Any] = {}
        if r.sop_class:
            item["00081150"] = {"vr": "UI", "Value": [r.sop_class]}
        if r.sop_uid and UID(r.sop_uid).is_valid:
            item["00081155"] = {"vr": "UI", "Value": [r.sop_uid]}
        return item

    answer: dict[str, Any] = {"00081199": {"vr": "SQ", "Value": [ref(r) for r in stored]}}
    if failed:
        answer["00081198"] = {
            "vr": "SQ",
            "Value": [
                {
                    **ref(r),
                    "00081197": {"vr": "US", "Value": [r.status]},
                    "00000902": {"vr": "LO", "Value": [r.reason]},
                }
                for r in failed
            ],
        }
    status = 200 if not failed else (202 if stored else 409)
    return status, answer


def stow_body(
    instances: Sequence[Path | bytes], boundary: str = "discgeo-boundary"
) -> tuple[Iterator[bytes], str]:
    """A STOW-RS request body streamed instance by instance (multipart/related of application/dicom
    parts; files are read as they are sent) and its Content-Type."""

    def chunks() -> Iterator[bytes]:
        for item in instances:
            yield f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            yield item.read_bytes() if isinstance(item, Path) else item
            yield b"\r\n"
        yield f"--{boundary}--\r\n".encode()

    return chunks(), f'multipart/related; type="application/dicom"; boundary={boundary}'


# ------------------------------------------------------------------------------------------ C-STORE
def start_scp(ingest: Ingest, settings: GatewaySettings) -> Any:
    """Start the C-STORE SCP on ``settings.dicom_host:dicom_port`` (non-blocking). Only the allowed
    calling AE titles from the allowed networks may associate, and only to our AE title. An
    association that is aborted or breaks off leaves its studies receiving until they are stable."""
    from pynetdicom import AE, AllStoragePresentationContexts, evt
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
    from pynetdicom.transport import ThreadedAssociationServer

    networks = [ipaddress.ip_network(n, strict=False) for n in settings.allowed_sources]

    class AllowListServer(ThreadedAssociationServer):
        def verify_request(self, request: Any, client_address: Any) -> bool:
            address = ipaddress.ip_address(client_address[0])
            if any(address in n for n in networks):
                return True
            log.warning("C-STORE connection from %s refused: not in DISCGEO_GATEWAY_ALLOWED_SOURCES", address)
            return False

    ae = AE(ae_title=settings.ae_title)
    ae.supported_contexts = AllStoragePresentationContexts
    ae.add_supported_context(Verification)
    ae.require_calling_aet = list(settings.allowed_aes)
    ae.require_called_aet = True
    ae.maximum_associations = settings.max_associations
    received: dict[int, set[str]] = {}
    lock = threading.Lock()

    def on_store(event: Any) -> Any:
        result = ingest.accept(event.encoded_dataset())
        if result.ok and result.key:
            with lock:
                received.setdefault(id(event.assoc), set()).add(result.key)
        elif not result.ok:
            log.info("C-STORE instance refused (0x%04X): %s", result.status, result.reason)
            answer = pydicom.Dataset()
            answer.Status = result.status
            answer.ErrorComment = result.reason[:64]  # LO: the sender logs why
            return answer
        return result.status

    def on_released(event: Any) -> None:
        with lock:
            keys = received.pop(id(event.assoc), set())
        ingest.store.release(keys)

    def on_broken(event: Any) -> None:
        with lock:
            keys = received.pop(id(event.assoc), set())
        if keys:
            log.warning("association aborted: %d study(ies) wait until they are stable", len(keys))

    handlers: list[Any] = [
        (evt.EVT_C_STORE, on_store),
        (evt.EVT_RELEASED, on_released),
        (evt.EVT_ABORTED, on_broken),
        (evt.EVT_CONN_CLOSE, on_broken),
    ]
    server = ae.make_server(
        (settings.dicom_host, settings.dicom_port), evt_handlers=handlers, server_class=AllowListServer
    )
    ae._servers.append(server)  # as AE.start_server does, so that server.shutdown() finds it
    thread = threading.Thread(target=server.serve_forever, name="discgeo-cstore-scp", daemon=True)
    thread.start()
    return server
