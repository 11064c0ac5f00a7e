"""The ``discgeo`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from discgeo.errors import DiscgeoError
from discgeo.schemas import GeometryResult, StudyResult


def _cmd_info(args: argparse.Namespace) -> int:
    from discgeo.config import Settings
    from discgeo.io import ITK_SUFFIXES, NIFTI_SUFFIXES, read_volume
    from discgeo.io.dicom import build_volume, scan, select_series

    path = Path(args.path)
    settings = Settings.from_env()
    report: dict = {"input": str(path)}
    name = path.name.lower()
    if path.is_file() and name.endswith(NIFTI_SUFFIXES + ITK_SUFFIXES):
        volume = read_volume(path, settings=settings)
        report["format"] = volume.meta.get("format")
    else:
        study = scan(path)
        report["series"] = study.summary()
        if study.skipped:
            report["skipped_files"] = study.skipped
        chosen, reason = select_series(study, settings)
        report["chosen"] = chosen.label
        report["reason"] = reason
        volume = build_volume(chosen, settings)
    report["volume"] = {
        "shape": list(volume.shape),
        "spacing_mm": [round(s, 4) for s in volume.spacing],
        "orientation": "".join(volume.axcodes),
        "source_shape": list(volume.source_shape),
        "source_orientation": "".join(volume.source_axcodes),
        "intensity_range": [float(volume.array.min()), float(volume.array.max())],
        "affine": [[round(v, 4) for v in row] for row in volume.affine.tolist()],
    }
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"input: {path}")
    for s in report.get("series", []):
        extra = f"  PROBLEM: {s['problem']}" if "problem" in s else ""
        spacing = "x".join(f"{v:g}" for v in s.get("pixel_spacing_mm", []))
        print(
            f"  series {s['series']}: {s['modality']} {s['plane']} {s['contrast'].upper()} "
            f"({s['contrast_reason']}), {s['slices']} slices of {s['matrix'][1]}x{s['matrix'][0]}"
            f" @ {spacing} mm{' multi-frame' if s['multiframe'] else ''}{extra}"
        )
    if "skipped_files" in report:
        print("  skipped: " + ", ".join(f"{n} {k}" for k, n in report["skipped_files"].items()))
    if "chosen" in report:
        print(f"chosen: {report['chosen']}\n  why: {report['reason']}")
    vol = report["volume"]
    print(
        f"volume: shape {tuple(vol['shape'])} ({vol['orientation']}), spacing "
        f"{' x '.join(f'{s:g}' for s in vol['spacing_mm'])} mm; stored as {tuple(vol['source_shape'])} "
        f"({vol['source_orientation']}); intensities "
        f"{vol['intensity_range'][0]:g}..{vol['intensity_range'][1]:g}"
    )
    return 0


def _cmd_phantom(args: argparse.Namespace) -> int:
    from discgeo.phantom import generate_cohort

    folders = generate_cohort(
        args.out,
        cases=args.cases,
        seed=args.seed,
        fmt=args.format,
        contrast=args.contrast,
        progress=not args.quiet,
    )
    summary = json.loads((Path(args.out) / "cohort.json").read_text())
    print(
        f"wrote {len(folders)} case(s) to {args.out}: {summary['discs']} discs, narrowing prevalence "
        f"{summary['narrowing_prevalence']:.1%}"
    )
    return 0


def _cmd_measure(args: argparse.Namespace) -> int:
    from discgeo.geometry import measure_discs
    from discgeo.io import read_labels

    labels = read_labels(args.labels)
    result = measure_discs(labels, min_fragment_mm3=args.min_fragment_mm3)
    print(format_geometry_table(result))
    for fragment in result.dropped_fragments:
        print(f"dropped fragment (label {fragment.label}): {fragment.volume_mm3:.0f} mm3")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(result.model_dump_json(indent=1))
        print(f"wrote {args.out}")
    return 0


_TABLE = (
    ("level", "level", "{}"),
    ("label", "label", "{}"),
    ("volume_mm3", "vol mm3", "{:.0f}"),
    ("mean_height_mm", "mean h", "{:.2f}"),
    ("middle_height_mm", "mid h", "{:.2f}"),
    ("anterior_height_mm", "ant h", "{:.2f}"),
    ("posterior_height_mm", "post h", "{:.2f}"),
    ("ap_width_mm", "AP mm", "{:.1f}"),
    ("lateral_width_mm", "lat mm", "{:.1f}"),
    ("wedge_angle_deg", "wedge", "{:.1f}"),
    ("sagittal_angle_deg", "sag deg", "{:.1f}"),
)


def format_geometry_table(result: GeometryResult) -> str:
    """Per-disc table (heights and widths in mm, angles in degrees), top disc first."""
    rows = [[title for _, title, _ in _TABLE]]
    for disc in reversed(result.discs):
        values = disc.model_dump()
        rows.append([fmt.format(values[key]) for key, _, fmt in _TABLE])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in rows)


def _cmd_analyze(args: argparse.Namespace) -> int:
    from discgeo.analysis import analyze
    from discgeo.config import Settings
    from discgeo.encoding import Encoder

    settings = Settings.from_env()
    encoder = Encoder.from_settings(settings, args.encoder)
    summary = analyze(
        Path(args.cohort),
        Path(args.out),
        encoder,
        folds=args.folds,
        bootstrap=args.bootstrap,
        seed=args.seed,
        progress=not args.quiet,
    )
    print(f"{summary['patients']} patients, {summary['discs']} discs, {summary['narrowed']} narrowed")
    for r in summary["results"]:
        auc = r["auc"]
        print(f"  {r['model']:9s} {r['feature_set']:9s} AUC {auc[0]:.3f} [{auc[1]:.3f}-{auc[2]:.3f}]")
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0


def _cmd_segment(args: argparse.Namespace) -> int:
    from discgeo.config import Settings
    from discgeo.io import read_volume, write_nifti
    from discgeo.segmentation import Segmenter

    settings = Settings.from_env()
    segmenter = Segmenter.from_settings(settings, args.model)
    volume = read_volume(args.input, settings=settings)
    labels = segmenter.predict(volume)
    write_nifti(labels, args.out)
    found = sorted(int(v) for v in set(labels.array.ravel().tolist()) if v)
    print(
        f"segmenter {segmenter.version} ({segmenter.mode} mode) on {segmenter.provider}: "
        f"{len(found)} disc(s) -> {args.out}; levels from the {labels.meta['levels_from']}"
        + (" (uncertain)" if labels.meta["levels_uncertain"] else "")
    )
    for note in labels.meta["level_notes"]:
        print(f"  {note}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from discgeo.io import read_labels
    from discgeo.segmentation import dice_per_level

    rows = dice_per_level(read_labels(args.pred), read_labels(args.truth))
    print(f"{'level':>8}  {'Dice':>6}  {'IoU':>6}")
    for row in rows:
        print(f"{row['level']:>8}  {row['dice']:6.3f}  {row['iou']:6.3f}")
    if rows:
        print(
            f"{'mean':>8}  {sum(r['dice'] for r in rows) / len(rows):6.3f}  "
            f"{sum(r['iou'] for r in rows) / len(rows):6.3f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


def _study_inputs(path: Path) -> list[Path]:
    """One study (a DICOM folder or zip, a NIfTI/MHA file) or a folder whose entries are studies."""
    from discgeo.io import ITK_SUFFIXES, NIFTI_SUFFIXES

    if not path.is_dir():
        return [path]
    entries = sorted(p for p in path.iterdir() if not p.name.startswith("."))
    top_files = [p for p in entries if p.is_file()]
    studies = [
        p for p in entries if p.is_dir() or p.name.lower().endswith((*NIFTI_SUFFIXES, *ITK_SUFFIXES, ".zip"))
    ]
    if top_files and len(studies) < len(entries):  # DICOM files at the top level: the folder is one study
        return [path]
    return studies or [path]


def _cmd_run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from discgeo.api import process_study
    from discgeo.pipeline import LocalStages

    stages = LocalStages()
    inputs = _study_inputs(Path(args.input))
    out_root = Path(args.out)
    failures = 0
    for study in tqdm(inputs, desc="studies", unit="study", disable=len(inputs) == 1 or args.quiet):
        out = out_root if len(inputs) == 1 else out_root / study.name.split(".")[0]
        try:
            processed = process_study(study, stages=stages, out=out)
        except DiscgeoError as exc:
            failures += 1
            print(f"discgeo: error: {study.name}: {exc.message}", file=sys.stderr)
            continue
        except Exception as exc:  # a bug, not the input: say so without a traceback full of header values
            failures += 1
            print(f"discgeo: internal error: {study.name}: {type(exc).__name__}", file=sys.stderr)
            continue
        for warning in processed.result.warnings:
            print(f"discgeo: warning: {study.name}: {warning}", file=sys.stderr)
        if len(inputs) == 1:
            print(format_result_table(processed.result))
            print(f"results in {out}")
    return 2 if failures == len(inputs) else 0


def format_result_table(result: StudyResult) -> str:
    """Per-disc table of the pipeline result, top disc first."""
    rows = [["level", "mean h mm", "AP mm", "wedge", "latents", "recon IoU", "p(narrow)", "flags"]]
    for disc in reversed(result.discs):
        rows.append(
            [
                disc.level,
                f"{disc.geometry.mean_height_mm:.2f}",
                f"{disc.geometry.ap_width_mm:.1f}",
                f"{disc.geometry.wedge_angle_deg:.1f}",
                " ".join(f"{v:+.2f}" for v in disc.latents) if disc.latents else "-",
                f"{disc.reconstruction_iou:.3f}" if disc.reconstruction_iou is not None else "-",
                f"{disc.narrowing_probability:.2f}" + (" *" if disc.narrowing else "")
                if disc.narrowing_probability is not None
                else "-",
                ",".join(disc.flags) or "-",
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    table = "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows)
    timing = ", ".join(f"{k} {v:.2f} s" for k, v in result.timings_s.items())
    naming = f"levels from the {result.levels.named_from}"
    if result.levels.uncertain:
        naming += " -- UNCERTAIN: " + "; ".join(result.levels.notes)
    return f"{table}\n(* = narrowing predicted)  {naming}\ntimings: {timing}"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for documentation and tests)."""
    from discgeo import __version__

    parser = argparse.ArgumentParser(prog="discgeo", description=__doc__)
    parser.add_argument("--version", action="version", version=f"discgeo {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="describe the series of a study and the volume that would be analysed")
    info.add_argument("path", help="DICOM folder, zip or file; NIfTI; MHA/MHD")
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    info.set_defaults(func=_cmd_info)

    run = sub.add_parser("run", help="the whole pipeline in this process: segment, measure, encode, classify")
    run.add_argument("input", help="DICOM folder or zip, NIfTI/MHA file, or a folder of such studies")
    run.add_argument("--out", required=True, help="output folder (one subfolder per study for a batch)")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.set_defaults(func=_cmd_run)

    segment = sub.add_parser("segment", help="segment and label the discs of a study (ONNX Runtime)")
    segment.add_argument("input", help="DICOM folder or zip, NIfTI or MHA")
    segment.add_argument("--out", required=True, help="output label map (.nii.gz)")
    segment.add_argument("--model", help="segmenter artifact folder (default: models/segmenter)")
    segment.set_defaults(func=_cmd_segment)

    evaluate = sub.add_parser(
        "evaluate", help="Dice and IoU per disc level of a prediction against a reference"
    )
    evaluate.add_argument("pred", help="predicted label map")
    evaluate.add_argument("truth", help="reference label map")
    evaluate.add_argument("--json", help="also write the rows as JSON")
    evaluate.set_defaults(func=_cmd_evaluate)

    measure = sub.add_parser("measure", help="measure every disc of a label map in mm and degrees")
    measure.add_argument("labels", help="label map: NIfTI, MHA/MHD or DICOM SEG")
    measure.add_argument("--out", help="write the measurements as JSON to this file")
    measure.add_argument(
        "--min-fragment-mm3",
        type=float,
        default=200.0,
        help="drop connected components smaller than this (default 200)",
    )
    measure.set_defaults(func=_cmd_measure)

    analyze = sub.add_parser(
        "analyze", help="feature-set comparison, correlations and traversals on a cohort"
    )
    analyze.add_argument(
        "cohort", help="a phantom cohort folder or a SPIDER root (masks/, radiological_gradings.csv)"
    )
    analyze.add_argument("--out", required=True, help="folder for report.md, figures, features.csv")
    analyze.add_argument(
        "--encoder",
        help="autoencoder artifact folder (default: DISCGEO_AUTOENCODER_ARTIFACT or models/autoencoder)",
    )
    analyze.add_argument("--folds", type=int, default=5)
    analyze.add_argument("--bootstrap", type=int, default=1000)
    analyze.add_argument("--seed", type=int, default=0)
    analyze.add_argument("--quiet", action="store_true")
    analyze.set_defaults(func=_cmd_analyze)

    phantom = sub.add_parser("phantom", help="generate synthetic lumbar MRI studies with ground truth")
    phantom.add_argument("out", help="output folder")
    phantom.add_argument("--cases", type=int, default=1)
    phantom.add_argument("--seed", type=int, default=0)
    phantom.add_argument("--format", choices=("dicom", "nifti"), default="dicom")
    phantom.add_argument("--contrast", choices=("t1", "t2", "mixed"), default="mixed")
    phantom.add_argument("--quiet", action="store_true", help="no progress bar")
    phantom.set_defaults(func=_cmd_phantom)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``discgeo`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except DiscgeoError as exc:
        print(f"discgeo: error: {exc.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
