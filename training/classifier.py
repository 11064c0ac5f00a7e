"""Train the shipped narrowing classifier on a phantom cohort and write models/classifier.

    python -m training.classifier --cohort build/cohort --cases 240 --seed 2024 --segmented 40

Generates the cohort when the folder does not exist (calibrated phantoms graded by the narrowing rule
of :mod:`discgeo.reference`), computes every feature from the ground-truth label maps (geometry,
relative features, latents with the shipped encoder), evaluates the feature sets with patient-grouped
5-fold CV (written to training/results/narrowing/), repeats the evaluation on ``--segmented`` more
phantom patients whose discs the shipped segmenter found in their images (what the deployed classifier
sees), then fits gradient boosting on all features of all patients, with the decision threshold at
the operating point (specificity 0.95 in the out-of-fold probabilities). The export measures the
classifier on the 145 real healthy discs of ``ivd-masks`` through the pipeline and records it.
Phantom figures describe the method on synthetic anatomy, not clinical accuracy.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from discgeo.analysis import (
    SPECIFICITY_TARGET,
    FeatureTable,
    add_labels,
    cross_validate,
    healthy_real_discs,
    load_features,
    operating_threshold,
    report,
)
from discgeo.artifacts import record_metric
from discgeo.classification import NarrowingClassifier, feature_sets, make_model
from discgeo.config import Settings
from discgeo.encoding import Encoder
from discgeo.phantom import generate_cohort, make_case

ROOT = Path(__file__).resolve().parents[1]
SEGMENTED_SEED = 4711


def choose_set(table: FeatureTable, *, seed: int = 0) -> tuple[str, str]:
    """The shipped feature set, decided on phantoms only: ``all`` when it beats ``relative`` (the
    features defined the way the grade is) by a paired-bootstrap AUC difference whose 95 % CI excludes
    zero, else ``relative``: latents and absolute sizes describe phantoms and real patients differently,
    so they must earn their place."""
    from discgeo.analysis import paired_auc_differences

    sets = feature_sets(4)
    p = {
        name: cross_validate(table, sets[name], model="boosting", seed=seed)[0]
        for name in ("all", "relative")
    }
    diff = paired_auc_differences(table.y, p, np.asarray(table.patients), n=1000, seed=seed)[0]
    estimate, low, high = diff["difference"]
    text = f"AUC all - relative {estimate:+.3f} [{low:+.3f} to {high:+.3f}] on segmented phantoms"
    return ("all", text) if low > 0 else ("relative", text)


def real_calls_by_set(
    table: FeatureTable, encoder: Encoder, sets: dict[str, tuple[str, ...]], thresholds: dict[str, float]
) -> dict[str, float]:
    """Share of the 145 real healthy discs each feature set's boosting model (fitted on the whole
    cohort, at its own operating threshold) calls narrowed; reported for information, never used to
    choose (the real discs are held out from every decision)."""
    from discgeo import realdata

    real = FeatureTable()
    for mask in realdata.real_masks(isotropic=False):
        add_labels(real, mask.subject, mask.labels, dict.fromkeys(realdata.LUMBAR_LEVELS, 0), encoder)
    out = {}
    for name, names in sets.items():
        model = make_model("boosting", seed=0, features=names).fit(table.matrix(names), table.y)
        called = model.predict_proba(real.matrix(names))[:, 1] >= thresholds[name]
        out[name] = round(float(called.mean()), 4)
    return out


def segmented_features(cases: int, encoder: Encoder, *, seed: int = SEGMENTED_SEED) -> FeatureTable:
    """Features of phantom patients as the deployed pipeline sees them: discs segmented from the image
    by the shipped segmenter, matched to the truth by level (a missed or extra disc shifts the levels,
    as it would in use)."""
    from tqdm import tqdm

    from discgeo.segmentation import Segmenter

    segmenter = Segmenter.from_settings(Settings.from_env())
    table = FeatureTable()
    for index in tqdm(range(cases), desc="segmented phantoms", unit="case"):
        case = make_case(seed, index)
        labels = segmenter.predict(case.image)
        targets = {d["level"]: int(d["narrowing"]) for d in case.truth["discs"]}
        if np.any(labels.array):
            add_labels(table, case.truth["patient_id"], labels, targets, encoder)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cohort", type=Path, default=ROOT / "build" / "cohort")
    parser.add_argument("--cases", type=int, default=240)
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument(
        "--segmented", type=int, default=40, help="phantom patients segmented by the shipped model"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "models" / "classifier")
    parser.add_argument("--report", type=Path, default=ROOT / "training" / "results" / "narrowing")
    args = parser.parse_args()
    if not args.cohort.exists():
        generate_cohort(args.cohort, cases=args.cases, seed=args.seed, fmt="nifti", progress=True)
    encoder = Encoder.from_artifact(Settings.from_env().artifact("autoencoder"))
    table, kind = load_features(args.cohort, encoder, progress=True)
    segmented = segmented_features(args.segmented, encoder) if args.segmented else None
    sets = feature_sets(encoder.latent_dim)
    oof = {name: cross_validate(table, names, model="boosting")[0] for name, names in sets.items()}
    thresholds = {name: operating_threshold(table.y, p) for name, p in oof.items()}
    shipped, why = choose_set(segmented if segmented is not None and len(segmented) else table)
    names = sets[shipped]
    threshold = thresholds[shipped]
    real_by_set = real_calls_by_set(table, encoder, sets, thresholds)
    summary = report(
        table,
        args.report,
        encoder,
        cohort=f"phantom cohort, seed {args.seed}",
        kind=kind,
        segmented=segmented,
        extra={
            "shipped_model": f"boosting on the '{shipped}' features ({why}), threshold {threshold:.4f} "
            f"(specificity {SPECIFICITY_TARGET:.2f} in the out-of-fold probabilities of the whole cohort)",
            "shipped_real_healthy_discs_called_narrowed_by_feature_set": real_by_set,
        },
    )
    model = make_model("boosting", seed=0, features=names).fit(table.matrix(names), table.y)
    cv = next(r for r in summary["results"] if r["model"] == "boosting" and r["feature_set"] == shipped)
    classifier = NarrowingClassifier(
        model,
        names,
        threshold=threshold,
        metadata={
            "name": "discgeo-narrowing",
            "version": f"0.2.0-{encoder.version}",
            "encoder_version": encoder.version,
            "model": "StandardScaler + HistGradientBoostingClassifier, sigmoid-calibrated (3-fold)",
            "feature_set": shipped,
            "feature_set_choice": why,
            "operating_point": f"specificity {SPECIFICITY_TARGET} on the cohort's out-of-fold probabilities",
            "training": {
                "cohort": f"calibrated phantoms, seed {args.seed}, {summary['patients']} patients, "
                f"{summary['discs']} discs, graded by discgeo.reference's narrowing rule with label noise",
                "prevalence": summary["prevalence"],
                "command": f"python -m training.classifier --cases {args.cases} --seed {args.seed} "
                f"--segmented {args.segmented}",
            },
            "metrics": {
                "cv": "patient-grouped stratified 5-fold, patient-level bootstrap 95% CI",
                "auc": cv["auc"],
                "sensitivity": cv["sensitivity"],
                "specificity": cv["specificity"],
                "f1": cv["f1"],
                "all_feature_sets": summary["results"],
                "segmented": summary.get("segmented"),
            },
        },
    )
    classifier.save(args.out)
    real = healthy_real_discs(encoder, NarrowingClassifier.from_artifact(args.out))
    record_metric(args.out, kind="classifier", name="real_healthy_discs", value=real)
    print(json.dumps({"saved": str(args.out), "cv_auc": cv["auc"], "threshold": threshold, "real": real}))


if __name__ == "__main__":
    main()
