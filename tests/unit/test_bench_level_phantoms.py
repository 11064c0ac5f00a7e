"""The arithmetic of bench.level_phantoms on label maps whose answer is known."""

from __future__ import annotations

import numpy as np

from bench.level_phantoms import score_case, summarise
from discgeo.volume import Volume


def test_a_shifted_name_and_a_spurious_disc_are_counted():
    truth = np.zeros((4, 40, 60), np.uint8)
    truth[:, 10:30, 10:15] = 201
    truth[:, 10:30, 30:35] = 202
    predicted = np.zeros_like(truth)
    predicted[:, 10:30, 30:35] = 201  # L4-L5 found but named L5-S1
    predicted[:, 10:30, 50:55] = 203  # nothing there
    row = score_case(Volume(predicted, np.eye(4), meta={"levels_uncertain": True}), Volume(truth, np.eye(4)))
    assert (row["true_discs"], row["found"], row["named_right"], row["spurious"]) == (2, 1, 0, 1)
    right = score_case(Volume(truth, np.eye(4)), Volume(truth, np.eye(4)))
    assert (right["found"], right["named_right"], right["levels_uncertain"]) == (2, 2, False)
    pooled = summarise([row, right])
    assert pooled == {
        "cases": 2,
        "discs_found": 0.75,
        "named_right": round(2 / 3, 3),
        "spurious_per_case": 0.5,
        "levels_uncertain": 0.5,
    }
