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
SHIPPED_SET = "all"
SEGMENTED_SEED = 4711


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
    parser.add_argument("--segmented", type=int, default=40, help="phantom patients segmented by the shipped model")
    parser.add_argument("--out", type=Path, default=ROOT / "models" / "classifier")
    parser.add_argument("--report", type=Path, default=ROOT / "training" / "results" / "narrowing")
    args = parser.parse_args()
    if not args.cohort.exists():
        generate_cohort(args.cohort, cases=args.cases, seed=args.seed, fmt="nifti", progress=True)
    encoder = Encoder.from_artifact(Settings.from_env().artifact("autoencoder"))
    table, kind = load_features(args.cohort, encoder, progress=True)
    segmented = segmented_features(args.segmented, encoder) if args.segmented else None
    names = feature_sets(encoder.latent_dim)[SHIPPED_SET]
    oof, _ = cross_validate(table, names, model="boosting")
    threshold = operating_threshold(table.y, oof)
    summary = report(
        table,
        args.report,
        encoder,
        cohort=f"phantom cohort, seed {args.seed}",
        kind=kind,
        segmented=segmented,
        extra={
            "shipped_model": f"boosting on the '{SHIPPED_SET}' features, threshold {threshold:.4f} (specificity "
            f"{SPECIFICITY_TARGET:.2f} in the out-of-fold probabilities of the whole cohort)"
        },
    )
    model = make_model("boosting", seed=0).fit(table.matrix(names), table.y)
    cv = next(r for r in summary["results"] if r["model"] == "boosting" and r["feature_set"] == SHIPPED_SET)
    classifier = NarrowingClassifier(
        model,
        names,
        threshold=threshold,
        metadata={
            "name": "discgeo-narrowing",
            "version": f"0.2.0-{encoder.version}",
            "encoder_version": encoder.version,
            "model": "StandardScaler + HistGradientBoostingClassifier, sigmoid-calibrated (3-fold)",
            "feature_set": SHIPPED_SET,
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
