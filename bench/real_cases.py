"""The three real shared T2 cases through the embedded pipeline, as NIfTI and as DICOM series written
from them, with per-stage timings, segmentation Dice against the manual masks and the discs called
narrowed (none should be: healthy young adults), Dice also against the same subjects' native masks
placed on the 1 mm grid; then the 145 manual disc masks of ``ivd-masks``
through the pipeline in place of the segmenter (share called narrowed, reconstruction IoU,
``unusual_shape`` flags).

    python -m bench.real_cases      # writes bench/results/real_cases.{json,md}
    DISCGEO_SEGMENTER_MODE=accurate python -m bench.real_cases   # real_cases-accurate.{json,md}

Data: Menezes-Reis et al., Quant Imaging Med Surg 2016 (see README). Which cases the shipped
segmenter saw in training is read from its metadata and printed next to each case.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from discgeo import realdata
from discgeo.analysis import healthy_real_discs
from discgeo.api import process_study
from discgeo.io import read_labels, read_volume
from discgeo.phantom import SeriesTags, write_dicom_series
from discgeo.pipeline import LocalStages
from discgeo.segmentation import dice, dice_per_level

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    stages = LocalStages()
    excluded = stages.segmenter.metadata.get("training", {}).get("excluded", [])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in realdata.REAL_CASES:
            image = read_volume(realdata.ivd_t2_dir() / f"{case}.nii.gz")
            truth = read_labels(realdata.ivd_t2_dir() / f"{case}_discs.nii.gz")
            native, _ = realdata.native_on_case_grid(case)
            # the NIfTI holds uint16 values: the DICOM written from it is exact
            files = write_dicom_series(
                image,
                Path(tmp) / case,
                tags=SeriesTags(series_description="SAG T2 TSE", contrast="t2", uid_seed=case),
            )
            for source in ("nifti", "dicom"):
                path = realdata.ivd_t2_dir() / f"{case}.nii.gz" if source == "nifti" else files
                processed = process_study(path, stages=stages, study=case)
                result, labels, read_s = processed.result, processed.labels, processed.read_s
                per_level = dice_per_level(labels, truth.with_array(np.asarray(truth.array)))
                per_level_native = dice_per_level(labels, native)
                rows.append(
                    {
                        "case": case,
                        "input": source,
                        "held_out": case in excluded,
                        "read_s": round(read_s, 3),
                        **{f"{k}_s": v for k, v in result.timings_s.items()},
                        "discs_found": len(result.discs),
                        "mean_dice": round(float(np.mean([d["dice"] for d in per_level])), 4),
                        "binary_dice": round(dice(labels.array > 0, truth.array > 0), 4),
                        "dice_by_level": {d["level"]: round(d["dice"], 4) for d in per_level},
                        "mean_dice_native": round(float(np.mean([d["dice"] for d in per_level_native])), 4),
                        "dice_native_by_level": {d["level"]: round(d["dice"], 4) for d in per_level_native},
                        "levels": [d.level for d in result.discs],
                        "mean_height_mm": [round(d.geometry.mean_height_mm, 2) for d in result.discs],
                        "narrowing_probability": [
                            round(d.narrowing_probability or 0, 3) for d in result.discs
                        ],
                        "called_narrowed": sum(bool(d.narrowing) for d in result.discs),
                        "unusual_shape": sum("unusual_shape" in d.flags for d in result.discs),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    healthy = healthy_real_discs(stages.encoder, stages.classifier)
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    mode = stages.segmenter.mode
    stem = "real_cases" if mode == "fast" else f"real_cases-{mode}"
    (out / f"{stem}.json").write_text(
        json.dumps(
            {
                "model_versions": stages.versions(),
                "segmenter_mode": mode,
                "rows": rows,
                "healthy_real_discs": healthy,
            },
            indent=1,
        )
    )
    lines = [
        "# Real T2 cases through `discgeo run` (embedded, CPU)",
        "",
        f"`DISCGEO_SEGMENTER_MODE={mode} python -m bench.real_cases`; models {stages.versions()}; "
        f"segmenter provider {stages.segmenter.provider}, {mode} mode. Held out = not seen by the segmenter "
        "in training.",
        "",
        "Dice against the native masks: the same subject's `ivd-masks` discs (4.4 mm slices) moved onto the "
        "case's 1 mm grid by one translation and resampled with each disc's volume kept "
        "(`discgeo.realdata.native_on_case_grid`); the 1 mm manual masks are inflated at the upper levels.",
        "",
        "| case | input | held out | read s | segment s | measure s | encode s | classify s | total s "
        "| discs | Dice per level (mean) | against the native masks | Dice all discs | called narrowed "
        "| unusual shape |",
        "|---" * 15 + "|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['input']} | {'yes' if r['held_out'] else 'no'} | {r['read_s']} | "
            f"{r['segment_s']} | {r['measure_s']} | {r['encode_s']} | {r['classify_s']} | {r['total_s']} | "
            f"{r['discs_found']} | {r['mean_dice']} | {r['mean_dice_native']} | {r['binary_dice']} | "
            f"{r['called_narrowed']} | "
            f"{r['unusual_shape']} |"
        )
    every = healthy["all"]
    lines += [
        "",
        f"## The 145 real healthy discs of `ivd-masks` ({healthy['data']})",
        "",
        f"Called narrowed: {every['called_narrowed']} of {every['discs']} "
        f"({every['called_narrowed_share']:.1%}); "
        "by level "
        + ", ".join(f"{lv} {v:.1%}" for lv, v in every["called_narrowed_by_level"].items())
        + f". Mean reconstruction IoU {every['mean_iou']:.3f}; `unusual_shape` {every['unusual_shape']}. "
        "The autoencoder trained on 22 of these 29 subjects (see its metadata for the held-out 7).",
    ]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
