"""The pipeline: segment -> measure -> encode -> classify, in-process or over HTTP.

``Stages`` is the contract; :class:`LocalStages` runs the library in this process (``discgeo run``),
:class:`RemoteStages` calls the four BentoML services with explicit timeouts and retries (exponential
backoff on connection errors and 5xx answers, none on 4xx). :func:`analyse_study` turns a volume into
a :class:`~discgeo.schemas.StudyResult` plus the label map, with per-stage timings and quality flags.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import numpy as np

from discgeo.config import STAGE_NAMES, Settings
from discgeo.errors import DiscgeoError, InvalidDataError
from discgeo.schemas import DiscResult, GeometryResult, LevelNaming, NarrowingPrediction, StudyResult
from discgeo.volume import Volume

log = logging.getLogger(__name__)
T = TypeVar("T")

FEW_DISCS = 4


@dataclass(frozen=True)
class Encoded:
    """Latents and reconstruction quality of every disc the encoder could crop, by level; the
    ``unusual`` flag is the encoder artifact's own threshold on the reconstruction IoU."""

    levels: list[str]
    latents: np.ndarray
    reconstruction_iou: np.ndarray
    unusual: list[bool]
    too_large: list[dict[str, Any]]


class Stages(Protocol):
    """What the pipeline needs from each stage, wherever it runs."""

    def segment(self, volume: Volume) -> Volume: ...

    def measure(self, labels: Volume) -> GeometryResult: ...

    def encode(self, labels: Volume) -> Encoded: ...

    def classify(self, rows: Sequence[dict[str, float]]) -> NarrowingPrediction: ...

    def versions(self) -> dict[str, str]: ...


class LocalStages:
    """All stages in this process, from artifact folders (defaults: settings' model folders)."""

    def __init__(self, *, segmenter: Any = None, encoder: Any = None, classifier: Any = None) -> None:
        from discgeo.classification import NarrowingClassifier
        from discgeo.config import Settings
        from discgeo.encoding import Encoder
        from discgeo.segmentation import Segmenter

        settings = Settings.from_env()
        self.segmenter = segmenter or Segmenter.from_settings(settings)
        self.encoder = encoder or Encoder.from_settings(settings)
        self.classifier = classifier or NarrowingClassifier.from_artifact(settings.artifact("classifier"))
        self.classifier.check_encoder(self.encoder.version)

    def segment(self, volume: Volume) -> Volume:
        return self.segmenter.predict(volume)

    def measure(self, labels: Volume) -> GeometryResult:
        from discgeo.geometry import measure_discs

        return measure_discs(labels)

    def encode(self, labels: Volume) -> Encoded:
        crops = self.encoder.crop(labels)
        latents, quality = self.encoder.encode_with_quality(crops.crops)
        unusual = [self.encoder.is_unusual(float(q)) for q in quality]
        return Encoded(crops.levels, latents, quality, unusual, crops.too_large)

    def classify(self, rows: Sequence[dict[str, float]]) -> NarrowingPrediction:
        p, labels = self.classifier.predict(list(rows))
        return NarrowingPrediction(
            probabilities=p.tolist(),
            labels=labels.tolist(),
            threshold=self.classifier.threshold,
            features=list(self.classifier.features),
            model_version=self.classifier.version,
        )

    def versions(self) -> dict[str, str]:
        return {
            "segmenter": self.segmenter.version,
            "encoder": self.encoder.version,
            "classifier": self.classifier.version,
        }


class RemoteStageError(DiscgeoError):
    """A stage service answered with an error (4xx: the input; 5xx after retries: the service).

    ``transient`` says whether trying the same study again later may succeed (the service was
    unreachable or failed), as opposed to the input being refused or a call timing out. A timed-out
    call is not blindly repeated: the service may still be computing the abandoned request, so
    ``busy_for_s`` says how long to leave it before the study is tried again."""

    code = "stage_error"

    def __init__(
        self, message: str, status: int, *, transient: bool = False, busy_for_s: float = 0.0
    ) -> None:
        super().__init__(message)
        self.http_status = status if 400 <= status < 500 else 502
        self.transient = transient
        self.busy_for_s = busy_for_s


@dataclass(frozen=True)
class ServiceURLs:
    """Base URLs of the four services."""

    segmenter: str
    encoder: str
    geometry: str
    classifier: str


