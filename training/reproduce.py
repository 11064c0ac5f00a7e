"""The reference study's tables from a SPIDER download, in one command (``make reproduce``).

    python -m training.reproduce --spider DIR [--labels spider|FILE] [--contrast t1|t2] [--quick]
                                 [--out build/reproduce] [--seg-epochs N] [--ae-epochs N]
                                 [--bottlenecks 64 8 4 3]

The reference study (Perrone et al. 2025) segmented the discs of 195 sagittal T1 series of the SPIDER
lumbar spine dataset (van der Graaf et al., Scientific Data 2024; Zenodo 10159290; CC-BY 4.0) with a
SwinUNETR, encoded each disc mask with a 3D CNN autoencoder (bottleneck sweep), measured the discs and
predicted disc narrowing from latent, geometric and combined features. This runs every step with
discgeo's models on a SPIDER folder (``images/``, ``masks/``, ``radiological_gradings.csv``,
``overview.csv``) and writes ``OUT/report.md``: per step the study's figure, ours and the difference.

Steps, in order; each writes ``OUT/<step>.json`` when it finishes and is only read on a rerun with the
same settings (the trainers also resume from their checkpoints under ``OUT/runs/``), so an interrupted
run continues where it stopped:

1. ``dataset``: the series of the chosen contrast (``<patient>_t1``), SPIDER's own split (``subset``
   in ``overview.csv``: training / validation), the gradings; series without a mask, masks without an
   image and graded patients without a series are reported.
2. ``segmentation``: discgeo's 2D SwinUNETR-V2 trained on the training subset's series (discs =
   labels 201+; checkpoints chosen on a tenth of them), exported to ONNX and run through the deployed
   inference path on the validation subset: Dice and IoU per disc (matched by level; a missed disc
   scores 0) with patient-level bootstrap 95 % CIs.
3. ``autoencoder``: the bottleneck sweep on crops of the SPIDER disc masks (training subset: train;
   validation subset: the held-out column), the bottleneck-4 model exported as the encoder of step 5.
4. ``geometry``: every disc of every mask measured by :mod:`discgeo.geometry`; per level medians.
5. ``narrowing``: latent / geometric / combined / relative features of every graded disc, gradient
   boosting with patient-grouped 5-fold CV and patient-level bootstrap CIs (:mod:`discgeo.analysis`,
   its report, ROC curves, correlation heatmap, traversals in ``OUT/narrowing/``), and the study's
   protocol (5-fold CV over discs, not grouped by patient), so that the leakage is measured: the paired
   bootstrap difference of the two protocols' AUCs.

Labels: SPIDER's ``Disc narrowing`` column (default), or the study's own annotation table with
``--labels FILE`` (csv or xlsx; columns ``subject``, ``IVD number`` (1 = the lowest disc, as SPIDER's
``IVD label``), ``Narrowing``; the other columns are ignored). The report says which was used.

``--quick``: at most 8 training and 4 validation series, one short segmenter epoch, 2 autoencoder
epochs at bottleneck 4, 100 bootstrap resamples: the whole chain in minutes, figures of no meaning
beyond that the chain runs. The full run trains as the shipped models were (segmenter: 40 epochs of 50
steps in the shipped step decay, :func:`seg_schedule`; autoencoder: up to 350 epochs per bottleneck,
stopped at a training IoU of 0.995 as in the study); a GPU is used when torch sees one. Time and disk:
README, "Reproducing the study".
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# the reference study's figures (Perrone et al. 2025, 195 SPIDER T1 series, 39 in its test set)
STUDY = {
    "segmentation_dice": (0.90, 0.89, 0.91),
    "segmentation_iou": 0.82,
    "autoencoder_iou_b4": 0.9984,
    "autoencoder_epochs": 350,
    "auc": {"latent": 0.75, "geometric": 0.66, "combined": 0.76},
    "f1": {"latent": 0.81, "geometric": 0.79, "combined": 0.81},
    "protocol": "XGBoost, 5-fold CV over discs (not grouped by patient)",
}
SETS = ("latent", "geometric", "combined", "relative")
FULL = {"series": None, "seg_epochs": 40, "seg_steps": 50, "ae_epochs": 350, "bottlenecks": [64, 8, 4, 3]}
QUICK = {"series": (8, 4), "seg_epochs": 1, "seg_steps": 2, "ae_epochs": 2, "bottlenecks": [4]}
BOOTSTRAP = {"full": 1000, "quick": 100}


# ------------------------------------------------------------------------------------------ data
@dataclass(frozen=True)
class Series:
    """One SPIDER series: ``name`` as in the files (``12_t1``), its patient, SPIDER's subset."""

    name: str
    patient: str
    subset: str
    image: str | None
    mask: str | None


