"""Real reference disc anatomy, and the phantoms against it.

    python -m training.real_discs            # writes src/discgeo/reference_discs.json and
                                             # training/results/real-discs.md (+ real-discs/*.png)

Measures every disc of the shared real masks with :mod:`discgeo.geometry`: the 145 native masks of
``ivd-masks`` (29 asymptomatic adults aged 20-40, 0.43 x 0.43 x 4.4 mm; Menezes-Reis et al., Quant
Imaging Med Surg 2016) are the reference; the three 1 mm masks of ``ivd-t2-mri`` (the same discs for
subjects 11, 20 and 25) are compared with them. Then normal discs of the young-adult part of a fresh
phantom cohort (analytic truth, :func:`discgeo.phantom.make_truth`) are set beside the reference:
per-level medians within 10 % and 5th-95th percentile spreads within 25 % for the heights, widths and
volume are the calibration goal (asserted by ``tests/unit/test_reference.py``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from discgeo import realdata, reference
from discgeo.geometry import measure_discs

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "training" / "results"
CALIBRATED = (  # what the phantoms must match: heights, widths and volume
    "mean_height_mm",
    "anterior_height_mm",
    "middle_height_mm",
    "posterior_height_mm",
    "ap_width_mm",
    "lateral_width_mm",
    "volume_mm3",
)
MEASURES = (*CALIBRATED, "wedge_angle_deg", "sagittal_angle_deg")
SIZES = ("mean_height_mm", "ap_width_mm", "lateral_width_mm", "volume_mm3")
MEDIAN_TOLERANCE = 0.10
SPREAD_TOLERANCE = 0.25
PHANTOM_SEED = 31337


def measure_real() -> list[dict[str, Any]]:
    """One row per real disc: subject, source (native / 1mm), level and every measure."""
    rows = []
    for mask in realdata.real_masks():
        for disc in measure_discs(mask.labels).discs:
            rows.append(
                {
                    "subject": mask.subject,
                    "source": mask.source,
                    "level": disc.level,
                    **{m: float(getattr(disc, m)) for m in MEASURES},
                }
            )
    return rows


def summarise(rows: list[dict[str, Any]], level_names: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Per level and measure: n, median, 5th and 95th percentile."""
    out: dict[str, dict[str, Any]] = {}
    for level in level_names:
        chosen = [r for r in rows if r["level"] == level]
        out[level] = {}
        for m in MEASURES:
            values = np.array([r[m] for r in chosen])
            p5, med, p95 = np.percentile(values, [5, 50, 95])
            out[level][m] = {
                "n": len(values),
                "median": round(med, 3),
                "p5": round(p5, 3),
                "p95": round(p95, 3),
            }
    return out


