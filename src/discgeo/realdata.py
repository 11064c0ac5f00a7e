"""The real data beside the project (``../shared/data``): where it is and how to read it.

One home for the paths and label conversions that training, benchmarks and tests use. The data is
read in place, never copied. Sets (see ``../shared/data/README.md``):

* ``ivd-t2-mri/``: three sagittal T2 cases at 1 mm with manual disc masks (labels 1 = L5-S1 ... 5 = L1-L2);
* ``ivd-masks/``: 29 subjects' manual disc masks at 0.43 x 0.43 x 4.4 mm (the same labels); subjects
  11, 20 and 25 are the three cases of ``ivd-t2-mri/``;
* ``vb-mri/``: 34 MRI volumes of two other sources with vertebral-body masks;
* ``spider-format/``: one real SPIDER mask and SPIDER's gradings.

Menezes-Reis R. et al., Quant Imaging Med Surg 6(4):402-412, 2016 (doi:10.21037/qims.2016.08.01) for
``ivd-t2-mri`` and ``ivd-masks``: asymptomatic adults aged 20-40.

``DISCGEO_SHARED_DATA`` points elsewhere when the data is not beside the source tree.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from discgeo import levels
from discgeo.errors import NotFoundError
from discgeo.volume import Volume

REAL_CASES = ("case-11", "case-20", "case-25")
LUMBAR_LEVELS = tuple(levels.level_name(i) for i in range(5))  # L5-S1 ... L1-L2


def root() -> Path:
    """The shared data folder (``DISCGEO_SHARED_DATA`` or ``../shared/data`` beside the source tree)."""
    configured = os.environ.get("DISCGEO_SHARED_DATA")
    folder = Path(configured) if configured else Path(__file__).resolve().parents[3] / "shared" / "data"
    if not folder.is_dir():
        raise NotFoundError(f"real data not found at {folder}; set DISCGEO_SHARED_DATA or put shared/ beside")
    return folder


def ivd_t2_dir() -> Path:
    """``ivd-t2-mri/``: the three 1 mm T2 cases."""
    return root() / "ivd-t2-mri"


def ivd_masks_dir() -> Path:
    """``ivd-masks/``: the 29 subjects' native disc masks."""
    return root() / "ivd-masks"


def vb_mri_dir() -> Path:
    """``vb-mri/``: vertebral-body masks of two other sources."""
    return root() / "vb-mri"


def vb_mri_volumes(source: str | None = None) -> list[str]:
    """The ``vb-mri`` volume names (``VB2-02`` ...), of one source (``VB2``, ``VB3``) or all, sorted."""
    names = sorted(p.name.removesuffix(".nii.gz") for p in vb_mri_dir().glob("VB*-[0-9][0-9].nii.gz"))
    return [n for n in names if source is None or n.startswith(f"{source}-")]


def spider_format_dir() -> Path:
    """``spider-format/``: one real SPIDER mask and SPIDER's gradings."""
    return root() / "spider-format"


def as_spider_labels(volume: Volume) -> Volume:
    """A mask with 1 = L5-S1 ... 5 = L1-L2 relabelled in the SPIDER convention (201 = L5-S1 ...)."""
    array = np.asarray(volume.array).astype(np.int16)
    out = np.where(array > 0, array + levels.DISC_LABEL_BASE, 0).astype(np.int16)
    return volume.with_array(out)


@dataclass(frozen=True)
class RealMask:
    """One subject's manual disc masks (SPIDER labels) and where they come from."""

    subject: str  # "ivd-11"
    source: str  # "native" (ivd-masks, 4.4 mm slices) or "1mm" (ivd-t2-mri)
    labels: Volume


def subject_of_case(case: str) -> str:
    """``case-11`` -> ``ivd-11`` (the same subject in ``ivd-masks``)."""
    return "ivd-" + case.split("-")[1]


def native_subjects() -> list[str]:
    """Subjects of ``ivd-masks`` (``ivd-01`` ... ``ivd-30``, no ``ivd-05``)."""
    names = sorted(p.name for p in ivd_masks_dir().glob("ivd-*_discs.nii.gz"))
    return [re.sub(r"_discs\.nii\.gz$", "", n) for n in names]


def real_masks(*, native: bool = True, isotropic: bool = True) -> list[RealMask]:
    """Every real disc mask: the native ``ivd-masks`` and/or the 1 mm ``ivd-t2-mri`` ones."""
    from discgeo.io import read_labels

    out = []
    if native:
        for subject in native_subjects():
            volume = read_labels(ivd_masks_dir() / f"{subject}_discs.nii.gz")
            out.append(RealMask(subject, "native", as_spider_labels(volume)))
    if isotropic:
        for case in REAL_CASES:
            volume = read_labels(ivd_t2_dir() / f"{case}_discs.nii.gz")
            out.append(RealMask(subject_of_case(case), "1mm", as_spider_labels(volume)))
    return out


def native_on_case_grid(case: str) -> tuple[Volume, np.ndarray]:
    """The native ``ivd-masks`` discs of a ``ivd-t2-mri`` case's subject placed on the case's 1 mm grid
    (SPIDER labels), and the translation in mm that placed them.

    The two masks of a subject come in different world frames that differ by a translation alone (the
    per-disc centroid differences agree within ~0.3 mm), so the native mask is moved by the mean of its
    five per-disc centroid differences and resampled disc by disc: trilinear fractions on the 1 mm grid,
    binarised with each disc's volume kept (:func:`discgeo.segmentation.binarise`); a voxel claimed by
    two discs goes to the larger fraction."""
    from scipy import ndimage

    from discgeo.io import read_labels
    from discgeo.segmentation import binarise

    grid = read_labels(ivd_t2_dir() / f"{case}_discs.nii.gz")
    native = read_labels(ivd_masks_dir() / f"{subject_of_case(case)}_discs.nii.gz")
    target, source = np.asarray(grid.array), np.asarray(native.array)

    def centroid(array: np.ndarray, affine: np.ndarray, value: int) -> np.ndarray:
        return np.argwhere(array == value).mean(axis=0) @ affine[:3, :3].T + affine[:3, 3]

    values = [v for v in range(1, 6) if np.any(target == v) and np.any(source == v)]
    shift = np.mean(
        [centroid(target, grid.affine, v) - centroid(source, native.affine, v) for v in values], axis=0
    )
    moved = native.affine.copy()
    moved[:3, 3] += shift
    # case voxel -> native voxel coordinates
    to_native = np.linalg.inv(moved) @ grid.affine
    coords = np.stack(np.meshgrid(*[np.arange(n) for n in target.shape], indexing="ij"), axis=-1)
    points = coords.reshape(-1, 3) @ to_native[:3, :3].T + to_native[:3, 3]
    best = np.zeros(target.size, np.float32)
    out = np.zeros(target.size, np.int16)
    for v in values:
        fraction = ndimage.map_coordinates(
            (source == v).astype(np.float32),
            points.T,
            order=1,
            mode="grid-constant",
            cval=0.0,
            prefilter=False,
        )
        # as many 1 mm voxels as the native disc's volume in mm3
        count = np.count_nonzero(source == v) * abs(np.linalg.det(native.affine[:3, :3]))
        count /= abs(np.linalg.det(grid.affine[:3, :3]))
        kept = binarise(fraction * np.float32(count / max(float(fraction.sum()), 1e-6)))
        take = kept & (fraction > best)
        out[take] = levels.DISC_LABEL_BASE + v
        best[take] = fraction[take]
    return grid.with_array(out.reshape(target.shape)), shift
