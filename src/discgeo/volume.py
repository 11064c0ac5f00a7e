"""The in-memory volume and its one canonical orientation.

Canonical orientation
---------------------
Every reader returns a :class:`Volume` in **RAS+ voxel order**: array axis 0 runs towards the
patient's Right, axis 1 towards Anterior, axis 2 towards Superior (nibabel's "closest canonical"
orientation). ``affine`` maps voxel indices ``(i, j, k, 1)`` to patient coordinates in millimetres
in the RAS+ world frame used by NIfTI (DICOM's LPS coordinates have x and y negated). Oblique
acquisitions stay oblique: only axis permutations and flips are applied, never resampling, so the
affine may still have off-diagonal terms. For a sagittal lumbar series this means axis 0 indexes
the sagittal slices, axis 1 goes posterior -> anterior and axis 2 inferior -> superior.

``source_shape`` and ``source_axcodes`` record the array layout of the file that was read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from nibabel import orientations as nio

from discgeo.config import Settings
from discgeo.errors import InvalidDataError, TooLargeError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True, eq=False)
class Volume:
    """A 3D image or label map placed in patient space.

    Parameters
    ----------
    array
        3D voxel array.
    affine
        4x4 voxel-to-RAS+ millimetre transform.
    source_shape, source_axcodes
        Shape and orientation codes of the array as stored in the source file.
    meta
        Non-identifying facts about the source (modality, contrast, series description...).
    """

    array: np.ndarray
    affine: np.ndarray
    source_shape: tuple[int, ...] = ()
    source_axcodes: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise InvalidDataError(
                f"expected a 3D volume, got {self.array.ndim} dimensions {self.array.shape}"
            )
        affine = np.asarray(self.affine, dtype=np.float64)
        if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
            raise InvalidDataError("the voxel-to-world affine must be a finite 4x4 matrix")
        if abs(np.linalg.det(affine[:3, :3])) < 1e-9:
            raise InvalidDataError(
                "the voxel-to-world affine is singular (zero voxel size or collinear axes)"
            )
        object.__setattr__(self, "affine", affine)
        if not self.source_shape:
            object.__setattr__(self, "source_shape", tuple(self.array.shape))
        if not self.source_axcodes:
            object.__setattr__(self, "source_axcodes", self.axcodes)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape (canonical order)."""
        return tuple(self.array.shape)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size along each array axis in millimetres."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    @property
    def axcodes(self) -> tuple[str, ...]:
        """Orientation codes of the array axes (``('R', 'A', 'S')`` when canonical)."""
        return tuple(str(c) for c in nio.aff2axcodes(self.affine))

    @property
    def direction(self) -> np.ndarray:
        """3x3 matrix of unit direction cosines (columns = array axes) in RAS+."""
        return self.affine[:3, :3] / np.asarray(self.spacing)

    def canonical(self) -> Volume:
        """Return this volume reordered to RAS+ (a view when no change is needed)."""
        return _reorient(self, ("R", "A", "S"))

    def reoriented(self, axcodes: tuple[str, str, str]) -> Volume:
        """Return the volume with array axes permuted/flipped to ``axcodes`` (no resampling)."""
        return _reorient(self, axcodes)

    def with_array(self, array: np.ndarray, **meta: Any) -> Volume:
        """Same geometry, other voxels (e.g. a label map on this image's grid)."""
        if array.shape != self.array.shape:
            raise InvalidDataError(
                f"array shape {array.shape} differs from the volume grid {self.array.shape}"
            )
        return Volume(array, self.affine, self.source_shape, self.source_axcodes, {**self.meta, **meta})

    def world_coordinates(self, ijk: np.ndarray) -> np.ndarray:
        """Map ``(..., 3)`` voxel indices to RAS+ millimetres."""
        ijk = np.asarray(ijk, dtype=np.float64)
        return ijk @ self.affine[:3, :3].T + self.affine[:3, 3]


def _reorient(volume: Volume, axcodes: tuple[str, str, str]) -> Volume:
    current = nio.io_orientation(volume.affine)
    target = nio.axcodes2ornt(axcodes)
    transform = nio.ornt_transform(current, target)
    if np.array_equal(transform, [[0, 1], [1, 1], [2, 1]]):
        return volume
    array = nio.apply_orientation(volume.array, transform)
    affine = volume.affine @ nio.inv_ornt_aff(transform, volume.array.shape)
    return Volume(
        np.ascontiguousarray(array), affine, volume.source_shape, volume.source_axcodes, volume.meta
    )


def check_size(shape: tuple[int, ...], settings: Settings, *, what: str = "volume") -> None:
    """Raise :class:`TooLargeError` when ``shape`` exceeds the configured limits (before loading voxels)."""
    if any(int(n) > settings.max_dim for n in shape):
        raise TooLargeError(
            f"{what} of shape {tuple(int(n) for n in shape)} exceeds the limit of {settings.max_dim} "
            "voxels per "
            "axis (DISCGEO_MAX_DIM)"
        )
    total = int(np.prod([int(n) for n in shape], dtype=np.int64))
    if total > settings.max_voxels:
        raise TooLargeError(
            f"{what} of shape {tuple(int(n) for n in shape)} has {total} voxels, over the limit of "
            f"{settings.max_voxels} (DISCGEO_MAX_VOXELS)"
        )


def check_finite(array: np.ndarray, *, what: str = "volume") -> None:
    """Raise :class:`InvalidDataError` when a floating-point array holds NaN or infinity."""
    if np.issubdtype(array.dtype, np.floating):
        flat = array.ravel(order="K")  # a view of C- or Fortran-ordered data
        step = 1 << 22  # slab by slab: no volume-sized temporaries
        bad = sum(int(np.count_nonzero(~np.isfinite(flat[i : i + step]))) for i in range(0, flat.size, step))
        if bad:
            raise InvalidDataError(
                f"{what} holds {bad} NaN or infinite voxel values; fix or mask them before use"
            )
