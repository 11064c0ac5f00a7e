"""Per-disc geometry in patient space (millimetres and degrees); numpy/scipy only.

Every measurement uses the label map's affine, so anisotropic voxels and oblique direction cosines
give the same answers as 1 mm isotropic voxels, up to partial-volume error.

Disc frame
----------
For each disc the centroid ``c`` and a local frame are found from the voxel centres in millimetres:
``w`` the disc normal (cranial), ``u`` the in-plane anterior-posterior axis (anterior), ``v`` the
in-plane lateral axis (towards the patient's right). The first estimate is the principal axes of the
voxel cloud (smallest variance = normal; of the two in-plane axes, the one closer to the patient's
anterior direction = AP). The normal is then refined to the bisector of the fitted superior and
inferior surfaces, so that the mid-plane of a wedged disc is symmetric.

Sub-voxel sampling
------------------
The binary mask is sampled with trilinear interpolation along lines parallel to ``w`` on a 0.5 mm
grid of columns in the mid-plane. A column's thickness is the integral of the interpolated mask
along its line (for a binary mask this equals the voxel-count length, an unbiased estimate), its
mid-point is the first moment, and its superior/inferior surface points are mid-point +- thickness/2.
Extents along ``u`` and ``v`` are the 0.5 crossings of the interpolated mask along bundles of 5x5
parallel lines through the centroid, averaged.

Measurements (:data:`FIELDS`)
-----------------------------
``volume_mm3``            voxel count x voxel volume
``mean_height_mm``        volume / area of the disc's projection on its mid-plane
``middle_height_mm``      thickness along ``w`` through the centroid (mean over 2.5 mm around it)
``anterior_height_mm``    thickness 10 % of the AP width in from the anterior edge, mid-sagittal plane
``posterior_height_mm``   the same from the posterior edge
``ap_width_mm``           extent through the centroid along ``u``
``lateral_width_mm``      extent through the centroid along ``v``
``midsagittal_area_mm2``  area of the section by the plane through the centroid spanned by u and w
``height_to_width_ratio`` mean height / AP width
``wedge_angle_deg``       angle between the fitted superior and inferior surfaces (central 80 % of
                          the disc), positive when anterior height > posterior height
``sagittal_angle_deg``    tilt of ``u`` from the patient's axial plane within the sagittal plane,
                          ``atan2(u_S, u_A)``: positive when the anterior end is cranial
``axial_angle_deg``       ``atan2(u_R, u_A)``: rotation of the AP axis within the axial plane,
                          positive when the anterior end turns to the patient's right
``frontal_angle_deg``     ``atan2(v_S, v_R)``: tilt of the lateral axis within the frontal plane,
                          positive when the right end is cranial

The reference study's six geometric features (Perrone et al. 2025) are ``mean_height_mm``,
``ap_width_mm``, ``lateral_width_mm`` and the three angles of the *pure principal axes* of the disc
(no surface refinement): ``pca_sagittal_angle_deg``, ``pca_axial_angle_deg``, ``pca_frontal_angle_deg``
(:data:`REFERENCE_FEATURES`). Unlike that study, they are in millimetres, not voxels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from discgeo import levels
from discgeo.errors import InvalidDataError
from discgeo.schemas import DiscGeometry, DroppedFragment, GeometryResult
from discgeo.volume import Volume

FIELDS = (
    "volume_mm3",
    "mean_height_mm",
    "middle_height_mm",
    "anterior_height_mm",
    "posterior_height_mm",
    "ap_width_mm",
    "lateral_width_mm",
    "midsagittal_area_mm2",
    "height_to_width_ratio",
    "wedge_angle_deg",
    "sagittal_angle_deg",
    "axial_angle_deg",
    "frontal_angle_deg",
)
REFERENCE_FEATURES = (
    "mean_height_mm",
    "ap_width_mm",
    "lateral_width_mm",
    "pca_sagittal_angle_deg",
    "pca_axial_angle_deg",
    "pca_frontal_angle_deg",
)
COLUMN_STEP_MM = 0.5
LINE_STEP_MM = 0.1
CENTRE_PATCH_MM = 2.5
EDGE_PATCH_MM = 1.5
DEFAULT_MIN_FRAGMENT_MM3 = 200.0
_R, _A, _S = np.eye(3)


# ------------------------------------------------------------------------------------ find discs
@dataclass(frozen=True)
class DiscMask:
    """One disc found in a label map: its label, level, and a boolean crop with the crop's affine."""

    label: int
    level: str
    mask: np.ndarray  # boolean crop around the disc
    affine: np.ndarray  # voxel-to-RAS+ of the crop


