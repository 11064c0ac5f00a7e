"""Disc-narrowing classifier on latent, geometric and patient-relative features (scikit-learn),
stored safely with skops.

Feature sets (:func:`feature_sets`): ``latent`` (the autoencoder's code), ``geometric`` (the
reference study's six features in mm/degrees, :data:`discgeo.geometry.REFERENCE_FEATURES`),
``combined`` (both), ``relative`` (:data:`RELATIVE_FEATURES`: how the disc compares with the patient's
own discs and with its level, as radiologists grade narrowing) and ``all``. The relative features use
level-normalised heights ``n = mean height / the level's real reference median``
(:mod:`discgeo.reference`): ``height_vs_adjacent`` = n over the mean n of the adjacent discs (1 without
neighbours), ``height_vs_patient`` = n over the median n of the patient's discs, ``height_vs_level`` =
n, ``height_to_width_ratio`` (mean height / AP width) and ``level_index`` (0 = L5-S1). Models:
gradient boosting (``HistGradientBoostingClassifier``) and a logistic-regression baseline, each after
standard scaling, with sigmoid calibration of the probabilities by internal cross-validation.
"""

from __future__ import annotations

import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from discgeo.errors import ArtifactError, InvalidDataError, ModelMismatchError
from discgeo.geometry import REFERENCE_FEATURES

MODEL_FILE = "classifier.skops"


def latent_names(dim: int) -> tuple[str, ...]:
    """Names of the latent features: latent_0 .. latent_{dim-1}."""
    return tuple(f"latent_{i}" for i in range(dim))


RELATIVE_FEATURES = (
    "height_vs_adjacent",
    "height_vs_patient",
    "height_vs_level",
    "height_to_width_ratio",
    "level_index",
)


def feature_sets(latent_dim: int) -> dict[str, tuple[str, ...]]:
    """The study's three feature sets, the patient-relative one, and all together."""
    latent = latent_names(latent_dim)
    return {
        "latent": latent,
        "geometric": REFERENCE_FEATURES,
        "combined": latent + REFERENCE_FEATURES,
        "relative": RELATIVE_FEATURES,
        "all": latent + REFERENCE_FEATURES + RELATIVE_FEATURES,
    }


def relative_features(discs: Sequence[Any]) -> list[dict[str, float]]:
    """The relative features of one patient's discs (objects with ``level``, ``mean_height_mm`` and
    ``height_to_width_ratio``, e.g. :class:`discgeo.schemas.DiscGeometry`), in the given order."""
    from discgeo import reference

    order = sorted(range(len(discs)), key=lambda i: reference.level_index(discs[i].level))
    index = {i: reference.level_index(discs[i].level) for i in order}
    norm = {
        i: float(discs[i].mean_height_mm) / reference.expected("mean_height_mm", discs[i].level)
        for i in order
    }
    median = float(np.median(list(norm.values()))) if norm else 1.0
    out = []
    for i in range(len(discs)):
        neighbours = [norm[j] for j in order if abs(index[j] - index[i]) == 1]
        out.append(
            {
                "height_vs_adjacent": norm[i] / float(np.mean(neighbours)) if neighbours else 1.0,
                "height_vs_patient": norm[i] / median,
                "height_vs_level": norm[i],
                "height_to_width_ratio": float(discs[i].height_to_width_ratio),
                "level_index": float(index[i]),
            }
        )
    return out


