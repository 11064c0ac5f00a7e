"""Where a DICOM SEG and SR come from: the device, the models, and UIDs that are the same on a retry.

The SEG's and SR's UIDs are derived from the study's StudyInstanceUID, its revision, the versions of
every model used and of discgeo (it computes the measurements), the device and whether findings are
included: everything that decides the objects' content. The revision is a digest of the SOPInstanceUIDs
of the analysed series (:func:`input_revision`): it changes when the analysed images change (a late
instance, a new series that is chosen instead) and not for anything else (a report added to the study, a
repeated send). A retry, a crash after forwarding or a reprocess with the same models therefore re-sends
the same objects, which a PACS stores once; new input, new models, a new release or findings switched on
give new objects (a PACS that keeps the first copy of a UID never holds stale content under it).
"""

from __future__ import annotations

import hashlib
import socket
from dataclasses import dataclass, field

from pydicom.uid import generate_uid

from discgeo import __version__


@dataclass(frozen=True)
class Provenance:
    """The device observer UID, the model versions, and the seed of every UID written."""

    device_uid: str
    study_uid: str
    revision: str = ""
    model_versions: dict[str, str] = field(default_factory=dict)
    include_findings: bool = False
    software_version: str = __version__

    def uid(self, kind: str) -> str:
        """A UID for ``kind`` (e.g. ``seg instance``), the same for the same content: study, revision,
        models, software, device and findings."""
        models = [f"{name}={version}" for name, version in sorted(self.model_versions.items())]
        content = [self.software_version, self.device_uid, f"findings={self.include_findings}"]
        return str(generate_uid(entropy_srcs=[self.study_uid, self.revision, *models, *content, kind]))


def input_revision(sop_instance_uids: list[str]) -> str:
    """The revision of a study's analysed input: a digest of its SOPInstanceUIDs (order-free)."""
    return hashlib.sha256("\n".join(sorted(sop_instance_uids)).encode()).hexdigest()[:20]


def device_uid(configured: str | None = None, *, secret: bytes | None = None) -> str:
    """The device observer UID of this deployment: ``DISCGEO_DEVICE_UID`` when set, else derived from
    the deployment secret (the gateway: the same across pods and restarts), else from the host name."""
    if configured:
        return configured
    if secret is not None:
        return str(generate_uid(entropy_srcs=["discgeo device", secret.hex()]))
    return str(generate_uid(entropy_srcs=["discgeo device", socket.gethostname()]))
