"""Draw docs/phantom.png: mid-sagittal slices of a few phantom cases (``make docs``)."""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from discgeo.phantom import make_case


def main(out: Path) -> None:
    cases = [make_case(2025, i) for i in range(5)]
    fig, axes = plt.subplots(1, len(cases), figsize=(3.2 * len(cases), 4.6), facecolor="black")
    for ax, case in zip(axes, cases, strict=True):
        vol = case.image
        mid = vol.shape[0] // 2
        # radiological display: anterior on the left, head up
        sl = vol.array[mid].T[::-1, ::-1]
        sx, sy = vol.spacing[1], vol.spacing[2]
        ax.imshow(sl, cmap="gray", aspect=sy / sx, vmin=0, vmax=np.percentile(sl, 99.5))
        narrowed = [d["level"] for d in case.truth["discs"] if d["narrowing"]]
        ax.set_title(
            f"{case.truth['contrast'].upper()}  {vol.shape[0]} sl x {vol.spacing[0]:.1f} mm\n"
            f"narrowed: {', '.join(narrowed) or 'none'}",
            color="white",
            fontsize=9,
        )
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=80, facecolor="black")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("docs/phantom.png"))
