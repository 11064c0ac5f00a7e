"""Disc levels from the vertebral chain, anchored at the sacrum.

A segmenter that also finds vertebral bodies and the sacrum names levels from anatomy, not by counting
discs from the bottom of the view. The chain is the sacrum's upper endplate followed by the vertebral
bodies above it, in order along the spine. Each disc is placed in the gap between two neighbours of
the chain. The gap above the sacrum is L5-S1, the next one L4-L5, and so on. A missed disc therefore
leaves its gap empty and does not shift the names above it. A disc-like structure below the sacrum's
upper endplate (an S1-S2 remnant, a pelvic false positive) or away from the chain is no lumbar disc.

The level names are **uncertain** (:attr:`Chain.uncertain`, with the reasons in :attr:`Chain.notes`)
when:

* no sacrum is in view: the lowest body is then taken as L5, which holds only when the view reaches
  the lumbosacral junction;
* two discs fall into one gap.

When the chain itself is unsure (no two bodies without the sacrum, or a gap between neighbours much
longer than the others: a body not found, or several bodies merged into one component), it names
nothing: the discs are counted from the lowest one, none is left out, and the levels are uncertain.

Transitional vertebrae (a sacralised L5, a lumbarised S1) cannot be told apart from a lumbar view
alone: the chain anchors at whatever the segmenter calls sacrum.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

MIN_BODY_MM3 = 4000.0  # a lumbar vertebral body is 25-45 cm3; this admits one cut by the view
MIN_SACRUM_MM3 = 4000.0
ENDPLATE_MM = 10.0  # the sacrum's upper endplate: its voxels this close to the nearest body, or its top
OFF_CHAIN_MM = 15.0  # a disc centre this far from the chain's segment is not between those bodies
LONG_GAP = 1.6  # a gap this many times the median gap (or a body's typical pitch): a body is missing
TYPICAL_PITCH_MM = 38.0  # body + disc along the lumbar spine, when too few gaps give a median


@dataclass(frozen=True)
class Chain:
    """Where each disc sits in the vertebral chain.

    ``index`` maps a disc's component value to its level index from the bottom (0 = L5-S1);
    ``rejected`` lists the components that lie in no gap of the chain (below the sacrum or off the
    spine), or that lost a gap to a larger disc."""

    index: dict[int, int]
    rejected: list[int]
    anchored: bool  # the chain starts at the sacrum
    bodies: int
    uncertain: bool
    notes: list[str] = field(default_factory=list)


def _components(mask: np.ndarray, voxel_mm3: float, minimum_mm3: float) -> list[np.ndarray]:
    parts, count = ndimage.label(mask)
    if count == 0:
        return []
    sizes = np.bincount(parts.ravel())
    return [np.argwhere(parts == v) for v in range(1, count + 1) if sizes[v] * voxel_mm3 >= minimum_mm3]


def _world(voxels: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return voxels @ affine[:3, :3].T + affine[:3, 3]


def sacral_anchor(sacrum: np.ndarray, lowest_body: np.ndarray | None) -> np.ndarray:
    """The centre of the sacrum's upper endplate (world mm): the mean of its points within
    :data:`ENDPLATE_MM` of the point nearest the lowest body's centre, or of its topmost points."""
    if lowest_body is not None:
        distance = np.linalg.norm(sacrum - lowest_body.mean(axis=0), axis=1)
    else:
        distance = sacrum[:, 2].max() - sacrum[:, 2]
    return sacrum[distance <= distance.min() + ENDPLATE_MM].mean(axis=0)