def disc_features(discs: Sequence[Any], latents: Mapping[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Every feature of each disc that has a latent code, by level: latents, the reference study's
    geometric features and the relative ones (the classifier takes the ones it was trained on)."""
    relative = relative_features(discs)
    rows = {}
    for disc, rel in zip(discs, relative, strict=True):
        if disc.level not in latents:
            continue
        row = {f"latent_{i}": float(v) for i, v in enumerate(latents[disc.level])}
        row.update({name: float(getattr(disc, name)) for name in REFERENCE_FEATURES})
        row.update(rel)
        rows[disc.level] = row
    return rows


# A disc that is thinner against its neighbours, its patient, its level or its own width is never less
# likely narrowed: boosting is held to that (``monotonic_cst``), so that label noise in the training
# cohort cannot leave islands where a tall disc scores high (it did: two real healthy L5-S1 discs with
# heights ~1.14x their neighbours' were called narrowed before the constraint).
DECREASING_FEATURES = ("height_vs_adjacent", "height_vs_patient", "height_vs_level", "height_to_width_ratio")


def make_model(
    kind: str = "boosting", *, seed: int = 0, calibrate: bool = True, features: Sequence[str] = ()
) -> Any:
    """A scikit-learn pipeline: scaling + classifier, optionally with calibrated probabilities.
    ``features`` names the columns in order; boosting is then constrained to decrease in
    :data:`DECREASING_FEATURES` (standard scaling keeps the direction)."""
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if kind == "boosting":
        estimator = HistGradientBoostingClassifier(
            max_iter=200,
            learning_rate=0.05,
            max_leaf_nodes=15,
            min_samples_leaf=20,
            l2_regularization=1.0,
            random_state=seed,
            monotonic_cst=[-1 if name in DECREASING_FEATURES else 0 for name in features] or None,
        )
    elif kind == "logistic":
        estimator = LogisticRegression(C=1.0, max_iter=2000)
    else:
        raise ValueError(f"unknown model kind {kind!r}; use boosting or logistic")
    pipeline = make_pipeline(StandardScaler(), estimator)
    if not calibrate:
        return pipeline
    return CalibratedClassifierCV(pipeline, method="sigmoid", cv=3)


class NarrowingClassifier:
    """A fitted narrowing model with its feature order, threshold and provenance."""

    def __init__(
        self,
        model: Any,
        features: Sequence[str],
        *,
        threshold: float = 0.5,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        self.model = model
        self.features = tuple(features)
        self.threshold = threshold
        self.metadata = dict(metadata or {})

    @property
    def version(self) -> str:
        """Artifact version."""
        return str(self.metadata.get("version", "unversioned"))

    @property
    def encoder_version(self) -> str | None:
        """Version of the autoencoder whose latents this model was trained on (None: no latents)."""
        if not any(name.startswith("latent_") for name in self.features):
            return None
        value = self.metadata.get("encoder_version")
        return None if value is None else str(value)

    def check_encoder(self, version: str | None) -> None:
        """Refuse latents from another autoencoder: a latent code means nothing to a model trained
        on a different encoder's codes, and the predictions would be silently wrong."""
        if version is not None and self.encoder_version is not None and version != self.encoder_version:
            raise ModelMismatchError(
                f"latent features come from autoencoder {version}, but classifier {self.version} was "
                f"trained on autoencoder {self.encoder_version}'s latents: retrain the classifier "
                "(python -m training.classifier) or deploy the matching autoencoder"
            )

    def _matrix(self, rows: np.ndarray | Sequence[Mapping[str, float]]) -> np.ndarray:
        if isinstance(rows, np.ndarray):
            x = np.asarray(rows, dtype=np.float64)
            if x.ndim != 2 or x.shape[1] != len(self.features):
                raise InvalidDataError(
                    f"expected features [N, {len(self.features)}] in the order "
                    f"{', '.join(self.features)}; got shape {list(x.shape)}"
                )
        else:
            missing = sorted({f for row in rows for f in self.features if f not in row})
            if missing:
                raise InvalidDataError(f"missing feature(s): {', '.join(missing)}")
            x = np.array([[float(row[f]) for f in self.features] for row in rows], dtype=np.float64)
        if not np.all(np.isfinite(x)):
            raise InvalidDataError("features must be finite numbers (NaN or infinity found)")
        return x

    def predict_proba(self, rows: np.ndarray | Sequence[Mapping[str, float]]) -> np.ndarray:
        """Probability of narrowing per disc."""
        return np.asarray(self.model.predict_proba(self._matrix(rows))[:, 1])

    def predict(self, rows: np.ndarray | Sequence[Mapping[str, float]]) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities, 0/1 labels at the stored threshold)."""
        p = self.predict_proba(rows)
        return p, (p >= self.threshold).astype(int)

    def save(self, folder: str | Path) -> Path:
        """Write ``classifier.skops`` and metadata.json (feature order, versions, sha256)."""
        import sklearn
        import skops.io as sio

        from discgeo.artifacts import write_artifact

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        sio.dump(self.model, folder / MODEL_FILE)
        metadata = {
            **self.metadata,
            "kind": "classifier",
            "features": list(self.features),
            "threshold": self.threshold,
            "files": {"model": MODEL_FILE},
            "libraries": {
                "scikit-learn": sklearn.__version__,
                "skops": _version("skops"),
                "numpy": np.__version__,
                "python": platform.python_version(),
            },
        }
        return write_artifact(folder, metadata)

    @classmethod
    def from_artifact(cls, path: str | Path) -> NarrowingClassifier:
        """Load a verified artifact; only the types skops reports are trusted are accepted."""
        import skops.io as sio

        from discgeo.artifacts import load_artifact

        folder, metadata = load_artifact(path, kind="classifier")
        file = folder / metadata["files"]["model"]
        untrusted = [t for t in sio.get_untrusted_types(file=file) if not t.startswith(_TRUSTED_PREFIXES)]
        if untrusted:
            raise ArtifactError(f"{file.name} holds types outside scikit-learn/numpy: {', '.join(untrusted)}")
        model = sio.load(file, trusted=sio.get_untrusted_types(file=file))
        return cls(model, metadata["features"], threshold=float(metadata["threshold"]), metadata=metadata)


_TRUSTED_PREFIXES = ("sklearn.", "numpy.", "scipy.", "builtins.")


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)
