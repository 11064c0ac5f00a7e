"""Encoder service: a disc label map (or packed crops) in, latent codes and reconstruction IoU out.

    bentoml serve services/encoder/service.py:Encoder --port 3002

``/encode_discs`` takes a label map (NIfTI) and crops every disc as the artifact prescribes (its
``crop_size``, ``crop_spacing_mm`` and ``crop_alignment``): the pipeline's path. ``/encode`` takes
crops already cut to that spec (packed bits, ``discgeo.encoding.pack_crops``). ``Encoder`` (HTTP, one
file per request) hands the crops to ``EncoderModel``, whose batchable API lets BentoML's adaptive
batching merge concurrent requests into one ONNX Runtime call.
"""

from __future__ import annotations

import logging
from pathlib import Path

import aiohttp
import bentoml
import numpy as np
from pydantic import BaseModel

from discgeo import __version__
from discgeo.config import Settings
from discgeo.encoding import CropSpec, disc_crops, unpack_crops
from discgeo.encoding import Encoder as OnnxEncoder
from discgeo.io.nifti import nifti_from_bytes
from discgeo.serving import DISCS, INPUT_BYTES, check_tokens, protect, record_model, stage_request

log = logging.getLogger("discgeo.service")

STAGE = "encoder"


class Latents(BaseModel):
    latents: list[list[float]]
    reconstruction_iou: list[float]
    unusual_shape: list[bool]
    model_version: str
    provider: str


class DiscLatents(Latents):
    levels: list[str]
    too_large: list[dict]


@bentoml.service(
    name="discgeo-encoder-model",
    traffic={"timeout": 120},
    resources={"cpu": "2", "gpu": 1},
    labels={"discgeo_version": __version__},
)
class EncoderModel:
    def __init__(self) -> None:
        self.model = OnnxEncoder.from_settings(Settings.from_env())
        record_model(STAGE, self.model.version, self.model.provider)

    # max_latency_ms bounds wait + compute; the dispatcher answers 503 beyond it, so leave room for CPU
    @bentoml.api(batchable=True, batch_dim=0, max_batch_size=64, max_latency_ms=60_000)
    def encode(self, crops: np.ndarray) -> np.ndarray:
        """[N, 64, 64, 64] uint8 -> [N, latent_dim + 1]: latents and reconstruction IoU."""
        latents, quality = self.model.encode_with_quality(crops)
        return np.concatenate([latents, quality[:, None].astype(np.float32)], axis=1)

    @bentoml.api
    def info(self) -> dict:
        return {
            "version": self.model.version,
            "provider": self.model.provider,
            **self.model.crop_spec.to_metadata(),
            "unusual_below": self.model.unusual_below,
        }


@bentoml.service(
    name="discgeo-encoder",
    traffic={"timeout": 120, "concurrency": 16},
    labels={"discgeo_version": __version__},
)
class Encoder:
    model = bentoml.depends(EncoderModel)

    def __init__(self) -> None:
        check_tokens()
        self.settings = Settings.from_env()
        self.details: dict | None = None

    async def _details(self) -> dict:
        if self.details is None:
            self.details = await self.model.to_async.info()
        return self.details

    async def _encode(self, array: np.ndarray) -> Latents:
        details = await self._details()
        out = await self._run_model(array) if len(array) else np.zeros((0, 5), np.float32)
        DISCS.labels(stage=STAGE).inc(len(array))
        quality = out[:, -1]
        below = details["unusual_below"]
        return Latents(
            latents=out[:, :-1].tolist(),
            reconstruction_iou=quality.tolist(),
            unusual_shape=[below is not None and float(q) < below for q in quality],
            model_version=details["version"],
            provider=details["provider"],
        )

    async def _run_model(self, array: np.ndarray) -> np.ndarray:
        try:
            return await self.model.to_async.encode(array)
        except aiohttp.ClientConnectionError:
            # a kept-alive connection to the model process that it closed meanwhile (seen under load:
            # "Cannot write to closing transport"); inference is pure, so once more on a fresh one
            log.info("encoder model connection was closed; retried once")
            return await self.model.to_async.encode(array)

    @bentoml.api(route="/encode")
    async def encode(self, crops: Path) -> Latents:
        """Encode the crops of a packed-bits .npz cut to the artifact's crop spec (see ``/encode_discs``)."""
        with stage_request(STAGE):
            data = crops.read_bytes()
            INPUT_BYTES.labels(stage=STAGE).observe(len(data))
            array = unpack_crops(data, size=(await self._details())["crop_size"])
            return await self._encode(array)

    @bentoml.api(route="/encode_discs")
    async def encode_discs(self, labels: Path) -> DiscLatents:
        """Crop every disc of a label map (NIfTI) as the artifact prescribes and encode the crops."""
        with stage_request(STAGE):
            data = labels.read_bytes()
            INPUT_BYTES.labels(stage=STAGE).observe(len(data))
            volume = nifti_from_bytes(data, settings=self.settings, labels=True, name="labels")
            crops = disc_crops(volume, spec=CropSpec.from_metadata(await self._details()))
            encoded = await self._encode(crops.crops)
            return DiscLatents(**encoded.model_dump(), levels=crops.levels, too_large=crops.too_large)


protect(Encoder, max_body_bytes=256 * 1024**2)  # label maps and crops: far below this
