"""Synthetic sagittal lumbar spine MRI with exact ground truth.

A phantom is built in patient space (RAS+ millimetres) as a kinematic chain from the sacrum upwards:
disc, vertebral body, disc, ... Every disc is a slab whose cross-section (in its own mid-plane) is a
superellipse and whose thickness varies linearly from posterior to anterior (the wedge) plus a
parabolic dome (the endplate concavity)::

    rho(u, v) = (|u/a|^p + |v/b|^p)^(1/p) <= 1           a = AP width / 2, b = lateral width / 2
    H(u, v)   = h + g*u + dome*(1 - rho^2),   -H/2 <= w <= H/2,   g = 2*tan(wedge/2)

with ``u`` the disc's anterior axis, ``v`` its lateral (right) axis and ``w`` its cranial normal.
Vertebral bodies use the same shape without a dome; pedicles, laminae and spinous processes are
boxes; the spinal canal runs behind the bodies. Ground truth of every disc measurement is computed
by numerical integration of these formulas on a 0.08 mm grid, independently of any voxel grid; the
label map is sampled at voxel centres (SPIDER label convention, see :mod:`discgeo.levels`).

The image is rendered from tissue classes with T1- or T2-like intensities, texture, blur (partial
volume), a smooth bias field and Rician noise, then stored as 12-bit integers so that a DICOM round
trip is exact.

Sizes follow real discs: normal discs are drawn around the per-level medians of the real reference
(:mod:`discgeo.reference`, 145 discs of healthy adults aged 20-40) with its between- and within-patient
spread; a cohort mixes young adults (the reference's range, :data:`YOUNG_ADULT_SHARE`) and older
patients whose discs are a little lower, wider and more variable (:data:`_OLDER`, an assumption).
Narrowing follows the clinical idea: a narrowed disc is drawn 28-55 % thinner than the patient's own
normal for that level, more often low in the spine and with age, darker on T2 and bulging; its graded
label is the narrowing rule of :mod:`discgeo.reference` (below 75 % of the height expected from the
level and the adjacent discs) on the exact geometry, flipped with probability :data:`LABEL_NOISE`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, MRImageStorage, generate_uid
from scipy import ndimage

from discgeo import levels, reference
from discgeo.volume import LPS_TO_RAS, Volume

Contrast = Literal["t1", "t2"]
TRUTH_GRID_MM = 0.08

# Prior probability of narrowing per level for an older patient, lowest disc first (more common low
# in the spine); a young adult's is a fifth of it.
_LEVEL_NARROWING = (0.44, 0.44, 0.25, 0.17, 0.11, 0.08, 0.08, 0.08)
LABEL_NOISE = 0.07
YOUNG_ADULT_SHARE = 0.4
# Wedge per lumbar level in degrees, lowest first, from the reference's anterior minus posterior height
# (flat thoracolumbar discs above).
_LEVEL_WEDGE = (9.0, 7.0, 4.0, 1.3, 0.3, 0.0, -1.0, -1.5)
_LEVEL_WEDGE_SD = (3.6, 2.5, 2.6, 2.4, 1.5, 1.5, 1.5, 1.5)
# Superellipse exponent of the cross-section per level: the reference's area / (AP x lateral width) is
# 0.77 at L5-S1 (an ellipse, p = 2) and 0.86 from L3-L4 up (p ~ 3).
_LEVEL_SQUARENESS = (2.0, 2.2, 2.9, 3.0, 2.9, 2.9, 2.9, 2.9)
# Endplate dome as a fraction of the rim thickness per level: real discs are biconvex, their middle
# height 1.21 x the mean at L5-S1 and L4-L5, 1.27-1.29 x above (the reference).
_DOME_RATIO = (0.55, 0.55, 0.95, 0.95, 0.9, 0.9, 0.9, 0.9)
# Shared share of the patient-level size variation (height, AP and lateral width grow together): brings
# the per-level spread of the disc volume close to the reference (its between-patient log SD is 0.25).
_SIZE_CORRELATION = 0.55
# Older patients (41-82 years, beyond the young-adult reference): normal discs a little lower, wider
# and more variable (a documented assumption, not measured here).
_OLDER = {"height": 0.95, "width": 1.06, "spread": 1.4}

# Tissue classes and their (T1, T2) intensities before texture, bias and noise.
_TISSUES: dict[str, tuple[float, float]] = {
    "air": (0.0, 0.0),
    "muscle": (0.32, 0.22),
    "fat": (0.92, 0.70),
    "abdomen": (0.45, 0.48),
    "vessel": (0.05, 0.04),
    "marrow": (0.62, 0.40),
    "cortex": (0.10, 0.08),
    "canal": (0.16, 1.00),
    "annulus": (0.34, 0.24),
    "nucleus": (0.40, 0.88),
    "nucleus_degenerated": (0.33, 0.36),
}
_TISSUE_INDEX = {name: i for i, name in enumerate(_TISSUES)}


# --------------------------------------------------------------------------------------- anatomy
def _rot_x(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def _rot_y(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def _rot_z(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def frame_basis(sagittal_deg: float, frontal_deg: float = 0.0, axial_deg: float = 0.0) -> np.ndarray:
    """Columns (u, v, w) of a local frame in RAS+: u anterior, v right, w cranial.

    ``sagittal_deg`` tilts u towards superior (anterior end cranial), ``frontal_deg`` tilts v
    towards superior, ``axial_deg`` turns u towards the patient's right.
    """
    base = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]).T  # u=A, v=R, w=S
    rot = (
        _rot_z(-math.radians(axial_deg))
        @ _rot_y(-math.radians(frontal_deg))
        @ _rot_x(math.radians(sagittal_deg))
    )
    return rot @ base


@dataclass(frozen=True, kw_only=True)
class Slab:
    """Superellipse slab in a local frame (discs and vertebral bodies)."""

    center: np.ndarray
    basis: np.ndarray
    a: float
    b: float
    p: float
    h: float
    wedge_deg: float
    dome: float = 0.0

    @property
    def g(self) -> float:
        """Height gradient along u (mm per mm)."""
        return 2.0 * math.tan(math.radians(self.wedge_deg) / 2.0)

    @property
    def radius(self) -> float:
        """Bounding radius in mm."""
        return math.sqrt(self.a**2 + self.b**2 + (self.h / 2 + abs(self.g) * self.a / 2 + self.dome) ** 2)

    def rho(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Superellipse radius (<= 1 inside the cross-section)."""
        return (np.abs(u / self.a) ** self.p + np.abs(v / self.b) ** self.p) ** (1.0 / self.p)

    def thickness(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """H(u, v): thickness along w (0 outside the cross-section)."""
        rho = self.rho(u, v)
        height = self.h + self.g * u + self.dome * (1.0 - np.minimum(rho, 1.0) ** 2)
        return np.where(rho <= 1.0, np.maximum(height, 0.0), 0.0)

    def inside(self, local: np.ndarray) -> np.ndarray:
        """Membership of points given in local (u, v, w) coordinates."""
        u, v, w = local[..., 0], local[..., 1], local[..., 2]
        return np.abs(w) <= self.thickness(u, v) / 2.0


@dataclass(frozen=True, kw_only=True)
class Box:
    """Axis-aligned box in a local frame (posterior elements, canal segments)."""

    center: np.ndarray
    basis: np.ndarray
    lo: tuple[float, float, float]
    hi: tuple[float, float, float]

    @property
    def radius(self) -> float:
        """Bounding radius in mm."""
        corners = np.array(
            [
                [x, y, z]
                for x in (self.lo[0], self.hi[0])
                for y in (self.lo[1], self.hi[1])
                for z in (self.lo[2], self.hi[2])
            ]
        )
        return float(np.max(np.linalg.norm(corners, axis=1)))

    def inside(self, local: np.ndarray) -> np.ndarray:
        """Membership of points given in local coordinates."""
        inside = (local[..., 0] >= self.lo[0]) & (local[..., 0] <= self.hi[0])
        for axis in (1, 2):
            inside &= (local[..., axis] >= self.lo[axis]) & (local[..., axis] <= self.hi[axis])
        return inside


Shape = Slab | Box


@dataclass(frozen=True, kw_only=True)
class DiscTruth:
    """One disc of a phantom: its shape and grading."""

    index: int
    slab: Slab
    narrowed: bool  # the generator's state: drawn as degenerated and thinned
    graded: bool  # the narrowing rule on the exact geometry, with label noise
    degeneration: float
    measured: dict[str, float] = field(default_factory=dict)  # disc_truth(slab), once graded

    @property
    def level(self) -> str:
        """Level name (L5-S1 for the lowest)."""
        return levels.level_name(self.index)

    @property
    def label(self) -> int:
        """SPIDER label value."""
        return levels.disc_label(self.index)


@dataclass(frozen=True, kw_only=True)
class Anatomy:
    """Patient-space anatomy of one phantom (independent of the voxel grid)."""

    discs: list[DiscTruth]
    vertebrae: list[list[Shape]]  # per vertebra above each disc: body + posterior elements
    sacrum: Slab
    canal: list[Box]
    remnant: Slab | None  # an S1-S2 remnant disc inside the sacrum (Variant.remnant)
    spine_line: np.ndarray  # (n, 3) points along the vertebral body centres, bottom to top
    back_depth: float
    front_depth: float
    fat_back: float
    fat_front: float
    age: float
    population: str  # "young-adult" (20-40, the real reference's range) or "older" (41-82)


@dataclass(frozen=True)
class Variant:
    """Opt-in departures from the usual lumbar study, for testing how levels are named (the default
    changes nothing: a cohort's anatomy, grid and image stay those of its seeds).

    * ``lordosis_deg``: extra lordosis, spread evenly over the wedges of the five lumbar discs;
    * ``scoliosis_deg``: a lateral curve, the frontal tilt of the chain going from +this at the
      sacrum to -this at the top (the grid follows the spine sideways);
    * ``view="no-sacrum"``: the field of view starts inside L5 (no sacrum, no L5-S1 disc in view);
    * ``remnant``: a rudimentary S1-S2 disc inside the sacrum, 24 mm below its upper endplate (disc
      tissue, labelled sacrum: no lumbar disc)."""

    lordosis_deg: float = 0.0
    scoliosis_deg: float = 0.0
    view: Literal["lumbar", "no-sacrum"] = "lumbar"
    remnant: bool = False


def _make_anatomy(rng: np.random.Generator, n_discs: int, variant: Variant = Variant()) -> Anatomy:
    """Draw one patient's anatomy (see the module docstring; sizes from :mod:`discgeo.reference`)."""
    young = bool(rng.random() < YOUNG_ADULT_SHARE)
    age = float(rng.uniform(20, 40)) if young else float(rng.uniform(41, 82))
    older = _OLDER if not young else {"height": 1.0, "width": 1.0, "spread": 1.0}
    narrowing_factor = 0.2 if young else 0.5 + (age - 41) / 41
    sacral_slope = float(rng.uniform(-42, -28))  # the L5-S1 endplate faces anteriorly
    frontal = float(rng.normal(0, 1.5))
    axial = float(rng.normal(0, 1.5))
    # patient-level log scales of disc height, AP and lateral width: a shared size part plus own parts
    size = float(rng.normal())
    patient = {}  # standard normal patient parts, scaled per level by the reference's between-patient SD
    for measure in ("mean_height_mm", "ap_width_mm", "lateral_width_mm"):
        own = float(rng.normal())
        patient[measure] = math.sqrt(_SIZE_CORRELATION) * size + math.sqrt(1 - _SIZE_CORRELATION) * own
    # vertebral body size follows the discs'
    scale = math.exp(reference.log_sd("ap_width_mm", levels.level_name(0))[0] * patient["ap_width_mm"])

    def normal_size(measure: str, level: str, factor: float) -> float:
        between, within = (sd * older["spread"] for sd in reference.log_sd(measure, level))
        deviation = between * patient[measure] + float(rng.normal(0, within))
        return reference.expected(measure, level) * factor * math.exp(deviation)

    point = np.zeros(3)
    angle = sacral_slope
    disc_truths: list[DiscTruth] = []
    noise_coins: list[float] = []
    vertebrae: list[list[Shape]] = []
    canal: list[Box] = []
    line = [point.copy()]

    def tilt(step: float) -> float:  # the frontal angle along the chain (step 0 = the sacrum)
        return frontal + variant.scoliosis_deg * math.cos(math.pi * step / max(1, 2 * n_discs))

    sac_basis = frame_basis(angle, tilt(0), axial)
    sac_a = reference.expected("ap_width_mm", levels.level_name(0)) / 2 * scale + 1.0
    sac_b = sac_a * 1.25
    sacrum = Slab(
        center=point - 20.0 * sac_basis[:, 2],
        basis=sac_basis,
        a=sac_a,
        b=sac_b,
        p=2.6,
        h=40.0,
        wedge_deg=-12.0,
    )
    canal_depth = float(rng.uniform(13, 18))
    canal_half_width = float(rng.uniform(10, 12))
    prev_ap = sac_a * 2
    for index in range(n_discs):
        level = levels.level_name(index)
        p_narrow = min(0.9, _LEVEL_NARROWING[min(index, len(_LEVEL_NARROWING) - 1)] * narrowing_factor)
        narrowed = bool(rng.random() < p_narrow)
        mean_height = normal_size("mean_height_mm", level, older["height"])
        degeneration = float(rng.uniform(0.28, 0.55)) if narrowed else 0.0
        mean_height *= 1.0 - degeneration
        at = min(index, len(_LEVEL_WEDGE) - 1)
        ap = normal_size("ap_width_mm", level, older["width"]) + (rng.uniform(0.5, 2.5) if narrowed else 0.0)
        lat = normal_size("lateral_width_mm", level, older["width"])
        p = float(rng.uniform(-0.2, 0.2)) + _LEVEL_SQUARENESS[at]
        dome_ratio = max(0.1, float(rng.normal(_DOME_RATIO[at], 0.2))) * (1.0 - degeneration)
        # mean height = h + dome * E[1 - rho^2] = h + dome / 2 (rho^2 is uniform on [0, 1] over any
        # superellipse); dome = ratio * h
        height = mean_height / (1.0 + dome_ratio / 2.0)
        dome = dome_ratio * height
        # the wedge grows with the disc's thickness (anterior heights vary most in the reference)
        typical = reference.expected("mean_height_mm", level) / (1.0 + _DOME_RATIO[at] / 2.0)
        slope = 2.0 * math.tan(math.radians(_LEVEL_WEDGE[at]) / 2.0) / typical
        slope_sd = 2.0 * math.tan(math.radians(_LEVEL_WEDGE_SD[at]) / 2.0) / typical
        gradient = height * float(rng.normal(slope, slope_sd)) * (1.0 - 0.6 * degeneration)
        wedge = math.degrees(2.0 * math.atan(gradient / 2.0)) + (
            variant.lordosis_deg / 5 if index < 5 else 0.0
        )
        mid = angle + wedge / 2.0
        basis = frame_basis(mid, tilt(2 * index + 1), axial)
        center = point + (height / 2.0) * basis[:, 2]
        slab = Slab(
            center=center,
            basis=basis,
            a=ap / 2,
            b=lat / 2,
            p=p,
            h=height,
            wedge_deg=wedge,
            dome=dome,
        )
        noise_coins.append(float(rng.random()))
        disc_truths.append(
            DiscTruth(index=index, slab=slab, narrowed=narrowed, graded=narrowed, degeneration=degeneration)
        )
        canal.append(
            Box(
                center=center,
                basis=basis,
                lo=(-prev_ap / 2 - 1 - canal_depth, -canal_half_width, -height / 2 - 1.5),
                hi=(-prev_ap / 2 - 1, canal_half_width, height / 2 + 1.5),
            )
        )
        # vertebral body above the disc
        point = center + (height / 2.0) * basis[:, 2]
        angle = mid + wedge / 2.0
        v_wedge = float(rng.normal(4.0 if index == 0 else (-1.0 if index < 5 else -3.0), 1.5))
        v_h = float(rng.normal(27.0, 1.5)) * scale * (0.92 if index >= 5 else 1.0)
        v_mid = angle + v_wedge / 2.0
        v_basis = frame_basis(v_mid, tilt(2 * index + 2), axial)
        v_center = point + (v_h / 2.0) * v_basis[:, 2]
        v_ap = ap * float(rng.uniform(0.95, 0.99))
        v_lat = lat * float(rng.uniform(0.96, 1.0))
        body = Slab(center=v_center, basis=v_basis, a=v_ap / 2, b=v_lat / 2, p=3.0, h=v_h, wedge_deg=v_wedge)
        canal_back = -v_ap / 2 - 1 - canal_depth
        pedicle = Box(
            center=v_center,
            basis=v_basis,
            lo=(canal_back, -canal_half_width - 8, -v_h * 0.3),
            hi=(-v_ap / 2 + 2, canal_half_width + 8, v_h * 0.35),
        )
        lamina = Box(
            center=v_center,
            basis=v_basis,
            lo=(canal_back - 7, -canal_half_width - 8, -v_h * 0.4),
            hi=(canal_back, canal_half_width + 8, v_h * 0.35),
        )
        spinous_len = float(rng.uniform(28, 40))
        spinous = Box(
            center=v_center,
            basis=v_basis,
            lo=(canal_back - 7 - spinous_len, -4.0, -v_h * 0.45),
            hi=(canal_back - 7, 4.0, v_h * 0.2),
        )
        vertebrae.append([body, pedicle, lamina, spinous])
        canal.append(
            Box(
                center=v_center,
                basis=v_basis,
                lo=(canal_back, -canal_half_width, -v_h / 2 - 1.5),
                hi=(-v_ap / 2 - 1, canal_half_width, v_h / 2 + 1.5),
            )
        )
        line.append(v_center)
        point = v_center + (v_h / 2.0) * v_basis[:, 2]
        angle = v_mid + v_wedge / 2.0
        prev_ap = v_ap
    return Anatomy(
        discs=_grade(disc_truths, noise_coins),
        vertebrae=vertebrae,
        sacrum=sacrum,
        canal=canal,
        remnant=Slab(
            center=sacrum.center + (20.0 - 24.0) * sac_basis[:, 2],
            basis=sac_basis,
            a=sac_a * 0.75,
            b=sac_b * 0.6,
            p=2.2,
            h=3.0,
            wedge_deg=0.0,
        )
        if variant.remnant
        else None,
        spine_line=np.array(line),
        back_depth=float(rng.uniform(100, 135)),
        front_depth=float(rng.uniform(110, 190)),
        fat_back=float(rng.uniform(8, 30)),
        fat_front=float(rng.uniform(10, 35)),
        age=age,
        population="young-adult" if young else "older",
    )


def _grade(discs: list[DiscTruth], noise_coins: list[float]) -> list[DiscTruth]:
    """The graded label: the narrowing rule of :mod:`discgeo.reference` on the exact mean heights,
    then flipped with probability :data:`LABEL_NOISE`."""
    measured = [disc_truth(d.slab) for d in discs]
    rule = reference.narrowed_by_rule([m["mean_height_mm"] for m in measured], [d.level for d in discs])
    return [
        replace(d, graded=bool(flag) != (coin < LABEL_NOISE), measured=m)
        for d, flag, coin, m in zip(discs, rule, noise_coins, measured, strict=True)
    ]


# ------------------------------------------------------------------------------------------- truth
def disc_truth(slab: Slab, *, grid_mm: float = TRUTH_GRID_MM) -> dict[str, float]:
    """Exact measurements of a disc slab by numerical integration (see module docstring)."""
    u = np.arange(-slab.a + grid_mm / 2, slab.a, grid_mm)
    v = np.arange(-slab.b + grid_mm / 2, slab.b, grid_mm)
    uu, vv = np.meshgrid(u, v, indexing="ij")
    thick = slab.thickness(uu, vv)
    cell = grid_mm * grid_mm
    inside = thick > 0
    area = float(np.count_nonzero(inside)) * cell
    volume = float(thick.sum()) * cell
    u_c = float((uu * thick).sum() * cell / volume)
    mid_line = np.linspace(-slab.a, slab.a, 4001)
    sagittal_profile = slab.thickness(mid_line, np.zeros_like(mid_line))
    midsagittal_area = float(np.trapezoid(sagittal_profile, mid_line))

    def height_at(u_pos: float) -> float:
        return float(slab.thickness(np.array(u_pos), np.array(0.0)))

    lateral = 2.0 * slab.b * (1.0 - abs(u_c / slab.a) ** slab.p) ** (1.0 / slab.p)
    u_axis, v_axis = slab.basis[:, 0], slab.basis[:, 1]  # RAS+: index 0 = R, 1 = A, 2 = S
    return {
        "volume_mm3": volume,
        "mean_height_mm": volume / area,
        "middle_height_mm": height_at(u_c),
        "anterior_height_mm": height_at(slab.a - 0.2 * slab.a),
        "posterior_height_mm": height_at(-slab.a + 0.2 * slab.a),
        "ap_width_mm": 2.0 * slab.a,
        "lateral_width_mm": lateral,
        "midsagittal_area_mm2": midsagittal_area,
        "height_to_width_ratio": volume / area / (2.0 * slab.a),
        "wedge_angle_deg": slab.wedge_deg,
        "sagittal_angle_deg": math.degrees(math.atan2(u_axis[2], u_axis[1])),
        "axial_angle_deg": math.degrees(math.atan2(u_axis[0], u_axis[1])),
        "frontal_angle_deg": math.degrees(math.atan2(v_axis[2], v_axis[0])),
    }


# -------------------------------------------------------------------------------------------- grid
@dataclass(frozen=True, kw_only=True)
class GridSpec:
    """Voxel grid of a phantom: spacing (R, A, S order), shape, and optional rotation of the grid."""

    spacing: tuple[float, float, float]
    shape: tuple[int, int, int]
    origin: np.ndarray
    rotation_deg: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def affine(self) -> np.ndarray:
        """Voxel-to-RAS+ affine; a rotation turns the grid about its centre (anatomy stays put)."""
        affine = np.eye(4)
        affine[:3, :3] = np.diag(self.spacing)
        affine[:3, 3] = self.origin
        if any(self.rotation_deg):
            rx, ry, rz = (math.radians(a) for a in self.rotation_deg)
            rot = _rot_z(rz) @ _rot_y(ry) @ _rot_x(rx)
            centre = affine[:3, :3] @ ((np.array(self.shape) - 1) / 2.0) + affine[:3, 3]
            move = np.eye(4)
            move[:3, :3] = rot
            move[:3, 3] = centre - rot @ centre
            affine = move @ affine
        return affine


def _grid_for(
    anatomy: Anatomy,
    rng: np.random.Generator,
    *,
    spacing: tuple[float, float, float] | None,
    rotation_deg: tuple[float, float, float],
    full_coverage: bool,
    variant: Variant = Variant(),
) -> GridSpec:
    lateral_cover = float(rng.uniform(50, 110))  # real protocols do not always cover the whole disc width
    if spacing is None:
        in_plane = float(rng.uniform(0.5, 1.2))
        if rng.random() < 0.7:
            thickness = float(rng.uniform(3.0, 4.5))
        else:
            thickness = float(rng.uniform(max(0.5, lateral_cover / 60), 2.0))
        spacing = (thickness, in_plane, in_plane)
    n_x = int(np.clip(math.ceil(lateral_cover / spacing[0]), 12, 60))
    if full_coverage:
        widest = max(2 * d.slab.b for d in anatomy.discs)
        if variant.scoliosis_deg:  # and the lateral curve
            widest += float(np.ptp([d.slab.center[0] for d in anatomy.discs]))
        n_x = max(n_x, math.ceil((widest + 24.0) / spacing[0]))
    disc_pts = np.array([d.slab.center for d in anatomy.discs])
    z_lo = float(disc_pts[:, 2].min()) - float(rng.uniform(35, 70))
    if variant.view == "no-sacrum":  # the field starts at L5's centre: no part of L5-S1 in view
        z_lo = float(anatomy.vertebrae[0][0].center[2]) + 2.0
    z_hi = float(disc_pts[:, 2].max()) + float(rng.uniform(25, 55))
    y_mid = float(np.mean(anatomy.spine_line[:, 1]))
    fov_y = float(rng.uniform(200, 290))
    y_lo = y_mid - fov_y * float(rng.uniform(0.5, 0.6))
    pad = 1.0 + (0.25 if any(rotation_deg) else 0.0)
    n_y = math.ceil(fov_y * pad / spacing[1])
    n_z = math.ceil((z_hi - z_lo) * pad / spacing[2])
    x_mid = float(np.mean(disc_pts[:, 0])) if variant.scoliosis_deg else 0.0  # follow a lateral curve
    centre = np.array([x_mid + float(rng.normal(0, 2)), y_lo + fov_y / 2, (z_lo + z_hi) / 2])
    shape = (n_x, n_y, n_z)
    origin = centre - np.array(spacing) * (np.array(shape) - 1) / 2.0
    return GridSpec(spacing=spacing, shape=shape, origin=origin, rotation_deg=rotation_deg)


# ------------------------------------------------------------------------------------- rasterise
def _footprint(
    shape: Shape, affine: np.ndarray, grid_shape: tuple[int, int, int]
) -> tuple[tuple[slice, slice, slice], np.ndarray] | None:
    """Voxel-centre membership of ``shape`` within its bounding box on the grid (None if off-grid)."""
    inv = np.linalg.inv(affine)
    centre_vox = inv[:3, :3] @ shape.center + inv[:3, 3]
    reach = shape.radius / np.linalg.norm(affine[:3, :3], axis=0)
    lo = np.maximum(np.floor(centre_vox - reach).astype(int), 0)
    hi = np.minimum(np.ceil(centre_vox + reach).astype(int) + 1, grid_shape)
    if np.any(hi <= lo):
        return None
    idx = np.stack(
        np.meshgrid(*(np.arange(a, b, dtype=np.float32) for a, b in zip(lo, hi, strict=True)), indexing="ij"),
        axis=-1,
    )
    # voxel index -> local frame in one affine step
    to_local = (shape.basis.T @ affine[:3, :3]).astype(np.float32)
    offset = (shape.basis.T @ (affine[:3, 3] - shape.center)).astype(np.float32)
    local = idx @ to_local.T + offset
    box = (slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2]))
    return box, shape.inside(local)