def place_discs(
    disc_centres: dict[int, np.ndarray],
    disc_sizes: dict[int, int],
    bodies: np.ndarray,
    sacrum: np.ndarray,
    affine: np.ndarray,
) -> Chain:
    """Place disc components (their world centres and voxel counts) in the chain of the ``bodies``
    and ``sacrum`` masks (boolean, on the grid of ``affine``); see the module docstring."""
    voxel_mm3 = float(abs(np.linalg.det(affine[:3, :3])))
    body_points = [_world(v, affine) for v in _components(bodies, voxel_mm3, MIN_BODY_MM3)]
    sacra = [_world(v, affine) for v in _components(sacrum, voxel_mm3, MIN_SACRUM_MM3)]
    notes: list[str] = []
    doubts: list[str] = []
    centres = sorted((p.mean(axis=0) for p in body_points), key=lambda c: float(c[2]))
    anchored = bool(sacra)
    if anchored:
        lowest = min(body_points, key=lambda p: float(p.mean(axis=0)[2]), default=None)
        anchor = sacral_anchor(max(sacra, key=len), lowest)
        below = [c for c in centres if c[2] <= anchor[2]]
        if below:
            notes.append(
                f"{len(below)} vertebral body component(s) below the sacrum's upper endplate left out"
            )
        centres = [c for c in centres if c[2] > anchor[2]]
    elif len(centres) >= 2:
        doubts.append("no sacrum in view: the lowest vertebral body is taken as L5")
        anchor = centres[0] - 0.5 * (centres[1] - centres[0])  # where the sacral endplate would be
    if not centres or (not anchored and len(centres) < 2):
        doubts.append("no vertebral chain found")
        return _counted(disc_centres, anchored, len(centres), doubts + notes)
    chain = [anchor, *centres]
    lengths = [float(np.linalg.norm(b - a)) for a, b in itertools.pairwise(chain)]
    # the first gap (endplate to L5's centre) is half a body pitch: doubled to compare with the others
    pitches = [2.0 * lengths[0], *lengths[1:]]
    usual = float(np.median(pitches)) if len(pitches) >= 3 else TYPICAL_PITCH_MM
    long = [i for i, pitch in enumerate(pitches) if pitch > LONG_GAP * usual]
    if long:  # a body not found, or several merged into one: the chain says nothing sure
        doubts += [f"{lengths[i]:.0f} mm between chain members {i} and {i + 1}" for i in long]
        return _counted(disc_centres, anchored, len(centres), doubts + notes)
    candidates: dict[int, list[int]] = {}
    rejected: list[int] = []
    for value, centre in disc_centres.items():
        found = _position(centre, chain)
        if found is None:
            rejected.append(value)
            continue
        gap, along = found
        if gap == len(chain) - 1:  # above the highest body: half a pitch above its centre, then one per pitch
            step = max(0, round(along / usual - 0.5))
            if step > 0:
                doubts.append(f"a disc {step} level(s) above the highest vertebral body found")
            gap += step
        candidates.setdefault(gap, []).append(value)
    if rejected:
        notes.append(
            f"{len(rejected)} disc-like component(s) below the sacrum's upper endplate or off the spine "
            "left out"
        )
    index: dict[int, int] = {}
    for level, values in sorted(candidates.items()):
        values.sort(key=lambda v: disc_sizes[v], reverse=True)
        index[values[0]] = level
        if len(values) > 1:
            doubts.append(f"{len(values)} discs at one level (index {level}): the largest kept")
            rejected += values[1:]
    return Chain(
        index=index,
        rejected=sorted(rejected),
        anchored=anchored,
        bodies=len(centres),
        uncertain=bool(doubts),
        notes=doubts + notes,
    )


def _counted(disc_centres: dict[int, np.ndarray], anchored: bool, bodies: int, notes: list[str]) -> Chain:
    """Levels counted from the lowest disc (no disc left out), uncertain: the chain cannot name them."""
    order = sorted(disc_centres, key=lambda v: float(disc_centres[v][2]))
    return Chain(
        index={v: i for i, v in enumerate(order)},
        rejected=[],
        anchored=anchored,
        bodies=bodies,
        uncertain=True,
        notes=[*notes, "levels counted from the lowest disc"],
    )


def _position(centre: np.ndarray, chain: list[np.ndarray]) -> tuple[int, float] | None:
    """The gap of the chain a disc centre lies in (0 = between its first two members; the last one
    continues the last segment beyond the highest member) and its distance along it from the gap's
    lower member: between the two along their segment and within :data:`OFF_CHAIN_MM` of it. None
    below the first member or off the chain."""
    ends = [*itertools.pairwise(chain), (chain[-1], 2 * chain[-1] - chain[-2])]
    for gap, (a, b) in enumerate(ends):
        axis = (b - a) / np.linalg.norm(b - a)
        along = float((centre - a) @ axis)
        inside = along > 0 and (gap == len(ends) - 1 or along < np.linalg.norm(b - a))
        if inside and np.linalg.norm(centre - (a + along * axis)) <= OFF_CHAIN_MM:
            return gap, along
    return None
