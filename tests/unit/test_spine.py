"""Levels from the vertebral chain (discgeo.spine) on phantom anatomy whose levels are known."""

from __future__ import annotations

import numpy as np
import pytest

from discgeo import levels, spine
from discgeo.phantom import Variant, make_case
from discgeo.segmentation import _centres


def _anatomy(variant: Variant | None = None, index: int = 2):
    """A 7-disc phantom: its discs (label -> world centre, voxels), bodies and sacrum."""
    case = make_case(31, index, n_discs=7, full_coverage=True, variant=variant or Variant())
    labels, bodies = case.labels.array, case.bodies.array
    discs = np.where(labels > levels.DISC_LABEL_BASE, labels, 0).astype(np.int32)
    present, centres = _centres(discs, case.labels.affine)
    sizes = np.bincount(discs.ravel())
    return {
        "affine": case.labels.affine,
        "discs": discs,
        "centres": {int(v): c for v, c in zip(present, centres, strict=True)},
        "sizes": {int(v): int(sizes[v]) for v in present},
        "bodies": bodies,
        "spacing": case.labels.spacing,
    }


@pytest.fixture(scope="module")
def phantom():
    return _anatomy()


def _place(p, *, centres=None, bodies=None, sacrum=None):
    body_map = p["bodies"] if bodies is None else bodies
    return spine.place_discs(
        p["centres"] if centres is None else centres,
        {**p["sizes"], **{v: 500 for v in (centres or {}) if v not in p["sizes"]}},
        (body_map > 0) & (body_map != levels.SACRUM_LABEL),
        (p["bodies"] == levels.SACRUM_LABEL) if sacrum is None else sacrum,
        p["affine"],
    )


def _truth(values):
    return {v: v - levels.DISC_LABEL_BASE - 1 for v in values}


def test_the_chain_names_every_disc_from_the_sacrum(phantom):
    chain = _place(phantom)
    assert chain.anchored and not chain.uncertain and chain.rejected == []
    assert chain.index == _truth(phantom["centres"])
    assert chain.bodies == 7


def test_a_missed_disc_leaves_its_gap_empty_and_the_names_above_right(phantom):
    centres = {v: c for v, c in phantom["centres"].items() if v != levels.disc_label(0)}  # no L5-S1
    chain = _place(phantom, centres=centres)
    assert chain.index == _truth(centres) and not chain.uncertain


def test_without_the_sacrum_the_lowest_body_is_l5_and_the_levels_are_uncertain(phantom):
    centres = {v: c for v, c in phantom["centres"].items() if v != levels.disc_label(0)}
    chain = _place(phantom, centres=centres, sacrum=np.zeros_like(phantom["bodies"], bool))
    assert not chain.anchored and chain.uncertain and "no sacrum" in chain.notes[0]
    assert chain.index == _truth(centres)


def test_discs_below_the_sacral_endplate_or_in_front_of_the_spine_are_no_lumbar_discs(phantom):
    sacrum = np.argwhere(phantom["bodies"] == levels.SACRUM_LABEL)
    world = sacrum @ phantom["affine"][:3, :3].T + phantom["affine"][:3, 3]
    remnant = world.mean(axis=0)  # an S1-S2 remnant inside the sacrum
    l4_l5 = phantom["centres"][levels.disc_label(1)]
    pelvic = l4_l5 + np.array([0.0, 45.0, -20.0])  # 45 mm in front of the spine
    centres = {**phantom["centres"], 240: remnant, 241: pelvic}
    chain = _place(phantom, centres=centres)
    assert chain.rejected == [240, 241] and not chain.uncertain
    assert chain.index == _truth(phantom["centres"])


def test_a_body_not_found_leaves_the_counting_to_the_discs_and_flags_it(phantom):
    bodies = np.where(phantom["bodies"] == levels.vertebra_label(2), 0, phantom["bodies"])  # no L3
    chain = _place(phantom, bodies=bodies)
    assert chain.uncertain and any("between chain members 2 and 3" in note for note in chain.notes)
    assert chain.index == _truth(phantom["centres"]) and chain.rejected == []
    # a pelvic false positive is then counted as well: no disc is left out of a doubtful chain
    pelvic = phantom["centres"][levels.disc_label(0)] + np.array([0.0, 45.0, -25.0])
    doubtful = _place(phantom, bodies=bodies, centres={**phantom["centres"], 240: pelvic})
    assert doubtful.uncertain and doubtful.rejected == [] and doubtful.index[240] == 0


def test_two_discs_at_one_level_keep_the_larger_and_flag_it(phantom):
    l3_l4 = phantom["centres"][levels.disc_label(2)]
    centres = {**phantom["centres"], 242: l3_l4 + np.array([0.0, 3.0, 1.0])}
    chain = _place(phantom, centres=centres)
    assert chain.uncertain and 242 in chain.rejected
    assert chain.index == _truth(phantom["centres"])


def test_with_no_vertebral_chain_the_discs_are_counted_and_flagged(phantom):
    empty = np.zeros_like(phantom["bodies"], bool)
    chain = spine.place_discs(phantom["centres"], phantom["sizes"], empty, empty, phantom["affine"])
    assert chain.uncertain and chain.index == _truth(phantom["centres"])


@pytest.mark.parametrize(
    ("variant", "uncertain"),
    [
        (Variant(lordosis_deg=25.0), False),
        (Variant(scoliosis_deg=15.0), False),
        (Variant(lordosis_deg=-10.0, scoliosis_deg=-12.0), False),
        (Variant(view="no-sacrum"), True),
    ],
)
@pytest.mark.parametrize("case", [0, 5])
def test_levels_stay_right_in_strong_curves_and_are_flagged_without_the_sacrum(variant, uncertain, case):
    p = _anatomy(variant, case)
    chain = _place(p)
    assert chain.uncertain == uncertain, chain.notes
    assert chain.index == _truth(p["centres"]) and chain.rejected == []
