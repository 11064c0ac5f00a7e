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
=====================================  ==========================================================
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
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
    contrast_preference: tuple[str, ...] = ("t1", "t2")
    accepted_planes: tuple[str, ...] = ("sagittal",)
    orientation_tolerance: float = 1e-3
    slice_spacing_tolerance: float = 0.05
    models_dir: Path = SOURCE_MODELS_DIR
    artifact_overrides: tuple[tuple[str, Path], ...] = ()
    onnx_providers: tuple[str, ...] = ()
    segmenter_mode: str = "fast"

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

        segmenter_mode = (get("SEGMENTER_MODE") or cls.segmenter_mode).lower()
        if segmenter_mode not in SEGMENTER_MODES:
            raise ConfigurationError(
                f"DISCGEO_SEGMENTER_MODE={segmenter_mode!r}: expected one of {', '.join(SEGMENTER_MODES)}"
            )
        return cls(
            max_dim=as_int("MAX_DIM", cls.max_dim),
            max_voxels=as_int("MAX_VOXELS", cls.max_voxels),
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
            segmenter_mode=segmenter_mode,
        )