def _crop_affine(affine: np.ndarray, box: tuple[slice, ...]) -> np.ndarray:
    shift = np.eye(4)
    shift[:3, 3] = [b.start for b in box]
    return affine @ shift


def _nonzero_box(labels: np.ndarray) -> tuple[slice, ...] | None:
    """The bounding box of the non-zero voxels (None when there are none), from per-axis projections."""
    box = []
    for axis in range(labels.ndim):
        others = tuple(a for a in range(labels.ndim) if a != axis)
        hit = np.flatnonzero(labels.any(axis=others))
        if hit.size == 0:
            return None
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


def _centroid_z(mask: np.ndarray, affine: np.ndarray) -> float:
    return float((affine[:3, :3] @ np.argwhere(mask).mean(axis=0) + affine[:3, 3])[2])


def find_discs(
    labels: np.ndarray, affine: np.ndarray, *, min_fragment_mm3: float = DEFAULT_MIN_FRAGMENT_MM3
) -> tuple[list[DiscMask], list[DroppedFragment], str]:
    """Identify discs and their levels in an integer label array.

    Returns the discs bottom to top (each as a cropped mask), the dropped fragments and the
    convention used: ``spider`` (labels 201+), ``multilabel`` (one disc per non-zero label) or
    ``binary`` (3D face-connected components of a single label).
    """
    if labels.min() < 0:
        raise InvalidDataError("a label map must not hold negative values")
    box = _nonzero_box(labels)
    if box is None:
        raise InvalidDataError("the label map is empty: no disc voxels")
    # everything below works on the labelled region only: a mostly empty map of a large field of view
    # costs what its discs cost, not a multiple of its declared size
    labels, affine = labels[box], _crop_affine(affine, box)
    counts = np.bincount(labels.ravel())
    values = np.flatnonzero(counts)
    values = values[values != 0]
    voxel_mm3 = abs(float(np.linalg.det(affine[:3, :3])))
    dropped: list[DroppedFragment] = []
    spider = [int(v) for v in values if levels.is_disc_label(int(v))]
    if spider:
        convention = "spider"
        work, candidates = labels, spider
    elif values.size > 1:
        convention = "multilabel"
        work, candidates = labels, [int(v) for v in values]
    else:
        convention = "binary"
        work, count = ndimage.label(labels == values[0], structure=ndimage.generate_binary_structure(3, 1))
        counts = np.bincount(work.ravel())
        candidates = list(range(1, count + 1))
    if convention != "spider" and len(candidates) > 10 * levels.MAX_DISCS:
        raise InvalidDataError(
            f"the label map holds {len(candidates)} separate labels or components, far more than a spine "
            "has discs: is it an image rather than a label map?"
        )
    boxes = ndimage.find_objects(work, max_label=max(candidates))
    found = []
    for value in candidates:
        size = float(counts[value]) * voxel_mm3
        if convention != "spider" and size < min_fragment_mm3:
            dropped.append(DroppedFragment(label=value, volume_mm3=round(size, 2)))
            continue
        box = boxes[value - 1]
        assert box is not None
        found.append((value, work[box] == value, _crop_affine(affine, box)))
    if not found:
        raise InvalidDataError(
            f"no disc of at least {min_fragment_mm3:g} mm3 in the label map "
            f"({len(dropped)} fragment(s) dropped)"
        )
    if convention == "spider":
        discs = [DiscMask(v, levels.level_of_disc_label(v), m, a) for v, m, a in found]
        _check_vertebrae(labels, affine, discs, boxes)
        return discs, dropped, convention
    if len(found) > levels.MAX_DISCS:
        raise InvalidDataError(
            f"{len(found)} disc-sized labels or components, more than the {levels.MAX_DISCS} discs of a spine"
        )
    found.sort(key=lambda item: _centroid_z(item[1], item[2]))
    discs = [
        DiscMask(
            value if convention == "multilabel" else levels.disc_label(i), levels.level_name(i), mask, crop
        )
        for i, (value, mask, crop) in enumerate(found)
    ]
    return discs, dropped, convention


