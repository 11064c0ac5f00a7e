"""Encoder service: packed binary disc crops in, latent codes and reconstruction IoU out.

    bentoml serve services/encoder/service.py:Encoder --port 3002

``Encoder`` (HTTP, one file per request) hands the crops to ``EncoderModel``, whose batchable API
lets BentoML's adaptive batching merge concurrent requests into one ONNX Runtime call.
"""

from __future__ import annotations

from pathlib import Path

import bentoml
import numpy as np
from pydantic import BaseModel

from discgeo import __version__
from discgeo.config import Settings
from discgeo.encoding import Encoder as OnnxEncoder
from discgeo.encoding import unpack_crops
from discgeo.serving import DISCS, INPUT_BYTES, record_model, stage_request

STAGE = "encoder"


class Latents(BaseModel):
    latents: list[list[float]]
    reconstruction_iou: list[float]
    model_version: str
    provider: str


@bentoml.service(
    name="discgeo-encoder-model",
    traffic={"timeout": 120},
    resources={"cpu": "2", "gpu": 1},
    labels={"discgeo_version": __version__},
)
class EncoderModel:
    def __init__(self) -> None:
        settings = Settings.from_env()
        self.model = OnnxEncoder.from_artifact(
            settings.artifact("autoencoder"), providers=settings.onnx_providers or None
        )
        record_model(STAGE, self.model.version, self.model.provider)

    # max_latency_ms bounds wait + compute; the dispatcher answers 503 beyond it, so leave room for CPU
    @bentoml.api(batchable=True, batch_dim=0, max_batch_size=64, max_latency_ms=60_000)
    def encode(self, crops: np.ndarray) -> np.ndarray:
        """[N, 64, 64, 64] uint8 -> [N, latent_dim + 1]: latents and reconstruction IoU."""
        latents, quality = self.model.encode_with_quality(crops)
        return np.concatenate([latents, quality[:, None].astype(np.float32)], axis=1)

    @bentoml.api
    def info(self) -> dict:
        return {"version": self.model.version, "provider": self.model.provider}


@bentoml.service(
    name="discgeo-encoder",
    traffic={"timeout": 120, "concurrency": 16},
    labels={"discgeo_version": __version__},
)
class Encoder:
    model = bentoml.depends(EncoderModel)

    def __init__(self) -> None:
        self.details: dict | None = None

    @bentoml.api(route="/encode")
    async def encode(self, crops: Path) -> Latents:
        """Encode the crops of a packed-bits .npz (see discgeo.encoding.pack_crops)."""
        with stage_request(STAGE):
            data = crops.read_bytes()
            INPUT_BYTES.labels(stage=STAGE).observe(len(data))
            array = unpack_crops(data)
            if self.details is None:
                self.details = await self.model.to_async.info()
            out = await self.model.to_async.encode(array) if len(array) else np.zeros((0, 5), np.float32)
            DISCS.labels(stage=STAGE).inc(len(array))
            return Latents(
                latents=out[:, :-1].tolist(),
                reconstruction_iou=out[:, -1].tolist(),
                model_version=self.details["version"],
                provider=self.details["provider"],
            )
