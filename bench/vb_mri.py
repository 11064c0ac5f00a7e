"""Disc detection and level names on real MRI of other scanners, scored against vertebral bodies.

The 34 volumes of ``vb-mri`` (T2 TSE of healthy subjects with T11-L5 labelled, Chu et al. 2015; water/fat
MRI with L1-L5 labelled, MyoSegmenTUM, Burian et al. 2019; see ``../shared/data/README.md``) carry
vertebral-body masks only, numbered from the lowest labelled body (L5) upwards. The shipped segmenter
runs on each volume (the mode of ``DISCGEO_SEGMENTER_MODE``) and its discs are scored per pair of
adjacent labelled bodies: the pair's disc is found when a predicted disc's centroid lies within
``MATCH_MM`` of the midpoint of the two facing endplates (the lower body's upper surface, the upper
body's lower surface). Four figures per source:

* the share of body pairs with a disc found between them;
* spurious disc components per volume: discs between no pair, above the lowest body (the L5-S1 disc
  below it and anything lower are not counted);
* the share of predicted disc voxels inside a labelled vertebral body;
* the share of found discs whose level name is right: the disc between bodies ``k`` and ``k + 1``
  (1 = L5) is level index ``k`` from the bottom (1 = L4-L5).

The volumes the segmenter trained on (its metadata's ``training.vb_mri_trained``: partial labels from
their bodies) are reported apart from the held-out ones; the headline figures are the held-out ones.

    python -m bench.vb_mri            # writes bench/results/vb_mri.{json,md,png}
"""

from __future__ import annotations

import itertools
import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from discgeo import levels, realdata
from discgeo.config import Settings
from discgeo.io import read_labels, read_volume
from discgeo.segmentation import Segmenter
from discgeo.volume import Volume

ROOT = Path(__file__).resolve().parents[1]
MATCH_MM = 8.0
SOURCES = {"VB2": "T2 TSE, T11-L5 labelled", "VB3": "water/fat, L1-L5 labelled"}


@dataclass(frozen=True)
class BodyPair:
    lower: int  # body label (1 = L5)
    midpoint_mm: np.ndarray