def log_spread(rows: list[dict[str, Any]], per_level: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Between- and within-patient SD of log(measure / level median) (one-way random effects)."""
    subjects = sorted({r["subject"] for r in rows})
    level_names = list(per_level)
    out = {}
    for m in SIZES:
        table = np.array(
            [
                [
                    np.log(
                        next(r[m] for r in rows if r["subject"] == s and r["level"] == lv)
                        / per_level[lv][m]["median"]
                    )
                    for lv in level_names
                ]
                for s in subjects
            ]
        )
        patient_mean = table.mean(axis=1)
        within = float(np.sqrt(((table - patient_mean[:, None]) ** 2).sum() / (table.size - len(subjects))))
        between = float(np.sqrt(max(patient_mean.var(ddof=1) - within**2 / len(level_names), 0.0)))
        # per level: what is left of that level's own spread (its 5th-95th percentile range, as a normal
        # SD: range / 3.29) once the between-patient part is taken
        by_level, totals = {}, {}
        for i, lv in enumerate(level_names):
            p5, p95 = np.percentile(table[:, i], [5, 95])
            total = (p95 - p5) / 3.29
            by_level[lv] = round(float(np.sqrt(max(total**2 - between**2, 0.02**2))), 4)
            totals[lv] = round(float(total), 4)
        out[m] = {
            "between": round(between, 4),
            "within": round(within, 4),
            "within_by_level": by_level,
            "total_by_level": totals,
        }
    return out


def agreement(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The same discs at both resolutions (subjects 11, 20, 25): 1 mm minus native, per measure."""
    out = []
    for m in MEASURES:
        diffs, rel = [], []
        for case in realdata.REAL_CASES:
            subject = realdata.subject_of_case(case)
            for level in realdata.LUMBAR_LEVELS:
                native = next(
                    r[m]
                    for r in rows
                    if r["subject"] == subject and r["source"] == "native" and r["level"] == level
                )
                iso = next(
                    r[m]
                    for r in rows
                    if r["subject"] == subject and r["source"] == "1mm" and r["level"] == level
                )
                diffs.append(iso - native)
                rel.append((iso - native) / abs(native) if abs(native) > 1e-6 else 0.0)
        out.append(
            {
                "measure": m,
                "discs": len(diffs),
                "mean_difference": round(float(np.mean(diffs)), 3),
                "mean_abs_difference": round(float(np.mean(np.abs(diffs))), 3),
                "mean_relative_difference": round(float(np.mean(rel)), 4),
                "max_abs_relative_difference": round(float(np.max(np.abs(rel))), 4),
            }
        )
    return out


def rule_on_real(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The narrowing rule on the real healthy discs (every one should be normal)."""
    flagged: dict[str, int] = dict.fromkeys(realdata.LUMBAR_LEVELS, 0)
    ratios = []
    for subject in sorted({r["subject"] for r in rows}):
        discs = sorted(
            (r for r in rows if r["subject"] == subject), key=lambda r: reference.level_index(r["level"])
        )
        r_ = reference.height_ratios([d["mean_height_mm"] for d in discs], [d["level"] for d in discs])
        ratios += r_.tolist()
        for d, value in zip(discs, r_, strict=True):
            flagged[d["level"]] += int(value < reference.NARROWING_RATIO)
    return {
        "discs": len(ratios),
        "narrowed": sum(flagged.values()),
        "by_level": flagged,
        "ratio_percentiles": dict(
            zip(("p1", "p5", "p50"), np.percentile(ratios, [1, 5, 50]).round(3).tolist(), strict=True)
        ),
    }


def phantom_rows(cases: int, seed: int = PHANTOM_SEED) -> list[dict[str, Any]]:
    """Per-disc truth of a fresh phantom cohort, with the patient's population."""
    from discgeo.phantom import make_truth

    rows = []
    for case in range(cases):
        for disc in make_truth(seed, case):
            rows.append({"subject": f"phantom-{case}", **disc})
    return rows


def calibration(real: dict[str, Any], phantom: dict[str, Any]) -> list[dict[str, Any]]:
    """Per level and calibrated measure: real vs phantom median and 5-95 spread, relative errors."""
    out = []
    for level in realdata.LUMBAR_LEVELS:
        for m in CALIBRATED:
            r, p = real[level][m], phantom[level][m]
            real_spread, phantom_spread = r["p95"] - r["p5"], p["p95"] - p["p5"]
            median_error = p["median"] / r["median"] - 1
            spread_error = phantom_spread / real_spread - 1
            out.append(
                {
                    "level": level,
                    "measure": m,
                    "real_median": r["median"],
                    "phantom_median": p["median"],
                    "median_error": round(median_error, 4),
                    "real_spread": round(real_spread, 3),
                    "phantom_spread": round(phantom_spread, 3),
                    "spread_error": round(spread_error, 4),
                    "ok": bool(
                        abs(median_error) <= MEDIAN_TOLERANCE and abs(spread_error) <= SPREAD_TOLERANCE
                    ),
                }
            )
    return out


def young_normal(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Normal discs (generator's own state) of young-adult phantom patients."""
    return [r for r in rows if r["population"] == "young-adult" and not r["narrowing_generator"]]


def plot_measure(measure: str, groups: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """Per level: real native, real 1 mm, phantom young-adult normal, phantom all discs, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(groups)
    colours = ("tab:blue", "tab:cyan", "tab:orange", "tab:red")
    fig, ax = plt.subplots(figsize=(8, 3.8), dpi=100)
    width = 0.8 / len(names)
    for g, (name, colour) in enumerate(zip(names, colours, strict=False)):
        data = [[r[measure] for r in groups[name] if r["level"] == lv] for lv in realdata.LUMBAR_LEVELS]
        positions = [i + (g - (len(names) - 1) / 2) * width for i in range(len(data))]
        box = ax.boxplot(
            data, positions=positions, widths=width * 0.9, whis=(5, 95), showfliers=False, patch_artist=True
        )
        for patch in box["boxes"]:
            patch.set(facecolor=colour, alpha=0.6)
        ax.plot([], [], color=colour, lw=6, alpha=0.6, label=name)
    ax.set_xticks(range(len(realdata.LUMBAR_LEVELS)), realdata.LUMBAR_LEVELS)
    ax.set(
        ylabel=measure.replace("_", " "),
        title=f"{measure.replace('_', ' ')}: real vs phantom (box 25-75, whiskers 5-95)",
    )
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def render(summary: dict[str, Any]) -> str:
    """training/results/real-discs.md."""
    per_level = summary["real"]
    lines = [
        "# Real disc anatomy per level, and the phantoms against it",
        "",
        "`python -m training.real_discs`. Reference: the 145 native manual disc masks of `ivd-masks` (29 "
        "asymptomatic adults aged 20-40, 0.43 x 0.43 x 4.4 mm; Menezes-Reis et al., Quant Imaging Med Surg "
        "2016), measured by `discgeo.geometry`. These are healthy young adults only: older or symptomatic "
        "patients (as in SPIDER) have other discs.",
        "",
        "## Reference: median [5th-95th percentile] per level",
        "",
        "| measure | " + " | ".join(realdata.LUMBAR_LEVELS) + " |",
        "|---" * (len(realdata.LUMBAR_LEVELS) + 1) + "|",
    ]
    for m in MEASURES:
        cells = [
            f"{per_level[lv][m]['median']:.4g} [{per_level[lv][m]['p5']:.4g}-{per_level[lv][m]['p95']:.4g}]"
            for lv in realdata.LUMBAR_LEVELS
        ]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Spread of log(size / level median), one-way random effects over patients (what the phantoms draw): "
        + "; ".join(
            f"{m}: between patients {v['between']:.3f}, within a patient {v['within']:.3f} "
            f"(by level {', '.join(f'{x:.3f}' for x in v['within_by_level'].values())})"
            for m, v in summary["log_sd"].items()
        )
        + ".",
        "",
        "## The same discs at two resolutions (subjects 11, 20, 25: `ivd-t2-mri` 1 mm minus native)",
        "",
        "| measure | discs | mean difference | mean absolute difference | mean relative | largest relative |",
        "|---|---|---|---|---|---|",
    ]
    for a in summary["agreement"]:
        lines.append(
            f"| {a['measure']} | {a['discs']} | {a['mean_difference']:+.3g} | "
            f"{a['mean_abs_difference']:.3g} | "
            f"{a['mean_relative_difference']:+.1%} | {a['max_abs_relative_difference']:.1%} |"
        )
    rule = summary["rule_on_real"]
    lines += [
        "",
        "The 1 mm masks were resampled for the isotropic release and are larger at the upper levels (see "
        "`../shared/data/README.md`); the native masks are the authors' segmentation and the reference.",
        "",
        "## Narrowing rule on the real healthy discs",
        "",
        "Rule (`discgeo.reference`): narrowed when the mean height is below "
        f"{reference.NARROWING_RATIO:.0%} of "
        "the expected height (level median x the adjacent discs' mean height/level-median ratio, limited to "
        f"0.8-1.2). On the {rule['discs']} real healthy discs it calls {rule['narrowed']} narrowed "
        f"({rule['narrowed'] / rule['discs']:.1%}; by level {rule['by_level']}); ratio percentiles "
        f"{rule['ratio_percentiles']}.",
        "",
        f"## Calibration: normal discs of young-adult phantoms (seed {summary['phantom_seed']}, "
        f"{summary['phantom_cases']} patients, {summary['phantom_young_normal_discs']} such discs) "
        "against the reference",
        "",
        f"Goal: medians within {MEDIAN_TOLERANCE:.0%}, 5th-95th percentile spread within "
        f"{SPREAD_TOLERANCE:.0%}.",
        "",
        "| level | measure | real median | phantom median | error | real spread | phantom spread "
        "| error | ok |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in summary["calibration"]:
        lines.append(
            f"| {c['level']} | {c['measure']} | {c['real_median']:.4g} | {c['phantom_median']:.4g} | "
            f"{c['median_error']:+.1%} | {c['real_spread']:.4g} | {c['phantom_spread']:.4g} | "
            f"{c['spread_error']:+.1%} | {'yes' if c['ok'] else 'NO'} |"
        )
    lines += [
        "",
        f"Whole cohort: {summary['phantom_population']}.",
        "",
        "## Figures",
        "",
        *(f"![{m}](real-discs/{m}.png)" for m in MEASURES),
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--phantoms", type=int, default=400, help="phantom patients for the comparison")
    parser.add_argument("--reference-only", action="store_true", help="write the reference JSON and stop")
    args = parser.parse_args()
    rows = measure_real()
    native = [r for r in rows if r["source"] == "native"]
    per_level = summarise(native, realdata.LUMBAR_LEVELS)
    table = {
        "source": "ivd-masks: 145 native manual disc masks of 29 asymptomatic adults aged 20-40 "
        "(Menezes-Reis "
        "et al., Quant Imaging Med Surg 2016), measured by discgeo.geometry",
        "command": "python -m training.real_discs",
        "levels": list(realdata.LUMBAR_LEVELS),
        "per_level": per_level,
        "log_sd": log_spread(native, per_level),
    }
    reference.REFERENCE_FILE.write_text(json.dumps(table, indent=1) + "\n")
    reference.load.cache_clear()
    print(f"wrote {reference.REFERENCE_FILE}")
    if args.reference_only:
        return
    phantom = phantom_rows(args.phantoms)
    young = young_normal(phantom)
    summary = {
        "real": per_level,
        "log_sd": table["log_sd"],
        "real_1mm": summarise([r for r in rows if r["source"] == "1mm"], realdata.LUMBAR_LEVELS),
        "agreement": agreement(rows),
        "rule_on_real": rule_on_real(native),
        "phantom_seed": PHANTOM_SEED,
        "phantom_cases": args.phantoms,
        "phantom_young_normal_discs": len(young),
        "phantom_population": _population(phantom),
        "calibration": calibration(per_level, summarise(young, realdata.LUMBAR_LEVELS)),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "real-discs.json").write_text(json.dumps(summary, indent=1) + "\n")
    (RESULTS / "real-discs.md").write_text(render(summary))
    groups = {
        "real (ivd-masks, native)": native,
        "real (ivd-t2-mri, 1 mm)": [r for r in rows if r["source"] == "1mm"],
        "phantom young-adult, normal": young,
        "phantom, all discs": phantom,
    }
    for m in MEASURES:
        plot_measure(m, groups, RESULTS / "real-discs" / f"{m}.png")
    failed = [c for c in summary["calibration"] if not c["ok"]]
    print(render(summary))
    print(
        f"calibration: {len(summary['calibration']) - len(failed)} of {len(summary['calibration'])} "
        "within the goal"
    )


def _population(rows: list[dict[str, Any]]) -> str:
    patients: dict[str, str] = {r["subject"]: r["population"] for r in rows}
    counts = {p: sum(1 for v in patients.values() if v == p) for p in sorted(set(patients.values()))}
    narrowed = sum(r["narrowing"] for r in rows)
    return (
        f"{len(patients)} patients ({', '.join(f'{n} {p}' for p, n in counts.items())}), {len(rows)} discs, "
        f"{narrowed} graded narrowed ({narrowed / len(rows):.1%})"
    )


if __name__ == "__main__":
    main()
