"""Level names on phantoms built to test them: strong lordosis and scoliosis, no sacrum in view, an
S1-S2 remnant disc (:class:`discgeo.phantom.Variant`), beside the usual lumbar view.

The configured segmenter (``DISCGEO_SEGMENTER_ARTIFACT``, ``DISCGEO_SEGMENTER_MODE``) runs on each
image; a predicted disc takes the level of the true disc it overlaps most (none: a spurious disc). Per
variant: the share of true discs found, the share of found discs named right, spurious discs per case
and the share of cases whose levels were flagged uncertain. Phantom figures: synthetic anatomy, no
clinical accuracy. Seeds 5151 (never used in training).

    python -m bench.level_phantoms [--cases 4] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from discgeo import levels
from discgeo.config import Settings
from discgeo.phantom import Variant, make_case
from discgeo.segmentation import Segmenter
from discgeo.volume import Volume

ROOT = Path(__file__).resolve().parents[1]
SEED = 5151
VARIANTS = {
    "usual lumbar view": Variant(),
    "lordosis +25 deg": Variant(lordosis_deg=25.0),
    "scoliosis 15 deg": Variant(scoliosis_deg=15.0),
    "no sacrum in view": Variant(view="no-sacrum"),
    "S1-S2 remnant": Variant(remnant=True),
}


def score_case(predicted: Volume, truth: Volume) -> dict[str, Any]:
    """Found, right and spurious discs of one case (SPIDER labels in both)."""
    p, t = np.asarray(predicted.array), np.asarray(truth.array)
    true_discs = [int(v) for v in np.unique(t) if levels.is_disc_label(int(v))]
    named = {}
    spurious = 0
    for value in (int(v) for v in np.unique(p) if levels.is_disc_label(int(v))):
        under = t[p == value]
        under = under[np.isin(under, true_discs)]
        if under.size == 0:
            spurious += 1
            continue
        values, counts = np.unique(under, return_counts=True)
        named[value] = int(values[np.argmax(counts)])
    found = set(named.values())
    return {
        "true_discs": len(true_discs),
        "found": len(found),
        "named_right": sum(predicted_label == true for predicted_label, true in named.items()),
        "named": len(named),
        "spurious": spurious,
        "levels_uncertain": bool(predicted.meta.get("levels_uncertain", False)),
        "levels_from": predicted.meta.get("levels_from"),
    }


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    def share(a: str, b: str) -> float | None:
        total = sum(r[b] for r in rows)
        return round(sum(r[a] for r in rows) / total, 3) if total else None

    return {
        "cases": len(rows),
        "discs_found": share("found", "true_discs"),
        "named_right": share("named_right", "named"),
        "spurious_per_case": round(sum(r["spurious"] for r in rows) / len(rows), 2),
        "levels_uncertain": round(sum(r["levels_uncertain"] for r in rows) / len(rows), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=4, help="phantoms per variant")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    segmenter = Segmenter.from_settings(Settings.from_env())
    summary, rows = {}, []
    for name, variant in VARIANTS.items():
        found = []
        for case in range(args.cases):
            c = make_case(SEED, case, variant=variant)
            start = time.perf_counter()
            predicted = segmenter.predict(c.image)
            row = {"variant": name, "case": case, "segment_s": round(time.perf_counter() - start, 2)}
            row.update(score_case(predicted, c.labels))
            print(json.dumps(row), flush=True)
            found.append(row)
        rows += found
        summary[name] = summarise(found)
    args.out.mkdir(parents=True, exist_ok=True)
    mode = segmenter.mode
    stem = "level_phantoms" if mode == "fast" else f"level_phantoms-{mode}"
    meta = {"segmenter": segmenter.version, "mode": mode, "seed": SEED}
    (args.out / f"{stem}.json").write_text(json.dumps({**meta, "summary": summary, "rows": rows}, indent=1))
    lines = [
        "# Level names on phantoms that test them",
        "",
        f"`python -m bench.level_phantoms --cases {args.cases}`; segmenter {segmenter.version} ({mode} "
        f"mode, CPU); phantoms of seed {SEED} (synthetic: no clinical accuracy).",
        "",
        "| variant | cases | true discs found | found discs named right | spurious per case "
        "| cases flagged levels uncertain |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in summary.items():
        lines.append(
            f"| {name} | {s['cases']} | {s['discs_found']} | {s['named_right']} | {s['spurious_per_case']} "
            f"| {s['levels_uncertain']} |"
        )
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
