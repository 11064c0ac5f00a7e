"""Geometry service: a label map in (compressed NIfTI), per-disc measurements out (JSON).

    bentoml serve services/geometry/service.py:Geometry --port 3003

Pure numpy/scipy: this process never imports torch or onnxruntime.
"""

from __future__ import annotations

from pathlib import Path

import bentoml

from discgeo import __version__
from discgeo.config import Settings
from discgeo.geometry import DEFAULT_MIN_FRAGMENT_MM3, measure_discs
from discgeo.io.nifti import nifti_from_bytes
from discgeo.schemas import GeometryResult
from discgeo.serving import DISCS, INPUT_BYTES, check_tokens, protect, stage_request

STAGE = "geometry"


@bentoml.service(
    name="discgeo-geometry",
    traffic={"timeout": 120, "concurrency": 4},
    resources={"cpu": "1"},
    labels={"discgeo_version": __version__},
)
class Geometry:
    def __init__(self) -> None:
        check_tokens()
        self.settings = Settings.from_env()

    @bentoml.api(route="/measure")
    def measure(self, labels: Path, min_fragment_mm3: float = DEFAULT_MIN_FRAGMENT_MM3) -> GeometryResult:
        """Measure every disc of a label map given as a NIfTI file (.nii or .nii.gz)."""
        with stage_request(STAGE):
            data = labels.read_bytes()
            INPUT_BYTES.labels(stage=STAGE).observe(len(data))
            volume = nifti_from_bytes(data, settings=self.settings, labels=True, name="labels")
            result = measure_discs(volume, min_fragment_mm3=min_fragment_mm3)
            DISCS.labels(stage=STAGE).inc(len(result.discs))
            return result


protect(Geometry, max_body_bytes=256 * 1024**2)  # compressed label maps are far smaller
