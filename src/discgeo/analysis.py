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

from discgeo.classification import feature_sets, make_model
from discgeo.encoding import CROP_SIZE, Encoder, disc_crops
from discgeo.errors import InputError, NotFoundError
from discgeo.geometry import REFERENCE_FEATURES, measure_discs
from discgeo.io import read_labels


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


def _add_case(
    table: FeatureTable, patient: str, labels_path: Path, targets: dict[str, int], encoder: Encoder
) -> int:
    """Measure and encode the discs of one label map; only discs with a target are kept."""
    labels = read_labels(labels_path)
    geometry = {d.level: d for d in measure_discs(labels).discs}
    crops = disc_crops(labels)
    latents, quality = encoder.encode_with_quality(crops.crops)
    added = 0
    for level, z, q in zip(crops.levels, latents, quality, strict=True):
        if level not in targets or level not in geometry:
            continue
        values = {f"latent_{i}": float(v) for i, v in enumerate(z)}
        values.update({name: float(getattr(geometry[level], name)) for name in REFERENCE_FEATURES})
        table.add(patient, level, targets[level], values, float(q))
        added += 1
    return added


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


# ----------------------------------------------------------------------------------- evaluation
@dataclass
class Scores:
    """Out-of-fold results of one feature set and model."""

    feature_set: str
    model: str
    auc: tuple[float, float, float]  # estimate, CI low, CI high
    balanced_accuracy: tuple[float, float, float]
    f1: tuple[float, float, float]
    probabilities: np.ndarray = field(repr=False)
    predicted: np.ndarray = field(repr=False)