def read_gradings(path: Path) -> dict[tuple[str, int], dict[str, int]]:
    """SPIDER's ``radiological_gradings.csv``: per (patient, IVD label) the narrowing and Pfirrmann
    grade (SPIDER spells the column ``Pfirrman grade``; ``IVD label`` 1 is the lowest disc)."""
    out = {}
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            pfirrmann = row.get("Pfirrman grade", row.get("Pfirrmann grade", ""))
            try:
                key = (str(int(row["Patient"])), int(row["IVD label"]))
                out[key] = {
                    "narrowing": int(row["Disc narrowing"]),
                    "pfirrmann": int(pfirrmann) if pfirrmann.strip() else 0,
                }
            except (KeyError, ValueError) as exc:
                raise SystemExit(f"{path.name}: unexpected row {dict(row)} ({exc})") from None
    return out


def read_study_labels(path: Path) -> dict[tuple[str, int], int]:
    """The study's annotation table (csv or xlsx): narrowing per (subject, IVD number from the bottom)."""
    if path.suffix.lower() in (".xlsx", ".xlsm"):
        import openpyxl

        sheet = openpyxl.load_workbook(path, read_only=True, data_only=True).active
        rows = list(sheet.iter_rows(values_only=True))
        header = [str(h).strip().lower() if h is not None else "" for h in rows[0]]
        records = [dict(zip(header, r, strict=False)) for r in rows[1:]]
    else:
        with path.open(newline="") as handle:
            records = [{k.strip().lower(): v for k, v in r.items()} for r in csv.DictReader(handle)]

    def column(*names: str) -> str:
        for name in names:
            if records and name in records[0]:
                return name
        raise SystemExit(f"{path.name}: no column {' or '.join(names)} (found {sorted(records[0])})")

    subject, ivd, narrowing = (
        column("subject", "patient"),
        column("ivd number", "ivd label"),
        column("narrowing", "disc narrowing"),
    )
    out = {}
    for r in records:
        if r[subject] in (None, ""):
            continue
        out[(str(int(float(r[subject]))), int(float(r[ivd])))] = int(float(r[narrowing]))
    return out


def load_dataset(root: Path, contrast: str, series_limit: tuple[int, int] | None) -> dict[str, Any]:
    """The series of ``contrast`` with SPIDER's split, and what does not fit (reported, not fatal)."""
    overview = root / "overview.csv"
    gradings = root / "radiological_gradings.csv"
    for needed in (overview, gradings, root / "masks"):
        if not needed.exists():
            raise SystemExit(f"{root} is not a SPIDER folder: {needed.name} is missing")
    with overview.open(newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["new_file_name"].endswith(f"_{contrast}")]
    images = {p.stem for p in (root / "images").glob("*.mha")} if (root / "images").is_dir() else set()
    masks = {p.stem for p in (root / "masks").glob("*.mha")}
    series, problems = [], []
    for r in rows:
        name = r["new_file_name"]
        if name not in masks:
            problems.append(f"{name}: no mask (masks/{name}.mha)")
        series.append(
            Series(
                name=name,
                patient=str(int(name.split("_")[0])),
                subset=r["subset"].strip(),
                image=f"images/{name}.mha" if name in images else None,
                mask=f"masks/{name}.mha" if name in masks else None,
            )
        )
    listed = {s.name for s in series}
    problems += [
        f"{m}: a mask not listed in overview.csv" for m in sorted(masks - listed) if m.endswith(contrast)
    ]
    problems += [f"{s.name}: no image (images/{s.name}.mha)" for s in series if s.mask and not s.image]
    grades = read_gradings(gradings)
    graded = {patient for patient, _ in grades}
    problems += [
        f"patient {p}: IVD label {ivd} graded, which no mask disc label matches (201 = IVD 1), left out"
        for p, ivd in sorted(grades)
        if ivd < 1
    ]
    problems += [
        f"patient {p}: graded, no {contrast} series" for p in sorted(graded - {s.patient for s in series})
    ]
    series = sorted((s for s in series if s.mask), key=lambda s: int(s.patient))  # the rest: problems
    if series_limit is not None:  # --quick: the first series of each subset, by patient number
        series = [
            s
            for subset, limit in zip(("training", "validation"), series_limit, strict=True)
            for s in [s for s in series if s.subset == subset][:limit]
        ]
    patients = {s.patient for s in series}
    used = [g for (patient, _), g in grades.items() if patient in patients]
    return {
        "root": str(root),
        "contrast": contrast,
        "series": [asdict(s) for s in series],
        "training": sum(s.subset == "training" for s in series),
        "validation": sum(s.subset == "validation" for s in series),
        "gradings": {
            "discs": len(used),
            "narrowed": sum(g["narrowing"] for g in used),
            "pfirrmann": {str(k): sum(g["pfirrmann"] == k for g in used) for k in range(1, 6)},
        },
        "problems": problems,
    }


