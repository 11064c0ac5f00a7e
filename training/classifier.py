"""Train the shipped narrowing classifier on a phantom cohort and write models/classifier.

    python -m training.classifier --cohort build/cohort --cases 240 --seed 2024

Generates the cohort when the folder does not exist, computes geometric features from the ground-truth
label maps and latents with the shipped encoder, evaluates the three feature sets with patient-grouped
5-fold CV (written to training/results/), then fits gradient boosting on the combined features of
all patients. Phantom figures describe the method on synthetic anatomy, not clinical accuracy.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from discgeo.analysis import load_features, report
from discgeo.classification import NarrowingClassifier, feature_sets, make_model
from discgeo.config import Settings
from discgeo.encoding import Encoder
from discgeo.phantom import generate_cohort

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cohort", type=Path, default=ROOT / "build" / "cohort")
    parser.add_argument("--cases", type=int, default=240)
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--out", type=Path, default=ROOT / "models" / "classifier")
    parser.add_argument("--report", type=Path, default=ROOT / "training" / "results" / "narrowing")
    args = parser.parse_args()
    if not args.cohort.exists():
        generate_cohort(args.cohort, cases=args.cases, seed=args.seed, fmt="nifti", progress=True)
    encoder = Encoder.from_artifact(Settings.from_env().artifact("autoencoder"))
    table, kind = load_features(args.cohort, encoder, progress=True)
    summary = report(table, args.report, encoder, cohort=f"phantom cohort, seed {args.seed}", kind=kind)
    names = feature_sets(encoder.latent_dim)["combined"]
    model = make_model("boosting", seed=0).fit(table.matrix(names), table.y)
    cv = next(r for r in summary["results"] if r["model"] == "boosting" and r["feature_set"] == "combined")
    classifier = NarrowingClassifier(
        model,
        names,
        threshold=float(table.y.mean()),
        metadata={
            "name": "discgeo-narrowing",
            "version": f"0.1.0-{encoder.version}",
            "encoder_version": encoder.version,
            "model": "StandardScaler + HistGradientBoostingClassifier, sigmoid-calibrated (3-fold)",
            "training": {
                "cohort": f"phantom seed {args.seed}, {summary['patients']} patients, "
                f"{summary['discs']} discs",
                "prevalence": summary["prevalence"],
                "command": f"python -m training.classifier --cases {args.cases} --seed {args.seed}",
            },
            "metrics": {
                "cv": "patient-grouped stratified 5-fold, bootstrap 95% CI",
                "auc": cv["auc"],
                "balanced_accuracy": cv["balanced_accuracy"],
                "f1": cv["f1"],
                "all_feature_sets": summary["results"],
            },
        },
    )
    classifier.save(args.out)
    print(json.dumps({"saved": str(args.out), "cv_auc_combined": cv["auc"]}))


if __name__ == "__main__":
    main()
