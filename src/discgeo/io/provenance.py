"""Where a DICOM SEG and SR come from: the device, the models, and UIDs that are the same on a retry.

The SEG's and SR's UIDs are derived from the study's StudyInstanceUID, its revision and the versions of
every model used. The revision is a digest of the SOPInstanceUIDs of the analysed series
(:func:`input_revision`): it changes when the analysed images change (a late instance, a new series
that is chosen instead) and not for anything else (a report added to the study, a repeated send). A
retry, a crash after forwarding or a reprocess with the same models therefore re-sends the same
objects, which a PACS stores once; new input or new models give new objects.
"""

from __future__ import annotations

import hashlib
import socket
from dataclasses import dataclass, field

from pydicom.uid import generate_uid


@dataclass(frozen=True)
class Provenance:
    """The device observer UID, the model versions, and the seed of every UID written."""

    device_uid: str
    study_uid: str
    revision: str = ""
    model_versions: dict[str, str] = field(default_factory=dict)
    include_findings: bool = False

    def uid(self, kind: str) -> str:
        """A UID for ``kind`` (e.g. ``seg instance``), the same for the same study, revision and models."""
        models = [f"{name}={version}" for name, version in sorted(self.model_versions.items())]
        return str(generate_uid(entropy_srcs=[self.study_uid, self.revision, *models, kind]))


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
