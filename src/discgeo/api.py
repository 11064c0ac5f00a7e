"""The one orchestration path: read a study, analyse it, write its outputs.

``discgeo run``, the gateway's workers and the benchmarks all call :func:`process_study`; what differs
between them is only where the stages run (:class:`~discgeo.pipeline.LocalStages` in this process,
:class:`~discgeo.pipeline.RemoteStages` over HTTP) and the provenance of the DICOM outputs.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import UID

from discgeo.config import Settings
from discgeo.errors import InvalidDataError, hashed_uid
from discgeo.io import read_study
from discgeo.io.conform import conform_sources
from discgeo.io.outputs import write_outputs
from discgeo.io.provenance import Provenance, device_uid, input_revision
from discgeo.pipeline import Stages, analyse_study
from discgeo.schemas import StudyResult
from discgeo.volume import Volume


@dataclass(frozen=True)
class ProcessedStudy:
    """The result, the disc label map, the files written (none without ``out``) and the seconds spent
    reading and writing (the stages' own times are in ``result.timings_s``)."""

    result: StudyResult
    labels: Volume
    files: dict[str, Path]
    read_s: float
    write_s: float


def process_study(
    source: str | Path | Sequence[str | Path],
    *,
    stages: Stages,
    out: str | Path | None = None,
    study: str | None = None,
    settings: Settings | None = None,
    device: str | None = None,
) -> ProcessedStudy:
    """Read ``source`` (DICOM folder, zip or files; NIfTI or MHA), run the stages, write the outputs.

    ``study`` names the study in the result (default: the hashed StudyInstanceUID, or the hashed path).
    For DICOM input the copied patient and study attributes are made conformant first (the changes are
    listed in ``result.warnings``), and the SEG and SR carry ``device`` (default: the settings' device
    UID) and UIDs derived from the study, the analysed instances and the model versions
    (:mod:`discgeo.io.provenance`).
    """
    settings = settings or Settings.from_env()
    start = time.perf_counter()
    volume, sources = read_study(source, settings=settings)
    warnings: list[str] = []
    if sources:
        _check_identifiers(sources)
        sources, warnings = conform_sources(sources)
    read_s = time.perf_counter() - start
    if study is None:
        identity = str(sources[0].StudyInstanceUID) if sources else str(Path(str(source)).resolve())
        study = hashed_uid(identity)
    result, labels = analyse_study(volume, stages, study=study)
    result = result.model_copy(
        update={"warnings": warnings, "timings_s": {"read": round(read_s, 4), **result.timings_s}}
    )
    files: dict[str, Path] = {}
    start = time.perf_counter()
    if out is not None:
        provenance = None
        if sources:
            provenance = Provenance(
                device_uid=device or device_uid(settings.device_uid),
                study_uid=str(sources[0].StudyInstanceUID),
                revision=input_revision([str(ds.SOPInstanceUID) for ds in sources]),
                model_versions=dict(result.model_versions),
                include_findings=settings.forward_findings,
            )
        files = write_outputs(out, result, volume, labels, sources, provenance=provenance)
    return ProcessedStudy(result, labels, files, read_s, time.perf_counter() - start)


def _check_identifiers(sources: list[Dataset]) -> None:
    """The SEG and SR reference the analysed instances by these UIDs: without valid ones the results
    cannot be tied to the images, so the study is refused before any work."""
    for name in ("StudyInstanceUID", "SOPClassUID", "SOPInstanceUID"):
        values = [ds.get(name) for ds in sources]
        missing = sum(1 for v in values if not v)
        if missing:
            raise InvalidDataError(f"{missing} of {len(sources)} instance(s) have no {name}")
        invalid = sum(1 for v in values if not UID(str(v)).is_valid)
        if invalid:
            raise InvalidDataError(f"{invalid} of {len(sources)} instance(s) have an invalid {name}")
