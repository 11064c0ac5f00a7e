"""The vertebral-body scoring of ``bench.vb_mri`` on a label map whose answer is known by construction
(the full run on the real volumes is ``python -m bench.vb_mri``)."""

from __future__ import annotations

import numpy as np
import pytest

from bench.vb_mri import body_pairs, score_volume, summarise
from discgeo.volume import Volume

SHAPE = (40, 40, 120)  # RAS+ at 1 mm: axis 2 is superior


def _bodies() -> np.ndarray:
    bodies = np.zeros(SHAPE, np.uint8)
    for label, (lo, hi) in enumerate([(20, 45), (52, 77), (84, 109)], start=1):  # L5, L4, L3
        bodies[10:30, 10:30, lo:hi] = label
    return bodies


def _volume(array: np.ndarray) -> Volume:
    return Volume(array, np.eye(4))


def test_facing_endplates_midpoints() -> None:
    pairs = body_pairs(_bodies(), np.eye(4))
    assert [p.lower for p in pairs] == [1, 2]
    # L5's top surface at S = 44, L4's bottom at 52: the midpoint 48, centred in R and A
    np.testing.assert_allclose(pairs[0].midpoint_mm, [19.5, 19.5, 48.0])
    np.testing.assert_allclose(pairs[1].midpoint_mm, [19.5, 19.5, 80.0])


def test_discs_found_spurious_inside_and_levels() -> None:
    discs = np.zeros(SHAPE, np.uint8)
    discs[10:30, 10:30, 12:19] = 201  # below L5: L5-S1, not scored
    discs[10:30, 10:30, 44:52] = 202  # L4-L5; its lowest slice lies inside L5
    discs[10:30, 10:30, 77:84] = 203  # L3-L4
    discs[0:4, 0:4, 60:64] = 204  # above the lowest body, between no pair: spurious
    score = score_volume(_volume(discs), _volume(_bodies()))
    assert (score["pairs"], score["found"], score["spurious"], score["levels_right"]) == (2, 2, 1, 2)
    assert score["level_offsets"] == [0, 0]
    assert score["disc_voxels_in_body"] == 20 * 20  # the slice S = 44 of disc 202 lies in L5
    assert score["disc_voxels"] == 20 * 20 * (7 + 8 + 7) + 4 * 4 * 4


def test_a_missed_lowest_disc_shifts_every_name_down() -> None:
    discs = np.zeros(SHAPE, np.uint8)
    discs[10:30, 10:30, 45:52] = 201  # the segmenter missed L5-S1: L4-L5 is named L5-S1
    discs[10:30, 10:30, 77:84] = 202
    score = score_volume(_volume(discs), _volume(_bodies()))
    assert score["found"] == 2 and score["levels_right"] == 0 and score["level_offsets"] == [-1, -1]
    pooled = summarise(
        [
            {**score, "segment_s": 1.0, "levels_uncertain": True},
            {**score, "segment_s": 3.0, "levels_uncertain": False},
        ]
    )
    assert pooled["pairs_with_disc"] == 1.0 and pooled["level_right"] == 0.0
    assert pooled["level_offsets"] == {"-1": 4} and pooled["seconds_per_volume"] == 2.0
    assert pooled["levels_uncertain"] == 0.5


def test_a_disc_too_far_from_the_midpoint_is_not_found() -> None:
    discs = np.zeros(SHAPE, np.uint8)
    discs[10:30, 10:30, 12:19] = 201
    discs[10:30, 10:30, 56:60] = 202  # centroid at S = 57.5: 9.5 mm above the L5/L4 midpoint
    score = score_volume(_volume(discs), _volume(_bodies()))
    assert score["found"] == 0 and score["spurious"] == 1


def test_grids_must_match() -> None:
    with pytest.raises(ValueError, match="differ in shape"):
        score_volume(_volume(np.zeros((4, 4, 4), np.uint8)), _volume(_bodies()))
