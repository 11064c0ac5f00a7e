"""Results out: send a study's SEG and SR to the PACS (C-STORE or DICOMweb STOW-RS).

Called from the outbox (:mod:`discgeo.gateway.worker`), which retries until the PACS accepts. The
objects' UIDs are deterministic (:mod:`discgeo.io.provenance`), so a repeated send after a crash is
stored once by the PACS.
"""

from __future__ import annotations

from pathlib import Path

import pydicom

from discgeo.errors import InputError
from discgeo.gateway.ingest import stow_body


class ForwardError(InputError):
    """The PACS could not be reached or refused an object."""

    code = "forward_failed"


def forward(target: str, files: list[Path], *, calling_ae: str, timeout_s: float = 60.0) -> None:
    """Send files to ``dicom://AET@host:port`` (C-STORE) or a DICOMweb base URL (STOW-RS)."""
    if target.startswith("dicom://"):
        _cstore(target, files, calling_ae=calling_ae, timeout_s=timeout_s)
        return
    import httpx

    body, content_type = stow_body(files)
    try:
        response = httpx.post(
            target.rstrip("/") + "/studies",
            content=body,
            timeout=timeout_s,
            headers={"Content-Type": content_type, "Accept": "application/dicom+json"},
        )
    except httpx.HTTPError as exc:
        raise ForwardError(f"DICOMweb PACS unreachable: {type(exc).__name__}") from None
    if response.status_code >= 300:
        raise ForwardError(f"DICOMweb PACS answered {response.status_code}")


def _cstore(target: str, files: list[Path], *, calling_ae: str, timeout_s: float) -> None:
    from pynetdicom import AE

    called, _, address = target.removeprefix("dicom://").partition("@")
    host, _, port = address.partition(":")
    datasets = [pydicom.dcmread(f) for f in files]
    ae = AE(ae_title=calling_ae)
    ae.network_timeout = ae.dimse_timeout = ae.acse_timeout = timeout_s
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate(host, int(port), ae_title=called)
    if not assoc.is_established:
        raise ForwardError(f"PACS {called}@{host}:{port} refused or did not answer the association")
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            code = getattr(status, "Status", None)
            # success, or a warning (0xB000-0xB007: stored with coercion)
            if code is None or not (code == 0 or 0xB000 <= code <= 0xB007):
                raise ForwardError(f"PACS did not store the {ds.Modality} (status {code})")
    finally:
        if assoc.is_established:
            assoc.release()
