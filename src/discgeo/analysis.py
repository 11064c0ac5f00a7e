"""The study's analyses, done right: feature-set comparison with patient-grouped CV, correlations,
latent traversals, and a report (``discgeo analyze``).

Evaluation: stratified 5-fold cross-validation grouped by patient (no patient's discs on both
sides), out-of-fold probabilities; ROC AUC, balanced accuracy and F1 with 95 % bootstrap
confidence intervals (resampling patients, not discs). The decision threshold for balanced accuracy
and F1 is the narrowing prevalence of the training folds (a calibrated probability above the base
rate counts as narrowed), chosen without looking at the test fold.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from discgeo.classification import disc_features, feature_sets, make_model
from discgeo.encoding import Encoder
from discgeo.errors import InputError, NotFoundError
from discgeo.geometry import REFERENCE_FEATURES, measure_discs
from discgeo.io import read_labels
from discgeo.volume import Volume


# ------------------------------------------------------------------------------------- features
@dataclass
class FeatureTable:
    """One row per disc: patient, level, narrowing target and named features."""

    patients: list[str] = field(default_factory=list)
    levels: list[str] = field(default_factory=list)
    target: list[int] = field(default_factory=list)
    features: dict[str, list[float]] = field(default_factory=dict)
    reconstruction_iou: list[float] = field(default_factory=list)

    def add(self, patient: str, level: str, target: int, values: dict[str, float], quality: float) -> None:
        """Append one disc."""
        self.patients.append(patient)
        self.levels.append(level)
        self.target.append(int(target))
        self.reconstruction_iou.append(float(quality))
        for name, value in values.items():
            self.features.setdefault(name, []).append(float(value))

    def matrix(self, names: Sequence[str]) -> np.ndarray:
        """Feature matrix [N, len(names)]."""
        return np.column_stack([np.asarray(self.features[n], dtype=np.float64) for n in names])

    @property
    def y(self) -> np.ndarray:
        """Narrowing targets."""
        return np.asarray(self.target, dtype=int)

    def __len__(self) -> int:
        return len(self.target)

    def write_csv(self, path: Path) -> None:
        """Save as CSV (one row per disc)."""
        names = list(self.features)
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["patient", "level", "narrowing", "reconstruction_iou", *names])
            for i in range(len(self)):
                writer.writerow(
                    [
                        self.patients[i],
                        self.levels[i],
                        self.target[i],
                        f"{self.reconstruction_iou[i]:.4f}",
                        *(f"{self.features[n][i]:.6g}" for n in names),
                    ]
                )


def add_labels(
    table: FeatureTable, patient: str, labels: Volume, targets: dict[str, int], encoder: Encoder
) -> int:
    """Measure and encode the discs of one label map (the pipeline's features,
    :func:`discgeo.classification.disc_features`); only discs with a target are kept."""
    discs = measure_discs(labels).discs
    crops = encoder.crop(labels)
    latents, quality = encoder.encode_with_quality(crops.crops)
    by_level = dict(zip(crops.levels, latents, strict=True))
    iou_by_level = dict(zip(crops.levels, quality, strict=True))
    added = 0
    for level, values in disc_features(discs, by_level).items():
        if level not in targets:
            continue
        table.add(patient, level, targets[level], values, float(iou_by_level[level]))
        added += 1
    return added


def _add_case(
    table: FeatureTable, patient: str, labels_path: Path, targets: dict[str, int], encoder: Encoder
) -> int:
    return add_labels(table, patient, read_labels(labels_path), targets, encoder)


def phantom_cohort_features(folder: Path, encoder: Encoder, *, progress: bool = False) -> FeatureTable:
    """Features of a phantom cohort written by ``discgeo phantom`` (labels.nii.gz + truth.json per case)."""
    from tqdm import tqdm

    cases = sorted(p for p in folder.iterdir() if (p / "truth.json").is_file())
    if not cases:
        raise NotFoundError(f"{folder} holds no phantom cases (case-*/truth.json)")
    table = FeatureTable()
    for case in tqdm(cases, desc="features", unit="case", disable=not progress):
        truth = json.loads((case / "truth.json").read_text())
        targets = {d["level"]: int(d["narrowing"]) for d in truth["discs"]}
        _add_case(table, truth["patient_id"], case / "labels.nii.gz", targets, encoder)
    return table


def spider_targets(root: Path) -> dict[str, dict[str, int]]:
    """Narrowing per series and level from SPIDER's radiological_gradings.csv and overview.csv.

    ``IVD label`` 1 is the lowest disc (mask label 201, level L5-S1); every series of a patient
    (``<patient>_t1``, ``<patient>_t2``...) shares the patient's gradings.
    """
    from discgeo import levels

    gradings = root / "radiological_gradings.csv"
    if not gradings.is_file():
        raise NotFoundError(f"{gradings} not found: a SPIDER root holds masks/ and radiological_gradings.csv")
    per_patient: dict[str, dict[str, int]] = {}
    with gradings.open(newline="") as handle:
        for row in csv.DictReader(handle):
            try:
                patient, ivd, narrowing = (
                    str(int(row["Patient"])),
                    int(row["IVD label"]),
                    int(row["Disc narrowing"]),
                )
            except (KeyError, ValueError) as exc:
                raise InputError(f"{gradings.name}: unexpected row {row} ({exc})") from None
            per_patient.setdefault(patient, {})[levels.level_name(ivd - 1)] = narrowing
    series: dict[str, dict[str, int]] = {}
    for mask in sorted((root / "masks").glob("*.mha")):
        patient = mask.stem.split("_")[0]
        if patient in per_patient:
            series[mask.stem] = per_patient[patient]
    return series


def spider_features(root: Path, encoder: Encoder, *, progress: bool = False) -> FeatureTable:
    """Features of the SPIDER dataset (masks/*.mha with gradings), one patient per series prefix."""
    from tqdm import tqdm

    targets = spider_targets(root)
    if not targets:
        raise NotFoundError(f"no graded mask in {root / 'masks'}")
    table = FeatureTable()
    for stem, target in tqdm(sorted(targets.items()), desc="features", unit="series", disable=not progress):
        _add_case(table, stem.split("_")[0], root / "masks" / f"{stem}.mha", target, encoder)
    return table


def load_features(cohort: Path, encoder: Encoder, *, progress: bool = False) -> tuple[FeatureTable, str]:
    """Features of a phantom cohort folder or a SPIDER root, and which of the two it is."""
    if (cohort / "radiological_gradings.csv").is_file():
        return spider_features(cohort, encoder, progress=progress), "spider"
    return phantom_cohort_features(cohort, encoder, progress=progress), "phantom"


# ------------------------------------------------------------------------- real healthy discs
class GivenSegmentation:
    """Stands in for the segmenter with a given label map (manual masks through the pipeline)."""

    version = "manual-masks"
    mode = "given"
    provider = "none"

    def __init__(self, labels: Volume) -> None:
        self.labels = labels

    def predict(self, volume: Volume) -> Volume:
        return self.labels


def healthy_real_discs(
    encoder: Encoder, classifier: Any = None, *, held_out: Sequence[str] = ()
) -> dict[str, Any]:
    """The 145 real healthy discs of ``ivd-masks`` (29 asymptomatic adults aged 20-40) as if the
    segmenter had found them: mean reconstruction IoU and ``unusual_shape`` count, and with a
    classifier the share called narrowed, overall and per level (through
    :func:`discgeo.pipeline.analyse_study`, the deployed path). ``held_out`` subjects (never trained
    on) are also summarised on their own."""
    from discgeo import realdata
    from discgeo.pipeline import LocalStages, analyse_study

    Row = tuple[str, str, float | None, bool, bool | None]
    rows: list[Row] = []
    for mask in realdata.real_masks(isotropic=False):
        if classifier is None:
            crops = encoder.crop(mask.labels)
            _, quality = encoder.encode_with_quality(crops.crops)
            for level, q in zip(crops.levels, quality, strict=True):
                rows.append((mask.subject, level, float(q), encoder.is_unusual(float(q)), None))
            continue
        stages = LocalStages(segmenter=GivenSegmentation(mask.labels), encoder=encoder, classifier=classifier)
        result, _ = analyse_study(mask.labels, stages, study=mask.subject)
        for d in result.discs:
            rows.append(
                (mask.subject, d.level, d.reconstruction_iou, "unusual_shape" in d.flags, d.narrowing)
            )

    def summary(chosen: list[Row]) -> dict[str, Any]:
        ious = [r[2] for r in chosen if r[2] is not None]
        out: dict[str, Any] = {
            "discs": len(chosen),
            "subjects": len({r[0] for r in chosen}),
            "mean_iou": round(float(np.mean(ious)), 4) if ious else None,
            "unusual_shape": sum(r[3] for r in chosen),
        }
        if classifier is not None:
            called = [r for r in chosen if r[4] is not None]
            out["called_narrowed"] = sum(bool(r[4]) for r in called)
            out["called_narrowed_share"] = round(out["called_narrowed"] / max(len(called), 1), 4)
            out["called_narrowed_by_level"] = {
                level: round(
                    sum(bool(r[4]) for r in called if r[1] == level)
                    / max(sum(1 for r in called if r[1] == level), 1),
                    4,
                )
                for level in realdata.LUMBAR_LEVELS
            }
        return out

    figures = {
        "data": "ivd-masks: 145 manual disc masks of 29 asymptomatic adults aged 20-40 (Menezes-Reis et al. "
        "2016), fed to the pipeline in place of the segmenter",
        "all": summary(rows),
    }
    if held_out:
        figures["held_out"] = summary([r for r in rows if r[0] in set(held_out)])
    return figures


# ----------------------------------------------------------------------------------- evaluation
SPECIFICITY_TARGET = 0.95


@dataclass
class Scores:
    """Out-of-fold results of one feature set and model (each metric: estimate, CI low, CI high)."""

    feature_set: str
    model: str
    auc: tuple[float, float, float]
    sensitivity: tuple[float, float, float]
    specificity: tuple[float, float, float]
    f1: tuple[float, float, float]
    probabilities: np.ndarray = field(repr=False)
    predicted: np.ndarray = field(repr=False)

    def figures(self) -> dict[str, tuple[float, float, float]]:
        """AUC, sensitivity, specificity and F1, each (estimate, CI low, CI high)."""
        return {
            "auc": self.auc,
            "sensitivity": self.sensitivity,
            "specificity": self.specificity,
            "f1": self.f1,
        }


def operating_threshold(y: np.ndarray, p: np.ndarray, *, specificity: float = SPECIFICITY_TARGET) -> float:
    """The lowest probability threshold at which at least ``specificity`` of the negatives are below it."""
    negatives = np.sort(np.asarray(p)[np.asarray(y) == 0])
    if negatives.size == 0:
        return 0.5
    k = min(int(np.ceil(specificity * negatives.size)), negatives.size) - 1
    return float(np.nextafter(negatives[k], np.inf))


def cross_validate(
    table: FeatureTable,
    names: Sequence[str],
    *,
    model: str = "boosting",
    folds: int = 5,
    seed: int = 0,
    grouped: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-fold probabilities and labels, stratified and grouped by patient. Each fold's decision
    threshold is the :data:`SPECIFICITY_TARGET` operating point of an inner 3-fold patient-grouped
    cross-validation of its training patients, so the test fold never informs it. ``grouped=False``
    splits discs, not patients (the reference study's protocol: a patient's other discs are seen in
    training, which :mod:`training.reproduce` measures as leakage)."""
    from sklearn.model_selection import (
        GroupKFold,
        KFold,
        StratifiedGroupKFold,
        StratifiedKFold,
        cross_val_predict,
    )

    x, y = table.matrix(names), table.y
    groups = np.asarray(table.patients)
    if len(set(groups)) < folds or y.sum() < folds:
        raise InputError(
            f"{len(set(groups))} patients and {int(y.sum())} narrowed discs are too few for "
            f"{folds}-fold cross-validation"
        )
    probabilities = np.zeros(len(y))
    predicted = np.zeros(len(y), dtype=int)
    splitter = (StratifiedGroupKFold if grouped else StratifiedKFold)(
        n_splits=folds, shuffle=True, random_state=seed
    )
    for train, test in splitter.split(x, y, groups if grouped else None):
        assert not grouped or not set(groups[train]) & set(groups[test])
        estimator = make_model(model, seed=seed, features=names).fit(x[train], y[train])
        probabilities[test] = estimator.predict_proba(x[test])[:, 1]
        inner = cross_val_predict(
            make_model(model, seed=seed, features=names),
            x[train],
            y[train],
            groups=groups[train] if grouped else None,
            cv=GroupKFold(n_splits=3) if grouped else KFold(n_splits=3, shuffle=True, random_state=seed),
            method="predict_proba",
        )[:, 1]
        predicted[test] = (probabilities[test] >= operating_threshold(y[train], inner)).astype(int)
    return probabilities, predicted


def _metrics() -> dict[str, Any]:
    from sklearn.metrics import f1_score, recall_score, roc_auc_score

    return {
        "auc": lambda yy, pp, ll: roc_auc_score(yy, pp),
        "sensitivity": lambda yy, pp, ll: recall_score(yy, ll, zero_division=0),
        "specificity": lambda yy, pp, ll: recall_score(1 - yy, 1 - ll, zero_division=0),
        "f1": lambda yy, pp, ll: f1_score(yy, ll, zero_division=0),
    }


def patient_resamples(groups: np.ndarray, n: int, seed: int) -> list[np.ndarray]:
    """``n`` bootstrap resamples of whole patients (row indices): a patient's rows are drawn together."""
    rng = np.random.default_rng(seed)
    patients = np.unique(groups)
    rows = {g: np.flatnonzero(groups == g) for g in patients}
    return [
        np.concatenate([rows[g] for g in rng.choice(patients, size=len(patients), replace=True)])
        for _ in range(n)
    ]


def bootstrap_ci(
    y: np.ndarray, p: np.ndarray, labels: np.ndarray, groups: np.ndarray, *, n: int = 1000, seed: int = 0
) -> dict[str, tuple[float, float, float]]:
    """AUC, sensitivity, specificity and F1 with 95 % CIs from a patient-level bootstrap."""
    metrics = _metrics()
    samples: dict[str, list[float]] = {k: [] for k in metrics}
    for index in patient_resamples(groups, n, seed):
        if len(np.unique(y[index])) < 2:
            continue
        for name, fn in metrics.items():
            samples[name].append(fn(y[index], p[index], labels[index]))
    out = {}
    for name, fn in metrics.items():
        low, high = np.percentile(samples[name], [2.5, 97.5])
        out[name] = (float(fn(y, p, labels)), float(low), float(high))
    return out


def paired_auc_differences(
    y: np.ndarray, probabilities: dict[str, np.ndarray], groups: np.ndarray, *, n: int = 1000, seed: int = 0
) -> list[dict[str, Any]]:
    """AUC(a) - AUC(b) for every pair of feature sets, with a 95 % CI from one patient-level bootstrap
    shared by both (paired: the same resampled patients score both sets)."""
    from sklearn.metrics import roc_auc_score

    names = list(probabilities)
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
    samples: dict[tuple[str, str], list[float]] = {pair: [] for pair in pairs}
    for index in patient_resamples(groups, n, seed):
        if len(np.unique(y[index])) < 2:
            continue
        auc = {k: roc_auc_score(y[index], v[index]) for k, v in probabilities.items()}
        for a, b in pairs:
            samples[(a, b)].append(auc[a] - auc[b])
    out = []
    for a, b in pairs:
        low, high = np.percentile(samples[(a, b)], [2.5, 97.5])
        estimate = roc_auc_score(y, probabilities[a]) - roc_auc_score(y, probabilities[b])
        out.append({"a": a, "b": b, "difference": (float(estimate), float(low), float(high))})
    return out


def compare_feature_sets(
    table: FeatureTable,
    *,
    latent_dim: int,
    folds: int = 5,
    bootstrap: int = 1000,
    seed: int = 0,
    models: Sequence[str] = ("boosting", "logistic"),
    sets: Sequence[str] | None = None,
    grouped: bool = True,
    jobs: int = 1,
) -> list[Scores]:
    """Every feature set (:func:`discgeo.classification.feature_sets`) side by side for each model
    (``grouped``: see :func:`cross_validate`); ``jobs`` cross-validations at once, in processes (joblib
    limits each worker's threads to cores / jobs: small gradient-boosting fits gain nothing from more)."""
    from joblib import Parallel, delayed

    groups = np.asarray(table.patients)
    available = feature_sets(latent_dim)
    runs = [(model, name) for model in models for name in sets or available]
    predictions = Parallel(n_jobs=jobs)(
        delayed(cross_validate)(table, available[name], model=model, folds=folds, seed=seed, grouped=grouped)
        for model, name in runs
    )
    results = []
    for (model, name), (p, labels) in zip(runs, predictions, strict=True):
        ci = bootstrap_ci(table.y, p, labels, groups, n=bootstrap, seed=seed)
        results.append(
            Scores(name, model, ci["auc"], ci["sensitivity"], ci["specificity"], ci["f1"], p, labels)
        )
    return results


def correlations(table: FeatureTable, latent_dim: int) -> dict[str, np.ndarray]:
    """Spearman and Pearson correlation of each latent with each geometric feature."""
    from scipy import stats

    latent = table.matrix([f"latent_{i}" for i in range(latent_dim)])
    geometric = table.matrix(REFERENCE_FEATURES)
    out = {}
    for name, fn in (("spearman", stats.spearmanr), ("pearson", stats.pearsonr)):
        out[name] = np.array(
            [
                [fn(latent[:, i], geometric[:, j])[0] for j in range(geometric.shape[1])]
                for i in range(latent_dim)
            ]
        )
    return out


# -------------------------------------------------------------------------------------- figures
def plot_roc(table: FeatureTable, scores: Sequence[Scores], path: Path) -> None:
    """ROC curves of every feature set and model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    models = sorted({s.model for s in scores})
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4.6), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        for s in (s for s in scores if s.model == model):
            fpr, tpr, _ = roc_curve(table.y, s.probabilities)
            ax.plot(fpr, tpr, label=f"{s.feature_set}: AUC {s.auc[0]:.2f} [{s.auc[1]:.2f}-{s.auc[2]:.2f}]")
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
        ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=f"{model}, patient-grouped 5-fold CV")
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_correlations(corr: dict[str, np.ndarray], path: Path) -> None:
    """Heatmaps of latent-vs-geometry correlations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
    for ax, (name, matrix) in zip(axes, corr.items(), strict=True):
        image = ax.imshow(matrix, cmap="RdBu_r", vmin=-1, vmax=1)
        ax.set_xticks(
            range(len(REFERENCE_FEATURES)),
            [f.replace("_", " ") for f in REFERENCE_FEATURES],
            rotation=30,
            ha="right",
            fontsize=8,
        )
        ax.set_yticks(range(matrix.shape[0]), [f"latent {i}" for i in range(matrix.shape[0])])
        for (i, j), value in np.ndenumerate(matrix):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7)
        ax.set_title(f"{name.capitalize()} correlation")
        fig.colorbar(image, ax=ax, shrink=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def traversal_latents(latents: np.ndarray, steps: int = 5) -> np.ndarray:
    """[latent_dim, steps, latent_dim]: each latent from its 5th to 95th percentile, others at the median."""
    median = np.median(latents, axis=0)
    lo, hi = np.percentile(latents, [5, 95], axis=0)
    out = np.repeat(median[None, None, :], latents.shape[1], axis=0).repeat(steps, axis=1)
    for i in range(latents.shape[1]):
        out[i, :, i] = np.linspace(lo[i], hi[i], steps)
    return out.astype(np.float32)


def plot_traversals(encoder: Encoder, latents: np.ndarray, path: Path, steps: int = 5) -> None:
    """Decoded mid-sagittal and mid-axial sections along each latent's 5th-95th percentile range."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = traversal_latents(latents, steps)
    dim = grid.shape[0]
    size = encoder.crop_spec.size
    decoded = encoder.decode(grid.reshape(-1, dim)).reshape(dim, steps, size, size, size)
    fig, axes = plt.subplots(dim, steps * 2, figsize=(steps * 2 * 1.3, dim * 1.4))
    mid = decoded.shape[-1] // 2
    for i in range(dim):
        for k in range(steps):
            volume = decoded[i, k]
            # sagittal (anterior left, head up) and axial (anterior up) sections through the centre
            axes[i, 2 * k].imshow(volume[mid].T[::-1, ::-1], cmap="gray", vmin=0, vmax=1)
            axes[i, 2 * k + 1].imshow(volume[:, :, mid].T[::-1], cmap="gray", vmin=0, vmax=1)
            for ax in axes[i, 2 * k : 2 * k + 2]:
                ax.set_xticks([])
                ax.set_yticks([])
        axes[i, 0].set_ylabel(f"latent {i}", fontsize=8)
    for k in range(steps):
        axes[0, 2 * k].set_title(f"P{5 + 90 * k // (steps - 1)} sag", fontsize=7)
        axes[0, 2 * k + 1].set_title("axial", fontsize=7)
    fig.suptitle(
        "Latent traversals: one latent from its 5th to 95th percentile, the others at their median",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# --------------------------------------------------------------------------------------- report
def analyze(
    cohort: Path,
    out: Path,
    encoder: Encoder,
    *,
    folds: int = 5,
    bootstrap: int = 1000,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Run every analysis on a cohort and write report.md, features.csv, results.json and figures."""
    table, kind = load_features(cohort, encoder, progress=progress)
    return report(
        table, out, encoder, cohort=str(cohort), kind=kind, folds=folds, bootstrap=bootstrap, seed=seed
    )


def evaluate_table(
    table: FeatureTable,
    *,
    latent_dim: int,
    folds: int,
    bootstrap: int,
    seed: int,
    models: Sequence[str] = ("boosting", "logistic"),
    sets: Sequence[str] | None = None,
    jobs: int = 1,
) -> tuple[list[Scores], dict[str, list[dict[str, Any]]]]:
    """Every feature set (or ``sets``) and model by cross-validation, and the paired AUC differences
    per model."""
    scores = compare_feature_sets(
        table,
        latent_dim=latent_dim,
        folds=folds,
        bootstrap=bootstrap,
        seed=seed,
        models=models,
        sets=sets,
        jobs=jobs,
    )
    groups = np.asarray(table.patients)
    differences = {
        model: paired_auc_differences(
            table.y,
            {s.feature_set: s.probabilities for s in scores if s.model == model},
            groups,
            n=bootstrap,
            seed=seed,
        )
        for model in sorted({s.model for s in scores})
    }
    return scores, differences


def _rows(scores: Sequence[Scores]) -> list[dict[str, Any]]:
    return [{"feature_set": s.feature_set, "model": s.model, **s.figures()} for s in scores]


def enough_for_cv(table: FeatureTable, folds: int) -> bool:
    """Whether ``folds``-fold CV can run: that many patients, narrowed and normal discs."""
    y = table.y
    return len(set(table.patients)) >= folds and y.sum() >= folds and (y == 0).sum() >= folds


def report(
    table: FeatureTable,
    out: Path,
    encoder: Encoder,
    *,
    cohort: str,
    kind: str,
    folds: int = 5,
    bootstrap: int = 1000,
    seed: int = 0,
    segmented: FeatureTable | None = None,
    extra: dict[str, Any] | None = None,
    evaluated: tuple[list[Scores], dict[str, list[dict[str, Any]]]] | None = None,
) -> dict[str, Any]:
    """The analyses of an already measured cohort (see :func:`analyze`); ``segmented`` is the same
    kind of table measured on the shipped segmenter's output instead of the true masks, ``extra``
    is written into the summary (and the report) as it is, and ``evaluated`` is
    :func:`evaluate_table`'s result for ``table`` when the caller already has it."""
    out.mkdir(parents=True, exist_ok=True)
    table.write_csv(out / "features.csv")
    latent_dim = encoder.latent_dim
    summary: dict[str, Any] = {
        "cohort": cohort,
        "kind": kind,
        "discs": len(table),
        "patients": len(set(table.patients)),
        "narrowed": int(table.y.sum()),
        "prevalence": float(table.y.mean()) if len(table) else 0.0,
        "encoder_version": encoder.version,
        "median_reconstruction_iou": float(np.median(table.reconstruction_iou)),
        "operating_point": f"specificity {SPECIFICITY_TARGET:.2f} on the training folds (inner grouped CV)",
        **(extra or {}),
    }
    if enough_for_cv(table, folds):
        scores, differences = evaluated or evaluate_table(
            table, latent_dim=latent_dim, folds=folds, bootstrap=bootstrap, seed=seed
        )
        summary["results"] = _rows(scores)
        summary["auc_differences"] = differences
        plot_roc(table, scores, out / "roc.png")
        corr = correlations(table, latent_dim)
        summary["correlations"] = {k: v.round(3).tolist() for k, v in corr.items()}
        plot_correlations(corr, out / "correlations.png")
    else:
        summary["results"] = []
        summary["note"] = (
            f"{summary['patients']} patient(s) with {summary['narrowed']} narrowed disc(s): too few "
            f"for {folds}-fold cross-validation; features only"
        )
    if segmented is not None and enough_for_cv(segmented, folds):
        seg_scores, seg_differences = evaluate_table(
            segmented, latent_dim=latent_dim, folds=folds, bootstrap=bootstrap, seed=seed
        )
        summary["segmented"] = {
            "patients": len(set(segmented.patients)),
            "discs": len(segmented),
            "narrowed": int(segmented.y.sum()),
            "results": _rows(seg_scores),
            "auc_differences": seg_differences,
        }
    latents = table.matrix([f"latent_{i}" for i in range(latent_dim)])
    if len(latents) >= 2:
        plot_traversals(encoder, latents, out / "traversals.png")
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    (out / "report.md").write_text(render_report(summary))
    return summary


def verdict(differences: Sequence[dict[str, Any]]) -> list[str]:
    """One plain sentence per paired AUC difference: shown only where its 95 % CI excludes zero."""
    lines = []
    for d in differences:
        estimate, low, high = d["difference"]
        if low > 0 or high < 0:
            word = "higher" if estimate > 0 else "lower"
            lines.append(
                f"{d['a']} AUC is {abs(estimate):.3f} {word} than {d['b']} [{low:+.3f} to {high:+.3f}]"
            )
        else:
            lines.append(
                f"{d['a']} vs {d['b']}: {estimate:+.3f} [{low:+.3f} to {high:+.3f}], "
                "no demonstrated difference"
            )
    return lines


def _results_table(results: Sequence[dict[str, Any]]) -> list[str]:
    lines = [
        "| model | features | ROC AUC [95 % CI] | sensitivity | specificity | F1 |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        cells = [
            f"{v[0]:.3f} [{v[1]:.3f}-{v[2]:.3f}]"
            for v in (r["auc"], r["sensitivity"], r["specificity"], r["f1"])
        ]
        lines.append(f"| {r['model']} | {r['feature_set']} | " + " | ".join(cells) + " |")
    return lines


def _differences_table(differences: dict[str, list[dict[str, Any]]]) -> list[str]:
    lines = ["| model | A - B | AUC difference [95 % CI, paired] |", "|---|---|---|"]
    for model, rows in differences.items():
        for d in rows:
            e, lo, hi = d["difference"]
            lines.append(f"| {model} | {d['a']} - {d['b']} | {e:+.3f} [{lo:+.3f} to {hi:+.3f}] |")
    return lines


def render_report(summary: dict[str, Any]) -> str:
    """Markdown report."""
    lines = [
        "# Disc narrowing: latent, geometric, combined, relative and all features",
        "",
        f"Cohort `{summary['cohort']}` ({summary['kind']}): {summary['patients']} patients, "
        f"{summary['discs']} discs, {summary['narrowed']} narrowed ({summary['prevalence']:.1%}). "
        f"Encoder {summary['encoder_version']}, "
        f"median reconstruction IoU {summary['median_reconstruction_iou']:.3f}.",
        "",
        "Patient-grouped stratified 5-fold cross-validation (no patient on both sides), calibrated "
        "probabilities; 95 % CIs from a patient-level bootstrap; sensitivity, specificity and F1 at the "
        f"decision threshold of the operating point: {summary['operating_point']}. Differences in AUC come "
        "from a paired bootstrap (the same resampled patients score both sets): overlapping CIs of two "
        "AUCs are not a comparison.",
        "",
    ]
    if summary["kind"] == "phantom":
        lines += [
            "These are synthetic phantoms: the figures describe the method on simulated anatomy, "
            "not clinical accuracy.",
            "",
        ]
    if summary["results"]:
        lines += ["## Features from the true masks", "", *_results_table(summary["results"]), ""]
        lines += [*_differences_table(summary["auc_differences"]), ""]
        lines += [
            "![ROC curves](roc.png)",
            "",
            "![Latent-geometry correlations](correlations.png)",
            "",
        ]
    else:
        lines += [summary.get("note", ""), ""]
    seg = summary.get("segmented")
    if seg:
        lines += [
            "## Features from the shipped segmenter's output (what the deployed classifier sees)",
            "",
            f"{seg['patients']} phantom patients of the same generator, segmented from their images by the "
            f"shipped segmenter; {seg['discs']} discs matched to the truth by level, "
            f"{seg['narrowed']} narrowed.",
            "",
            *_results_table(seg["results"]),
            "",
            *_differences_table(seg["auc_differences"]),
            "",
        ]
    for key, value in summary.items():
        if key.startswith("shipped"):
            lines += [f"**{key.replace('_', ' ')}:** {value}", ""]
    lines += ["![Latent traversals](traversals.png)", ""]
    return "\n".join(lines)
