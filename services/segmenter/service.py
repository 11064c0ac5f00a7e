"""Segmenter service: a study volume in (compressed NIfTI, or a zip of DICOM files), disc label map out
(compressed NIfTI, SPIDER labels 201+ from the lowest disc).

    bentoml serve services/segmenter/service.py:Segmenter --port 3001

The model is loaded before the service reports ready (/readyz). A GPU is requested for the
deployment; ONNX Runtime uses CUDA when the device and its libraries are present, else the CPU, and
the provider in use is returned in the ``X-Discgeo-Provider`` header.
"""

from __future__ import annotations

import tempfile
import zipfile
from pathlib import Path
from typing import Annotated

import bentoml
import numpy as np
from bentoml.validators import ContentType

from discgeo import __version__
from discgeo.config import Settings
from discgeo.io import read_dicom
from discgeo.io.nifti import nifti_from_bytes, nifti_to_bytes
from discgeo.segmentation import SEGMENTATION_HEADER, segmentation_header
from discgeo.segmentation import Segmenter as OnnxSegmenter
from discgeo.serving import DISCS, INPUT_BYTES, check_tokens, protect, record_model, stage_request

STAGE = "segmenter"


@bentoml.service(
    name="discgeo-segmenter",
    traffic={"timeout": 600, "concurrency": 2},
    resources={"cpu": "2", "gpu": 1},
    labels={"discgeo_version": __version__},
)
class Segmenter:
    def __init__(self) -> None:
        check_tokens()
        self.settings = Settings.from_env()
        self.model = OnnxSegmenter.from_settings(self.settings)
        record_model(STAGE, self.model.version, self.model.provider)

    @bentoml.api(route="/segment")
    def segment(self, volume: Path, ctx: bentoml.Context) -> Annotated[Path, ContentType("application/gzip")]:
        """Segment the discs of a NIfTI volume or a zip archive of one DICOM study."""
        with stage_request(STAGE):
            data = volume.read_bytes()
            INPUT_BYTES.labels(stage=STAGE).observe(len(data))
            if zipfile.is_zipfile(volume):
                with tempfile.TemporaryDirectory() as tmp:
                    archive = Path(tmp) / "study.zip"
                    archive.write_bytes(data)
                    image = read_dicom(archive, settings=self.settings)
            else:
                image = nifti_from_bytes(data, settings=self.settings, name="volume")
            labels = self.model.predict(image)
            discs = int(np.count_nonzero(np.unique(labels.array)))
            DISCS.labels(stage=STAGE).inc(discs)
            ctx.response.headers["X-Discgeo-Model-Version"] = self.model.version
            ctx.response.headers["X-Discgeo-Provider"] = self.model.provider
            ctx.response.headers["X-Discgeo-Discs"] = str(discs)
            ctx.response.headers[SEGMENTATION_HEADER] = segmentation_header(labels)
            out = Path(ctx.temp_dir) / "labels.nii.gz"
            out.write_bytes(nifti_to_bytes(labels))
            return out


protect(Segmenter, max_body_bytes=2 * 1024**3)  # a zipped DICOM study