def _paint(shape: Shape, affine: np.ndarray, *targets: tuple[np.ndarray, int]) -> None:
    """Set each ``(array, value)`` target to its value at the voxel centres inside ``shape``."""
    found = _footprint(shape, affine, targets[0][0].shape)
    if found is None:
        return
    box, mask = found
    for array, value in targets:
        array[box][mask] = value


def _rasterise(anatomy: Anatomy, grid: GridSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Label map (SPIDER convention), tissue-class map and vertebral-body map on the grid."""
    affine = grid.affine()
    shape = grid.shape
    labels = np.zeros(shape, dtype=np.uint8)
    tissue = np.full(shape, _TISSUE_INDEX["air"], dtype=np.uint8)
    T = _TISSUE_INDEX

    # Body outline, fat and muscle: functions of the distance in front of / behind the spine line.
    idx = np.indices(shape, dtype=np.float32).reshape(3, -1).T
    world = idx @ affine[:3, :3].T.astype(np.float32) + affine[:3, 3].astype(np.float32)
    line = anatomy.spine_line
    order = np.argsort(line[:, 2])
    spine_y = np.interp(world[:, 2], line[order, 2], line[order, 1]).astype(np.float32)
    dy = world[:, 1] - spine_y
    dx = world[:, 0] - float(line[:, 0].mean())
    body = (dy > -anatomy.back_depth) & (dy < anatomy.front_depth) & (np.abs(dx) < 170)
    cls = np.full(world.shape[0], T["air"], dtype=np.uint8)
    cls[body] = T["muscle"]
    cls[body & (dy > 25)] = T["abdomen"]
    cls[
        body
        & ((dy < -anatomy.back_depth + anatomy.fat_back) | (dy > anatomy.front_depth - anatomy.fat_front))
    ] = T["fat"]
    vessel = ((dx + 12) ** 2 + (dy - 38) ** 2) < 10.0**2
    cls[body & vessel] = T["vessel"]
    tissue[...] = cls.reshape(shape)
    del idx, world, spine_y, dy, dx, body, cls

    bodies = np.zeros(shape, dtype=np.uint8)
    _paint(
        anatomy.sacrum,
        affine,
        (labels, levels.SACRUM_LABEL),
        (tissue, T["marrow"]),
        (bodies, levels.SACRUM_LABEL),
    )
    if anatomy.remnant is not None:  # disc tissue, part of the sacrum
        _paint(anatomy.remnant, affine, (tissue, T["nucleus"]))
    for n, shapes in enumerate(anatomy.vertebrae):
        _paint(shapes[0], affine, (bodies, levels.vertebra_label(n)))
        for part in shapes:
            _paint(part, affine, (labels, levels.vertebra_label(n)), (tissue, T["marrow"]))
    for box in anatomy.canal:
        _paint(box, affine, (labels, levels.CANAL_LABEL), (tissue, T["canal"]))
    for disc in anatomy.discs:
        _paint(disc.slab, affine, (labels, disc.label), (tissue, T["annulus"]))
        s = disc.slab
        nucleus = Slab(
            center=s.center,
            basis=s.basis,
            a=s.a * 0.7,
            b=s.b * 0.7,
            p=2.0,
            h=s.h * 0.65,
            wedge_deg=s.wedge_deg,
            dome=s.dome * 0.6,
        )
        _paint(nucleus, affine, (tissue, T["nucleus_degenerated" if disc.narrowed else "nucleus"]))

    # Vertebrae cut by the field of view get the "partly visible" label (SPIDER 101-125).
    for n, shapes in enumerate(anatomy.vertebrae):
        body = shapes[0]
        assert isinstance(body, Slab)
        inv = np.linalg.inv(affine)
        corners = [body.center + body.basis @ np.array([0.0, 0.0, sgn * body.h / 2]) for sgn in (-1, 1)]
        vox = np.array([inv[:3, :3] @ c + inv[:3, 3] for c in corners])
        if np.any(vox < -0.5) or np.any(vox > np.array(shape) - 0.5):
            labels[labels == levels.vertebra_label(n)] = levels.vertebra_label(n, partial=True)
    bodies[(labels == levels.CANAL_LABEL) | (labels > levels.DISC_LABEL_BASE)] = (
        0  # painted over, as in labels
    )
    return labels, tissue, bodies


def _render(
    tissue: np.ndarray, spacing: tuple[float, float, float], contrast: Contrast, rng: np.random.Generator
) -> np.ndarray:
    column = 0 if contrast == "t1" else 1
    lut = np.array([values[column] for values in _TISSUES.values()], dtype=np.float32)
    lut *= rng.normal(1.0, 0.06, size=lut.shape).astype(np.float32)
    image = lut[tissue]

    def smooth_field(cells: int, amplitude: float) -> np.ndarray:
        coarse = rng.normal(0, 1, size=(max(2, tissue.shape[0] // 8), cells, cells)).astype(np.float32)
        zoom = [n / c for n, c in zip(tissue.shape, coarse.shape, strict=True)]
        return (
            1.0
            + amplitude
            * ndimage.zoom(coarse, zoom, order=1)[: tissue.shape[0], : tissue.shape[1], : tissue.shape[2]]
        )

    image *= np.clip(smooth_field(24, 0.08), 0.6, 1.4)  # tissue texture
    sigma = [max(0.35, 0.6 / s) if i else 0.35 for i, s in enumerate(spacing)]
    image = ndimage.gaussian_filter(image, sigma=sigma, mode="nearest")
    bias = np.clip(smooth_field(3, 0.15), 0.6, 1.4)
    image *= bias
    noise = float(rng.uniform(0.015, 0.04))
    image = np.sqrt(
        (image + rng.normal(0, noise, image.shape).astype(np.float32)) ** 2
        + rng.normal(0, noise, image.shape).astype(np.float32) ** 2
    )
    scale = float(rng.uniform(1800, 3000))
    return np.clip(np.rint(image * scale), 0, 4095).astype(np.float32)


# -------------------------------------------------------------------------------------------- case
@dataclass(frozen=True)
class PhantomCase:
    """A generated case: image, labels (same grid), the truth dictionary and the vertebral bodies
    alone (``bodies``: the body of vertebra ``n`` labelled as in ``labels``, without its posterior
    elements, and the sacrum :data:`~discgeo.levels.SACRUM_LABEL`; what a segmenter of bodies learns)."""

    image: Volume
    labels: Volume
    truth: dict[str, Any] = field(repr=False)
    bodies: Volume | None = field(default=None, repr=False)


def make_case(
    seed: int,
    case: int = 0,
    *,
    contrast: Literal["t1", "t2", "mixed"] = "mixed",
    spacing: tuple[float, float, float] | None = None,
    rotation_deg: tuple[float, float, float] = (0.0, 0.0, 0.0),
    n_discs: int | None = None,
    full_coverage: bool = False,
    variant: Variant = Variant(),
) -> PhantomCase:
    """Generate one phantom deterministically from ``(seed, case)``.

    Parameters
    ----------
    seed, case
        Cohort seed and case index; anatomy depends on nothing else.
    contrast
        ``t1``, ``t2`` or ``mixed`` (drawn per case).
    spacing
        Voxel size (R, A, S) in mm; drawn when None. Changing it does not change the anatomy.
    rotation_deg
        Rotation of the voxel grid about R, A, S (oblique acquisition); the anatomy stays put.
    n_discs
        Discs in view (5-7 drawn when None).
    full_coverage
        Widen the sagittal coverage (beyond the usual 60-slice limit if needed) so that every disc
        is entirely in view, as measurement tests need.
    variant
        Opt-in anatomy and views that test level naming (:class:`Variant`).
    """
    anatomy_rng = np.random.default_rng([seed, case, 1])
    grid_rng = np.random.default_rng([seed, case, 2])
    render_rng = np.random.default_rng([seed, case, 3])
    count = n_discs if n_discs is not None else int(anatomy_rng.integers(5, 8))
    anatomy = _make_anatomy(anatomy_rng, count, variant)
    coin = render_rng.random()  # drawn always, so that fixing the contrast leaves the rest unchanged
    chosen: Contrast = ("t1" if coin < 0.5 else "t2") if contrast == "mixed" else contrast
    grid = _grid_for(
        anatomy,
        grid_rng,
        spacing=spacing,
        rotation_deg=rotation_deg,
        full_coverage=full_coverage,
        variant=variant,
    )
    labels, tissue, bodies = _rasterise(anatomy, grid)
    image = _render(tissue, grid.spacing, chosen, render_rng)
    affine = grid.affine()
    patient_id = f"DG-PHANTOM-{seed}-{case:04d}"
    truth = {
        "patient_id": patient_id,
        "seed": seed,
        "case": case,
        "contrast": chosen,
        "spacing_mm": list(grid.spacing),
        "shape": list(grid.shape),
        "affine": affine.tolist(),
        "age": round(anatomy.age, 1),
        "population": anatomy.population,
        "discs": [
            {
                **_disc_record(d),
                "voxels": int(np.count_nonzero(labels == d.label)),
                "fully_in_view": _fully_in_view(labels, d.label),
            }
            for d in anatomy.discs
        ],
    }
    meta = {"contrast": chosen, "phantom": patient_id}
    image_vol = Volume(image, affine, meta=meta)
    label_vol = Volume(labels, affine, meta={"phantom": patient_id})
    body_vol = Volume(bodies, affine, meta={"phantom": patient_id})
    return PhantomCase(image=image_vol, labels=label_vol, truth=truth, bodies=body_vol)


def _fully_in_view(labels: np.ndarray, label: int) -> bool:
    """False when the structure touches a face of the grid (cut by the field of view)."""
    faces = (labels[0], labels[-1], labels[:, 0], labels[:, -1], labels[:, :, 0], labels[:, :, -1])
    return not any(bool(np.any(face == label)) for face in faces)


def make_truth(seed: int, case: int = 0, *, n_discs: int | None = None) -> list[dict[str, Any]]:
    """Per-disc truth of ``make_case(seed, case)`` without rasterising (fast, for cohort statistics)."""
    rng = np.random.default_rng([seed, case, 1])
    count = n_discs if n_discs is not None else int(rng.integers(5, 8))
    anatomy = _make_anatomy(rng, count)
    return [{**_disc_record(d), "population": anatomy.population} for d in anatomy.discs]


def _disc_record(d: DiscTruth) -> dict[str, Any]:
    return {
        "level": d.level,
        "label": d.label,
        **{k: round(v, 5) for k, v in (d.measured or disc_truth(d.slab)).items()},
        "narrowing": int(d.graded),
        "narrowing_generator": int(d.narrowed),
        "degeneration": round(d.degeneration, 4),
    }


def write_case(case: PhantomCase, out_dir: str | Path, *, fmt: Literal["dicom", "nifti"] = "dicom") -> Path:
    """Write a case folder: ``dicom/`` or ``image.nii.gz``, ``labels.nii.gz`` and ``truth.json``."""
    from discgeo.io.nifti import write_nifti

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    truth = case.truth
    if fmt == "dicom":
        contrast = truth["contrast"]
        tags = SeriesTags(
            patient_id=truth["patient_id"],
            patient_name=f"Phantom^{truth['seed']}-{truth['case']:04d}",
            series_description=f"SAG {contrast.upper()} TSE",
            contrast=contrast,
            series_number=2 if contrast == "t1" else 3,
            uid_seed=truth["patient_id"],
        )
        write_dicom_series(case.image, out / "dicom", tags=tags)
    elif fmt == "nifti":
        write_nifti(case.image, out / "image.nii.gz")
    else:
        raise ValueError(f"unknown format {fmt!r}; use dicom or nifti")
    write_nifti(case.labels, out / "labels.nii.gz")
    (out / "truth.json").write_text(json.dumps(truth, indent=1))
    return out


def generate_cohort(
    out_dir: str | Path,
    *,
    cases: int,
    seed: int,
    fmt: Literal["dicom", "nifti"] = "dicom",
    contrast: Literal["t1", "t2", "mixed"] = "mixed",
    progress: bool = False,
) -> list[Path]:
    """Write ``cases`` phantom cases to ``out_dir/case-NNNN`` plus ``cohort.json`` (a summary)."""
    from tqdm import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    folders = []
    summary = []
    for index in tqdm(range(cases), desc="phantoms", unit="case", disable=not progress):
        case = make_case(seed, index, contrast=contrast)
        folder = write_case(case, out / f"case-{index:04d}", fmt=fmt)
        folders.append(folder)
        discs = case.truth["discs"]
        summary.append(
            {
                "case": folder.name,
                "patient_id": case.truth["patient_id"],
                "contrast": case.truth["contrast"],
                "discs": len(discs),
                "narrowed": sum(d["narrowing"] for d in discs),
            }
        )
    n_discs = sum(s["discs"] for s in summary)
    n_narrow = sum(s["narrowed"] for s in summary)
    (out / "cohort.json").write_text(
        json.dumps(
            {
                "seed": seed,
                "format": fmt,
                "contrast": contrast,
                "cases": summary,
                "discs": n_discs,
                "narrowing_prevalence": round(n_narrow / max(n_discs, 1), 4),
                "label_noise": LABEL_NOISE,
            },
            indent=1,
        )
    )
    return folders


# ------------------------------------------------------------------------------- synthetic DICOM
@dataclass(frozen=True, kw_only=True)
class SeriesTags:
    """Identity and acquisition tags of a written MR series (all synthetic by default)."""

    patient_id: str = "DISCGEO-0000"
    patient_name: str = "Phantom^Discgeo"
    study_uid: str | None = None
    series_uid: str | None = None
    frame_of_reference_uid: str | None = None
    series_number: int = 1
    series_description: str = "SAG T1 TSE"
    contrast: str = "t1"
    field_strength: float = 1.5
    study_datetime: datetime = datetime(2025, 1, 1, 9, 0, 0)
    uid_seed: str = "discgeo"


_TIMING = {"t1": (550.0, 12.0, 3), "t2": (3500.0, 100.0, 17)}


# Array layout written per plane, as RAS+ axis codes of (columns, rows, slices).
_WRITE_LAYOUT = {"sagittal": ("P", "I", "R"), "coronal": ("L", "I", "P"), "axial": ("L", "P", "S")}


def write_dicom_series(
    volume: Volume,
    out_dir: str | Path,
    *,
    tags: SeriesTags | None = None,
    rescale: tuple[float, float] = (1.0, 0.0),
    plane: str = "sagittal",
) -> list[Path]:
    """Write ``volume`` as a single-frame MR series (one file per slice).

    For a sagittal series the array is reordered so that columns run posterior, rows run inferior
    and slices run towards the patient's right (the usual layout); ``plane`` picks the slice axis
    for coronal or axial series. Oblique affines are preserved exactly.
    Stored values are ``round((value - intercept) / slope)`` as unsigned 16-bit integers.
    """
    tags = tags or SeriesTags()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    slope, intercept = rescale
    vol = volume.reoriented(_WRITE_LAYOUT[plane])
    stored = np.rint((vol.array.astype(np.float64) - intercept) / slope)
    if stored.min() < 0 or stored.max() > 65535:
        raise ValueError("values do not fit unsigned 16 bits with this rescale; choose slope/intercept")
    stored = stored.astype(np.uint16)
    lps = LPS_TO_RAS @ vol.affine
    sp = vol.spacing
    row_cos = lps[:3, 0] / sp[0]
    col_cos = lps[:3, 1] / sp[1]
    normal = np.cross(row_cos, col_cos)

    def uid(kind: str) -> UID:
        return generate_uid(entropy_srcs=[tags.uid_seed, kind])

    study_uid = UID(tags.study_uid) if tags.study_uid else uid("study")
    series_uid = UID(tags.series_uid) if tags.series_uid else uid(f"series-{tags.series_number}")
    for_uid = UID(tags.frame_of_reference_uid) if tags.frame_of_reference_uid else uid("frame-of-reference")
    tr, te, echo_train = _TIMING.get(tags.contrast, _TIMING["t1"])
    date = tags.study_datetime.strftime("%Y%m%d")
    time = tags.study_datetime.strftime("%H%M%S")
    high = int(stored.max())
    paths = []
    for k in range(stored.shape[2]):
        position = lps[:3, :3] @ np.array([0.0, 0.0, k]) + lps[:3, 3]
        sop_uid = uid(f"series-{tags.series_number}-instance-{k}")
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = date
        ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = time
        ds.AccessionNumber = ""
        ds.Modality = "MR"
        ds.Manufacturer = "discgeo"
        ds.ManufacturerModelName = "synthetic phantom"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "LUMBAR SPINE MRI"
        ds.SeriesDescription = tags.series_description
        ds.ProtocolName = tags.series_description
        ds.BodyPartExamined = "LSPINE"
        ds.PatientName = tags.patient_name
        ds.PatientID = tags.patient_id
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.PatientPosition = "HFS"
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = ["SK", "OSP"]
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.RepetitionTime = f"{tr:g}"
        ds.EchoTime = f"{te:g}"
        ds.EchoTrainLength = echo_train
        ds.MagneticFieldStrength = f"{tags.field_strength:g}"
        ds.ImagedNucleus = "1H"
        ds.SliceThickness = f"{sp[2]:.6g}"
        ds.SpacingBetweenSlices = f"{sp[2]:.6g}"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = tags.series_number
        ds.InstanceNumber = k + 1
        ds.FrameOfReferenceUID = for_uid
        ds.PositionReferenceIndicator = ""
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*row_cos, *col_cos)]
        ds.SliceLocation = f"{float(position @ normal):.6f}"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = stored.shape[1]
        ds.Columns = stored.shape[0]
        ds.PixelSpacing = [f"{sp[1]:.8g}", f"{sp[0]:.8g}"]
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.RescaleSlope = f"{slope:g}"
        ds.RescaleIntercept = f"{intercept:g}"
        ds.RescaleType = "US"
        ds.WindowCenter = f"{(high * slope) / 2 + intercept:.0f}"
        ds.WindowWidth = f"{max(high * slope, 1):.0f}"
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        path = out / f"IM{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