class RemoteStages:
    """The stages as HTTP calls to the BentoML services.

    Timeouts are per stage (segmentation is slow on CPU) and never reach past ``deadline`` (a
    ``time.monotonic()`` value, set per study by the gateway); connection errors and 5xx answers are
    retried ``retries`` times with exponential backoff and jitter; 4xx answers and timeouts are
    raised at once. Every call carries ``headers`` (the bearer token of the stage services).
    """

    def __init__(
        self,
        urls: ServiceURLs,
        *,
        timeouts_s: dict[str, float] | None = None,
        retries: int = 3,
        backoff_s: float = 0.5,
        headers: dict[str, str] | None = None,
    ) -> None:
        import httpx

        self.urls = urls
        self.deadline: float | None = None
        self.timeouts = {
            "segmenter": 600.0,
            "encoder": 120.0,
            "geometry": 60.0,
            "classifier": 30.0,
            **(timeouts_s or {}),
        }
        self.retries = retries
        self.backoff = backoff_s
        self.client = httpx.Client(headers=headers or {})
        self._versions: dict[str, str] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> RemoteStages:
        """The four services at ``DISCGEO_<STAGE>_URL`` with the token of ``DISCGEO_STAGE_TOKEN_FILE``."""
        from discgeo.auth import bearer_header

        urls = ServiceURLs(**{name: settings.stage_url(name) for name in STAGE_NAMES})
        return cls(urls, headers=bearer_header(settings.stage_token_file, "DISCGEO_STAGE_TOKEN_FILE"))

    def close(self) -> None:
        """Release the HTTP connections."""
        self.client.close()

    def _call(self, stage: str, send: Callable[[float], Any]) -> Any:
        import httpx

        delay = self.backoff
        for attempt in range(self.retries + 1):
            timeout = self.timeouts[stage]
            if self.deadline is not None:
                timeout = min(timeout, self.deadline - time.monotonic())
                if timeout <= 0:
                    raise RemoteStageError(f"the study's deadline passed before the {stage} call", 504)
            try:
                response = send(timeout)
            except httpx.TimeoutException as exc:
                # a request that reached the service may run there for the stage's whole timeout
                started = not isinstance(exc, httpx.ConnectTimeout | httpx.PoolTimeout)
                raise RemoteStageError(
                    f"{stage} service did not answer within {timeout:.0f} s",
                    504,
                    busy_for_s=self.timeouts[stage] if started else 0.0,
                ) from None
            except httpx.TransportError as exc:
                if attempt == self.retries:
                    raise RemoteStageError(
                        f"{stage} service unreachable after {attempt + 1} tries: {type(exc).__name__}",
                        503,
                        transient=True,
                    ) from None
            else:
                if response.status_code < 400:
                    return response
                message = _error_text(response)
                if response.status_code < 500 or attempt == self.retries:
                    raise RemoteStageError(
                        f"{stage} service: {message}",
                        response.status_code,
                        transient=response.status_code >= 500,
                    )
            log.warning("%s call failed (try %d), retrying in %.1f s", stage, attempt + 1, delay)
            time.sleep(delay * random.uniform(0.5, 1.5))
            delay *= 2
        raise AssertionError("unreachable")

    def segment(self, volume: Volume) -> Volume:
        from discgeo.io.nifti import nifti_from_bytes, nifti_to_bytes
        from discgeo.segmentation import SEGMENTATION_HEADER, with_segmentation_header

        payload = nifti_to_bytes(volume)
        response = self._call(
            "segmenter",
            lambda t: self.client.post(
                self.urls.segmenter + "/segment",
                files={"volume": ("volume.nii.gz", payload, "application/gzip")},
                timeout=t,
            ),
        )
        self._versions["segmenter"] = response.headers.get("x-discgeo-model-version", "unknown")
        labels = nifti_from_bytes(response.content, labels=True, name="segmenter response")
        canonical = volume.canonical()
        if labels.shape != canonical.shape or not np.allclose(labels.affine, canonical.affine, atol=1e-3):
            raise RemoteStageError("segmenter service answered on a different voxel grid", 502)
        # NIfTI stores the affine in float32: keep the input's exact geometry
        return with_segmentation_header(
            canonical.with_array(labels.array), response.headers.get(SEGMENTATION_HEADER.lower())
        )

    def measure(self, labels: Volume) -> GeometryResult:
        from discgeo.io.nifti import nifti_to_bytes

        payload = nifti_to_bytes(labels)
        response = self._call(
            "geometry",
            lambda t: self.client.post(
                self.urls.geometry + "/measure",
                files={"labels": ("labels.nii.gz", payload, "application/gzip")},
                timeout=t,
            ),
        )
        return GeometryResult.model_validate(response.json())

    def encode(self, labels: Volume) -> Encoded:
        from discgeo.io.nifti import nifti_to_bytes

        payload = nifti_to_bytes(labels)
        response = self._call(
            "encoder",
            lambda t: self.client.post(
                self.urls.encoder + "/encode_discs",
                files={"labels": ("labels.nii.gz", payload, "application/gzip")},
                timeout=t,
            ),
        )
        body = response.json()
        self._versions["encoder"] = body["model_version"]
        count = len(body["levels"])
        return Encoded(
            list(body["levels"]),
            np.asarray(body["latents"], dtype=np.float32).reshape(count, -1),
            np.asarray(body["reconstruction_iou"], dtype=np.float64),
            [bool(v) for v in body["unusual_shape"]],
            list(body["too_large"]),
        )

    def classify(self, rows: Sequence[dict[str, float]]) -> NarrowingPrediction:
        response = self._call(
            "classifier",
            lambda t: self.client.post(
                self.urls.classifier + "/predict",
                json={"discs": list(rows), "encoder_version": self._versions.get("encoder")},
                timeout=t,
            ),
        )
        prediction = NarrowingPrediction.model_validate(response.json())
        self._versions["classifier"] = prediction.model_version
        return prediction

    def versions(self) -> dict[str, str]:
        return dict(self._versions)