def _series(dataset: dict[str, Any], subset: str | None = None, *, image: bool = False) -> list[Series]:
    chosen = [Series(**s) for s in dataset["series"]]
    return [s for s in chosen if s.mask and (subset is None or s.subset == subset) and (s.image or not image)]


def _labels(root: Path, s: Series) -> Any:
    from discgeo.io import read_labels

    assert s.mask is not None
    return read_labels(root / s.mask)


# ----------------------------------------------------------------------------------- segmentation
def seg_schedule(epochs: int) -> list[tuple[int, float | None]]:
    """The shipped segmenter's step decay scaled to ``epochs``: the first 40 % at the configuration's
    rate, to 80 % at 1e-4, the rest at 3e-5 (16 / 32 / 40 for 40 epochs); (epochs reached, rate)."""
    stages = [(max(1, round(0.4 * epochs)), None), (round(0.8 * epochs), 1e-4), (epochs, 3e-5)]
    out: list[tuple[int, float | None]] = []
    for until, lr in stages:
        if until > (out[-1][0] if out else 0):
            out.append((until, lr))
    return out


def segmentation(root: Path, dataset: dict[str, Any], out: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """Train on the training subset, score the validation subset through the deployed inference path."""
    from tqdm import tqdm

    from discgeo.analysis import patient_resamples
    from discgeo.io import read_volume
    from discgeo.segmentation import Segmenter, dice, dice_per_level
    from training import segmenter as seg

    train_series = _series(dataset, "training", image=True)
    test_series = _series(dataset, "validation", image=True)
    if len(train_series) < 3 or not test_series:  # checkpoints are chosen on 2 of the training series
        return {
            "skipped": f"{len(train_series)} training and {len(test_series)} validation series with images"
        }
    data = out / "data" / f"segmenter-{settings['dataset_tag']}"
    data.mkdir(parents=True, exist_ok=True)
    index = [
        seg.write_spider_series(data, root / str(s.image), root / str(s.mask), seg.CONFIGS["cpu"], reuse=True)
        for s in tqdm(train_series, desc="segmenter data", unit="series")
    ]
    summary = {"config": "cpu", "seed": 0, "target_codes": seg.TARGET_CODES, "cases": index}
    (data / "index.json").write_text(json.dumps(summary, indent=1))
    # one run per dataset and recipe: a rerun on other series or another contrast starts afresh
    run = (
        out
        / "runs"
        / f"segmenter-{settings['dataset_tag']}-e{settings['seg_epochs']}x{settings['seg_steps']}"
    )
    started = time.monotonic()
    for epochs, lr in seg_schedule(settings["seg_epochs"]):
        seg.train(
            data,
            run,
            config_name="cpu",
            epochs=epochs,
            seed=0,
            threads=settings["threads"],
            max_minutes=1e9,
            exclude=[],
            steps_per_epoch=settings["seg_steps"],
            lr=lr,
        )
    artifact = out / "models" / "segmenter"
    seg.export(run, artifact, score=False)
    train_seconds = time.monotonic() - started
    model = Segmenter.from_artifact(artifact)
    rows, extra, binary = [], 0, []
    for s in tqdm(test_series, desc="segmenting validation series", unit="series"):
        assert s.image is not None
        truth = _labels(root, s)
        discs_only = truth.with_array(np.where(np.asarray(truth.array) > 200, truth.array, 0))
        if not np.any(discs_only.array):  # a mask without discs: nothing to score
            continue
        predicted = model.predict(read_volume(root / s.image))
        binary.append(dice(np.asarray(predicted.array) > 0, np.asarray(discs_only.array) > 0))
        if not np.any(predicted.array):  # nothing found: every reference disc missed
            missed = dice_per_level(discs_only, discs_only)
            rows += [
                {"series": s.name, "patient": s.patient, **r, "dice": 0.0, "iou": 0.0, "predicted": False}
                for r in missed
            ]
            continue
        for r in dice_per_level(predicted, discs_only):
            if r["reference"]:  # a disc of the reference: found (by level) or missed (0)
                rows.append({"series": s.name, "patient": s.patient, **r})
            else:
                extra += 1
    if not rows:
        return {"skipped": f"no reference disc in the {len(test_series)} validation series' masks"}
    dice = np.array([r["dice"] for r in rows])
    iou = np.array([r["iou"] for r in rows])
    groups = np.array([r["patient"] for r in rows])
    resamples = patient_resamples(groups, settings["bootstrap"], 0)

    def ci(values: np.ndarray) -> list[float]:
        means = [float(values[i].mean()) for i in resamples]
        return [
            round(float(values.mean()), 4),
            *(round(float(v), 4) for v in np.percentile(means, [2.5, 97.5])),
        ]

    return {
        "train_series": len(train_series),
        "test_series": len(test_series),
        "discs": len(rows),
        "dice": ci(dice),
        "iou": ci(iou),
        "missed": int(sum(not r["predicted"] for r in rows)),
        "series_dice_all_discs": round(float(np.mean(binary)), 4),
        "epochs": settings["seg_epochs"],
        "steps_per_epoch": settings["seg_steps"],
        "train_seconds": round(train_seconds, 1),
        "artifact": str(artifact),
        "extra_discs": extra,
        "per_disc": rows,
    }


# ------------------------------------------------------------------------------------ autoencoder
def autoencoder(root: Path, dataset: dict[str, Any], out: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """The bottleneck sweep on SPIDER disc crops (held out: the validation subset), and the
    bottleneck-4 encoder exported for the narrowing step."""
    from tqdm import tqdm

    from discgeo.encoding import disc_crops
    from training import autoencoder as ae

    if 4 not in settings["bottlenecks"]:
        raise SystemExit("the sweep must include bottleneck 4 (the study's choice, used for narrowing)")
    data = out / "data" / f"autoencoder-{settings['dataset_tag']}"
    if not (data / "crops.npz").exists():
        crops, held, patients = [], [], []
        too_large = 0
        for s in tqdm(_series(dataset), desc="disc crops", unit="series"):
            result = disc_crops(_labels(root, s), spec=ae.CROP)
            too_large += len(result.too_large)
            crops.append(result.crops)
            held += [s.subset == "validation"] * len(result.crops)
            patients += [s.patient] * len(result.crops)
        array = np.concatenate(crops)
        data.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(
            data / "crops.npz",
            packed=np.packbits(array, axis=-1),
            held=np.array(held),
            patients=np.array(patients),
            sources=np.array(["real-spider"] * len(array)),  # real masks: their mirror images train too
        )
        summary = {
            "discs": len(array),
            "train": int((~np.array(held)).sum()),
            "held_out": int(np.sum(held)),
            "real": f"SPIDER {dataset['contrast']} disc masks ({dataset['root']})",
            "held_out_real_subjects": sorted(set(np.array(patients)[np.array(held)].tolist())),
            "crop": {"size": ae.CROP.size, "spacing_mm": list(ae.CROP.spacing_mm)},
            "too_large_skipped": too_large,
        }
        (data / "summary.json").write_text(json.dumps(summary, indent=1))
    runs = (
        out / "runs" / f"autoencoder-{settings['dataset_tag']}-e{settings['ae_epochs']}"
    )  # per dataset, budget
    rows = ae.sweep(
        data,
        runs,
        out / "autoencoder-sweep.md",
        bottlenecks=settings["bottlenecks"],
        epochs=settings["ae_epochs"],
        batch=8,
        threads=settings["threads"],
    )
    artifact = out / "models" / "autoencoder"
    metadata = ae.export(
        runs / "b4",
        artifact,
        data=data,
        curve=out / "autoencoder-curve.png",
        sweep_table=out / "autoencoder-sweep.json",
        healthy_discs=False,
    )
    return {
        "sweep": rows,
        "discs": json.loads((data / "summary.json").read_text()),
        "b4": {k: metadata["metrics"][k] for k in ("train_iou", "held_out_iou")},
        "b4_epochs": metadata["training"]["epochs"],
        "artifact": str(artifact),
    }


# --------------------------------------------------------------------------------------- geometry
GEOMETRY = ("mean_height_mm", "anterior_height_mm", "posterior_height_mm", "ap_width_mm", "volume_mm3")


def geometry(root: Path, dataset: dict[str, Any]) -> dict[str, Any]:
    """Every disc of every mask measured; per level the count and median [25th-75th percentile]."""
    from tqdm import tqdm

    from discgeo import levels
    from discgeo.geometry import measure_discs

    by_level: dict[str, list[dict[str, float]]] = {}
    failed = []
    for s in tqdm(_series(dataset), desc="geometry", unit="series"):
        try:
            result = measure_discs(_labels(root, s))
        except Exception as exc:  # one unreadable mask is reported, the others still measured
            failed.append(f"{s.name}: {type(exc).__name__}: {exc}")
            continue
        for d in result.discs:
            by_level.setdefault(d.level, []).append({k: getattr(d, k) for k in GEOMETRY})
    order = sorted(by_level, key=lambda name: levels.level_from_name(name) or 0)
    return {
        "levels": {
            level: {
                "discs": len(by_level[level]),
                **{
                    k: [
                        round(float(v), 2)
                        for v in np.percentile([d[k] for d in by_level[level]], [50, 25, 75])
                    ]
                    for k in GEOMETRY
                },
            }
            for level in order
        },
        "failed": failed,
    }


# -------------------------------------------------------------------------------------- narrowing
def narrowing(
    root: Path, dataset: dict[str, Any], out: Path, settings: dict[str, Any], encoder_dir: Path
) -> dict[str, Any]:
    """Features of every graded disc from the true masks (as the study), both CV protocols."""
    from tqdm import tqdm

    from discgeo import levels
    from discgeo.analysis import (
        FeatureTable,
        add_labels,
        compare_feature_sets,
        enough_for_cv,
        evaluate_table,
        paired_auc_differences,
        report,
    )
    from discgeo.encoding import Encoder

    targets, source = _targets(root, settings["labels"])
    encoder = Encoder.from_artifact(encoder_dir)
    table = FeatureTable()
    for s in tqdm(_series(dataset), desc="narrowing features", unit="series"):
        wanted = {
            levels.level_name(ivd - 1): y for (p, ivd), y in targets.items() if p == s.patient and ivd >= 1
        }
        if wanted:
            add_labels(table, s.patient, _labels(root, s), wanted, encoder)
    # the cross-validations run ``threads`` at once, one thread each on 2 cores: gradient boosting of a
    # few hundred or thousand discs is dominated by thread start-up (a calibrated fit of 1,300 discs took
    # 1.42 s on one thread and 1.63 s on two, of 50 discs 0.39 s and 0.73 s, on 2 cores)
    n, jobs = settings["bootstrap"], settings["threads"]
    cohort = f"SPIDER {dataset['contrast']} series of {dataset['root']}"
    counts = {
        "labels": source,
        "patients": len(set(table.patients)),
        "discs": len(table),
        "narrowed": int(table.y.sum()),
    }
    enough = enough_for_cv(table, 5)  # not, e.g., with a labels table whose subjects match no series
    if enough:
        # one model, as the study (boosting; the logistic comparison of `discgeo analyze` is left out)
        common = {
            "latent_dim": encoder.latent_dim,
            "bootstrap": n,
            "seed": 0,
            "models": ("boosting",),
            "sets": SETS,
        }
        scores, differences = evaluate_table(table, folds=5, jobs=jobs, **common)
        disc_level = {
            s.feature_set: s for s in compare_feature_sets(table, grouped=False, jobs=jobs, **common)
        }
    report(  # features only, without enough patients and discs for 5-fold CV
        table,
        out / "narrowing",
        encoder,
        cohort=cohort,
        kind="spider",
        bootstrap=n,
        extra={"labels": source},
        evaluated=(scores, differences) if enough else None,
    )
    if not enough:
        return {
            **counts,
            "encoder": encoder.version,
            "protocols": {},
            "note": "too few patients or discs of a class for 5-fold CV",
        }
    groups = np.asarray(table.patients)
    protocols = {}
    for grouped in scores:
        by_disc = disc_level[grouped.feature_set]
        (difference,) = paired_auc_differences(
            table.y, {"discs": by_disc.probabilities, "patients": grouped.probabilities}, groups, n=n, seed=0
        )
        protocols[grouped.feature_set] = {
            "patient_grouped": grouped.figures(),
            "disc_level": by_disc.figures(),
            "leakage_auc": difference["difference"],
        }
    return {**counts, "encoder": encoder.version, "protocols": protocols}


def _targets(root: Path, labels: str) -> tuple[dict[tuple[str, int], int], str]:
    if labels == "spider":
        gradings = read_gradings(root / "radiological_gradings.csv")
        return {k: v["narrowing"] for k, v in gradings.items()}, "SPIDER's `Disc narrowing` column"
    path = Path(labels)
    if not path.is_file():
        raise SystemExit(f"--labels {labels}: not 'spider' and not a file")
    return read_study_labels(path), f"the study's annotation table `{path.name}` (`Narrowing` column)"


# ----------------------------------------------------------------------------------------- report
def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for package in ("discgeo", "torch", "monai", "onnxruntime-gpu", "onnxruntime", "scikit-learn", "numpy"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            continue
    return out


def _ci(v: Any) -> str:
    return f"{v[0]:.3f} [{v[1]:.3f}-{v[2]:.3f}]"


def render(results: dict[str, Any]) -> str:
    """``report.md``: per step the study's figure, ours and the difference."""
    dataset, settings = results["dataset"], results["settings"]
    lines = [
        "# Reproducing the reference study on SPIDER",
        "",
        f"`{results['command']}` on {results['machine']}; {dataset['training']} training and "
        f"{dataset['validation']} validation {dataset['contrast'].upper()} series of `{dataset['root']}` "
        "(SPIDER, van der Graaf et al. 2024, CC-BY 4.0; SPIDER's own training / validation split).",
        "",
    ]
    if settings["quick"]:
        lines += [
            "**QUICK run**: a few series, a few epochs: the figures show that every step runs, not what "
            "the models can do.",
            "",
        ]
    grading = dataset["gradings"]
    lines += [
        f"SPIDER's gradings of these patients: {grading['discs']} discs, {grading['narrowed']} graded "
        "narrowed; Pfirrmann grades 1-5: " + ", ".join(f"{v}" for v in grading["pfirrmann"].values()) + ".",
        "",
    ]
    if dataset["problems"]:
        lines += [f"Left out or missing ({len(dataset['problems'])}):", ""]
        lines += [f"- {p}" for p in dataset["problems"][:20]]
        if len(dataset["problems"]) > 20:
            lines.append(f"- ... and {len(dataset['problems']) - 20} more (`dataset.json`)")
        lines.append("")
    seg = results["segmentation"]
    lines += ["## 1. Segmentation (held-out validation series)", ""]
    if "skipped" in seg:
        lines += [f"Not run: {seg['skipped']}.", ""]
    else:
        study_dice, study_iou = STUDY["segmentation_dice"], STUDY["segmentation_iou"]
        lines += [
            "| per disc | study | ours [patient-level 95 % CI] | ours - study |",
            "|---|---|---|---|",
            f"| Dice | {study_dice[0]:.2f} [{study_dice[1]:.2f}-{study_dice[2]:.2f}] | {_ci(seg['dice'])} "
            f"| {seg['dice'][0] - study_dice[0]:+.3f} |",
            f"| IoU | {study_iou:.2f} | {_ci(seg['iou'])} | {seg['iou'][0] - study_iou:+.3f} |",
            "",
            f"{seg['discs']} reference discs of {seg['test_series']} series ({seg['missed']} missed, "
            f"scored 0; {seg['extra_discs']} predicted at levels the reference does not have; all discs "
            f"of a series as one mask, whatever their level: mean Dice {seg['series_dice_all_discs']:.3f}). "
            f"Ours: 2D SwinUNETR-V2 (feature size 12), {seg['epochs']} epochs of {seg['steps_per_epoch']} "
            f"steps on {seg['train_series']} training series ({seg['train_seconds']:.0f} s), run through "
            "the deployed inference path (ONNX, level assignment); the study: 3D SwinUNETR.",
            "",
        ]
    enc = results["autoencoder"]
    lines += [
        "## 2. Autoencoder bottleneck sweep",
        "",
        (Path(results["out"]) / "autoencoder-sweep.md").read_text(),
        f"Bottleneck 4 after {enc['b4_epochs']} epochs: train IoU {enc['b4']['train_iou']:.4f}, held-out "
        f"(validation series, {enc['discs']['held_out']} discs) {enc['b4']['held_out_iou']:.4f}; the study: "
        f"{STUDY['autoencoder_iou_b4']} (training discs, {STUDY['autoencoder_epochs']} epochs, no held-out "
        f"set); ours - study on training discs: {enc['b4']['train_iou'] - STUDY['autoencoder_iou_b4']:+.4f}.",
        "",
        "![learning curve](autoencoder-curve.png)",
        "",
    ]
    geo = results["geometry"]
    lines += [
        "## 3. Geometry (every disc of every mask, median [25th-75th percentile])",
        "",
        "| level | discs | " + " | ".join(k.replace("_", " ") for k in GEOMETRY) + " |",
        "|---|---|" + "---|" * len(GEOMETRY),
    ]
    for level, row in geo["levels"].items():
        cells = [f"{row[k][0]:.1f} [{row[k][1]:.1f}-{row[k][2]:.1f}]" for k in GEOMETRY]
        lines.append(f"| {level} | {row['discs']} | " + " | ".join(cells) + " |")
    lines += ["", "The study reports no per-level table to compare with.", ""]
    nar = results["narrowing"]
    lines += [
        "## 4. Narrowing",
        "",
        f"Labels: {nar['labels']}. {nar['discs']} graded discs of {nar['patients']} patients, "
        f"{nar['narrowed']} narrowed; features from the true masks (as the study), encoder {nar['encoder']}. "
        f"Gradient boosting (scikit-learn, calibrated; the study: {STUDY['protocol']}); sensitivity, "
        "specificity and F1 at the threshold for specificity 0.95 chosen within the training folds. 95 % CIs "
        "resample patients.",
        "",
        "| features | study AUC | ours, patient-grouped CV | ours - study | ours, the study's disc-level CV "
        "| leakage: disc-level - grouped AUC [paired 95 % CI] | study F1 | our F1 (grouped) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in nar["protocols"].items():
        study_auc = STUDY["auc"].get(name)
        grouped = row["patient_grouped"]
        leak = row["leakage_auc"]
        lines.append(
            f"| {name} | {study_auc if study_auc is not None else '-'} | {_ci(grouped['auc'])} | "
            + (f"{grouped['auc'][0] - study_auc:+.3f}" if study_auc is not None else "-")
            + f" | {_ci(row['disc_level']['auc'])} | {leak[0]:+.3f} [{leak[1]:+.3f} to {leak[2]:+.3f}] | "
            f"{STUDY['f1'].get(name, '-')} | {_ci(grouped['f1'])} |"
        )
    lines += [
        "",
        *([f"Not cross-validated: {nar['note']}.", ""] if nar.get("note") else []),
        "The full comparison (paired AUC differences between feature sets, correlations, traversals): "
        "[narrowing/report.md](narrowing/report.md).",
        "",
        "![ROC curves](narrowing/roc.png)",
        "",
        "![latent-geometry correlations](narrowing/correlations.png)",
        "",
        "![latent traversals](narrowing/traversals.png)",
        "",
        "## Versions",
        "",
        ", ".join(f"{k} {v}" for k, v in results["versions"].items()),
        "",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- main
def _step(out: Path, name: str, key: dict[str, Any], run: Any) -> dict[str, Any]:
    """A finished step with the same settings is only read; else it runs and its figures are saved."""
    path = out / f"{name}.json"
    key = json.loads(json.dumps(key))  # as saved (tuples become lists)
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            print(f"{name}: done before, read from {path}", flush=True)
            return dict(saved["result"])
    print(f"{name}: running", flush=True)
    started = time.monotonic()
    result = run()
    result["seconds"] = round(time.monotonic() - started, 1)
    path.write_text(json.dumps({"key": key, "result": result}, indent=1, default=str))
    return dict(result)


def reproduce(
    root: Path,
    out: Path,
    *,
    labels: str = "spider",
    contrast: str = "t1",
    quick: bool = False,
    threads: int = 2,
    overrides: dict[str, Any] | None = None,
    command: str = "",
) -> dict[str, Any]:
    """Every step (module docstring); returns the figures and writes ``OUT/report.md``."""
    settings = {
        **(QUICK if quick else FULL),
        **{k: v for k, v in (overrides or {}).items() if v is not None},
        "quick": quick,
        "labels": labels,
        "bootstrap": BOOTSTRAP["quick" if quick else "full"],
        "threads": threads,
    }
    out.mkdir(parents=True, exist_ok=True)
    key = {"root": str(root.resolve()), "contrast": contrast, "series": settings["series"]}
    # the caches and runs of one dataset (root, contrast, series chosen) are never reused for another
    settings["dataset_tag"] = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]
    dataset = _step(out, "dataset", key, lambda: load_dataset(root, contrast, settings["series"]))
    for problem in dataset["problems"][:10]:
        print(f"  {problem}")
    seg_key = {**key, **{k: settings[k] for k in ("seg_epochs", "seg_steps", "bootstrap")}}
    ae_key = {**key, **{k: settings[k] for k in ("ae_epochs", "bottlenecks")}}
    results = {
        "command": command
        or f"python -m training.reproduce --spider {root} --labels {labels} --contrast {contrast} --out {out}"
        + (" --quick" if quick else ""),
        "machine": f"{platform.machine()}, {_device()}",
        "out": str(out),
        "settings": settings,
        "dataset": dataset,
        "segmentation": _step(
            out, "segmentation", seg_key, lambda: segmentation(root, dataset, out, settings)
        ),
        "autoencoder": _step(out, "autoencoder", ae_key, lambda: autoencoder(root, dataset, out, settings)),
        "geometry": _step(out, "geometry", key, lambda: geometry(root, dataset)),
    }
    encoder_dir = Path(results["autoencoder"]["artifact"])
    nar_key = {**ae_key, "labels": labels, "bootstrap": settings["bootstrap"]}
    results["narrowing"] = _step(
        out, "narrowing", nar_key, lambda: narrowing(root, dataset, out, settings, encoder_dir)
    )
    results["versions"] = _versions()
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "report.md").write_text(render(results))
    print(f"report: {out / 'report.md'}")
    return results


def _device() -> str:
    import torch

    return (
        f"CUDA ({torch.cuda.get_device_name()})"
        if torch.cuda.is_available()
        else f"{torch.get_num_threads()} CPU threads"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--spider", type=Path, required=True, help="SPIDER folder (images/, masks/, *.csv)")
    parser.add_argument(
        "--labels", default="spider", help="'spider' (default) or the study's table (csv/xlsx)"
    )
    parser.add_argument("--contrast", choices=("t1", "t2"), default="t1")
    parser.add_argument("--quick", action="store_true", help="a small subset end to end in minutes")
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "reproduce")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seg-epochs", type=int)
    parser.add_argument("--ae-epochs", type=int)
    parser.add_argument("--bottlenecks", type=int, nargs="+")
    args = parser.parse_args()
    import sys

    reproduce(
        args.spider,
        args.out,
        labels=args.labels,
        contrast=args.contrast,
        quick=args.quick,
        threads=args.threads,
        overrides={
            "seg_epochs": args.seg_epochs,
            "ae_epochs": args.ae_epochs,
            "bottlenecks": args.bottlenecks,
        },
        command="python -m training.reproduce " + " ".join(sys.argv[1:]),
    )


if __name__ == "__main__":
    main()