def _points_mm(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    idx = np.argwhere(mask)
    return idx @ affine[:3, :3].T + affine[:3, 3]


def body_pairs(bodies: np.ndarray, affine: np.ndarray) -> list[BodyPair]:
    """Adjacent labelled bodies and the midpoint of their facing endplates (RAS+ order: axis 2 = S).
    The lower body's upper surface is its voxels with no voxel of it directly above; the upper body's
    lower surface likewise below."""
    present = sorted(int(v) for v in np.unique(bodies) if v > 0)
    pairs = []
    for lower, upper in itertools.pairwise(present):
        if upper != lower + 1:
            continue
        low, up = bodies == lower, bodies == upper
        top = low & ~np.concatenate([low[:, :, 1:], np.zeros_like(low[:, :, :1])], axis=2)
        bottom = up & ~np.concatenate([np.zeros_like(up[:, :, :1]), up[:, :, :-1]], axis=2)
        mid = (_points_mm(top, affine).mean(axis=0) + _points_mm(bottom, affine).mean(axis=0)) / 2
        pairs.append(BodyPair(lower, mid))
    return pairs


def score_volume(discs: Volume, bodies: Volume) -> dict[str, Any]:
    """The four figures of one volume: predicted disc labels (SPIDER 201+) against body labels (1 = L5),
    both in RAS+ order on the same grid."""
    disc_array, body_array = np.asarray(discs.array), np.asarray(bodies.array)
    if disc_array.shape != body_array.shape:
        raise ValueError(f"disc map {disc_array.shape} and body map {body_array.shape} differ in shape")
    affine = bodies.affine
    pairs = body_pairs(body_array, affine)
    labels = [int(v) for v in np.unique(disc_array) if levels.is_disc_label(int(v))]
    centroids = {v: _points_mm(disc_array == v, affine).mean(axis=0) for v in labels}
    lowest_s = _points_mm(body_array == 1, affine)[:, 2].mean() if np.any(body_array == 1) else -np.inf
    matched: dict[int, int] = {}  # disc label -> lower body of its pair
    found = []
    for pair in pairs:
        distance = {v: float(np.linalg.norm(c - pair.midpoint_mm)) for v, c in centroids.items()}
        near = [v for v in distance if distance[v] <= MATCH_MM and v not in matched]
        if near:
            best = min(near, key=distance.__getitem__)
            matched[best] = pair.lower
            expected = levels.level_name(pair.lower)
            named = levels.level_of_disc_label(best)
            found.append({"pair": f"{pair.lower}-{pair.lower + 1}", "expected": expected, "named": named})
    spurious = [v for v in labels if v not in matched and centroids[v][2] > lowest_s]
    disc_voxels = int(np.count_nonzero(disc_array > levels.DISC_LABEL_BASE))
    inside = int(np.count_nonzero((disc_array > levels.DISC_LABEL_BASE) & (body_array > 0)))
    return {
        "pairs": len(pairs),
        "found": len(found),
        "spurious": len(spurious),
        "disc_voxels": disc_voxels,
        "disc_voxels_in_body": inside,
        "levels_right": sum(f["expected"] == f["named"] for f in found),
        "level_offsets": [
            levels.level_from_name(f["named"]) - levels.level_from_name(f["expected"]) for f in found
        ],
        "discs": len(labels),
    }


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Pooled figures of a set of scored volumes."""
    pairs = sum(r["pairs"] for r in rows)
    found = sum(r["found"] for r in rows)
    voxels = sum(r["disc_voxels"] for r in rows)
    offsets = Counter(o for r in rows for o in r["level_offsets"])
    return {
        "volumes": len(rows),
        "pairs": pairs,
        "pairs_with_disc": round(found / pairs, 4) if pairs else None,
        "spurious_per_volume": round(sum(r["spurious"] for r in rows) / len(rows), 3) if rows else None,
        "disc_voxels_in_body": round(sum(r["disc_voxels_in_body"] for r in rows) / voxels, 4)
        if voxels
        else None,
        "level_right": round(sum(r["levels_right"] for r in rows) / found, 4) if found else None,
        "level_offsets": {str(k): v for k, v in sorted(offsets.items())},
        "levels_uncertain": round(sum(r["levels_uncertain"] for r in rows) / len(rows), 3) if rows else None,
        "seconds_per_volume": round(float(np.mean([r["segment_s"] for r in rows])), 2) if rows else None,
    }


def picture(views: list[tuple[str, Volume, Volume, Volume]], path: Path) -> None:
    """Mid-sagittal slices (the one with most body voxels) of held-out volumes: labelled bodies in
    green, predicted discs in red with the level name the pipeline gives them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(views), figsize=(2.6 * len(views), 4.2), squeeze=False)
    for ax, (name, image, discs, bodies) in zip(axes[0], views, strict=True):
        body_array, disc_array = np.asarray(bodies.array), np.asarray(discs.array)
        r = int(np.argmax((body_array > 0).sum(axis=(1, 2))))
        ax.imshow(np.asarray(image.canonical().array)[r].T, cmap="gray", origin="lower")
        overlay = np.zeros((*body_array[r].T.shape, 4))
        overlay[body_array[r].T > 0] = (0.1, 0.8, 0.1, 0.35)
        overlay[disc_array[r].T > levels.DISC_LABEL_BASE] = (1.0, 0.1, 0.1, 0.6)
        ax.imshow(overlay, origin="lower")
        for value in np.unique(disc_array[r]):
            if levels.is_disc_label(int(value)):
                a, s = np.argwhere(disc_array[r] == value).mean(axis=0)
                ax.text(a + 12, s, levels.level_of_disc_label(int(value)), color="yellow", fontsize=6)
        ax.set_title(name, fontsize=8)
        ax.set_axis_off()
    fig.suptitle(
        "held-out vb-mri volumes: labelled vertebral bodies (green), predicted discs (red)", fontsize=8
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="folder of the tables")
    args = parser.parse_args()
    segmenter = Segmenter.from_settings(Settings.from_env())
    trained = set(segmenter.metadata.get("training", {}).get("vb_mri_trained", []))
    folder = realdata.vb_mri_dir()
    rows = []
    views = []  # the first held-out volumes of each source, for the picture
    for name in realdata.vb_mri_volumes():
        image = read_volume(folder / f"{name}.nii.gz")
        bodies = read_labels(folder / f"{name}_vertebrae.nii.gz")
        start = time.perf_counter()
        discs = segmenter.predict(image)
        seconds = time.perf_counter() - start
        row = {
            "volume": name,
            "source": name[:3],
            "trained_on": name in trained,
            "segment_s": round(seconds, 2),
            **score_volume(discs, bodies),
            "levels_from": discs.meta["levels_from"],
            "levels_uncertain": discs.meta["levels_uncertain"],
            "level_notes": discs.meta["level_notes"],
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        if name not in trained and sum(v[0][:3] == name[:3] for v in views) < 4:
            views.append((name, image, discs, bodies))
    held = [r for r in rows if not r["trained_on"]]
    summary = {f"{src} held out": summarise([r for r in held if r["source"] == src]) for src in SOURCES}
    summary["held out"] = summarise(held)
    if trained:
        summary["trained on"] = summarise([r for r in rows if r["trained_on"]])
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    mode = segmenter.mode
    stem = "vb_mri" if mode == "fast" else f"vb_mri-{mode}"
    meta = {"segmenter": segmenter.metadata.get("version"), "mode": mode, "match_mm": MATCH_MM}
    (out / f"{stem}.json").write_text(json.dumps({**meta, "summary": summary, "rows": rows}, indent=1))
    picture(views, out / f"{stem}.png")
    goals = {
        "pairs_with_disc": ">= 0.95",
        "spurious_per_volume": "<= 0.1",
        "disc_voxels_in_body": "<= 0.01",
        "level_right": ">= 0.95",
    }
    lines = [
        "# Discs on real MRI of other scanners, scored against vertebral bodies (`vb-mri`)",
        "",
        f"`DISCGEO_SEGMENTER_MODE={mode} python -m bench.vb_mri`; segmenter {meta['segmenter']} "
        f"({mode} mode, CPU). A pair of adjacent labelled bodies has its disc when a predicted disc's "
        f"centroid lies within {MATCH_MM:g} mm of the midpoint of their facing endplates. Data: "
        "Chu et al. 2015 (VB2), MyoSegmenTUM, Burian et al. 2019 (VB3); healthy subjects.",
        "",
        "| source | volumes | body pairs | pairs with a disc | spurious discs per volume "
        "| disc voxels inside a body | level name right | level offsets (named - true: count) "
        "| volumes with levels uncertain | s per volume |",
        "|---" * 10 + "|",
    ]
    for key, s in summary.items():
        source = key.split()[0]
        label = f"{key} ({SOURCES[source]})" if source in SOURCES else key
        offsets = ", ".join(f"{k}: {v}" for k, v in s["level_offsets"].items())
        lines.append(
            f"| {label} | {s['volumes']} | {s['pairs']} | {s['pairs_with_disc']} | "
            f"{s['spurious_per_volume']} | {s['disc_voxels_in_body']} | {s['level_right']} | {offsets} | "
            f"{s['levels_uncertain']} | {s['seconds_per_volume']} |"
        )
    lines.append("| goal | | | " + " | ".join(goals.values()) + " | | | |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