def _error_text(response: Any) -> str:
    try:
        body = response.json()
    except ValueError:
        return str(response.text)[:300]
    if isinstance(body, list) and body and isinstance(body[0], dict):
        body = body[0]
    return str(body.get("error", body)) if isinstance(body, dict) else str(body)


def _timed(timings: dict[str, float], stage: str, fn: Callable[[], T]) -> T:
    start = time.perf_counter()
    try:
        return fn()
    finally:
        timings[stage] = round(time.perf_counter() - start, 4)


def analyse_study(volume: Volume, stages: Stages, *, study: str = "study") -> tuple[StudyResult, Volume]:
    """Run every stage on one volume; returns the result and the disc label map (volume's grid)."""
    from discgeo.classification import disc_features

    timings: dict[str, float] = {}
    start = time.perf_counter()
    labels = _timed(timings, "segment", lambda: stages.segment(volume))
    flags: list[str] = []
    if not np.any(labels.array):
        raise InvalidDataError("no intervertebral disc was found in this volume")
    geometry = _timed(timings, "measure", lambda: stages.measure(labels))
    encoded = _timed(timings, "encode", lambda: stages.encode(labels))
    by_encoder = {
        level: (z, float(q), unusual)
        for level, z, q, unusual in zip(
            encoded.levels, encoded.latents, encoded.reconstruction_iou, encoded.unusual, strict=True
        )
    }
    latents = {level: z for level, (z, _, _) in by_encoder.items()}
    features = disc_features(geometry.discs, latents)
    rows, classified = list(features.values()), list(features)
    prediction = _timed(timings, "classify", lambda: stages.classify(rows)) if rows else None
    by_level = (
        dict(zip(classified, zip(prediction.probabilities, prediction.labels, strict=True), strict=True))
        if prediction
        else {}
    )
    too_large = {item["level"] for item in encoded.too_large}
    naming = LevelNaming(
        named_from=str(labels.meta.get("levels_from", "lowest disc")),
        uncertain=bool(labels.meta.get("levels_uncertain", False)),
        notes=[str(note) for note in labels.meta.get("level_notes", [])],
    )
    discs = []
    for disc in geometry.discs:
        disc_flags = ["level_uncertain"] if naming.uncertain else []
        z_q = by_encoder.get(disc.level)
        if disc.level in too_large:
            disc_flags.append("too_large_for_encoder")
        if z_q is not None and z_q[2]:
            disc_flags.append("unusual_shape")
        p_l = by_level.get(disc.level)
        discs.append(
            DiscResult(
                level=disc.level,
                label=disc.label,
                geometry=disc,
                latents=[float(v) for v in z_q[0]] if z_q is not None else None,
                reconstruction_iou=z_q[1] if z_q is not None else None,
                narrowing_probability=float(p_l[0]) if p_l else None,
                narrowing=bool(p_l[1]) if p_l else None,
                flags=disc_flags,
            )
        )
    if naming.uncertain:
        flags.append("levels_uncertain")
    if len(discs) < FEW_DISCS:
        flags.append("few_discs")
    if geometry.dropped_fragments or labels.meta.get("dropped_fragments"):
        flags.append("fragments_dropped")
    timings["total"] = round(time.perf_counter() - start, 4)
    result = StudyResult(
        study=study,
        input={
            "shape": list(volume.shape),
            "spacing_mm": [round(s, 4) for s in volume.spacing],
            "orientation": "".join(volume.source_axcodes),
            "contrast": str(volume.meta.get("contrast", "unknown")),
        },
        model_versions=stages.versions(),
        discs=discs,
        levels=naming,
        flags=flags,
        timings_s=timings,
    )
    return result, labels
