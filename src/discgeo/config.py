"""Settings from ``DISCGEO_*`` environment variables, built on demand (never at import time).

=====================================  ==========================================================
variable                               meaning (default)
=====================================  ==========================================================
``DISCGEO_MAX_DIM``                    largest allowed size of any volume axis, voxels (2048)
``DISCGEO_MAX_VOXELS``                 largest allowed number of voxels in a volume (200000000)
``DISCGEO_CONTRAST_PREFERENCE``        series contrasts in order of preference (``t1,t2``)
``DISCGEO_ACCEPTED_PLANES``            acquisition planes a study series may have (``sagittal``)
``DISCGEO_ORIENTATION_TOLERANCE``      max difference of direction cosines within a series (1e-3)
``DISCGEO_SLICE_SPACING_TOLERANCE``    max relative deviation of slice spacing from the median (0.05)
``DISCGEO_MODELS_DIR``                 folder of model artifacts (``models/`` of the source tree)
``DISCGEO_<NAME>_ARTIFACT``            one artifact folder, e.g. ``DISCGEO_AUTOENCODER_ARTIFACT``
``DISCGEO_ONNX_PROVIDERS``             ONNX Runtime providers in order (CUDA, then CPU, if offered)
``DISCGEO_SEGMENTER_MODE``             ``fast`` (one inference scale) or ``accurate`` (the artifact's
                                       multi-scale set, about 5x the segmenter time) (``fast``)
``DISCGEO_DEVICE_UID``                 the SR's device observer UID (default: derived from the
                                       deployment secret for the gateway, from the host name else)
``DISCGEO_FORWARD_FINDINGS``           ``1``: the SR carries the narrowing findings; otherwise it
                                       carries the measurements only (results.json always has both)
``DISCGEO_MAX_BODY_BYTES``             largest request body a stage service accepts (each
                                       service's own: 2 GiB segmenter, 256 MiB geometry and
                                       encoder, 1 MiB classifier)
``DISCGEO_STAGE_TOKEN_FILE``           file holding the bearer token the stage services accept and
                                       the gateway sends (required by every service)
``DISCGEO_<STAGE>_URL``                base URL of a stage service, for the gateway
``DISCGEO_GATEWAY_*``                  the gateway's settings: :class:`GatewaySettings`
=====================================  ==========================================================
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from discgeo.errors import ConfigurationError

PLANES = ("sagittal", "coronal", "axial")
SOURCE_MODELS_DIR = Path(__file__).resolve().parents[2] / "models"
CONTRASTS = ("t1", "t2")
SEGMENTER_MODES = ("fast", "accurate")


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Runtime settings; build with :meth:`Settings.from_env`."""

    max_dim: int = 2048
    max_voxels: int = 200_000_000
    max_body_bytes: int | None = None  # a stage service's own cap when unset
    contrast_preference: tuple[str, ...] = ("t1", "t2")
    accepted_planes: tuple[str, ...] = ("sagittal",)
    orientation_tolerance: float = 1e-3
    slice_spacing_tolerance: float = 0.05
    models_dir: Path = SOURCE_MODELS_DIR
    artifact_overrides: tuple[tuple[str, Path], ...] = ()
    onnx_providers: tuple[str, ...] = ()
    onnx_threads: int | None = None  # intra-op threads; None: the CPUs the cgroup quota allows
    segmenter_mode: str = "fast"
    device_uid: str | None = None
    forward_findings: bool = False
    stage_token_file: Path | None = None
    stage_urls: tuple[tuple[str, str], ...] = ()
    gateway: GatewaySettings = field(default_factory=lambda: GatewaySettings())

    def artifact(self, name: str) -> Path:
        """Folder of the artifact ``name`` (``autoencoder``, ``segmenter``, ``classifier``)."""
        return dict(self.artifact_overrides).get(name, self.models_dir / name)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read ``DISCGEO_*`` variables from ``env`` (default: ``os.environ``)."""
        env = os.environ if env is None else env

        def get(name: str) -> str | None:
            value = env.get("DISCGEO_" + name)
            return value.strip() if value is not None and value.strip() else None

        def as_int(name: str, default: int) -> int:
            raw = get(name)
            if raw is None:
                return default
            try:
                value = int(raw)
            except ValueError:
                raise ConfigurationError(f"DISCGEO_{name}={raw!r} is not an integer") from None
            if value <= 0:
                raise ConfigurationError(f"DISCGEO_{name} must be positive, got {value}")
            return value

        def as_float(name: str, default: float) -> float:
            raw = get(name)
            if raw is None:
                return default
            try:
                value = float(raw)
            except ValueError:
                raise ConfigurationError(f"DISCGEO_{name}={raw!r} is not a number") from None
            if not value > 0:
                raise ConfigurationError(f"DISCGEO_{name} must be positive, got {value}")
            return value

        def as_choices(name: str, default: tuple[str, ...], allowed: tuple[str, ...]) -> tuple[str, ...]:
            raw = get(name)
            if raw is None:
                return default
            items = tuple(item.strip().lower() for item in raw.split(",") if item.strip())
            bad = [item for item in items if item not in allowed]
            if bad or not items:
                raise ConfigurationError(
                    f"DISCGEO_{name}={raw!r}: expected a comma-separated list of {', '.join(allowed)}"
                )
            return items

        def as_path(name: str) -> Path | None:
            raw = get(name)
            return Path(raw) if raw else None

        segmenter_mode = (get("SEGMENTER_MODE") or cls.segmenter_mode).lower()
        if segmenter_mode not in SEGMENTER_MODES:
            raise ConfigurationError(
                f"DISCGEO_SEGMENTER_MODE={segmenter_mode!r}: expected one of {', '.join(SEGMENTER_MODES)}"
            )
        return cls(
            max_dim=as_int("MAX_DIM", cls.max_dim),
            max_voxels=as_int("MAX_VOXELS", cls.max_voxels),
            max_body_bytes=as_int("MAX_BODY_BYTES", 0) or None,
            contrast_preference=as_choices("CONTRAST_PREFERENCE", cls.contrast_preference, CONTRASTS),
            accepted_planes=as_choices("ACCEPTED_PLANES", cls.accepted_planes, PLANES),
            orientation_tolerance=as_float("ORIENTATION_TOLERANCE", cls.orientation_tolerance),
            slice_spacing_tolerance=as_float("SLICE_SPACING_TOLERANCE", cls.slice_spacing_tolerance),
            models_dir=Path(get("MODELS_DIR") or SOURCE_MODELS_DIR),
            artifact_overrides=tuple(
                (name, Path(value))
                for name in ("autoencoder", "segmenter", "classifier")
                if (value := get(f"{name.upper()}_ARTIFACT"))
            ),
            onnx_providers=tuple(p.strip() for p in (get("ONNX_PROVIDERS") or "").split(",") if p.strip()),
            onnx_threads=as_int("ONNX_THREADS", 0) or None,
            segmenter_mode=segmenter_mode,
            device_uid=get("DEVICE_UID"),
            forward_findings=(get("FORWARD_FINDINGS") or "0").lower() in ("1", "true", "yes"),
            stage_token_file=as_path("STAGE_TOKEN_FILE"),
            stage_urls=tuple(
                (name, url.rstrip("/")) for name in STAGE_NAMES if (url := get(f"{name.upper()}_URL"))
            ),
            gateway=GatewaySettings(
                data_dir=as_path("GATEWAY_DATA"),
                ae_title=get("GATEWAY_AE_TITLE") or GatewaySettings.ae_title,
                dicom_host=get("GATEWAY_DICOM_HOST") or GatewaySettings.dicom_host,
                dicom_port=as_int("GATEWAY_DICOM_PORT", GatewaySettings.dicom_port),
                allowed_aes=tuple(
                    a.strip() for a in (get("GATEWAY_ALLOWED_AES") or "").split(",") if a.strip()
                ),
                allowed_sources=_networks(get("GATEWAY_ALLOWED_SOURCES"), GatewaySettings.allowed_sources),
                idle_s=as_float("GATEWAY_IDLE_S", GatewaySettings.idle_s),
                stable_s=as_float("GATEWAY_STABLE_S", GatewaySettings.stable_s),
                workers=as_int("GATEWAY_WORKERS", GatewaySettings.workers),
                study_timeout_s=as_float("GATEWAY_STUDY_TIMEOUT_S", GatewaySettings.study_timeout_s),
                retry_s=as_float("GATEWAY_RETRY_S", GatewaySettings.retry_s),
                max_attempts=as_int("GATEWAY_MAX_ATTEMPTS", GatewaySettings.max_attempts),
                forward=get("GATEWAY_FORWARD"),
                max_body_bytes=as_int("GATEWAY_MAX_BODY_BYTES", GatewaySettings.max_body_bytes),
                max_associations=as_int("GATEWAY_MAX_ASSOCIATIONS", GatewaySettings.max_associations),
                retention_days=as_float("GATEWAY_RETENTION_DAYS", GatewaySettings.retention_days),
                tokens_file=as_path("GATEWAY_TOKENS_FILE"),
                secret_file=as_path("GATEWAY_SECRET_FILE"),
                database=get("GATEWAY_DATABASE"),
            ),
        )

    def stage_url(self, name: str) -> str:
        """Base URL of the stage service ``name`` (``DISCGEO_<NAME>_URL``)."""
        url = dict(self.stage_urls).get(name)
        if url is None:
            raise ConfigurationError(f"DISCGEO_{name.upper()}_URL must give the {name} service's base URL")
        return url


STAGE_NAMES = ("segmenter", "encoder", "geometry", "classifier")


@dataclass(frozen=True, kw_only=True)
class GatewaySettings:
    """The gateway's part of :class:`Settings` (``DISCGEO_GATEWAY_*``).

    ``data_dir`` (``_DATA``): job database, spool and results (required by the gateway).
    ``ae_title`` / ``dicom_host`` / ``dicom_port``: the C-STORE SCP (``DISCGEO`` on 127.0.0.1:11112).
    ``allowed_aes``: calling AE titles that may store (comma-separated; none configured: every
    association is refused). ``allowed_sources``: networks they may connect from (127.0.0.1/32, ::1).
    ``max_associations``: associations served at once; one more is rejected as transient ("local
    limit exceeded"), which a PACS retries (64).
    ``idle_s``: a study is complete this long after the last instance once its sender released the
    association or finished the STOW-RS request (10); ``stable_s``: complete this long after the last
    instance when the sender never finished (an aborted or broken association) (120).
    ``workers``: studies processed at once (2); ``study_timeout_s``: deadline of one study (1800);
    ``retry_s``: how long transient stage failures are retried (600); ``max_attempts``: processing
    attempts before a study is dead-lettered (3). ``forward``: ``dicom://AET@host:port`` or a DICOMweb
    base URL for the SEG and SR. ``max_body_bytes``: largest STOW-RS body (2 GiB).
    ``retention_days``: spool and results of finished studies are deleted after this long (30).
    ``tokens_file``: bearer tokens (one per line) accepted by the HTTP API (required).
    ``secret_file``: the deployment secret for hashed keys and the device UID (default:
    ``<data>/secret``, created on first start).
    ``database``: a PostgreSQL URL (``postgresql://user@host:5432/db``; the password from libpq's
    ``PGPASSWORD`` or ``PGPASSFILE``) for a job store shared by several gateway replicas, whose
    ``data_dir`` must then be the same shared folder; unset: SQLite in ``data_dir``, one process.
    """

    data_dir: Path | None = None
    ae_title: str = "DISCGEO"
    dicom_host: str = "127.0.0.1"
    dicom_port: int = 11112
    allowed_aes: tuple[str, ...] = ()
    allowed_sources: tuple[str, ...] = ("127.0.0.1/32", "::1/128")
    max_associations: int = 64
    idle_s: float = 10.0
    stable_s: float = 120.0
    workers: int = 2
    study_timeout_s: float = 1800.0
    retry_s: float = 600.0
    max_attempts: int = 3
    forward: str | None = None
    max_body_bytes: int = 2 * 1024**3
    retention_days: float = 30.0
    tokens_file: Path | None = None
    secret_file: Path | None = None
    database: str | None = None

    def data(self) -> Path:
        if self.data_dir is None:
            raise ConfigurationError("DISCGEO_GATEWAY_DATA must name the gateway's data folder")
        return self.data_dir


def _networks(raw: str | None, default: tuple[str, ...]) -> tuple[str, ...]:
    if raw is None:
        return default
    items = tuple(item.strip() for item in raw.split(",") if item.strip())
    for item in items:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ConfigurationError(
                f"DISCGEO_GATEWAY_ALLOWED_SOURCES: {item!r} is not an address or network"
            ) from None
    return items


def read_tokens(path: Path | None, what: str) -> tuple[str, ...]:
    """Bearer tokens from a file (one per line, e.g. a mounted Kubernetes Secret); refuses none."""
    if path is None:
        raise ConfigurationError(f"{what} must name a file of bearer tokens (one per line)")
    try:
        tokens = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    except OSError as exc:
        raise ConfigurationError(f"{what}: cannot read {path} ({exc.strerror})") from None
    if not tokens or any(len(t) < 16 for t in tokens):
        raise ConfigurationError(f"{what}: {path} must hold tokens of at least 16 characters")
    return tokens