def _check_vertebrae(
    labels: np.ndarray, affine: np.ndarray, discs: list[DiscMask], boxes: list[tuple[slice, ...] | None]
) -> None:
    """With SPIDER vertebra labels present, check that disc 200+n lies below vertebra n."""
    for disc in discs:
        n = disc.label - levels.DISC_LABEL_BASE
        for value in (n, n + levels.PARTIAL_VERTEBRA_OFFSET):
            box = boxes[value - 1] if value <= len(boxes) else None
            if box is None:
                continue
            vertebra_z = _centroid_z(labels[box] == value, _crop_affine(affine, box))
            if _centroid_z(disc.mask, disc.affine) > vertebra_z:
                raise InvalidDataError(
                    f"disc label {disc.label} lies above vertebra label {value}; SPIDER numbering puts "
                    "vertebra n directly above disc 200+n"
                )


# ---------------------------------------------------------------------------------- one disc
def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x)


def _deg(y: Any, x: Any) -> float:
    return math.degrees(math.atan2(float(y), float(x)))


def _principal_frame(points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(u, v, w) from principal axes: w smallest variance (cranial), u the in-plane axis nearer anterior."""
    centred = points - points.mean(axis=0)
    _, vecs = np.linalg.eigh(centred.T @ centred)
    w = vecs[:, 0] * (1 if vecs[2, 0] >= 0 else -1)
    a, b = vecs[:, 1], vecs[:, 2]
    u = a if abs(a[1]) >= abs(b[1]) else b
    u = u * (1 if u[1] >= 0 else -1)
    v = np.cross(w, u)
    v = v * (1 if v[0] >= 0 else -1)
    return u, v, w


class _Sampler:
    """Trilinear sampling of one disc's binary mask (a crop) at world points."""

    def __init__(self, mask: np.ndarray, affine: np.ndarray) -> None:
        self.volume = np.pad(mask.astype(np.float32), 2)
        inv = np.linalg.inv(affine)
        self.inv_m = inv[:3, :3]
        self.inv_t = inv[:3, 3] + 2.0
        self.spacing = np.linalg.norm(affine[:3, :3], axis=0)

    def to_voxel(self, world: np.ndarray) -> np.ndarray:
        """World point(s) (..., 3) to padded-crop voxel coordinates."""
        return world @ self.inv_m.T + self.inv_t

    def direction(self, axis: np.ndarray) -> np.ndarray:
        """A world direction in voxel units."""
        return self.inv_m @ axis

    def at_voxels(self, coords: np.ndarray) -> np.ndarray:
        """Sample at voxel coordinates given as (3, ...)."""
        return ndimage.map_coordinates(
            self.volume, coords, order=1, mode="constant", cval=0.0, prefilter=False
        )


def _extent(
    sample: _Sampler,
    centre: np.ndarray,
    axis: np.ndarray,
    across: tuple[np.ndarray, np.ndarray],
    reach: float,
) -> tuple[float, float]:
    """Mean positions (along ``axis``, from ``centre``) of the two 0.5 crossings over a 5x5 line bundle."""
    t = np.arange(-reach, reach + LINE_STEP_MM, LINE_STEP_MM)
    offsets = np.linspace(-1.0, 1.0, 5)
    starts = centre + offsets[:, None, None] * across[0] + offsets[None, :, None] * across[1]
    coords = sample.to_voxel(starts.reshape(-1, 3))[:, :, None] + sample.direction(axis)[None, :, None] * t
    profiles = sample.at_voxels(coords.transpose(1, 0, 2))
    lows, highs = [], []
    for profile in profiles:
        inside = np.flatnonzero(profile >= 0.5)
        if inside.size == 0:
            continue
        i, j = inside[0], inside[-1]
        lows.append(_cross(t, profile, i - 1, i))
        highs.append(_cross(t, profile, j, j + 1))
    if not lows:
        raise InvalidDataError("the disc has no voxels on the lines through its centroid")
    return float(np.mean(lows)), float(np.mean(highs))


def _cross(t: np.ndarray, profile: np.ndarray, i: int, j: int) -> float:
    """Position where the profile crosses 0.5 between samples i and j (linear interpolation)."""
    if i < 0 or j >= t.size:
        return float(t[max(min(i, t.size - 1), 0)])
    a, b = profile[i], profile[j]
    return float(t[i] + (0.5 - a) / (b - a) * (t[j] - t[i])) if b != a else float(t[i])


@dataclass
class _Columns:
    """Columns parallel to w on a grid in the mid-plane: thickness and mid-point of the mask."""

    uu: np.ndarray
    vv: np.ndarray
    thickness: np.ndarray
    middle: np.ndarray

    def surfaces(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Projection mask, and unit normals (u, v, w coordinates) of the fitted superior and inferior
        surfaces over the central part of the disc (10 % of its span eroded from the rim)."""
        typical = float(np.median(self.thickness[self.thickness > 0.25 * self.thickness.max()]))
        inside = self.thickness >= 0.5 * typical
        idx = np.argwhere(inside)
        span = float(min(idx.max(axis=0) - idx.min(axis=0) + 1))
        core = ndimage.binary_erosion(inside, iterations=max(1, round(0.05 * span))) & inside
        u, v = self.uu[core], self.vv[core]
        half = self.thickness[core] / 2
        top = _fit_plane(u, v, self.middle[core] + half)
        bottom = _fit_plane(u, v, self.middle[core] - half)
        return inside, top, bottom

    def patch_mean(self, u0: float, v0: float, radius: float) -> float:
        """Mean thickness of the columns within ``radius`` of (u0, v0)."""
        near = (self.uu - u0) ** 2 + (self.vv - v0) ** 2 <= radius**2
        return float(self.thickness[near].mean())


def _columns(
    sample: _Sampler,
    centre: np.ndarray,
    frame: tuple[np.ndarray, np.ndarray, np.ndarray],
    local: np.ndarray,
    step: float,
) -> _Columns:
    lo = local.min(axis=0) - 2.0
    hi = local.max(axis=0) + 2.0
    u = np.arange(lo[0], hi[0], step)
    v = np.arange(lo[1], hi[1], step)
    uu, vv = np.meshgrid(u, v, indexing="ij")
    # only columns near the projected voxels
    cells = np.floor((local[:, :2] - lo[:2]) / step).astype(int)
    active = np.zeros(uu.shape, dtype=bool)
    active[cells[:, 0].clip(0, u.size - 1), cells[:, 1].clip(0, v.size - 1)] = True
    active = ndimage.binary_dilation(active, iterations=max(2, int(np.ceil(2.0 / step))))
    dw = float(np.clip(sample.spacing.min() / 4, 0.1, 0.25))
    w = np.arange(lo[2], hi[2], dw)
    u_vox, v_vox, w_vox = (sample.direction(axis) for axis in frame)
    base = sample.to_voxel(centre)[:, None] + u_vox[:, None] * uu[active] + v_vox[:, None] * vv[active]
    values = sample.at_voxels(base[:, :, None] + w_vox[:, None, None] * w[None, None, :])
    thick = values.sum(axis=-1) * dw
    with np.errstate(invalid="ignore", divide="ignore"):
        mid = np.where(thick > 0, (values @ w) * dw / thick, 0.0)
    thickness = np.zeros(uu.shape)
    middle = np.zeros(uu.shape)
    thickness[active] = thick
    middle[active] = mid
    return _Columns(uu, vv, thickness, middle)


def _fit_plane(u: np.ndarray, v: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Unit normal (cranial) of the least-squares plane w = a + b u + c v, in (u, v, w) coordinates."""
    design = np.column_stack([np.ones_like(u), u, v])
    _, b, c = np.linalg.lstsq(design, w, rcond=None)[0]
    return _unit(np.array([-b, -c, 1.0]))


def _refined_frame(
    frame: tuple[np.ndarray, np.ndarray, np.ndarray], top: np.ndarray, bottom: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Frame whose normal is the bisector of the two fitted surfaces; u stays as close as possible."""
    w = _unit(np.column_stack(frame) @ _unit(top + bottom))
    u = _unit(frame[0] - (frame[0] @ w) * w)
    v = np.cross(w, u)
    return u, v * (1 if v[0] >= 0 else -1), w


def measure_disc(mask: np.ndarray, affine: np.ndarray) -> dict[str, Any]:
    """Measure one disc given as a boolean mask on a grid with voxel-to-RAS+ ``affine``."""
    idx = np.argwhere(mask)
    if idx.shape[0] < 8:
        raise InvalidDataError(f"a disc needs at least 8 voxels, this one has {idx.shape[0]}")
    points = idx @ affine[:3, :3].T + affine[:3, 3]
    volume = idx.shape[0] * abs(float(np.linalg.det(affine[:3, :3])))
    centre = points.mean(axis=0)
    pca = _principal_frame(points)
    sample = _Sampler(mask, affine)

    # one coarse pass to refine the normal, then the measuring pass
    coarse = _columns(sample, centre, pca, (points - centre) @ np.column_stack(pca), step=1.0)
    _, top, bottom = coarse.surfaces()
    frame = _refined_frame(pca, top, bottom)
    u_axis, v_axis, w_axis = frame
    local = (points - centre) @ np.column_stack(frame)
    cols = _columns(sample, centre, frame, local, step=COLUMN_STEP_MM)
    inside, top, bottom = cols.surfaces()
    area = float(np.count_nonzero(inside)) * COLUMN_STEP_MM**2

    reach = float(np.abs(local).max()) + 3.0
    ap_lo, ap_hi = _extent(sample, centre, u_axis, (v_axis, w_axis), reach)
    lat_lo, lat_hi = _extent(sample, centre, v_axis, (u_axis, w_axis), reach)
    ap_width = ap_hi - ap_lo
    anterior = cols.patch_mean(ap_hi - 0.1 * ap_width, 0.0, EDGE_PATCH_MM)
    posterior = cols.patch_mean(ap_lo + 0.1 * ap_width, 0.0, EDGE_PATCH_MM)
    sagittal_column = int(np.abs(cols.vv[0]).argmin())
    midsagittal_area = float(cols.thickness[:, sagittal_column].sum() * COLUMN_STEP_MM)
    wedge = math.degrees(math.acos(float(np.clip(top @ bottom, -1.0, 1.0))))
    mean_height = volume / area
    return {
        "volume_mm3": volume,
        "mean_height_mm": mean_height,
        "middle_height_mm": cols.patch_mean(0.0, 0.0, CENTRE_PATCH_MM),
        "anterior_height_mm": anterior,
        "posterior_height_mm": posterior,
        "ap_width_mm": ap_width,
        "lateral_width_mm": lat_hi - lat_lo,
        "midsagittal_area_mm2": midsagittal_area,
        "height_to_width_ratio": mean_height / ap_width,
        "wedge_angle_deg": wedge if anterior >= posterior else -wedge,
        "sagittal_angle_deg": _deg(u_axis @ _S, u_axis @ _A),
        "axial_angle_deg": _deg(u_axis @ _R, u_axis @ _A),
        "frontal_angle_deg": _deg(v_axis @ _S, v_axis @ _R),
        "pca_sagittal_angle_deg": _deg(pca[0] @ _S, pca[0] @ _A),
        "pca_axial_angle_deg": _deg(pca[0] @ _R, pca[0] @ _A),
        "pca_frontal_angle_deg": _deg(pca[1] @ _S, pca[1] @ _R),
        "centroid_ras_mm": centre.tolist(),
        "normal_ras": w_axis.tolist(),
    }


# ----------------------------------------------------------------------------------- public API
def measure_discs(labels: Volume, *, min_fragment_mm3: float = DEFAULT_MIN_FRAGMENT_MM3) -> GeometryResult:
    """Measure every disc of a label map (SPIDER labels, one label per disc, or a binary mask).

    Parameters
    ----------
    labels
        Label map in patient space (any orientation; the affine is used).
    min_fragment_mm3
        Connected components smaller than this are dropped and reported (binary and multi-label maps).
    """
    array = np.asarray(labels.array)
    if not np.issubdtype(array.dtype, np.integer):
        if not np.array_equal(array, np.rint(array)):
            raise InvalidDataError("a label map must hold integers")
        array = array.astype(np.int32)
    discs, dropped, convention = find_discs(array, labels.affine, min_fragment_mm3=min_fragment_mm3)
    results = [
        DiscGeometry(level=disc.level, label=disc.label, **measure_disc(disc.mask, disc.affine))
        for disc in discs
    ]
    return GeometryResult(
        discs=results, dropped_fragments=dropped, label_convention=convention, spacing_mm=list(labels.spacing)
    )
