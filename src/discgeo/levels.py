"""Disc levels and label values: the one source of truth.

Label conventions (SPIDER, van der Graaf et al. 2024):

* ``201, 202, ...`` intervertebral discs counted from the lowest disc in view (201 = lowest);
* ``1 .. 25`` vertebrae counted from the bottom; vertebra ``n`` lies directly above disc ``200 + n``
  (in the real SPIDER mask shipped for tests, vertebra 1 sits above disc 201; the sacrum is unlabelled);
* ``101 .. 125`` the same vertebrae when only partly visible;
* ``100`` the spinal canal;
* ``50`` the sacrum (discgeo's phantoms; SPIDER leaves it unlabelled).

Disc levels are named from the bottom: the lowest disc in view is L5-S1, then L4-L5, L3-L4, L2-L3,
L1-L2, T12-L1, T11-T12, ... This assumes the usual five lumbar vertebrae and that the lumbosacral
junction is in view, which holds for lumbar spine protocols.
"""

from __future__ import annotations

from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

DISC_LABEL_BASE = 200
CANAL_LABEL = 100
SACRUM_LABEL = 50
PARTIAL_VERTEBRA_OFFSET = 100

_VERTEBRAE_FROM_BOTTOM = (
    "S1",
    "L5",
    "L4",
    "L3",
    "L2",
    "L1",
    *(f"T{n}" for n in range(12, 0, -1)),
    *(f"C{n}" for n in range(7, 0, -1)),
)


def level_name(index_from_bottom: int) -> str:
    """Name of the ``index_from_bottom``-th disc (0 = lowest disc in view = L5-S1)."""
    if index_from_bottom < 0 or index_from_bottom >= len(_VERTEBRAE_FROM_BOTTOM) - 1:
        raise ValueError(f"disc index {index_from_bottom} outside the spine")
    lower = _VERTEBRAE_FROM_BOTTOM[index_from_bottom]
    upper = _VERTEBRAE_FROM_BOTTOM[index_from_bottom + 1]
    return f"{upper}-{lower}"


def disc_label(index_from_bottom: int) -> int:
    """SPIDER label value of the ``index_from_bottom``-th disc (0 -> 201)."""
    return DISC_LABEL_BASE + 1 + index_from_bottom


def vertebra_label(index_from_bottom: int, *, partial: bool = False) -> int:
    """SPIDER label value of the vertebra above disc ``index_from_bottom`` (0 -> 1, i.e. L5)."""
    return index_from_bottom + 1 + (PARTIAL_VERTEBRA_OFFSET if partial else 0)


MAX_DISCS = len(_VERTEBRAE_FROM_BOTTOM) - 1  # L5-S1 up to C1-C2: 24


def is_disc_label(value: int) -> bool:
    """True for SPIDER disc labels (201-224: L5-S1 up to C1-C2)."""
    return DISC_LABEL_BASE < value <= DISC_LABEL_BASE + MAX_DISCS


def level_of_disc_label(value: int) -> str:
    """Level name of a SPIDER disc label (201 -> 'L5-S1')."""
    if not is_disc_label(value):
        raise ValueError(f"{value} is not a SPIDER disc label (201-{DISC_LABEL_BASE + MAX_DISCS})")
    return level_name(value - DISC_LABEL_BASE - 1)


_ORDINALS = (
    "First",
    "Second",
    "Third",
    "Fourth",
    "Fifth",
    "Sixth",
    "Seventh",
    "Eighth",
    "Ninth",
    "Tenth",
    "Eleventh",
    "Twelfth",
)
_REGIONS = {"C": "Cervical", "T": "Thoracic", "L": "Lumbar"}


# SNOMED CT "Intervertebral disc structure": the finding site of a disc whose level is uncertain
DISC_STRUCTURE = Code("360499006", "SCT", "Intervertebral disc structure")


def disc_structure_code(level: str, *, uncertain: bool = False) -> Code:
    """SNOMED CT body structure of a disc level, e.g. L4-L5 -> 'Intervertebral disc structure of fourth
    lumbar vertebra' (the disc below the named vertebra); :data:`DISC_STRUCTURE` when the level is
    ``uncertain`` (no level-specific claim)."""
    if uncertain:
        return DISC_STRUCTURE
    upper = level.split("-")[0]
    name = f"IntervertebralDiscStructureOf{_ORDINALS[int(upper[1:]) - 1]}{_REGIONS[upper[0]]}Vertebra"
    code = getattr(codes.SCT, name)
    # DICOM limits code meanings to 64 characters: drop SNOMED's semantic tag "(body structure)"
    return Code(code.value, code.scheme_designator, code.meaning.replace(" (body structure)", ""))


def level_from_name(text: str) -> int | None:
    """Index from the bottom of a level name found in ``text`` ('L4-L5' -> 1), or None."""
    for index in range(len(_VERTEBRAE_FROM_BOTTOM) - 1):
        if level_name(index) in text:
            return index
    return None
