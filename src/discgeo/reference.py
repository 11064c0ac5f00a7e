"""Real reference disc anatomy per level, and the narrowing rule that grades against it.

``reference_discs.json`` (next to this module) is written by ``python -m training.real_discs`` from
the 145 manual disc masks of 29 asymptomatic adults aged 20-40 (Menezes-Reis et al., Quant Imaging Med
Surg 2016; ``../shared/data/ivd-masks``), measured by :mod:`discgeo.geometry`: per lumbar level the
median, 5th and 95th percentile of each measure, and the between-patient / within-patient spread of
the log of each size (what the phantoms are calibrated to). Discs above L1-L2 are not in that data:
their expected values are L1-L2's scaled by :data:`THORACOLUMBAR_SCALE` (an assumption, flagged as
``extrapolated``).

Narrowing rule (:func:`height_ratios`, :data:`NARROWING_RATIO`)
--------------------------------------------------------------
Radiologists grade disc narrowing by comparing a disc's height with the adjacent discs and with what
is expected at its level (Pfirrmann et al., Spine 2001, "disc height" criterion; Griffith et al.,
Spine 2007, modified Pfirrmann grades 6-8 by loss of disc height in bands of < 30 %, 30-60 % and
> 60 %). The rule used here: a disc's **expected height** is its level's reference median times the
patient's own scale, the mean ``height / level median`` of its adjacent discs (one or two), limited to
0.8-1.2 so that narrowed neighbours cannot pull the expectation below what the level allows. A disc
is **narrowed** when its mean height is below ``NARROWING_RATIO`` (75 %) of that expectation (a loss
of at least 25 %). On the 145 real healthy discs this rule calls 3 narrowed (2.1 %,
``training/results/real-discs.md``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from discgeo import levels

REFERENCE_FILE = Path(__file__).with_name("reference_discs.json")
NARROWING_RATIO = 0.75
NEIGHBOUR_SCALE_LIMITS = (0.8, 1.2)
# Discs above L1-L2 (not in the real data): L1-L2's expected sizes times these factors, per disc above.
THORACOLUMBAR_SCALE = {"mean_height_mm": 0.86, "ap_width_mm": 0.97, "lateral_width_mm": 0.95}


@lru_cache(maxsize=1)
def load() -> dict[str, Any]:
    """The reference table as written by ``training.real_discs``."""
    return dict(json.loads(REFERENCE_FILE.read_text()))


def lumbar_levels() -> tuple[str, ...]:
    """Levels the reference holds, lowest first (L5-S1 ... L1-L2)."""
    return tuple(load()["levels"])


def level_index(level: str) -> int:
    """0 for L5-S1, 1 for L4-L5, ... (position from the sacrum)."""
    for i in range(24):
        if levels.level_name(i) == level:
            return i
    raise ValueError(f"unknown disc level {level!r}")


def expected(measure: str, level: str) -> float:
    """The reference median of ``measure`` at ``level`` (extrapolated above L1-L2)."""
    table = load()["per_level"]
    if level in table:
        return float(table[level][measure]["median"])
    top = lumbar_levels()[-1]
    above = level_index(level) - level_index(top)
    factor = THORACOLUMBAR_SCALE.get(measure, 1.0) ** above
    return float(table[top][measure]["median"]) * factor


def spread(measure: str, level: str) -> dict[str, float]:
    """Median, 5th and 95th percentile of ``measure`` at a lumbar ``level``."""
    return dict(load()["per_level"][level][measure])


def log_sd(measure: str, level: str) -> tuple[float, float]:
    """SDs of log(measure / level median) to draw at ``level``: the between-patient part (scaled
    down where the level's whole spread is smaller than it) and the within-patient rest; levels above
    L1-L2 take L1-L2's."""
    entry = load()["log_sd"][measure]
    top = lumbar_levels()[-1]
    within = entry["within_by_level"]
    total = entry["total_by_level"]
    between = float(entry["between"])
    return min(between, float(total.get(level, total[top]))), float(within.get(level, within[top]))


def height_ratios(heights: Sequence[float], disc_levels: Sequence[str]) -> np.ndarray:
    """Each disc's mean height over its expected height (see the module docstring).

    ``heights`` and ``disc_levels`` list one patient's discs from the lowest up; adjacent means
    adjacent in that list (a disc missing from the list breaks the adjacency).
    """
    h = np.asarray(heights, dtype=np.float64)
    norm = h / np.array([expected("mean_height_mm", lv) for lv in disc_levels])
    idx = [level_index(lv) for lv in disc_levels]
    out = np.empty(len(h))
    for i in range(len(h)):
        neighbours = [norm[j] for j in (i - 1, i + 1) if 0 <= j < len(h) and abs(idx[j] - idx[i]) == 1]
        scale = float(np.clip(np.mean(neighbours), *NEIGHBOUR_SCALE_LIMITS)) if neighbours else 1.0
        out[i] = norm[i] / scale
    return out


def narrowed_by_rule(heights: Sequence[float], disc_levels: Sequence[str]) -> np.ndarray:
    """The rule's grade per disc (True = narrowed)."""
    return height_ratios(heights, disc_levels) < NARROWING_RATIO