def cross_validate(
    table: FeatureTable, names: Sequence[str], *, model: str = "boosting", folds: int = 5, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-fold probabilities and labels, stratified and grouped by patient."""
    from sklearn.model_selection import StratifiedGroupKFold

    x, y = table.matrix(names), table.y
    groups = np.asarray(table.patients)
    if len(set(groups)) < folds or y.sum() < folds:
        raise InputError(
            f"{len(set(groups))} patients and {int(y.sum())} narrowed discs are too few for "
            f"{folds}-fold cross-validation"
        )
    probabilities = np.zeros(len(y))
    predicted = np.zeros(len(y), dtype=int)
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    for train, test in splitter.split(x, y, groups):
        assert not set(groups[train]) & set(groups[test])
        estimator = make_model(model, seed=seed).fit(x[train], y[train])
        probabilities[test] = estimator.predict_proba(x[test])[:, 1]
        predicted[test] = (probabilities[test] >= y[train].mean()).astype(int)
    return probabilities, predicted


def bootstrap_ci(
    y: np.ndarray, p: np.ndarray, labels: np.ndarray, groups: np.ndarray, *, n: int = 1000, seed: int = 0
) -> dict[str, tuple[float, float, float]]:
    """AUC, balanced accuracy and F1 with 95 % CIs from a patient-level bootstrap."""
    from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

    metrics = {
        "auc": lambda yy, pp, ll: roc_auc_score(yy, pp),
        "balanced_accuracy": lambda yy, pp, ll: balanced_accuracy_score(yy, ll),
        "f1": lambda yy, pp, ll: f1_score(yy, ll, zero_division=0),
    }
    rng = np.random.default_rng(seed)
    patients = np.unique(groups)
    rows = {g: np.flatnonzero(groups == g) for g in patients}
    samples: dict[str, list[float]] = {k: [] for k in metrics}
    for _ in range(n):
        index = np.concatenate([rows[g] for g in rng.choice(patients, size=len(patients), replace=True)])
        if len(np.unique(y[index])) < 2:
            continue
        for name, fn in metrics.items():
            samples[name].append(fn(y[index], p[index], labels[index]))
    out = {}
    for name, fn in metrics.items():
        low, high = np.percentile(samples[name], [2.5, 97.5])
        out[name] = (float(fn(y, p, labels)), float(low), float(high))
    return out


def compare_feature_sets(
    table: FeatureTable,
    *,
    latent_dim: int,
    folds: int = 5,
    bootstrap: int = 1000,
    seed: int = 0,
    models: Sequence[str] = ("boosting", "logistic"),
) -> list[Scores]:
    """The three feature sets side by side for each model."""
    results = []
    groups = np.asarray(table.patients)
    for model in models:
        for name, names in feature_sets(latent_dim).items():
            p, labels = cross_validate(table, names, model=model, folds=folds, seed=seed)
            ci = bootstrap_ci(table.y, p, labels, groups, n=bootstrap, seed=seed)
            results.append(Scores(name, model, ci["auc"], ci["balanced_accuracy"], ci["f1"], p, labels))
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
    decoded = encoder.decode(grid.reshape(-1, dim)).reshape(dim, steps, CROP_SIZE, CROP_SIZE, CROP_SIZE)
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
) -> dict[str, Any]:
    """The analyses of an already measured cohort (see :func:`analyze`)."""
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
    }
    enough = len(set(table.patients)) >= folds and table.y.sum() >= folds and (table.y == 0).sum() >= folds
    if enough:
        scores = compare_feature_sets(
            table, latent_dim=latent_dim, folds=folds, bootstrap=bootstrap, seed=seed
        )
        summary["results"] = [
            {
                "feature_set": s.feature_set,
                "model": s.model,
                "auc": s.auc,
                "balanced_accuracy": s.balanced_accuracy,
                "f1": s.f1,
            }
            for s in scores
        ]
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
    latents = table.matrix([f"latent_{i}" for i in range(latent_dim)])
    if len(latents) >= 2:
        plot_traversals(encoder, latents, out / "traversals.png")
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    (out / "report.md").write_text(render_report(summary))
    return summary


def verdict(results: Sequence[dict[str, Any]], model: str = "boosting") -> str:
    """Plain statement of whether the combined set beats each set alone (by AUC and CI overlap)."""
    by = {r["feature_set"]: r["auc"] for r in results if r["model"] == model}
    if set(by) != {"latent", "geometric", "combined"}:
        return "not evaluated"
    parts = []
    for alone in ("latent", "geometric"):
        diff = by["combined"][0] - by[alone][0]
        overlap = by["combined"][1] <= by[alone][2] and by[alone][1] <= by["combined"][2]
        word = "higher" if diff > 0 else "lower"
        parts.append(
            f"combined AUC is {abs(diff):.3f} {word} than {alone} alone"
            + (" (95 % CIs overlap)" if overlap else " (95 % CIs do not overlap)")
        )
    return "; ".join(parts)


def render_report(summary: dict[str, Any]) -> str:
    """Markdown report."""
    lines = [
        "# Disc narrowing: latent vs geometric vs combined features",
        "",
        f"Cohort `{summary['cohort']}` ({summary['kind']}): {summary['patients']} patients, "
        f"{summary['discs']} discs, {summary['narrowed']} narrowed ({summary['prevalence']:.1%}). "
        f"Encoder {summary['encoder_version']}, "
        f"median reconstruction IoU {summary['median_reconstruction_iou']:.3f}.",
        "",
        "Patient-grouped stratified 5-fold cross-validation (no patient on both sides); 95 % CIs from a "
        "patient-level bootstrap; threshold for balanced accuracy and F1 = training-fold prevalence.",
        "",
    ]
    if summary["kind"] == "phantom":
        lines += [
            "These are synthetic phantoms: the figures describe the method on simulated anatomy, "
            "not clinical accuracy.",
            "",
        ]
    if summary["results"]:
        lines += [
            "| model | features | ROC AUC [95 % CI] | balanced accuracy | F1 |",
            "|---|---|---|---|---|",
        ]
        for r in summary["results"]:
            cells = [
                f"{v[0]:.3f} [{v[1]:.3f}-{v[2]:.3f}]" for v in (r["auc"], r["balanced_accuracy"], r["f1"])
            ]
            lines.append(f"| {r['model']} | {r['feature_set']} | " + " | ".join(cells) + " |")
        lines += [
            "",
            f"**Gradient boosting:** {verdict(summary['results'])}.",
            f"**Logistic regression:** {verdict(summary['results'], 'logistic')}.",
            "",
            "![ROC curves](roc.png)",
            "",
            "![Latent-geometry correlations](correlations.png)",
            "",
        ]
    else:
        lines += [summary.get("note", ""), ""]
    lines += ["![Latent traversals](traversals.png)", ""]
    return "\n".join(lines)
