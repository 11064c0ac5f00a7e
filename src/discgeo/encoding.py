"""Disc crops and the latent shape code (autoencoder encoder/decoder run with ONNX Runtime).

Disc crops
----------
The encoder artifact owns its preprocessing: its ``metadata.json`` states the crop's size (voxels per
side), its spacing in mm along each of the cube's axes and its alignment (:class:`CropSpec`);
:meth:`Encoder.crop` cuts every disc of a label map accordingly, so nothing else in the pipeline knows
those numbers. Each disc mask is taken in RAS+ voxel order (the canonical orientation of every discgeo
volume), resampled to the cube and centred by its bounding box in the cube's axes. With the artifact's
``crop_alignment`` ``voxel`` the cube's axes are the voxel axes and the tilt is kept, as in the reference
study; with ``sagittal`` (the shipped crop) the cube is turned about R to the disc's own sagittal tilt
(which :mod:`discgeo.geometry` reports in degrees), so the code need not spend a number on it and the
cube can be fine along the disc's height. Where an untilted cube's spacing is a whole multiple of the
mask's along an axis, the mask is copied voxel for voxel; elsewhere trilinear interpolation is
binarised with the volume kept (a threshold of 0.5 alone made 1 mm discs one voxel longer along each
axis of odd extent: up to +16 % volume on the real cases). Size is kept (no rescaling). A disc whose
bounding box exceeds the cube is reported in :class:`CropResult.too_large`, never cut.
"""

from __future__ import annotations

import io
import logging
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from discgeo.config import Settings
from discgeo.errors import InvalidDataError, TooLargeError, UnsupportedFormatError
from discgeo.geometry import find_discs
from discgeo.runtime import open_session
from discgeo.segmentation import binarise
from discgeo.volume import Volume

log = logging.getLogger(__name__)
ALIGNMENTS = ("voxel", "sagittal")


@dataclass(frozen=True)
class CropSpec:
    """Crop size (voxels per side), spacing (mm along the cube's R, A and S axes) and alignment:
    ``voxel`` (the cube's axes are the mask's voxel axes) or ``sagittal`` (turned about R so that the
    cube's S axis is the disc's normal in the sagittal plane; see :func:`crop_disc`)."""

    size: int
    spacing_mm: tuple[float, float, float]
    alignment: str = "voxel"

    def __post_init__(self) -> None:
        if self.alignment not in ALIGNMENTS:
            raise ValueError(f"crop alignment must be one of {', '.join(ALIGNMENTS)}, not {self.alignment!r}")

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any]) -> CropSpec:
        """From an encoder artifact's ``crop_size``, ``crop_spacing_mm`` (one number or three) and
        ``crop_alignment`` (``voxel`` when absent: the artifacts before it)."""
        spacing = metadata["crop_spacing_mm"]
        values = [float(spacing)] * 3 if isinstance(spacing, int | float) else [float(v) for v in spacing]
        if len(values) != 3 or min(values) <= 0:
            raise ValueError(f"crop_spacing_mm must be one or three positive numbers, not {spacing!r}")
        alignment = str(metadata.get("crop_alignment", "voxel"))
        return cls(int(metadata["crop_size"]), (values[0], values[1], values[2]), alignment)

    def to_metadata(self) -> dict[str, Any]:
        """The artifact's fields for this crop (what :meth:`from_metadata` reads)."""
        return {
            "crop_size": self.size,
            "crop_spacing_mm": list(self.spacing_mm),
            "crop_alignment": self.alignment,
        }

    @property
    def extent_mm(self) -> tuple[float, float, float]:
        """What the cube covers along each axis."""
        return (
            self.size * self.spacing_mm[0],
            self.size * self.spacing_mm[1],
            self.size * self.spacing_mm[2],
        )


@dataclass
class CropResult:
    """Crops of the discs that fit, and the discs that did not."""

    crops: np.ndarray  # uint8 [N, 64, 64, 64]
    levels: list[str]
    labels: list[int]
    too_large: list[dict[str, Any]] = field(default_factory=list)


def crop_disc(mask: np.ndarray, affine: np.ndarray, *, spec: CropSpec) -> np.ndarray | None:
    """Crop one disc (boolean mask on a RAS+-ordered grid) into the ``spec`` cube; None if it does not fit.

    With ``voxel`` alignment the cube's axes follow the mask's voxel axes (after the canonical
    reordering), so an oblique acquisition keeps its obliqueness, as in the reference study. Where the
    crop spacing is a whole multiple of the mask's (1 mm masks, 0.5 mm masks), the samples are put on
    voxel centres (the bounding-box centre moves by under half a voxel) and the crop copies the mask
    exactly. With ``sagittal`` alignment the cube is turned about R by the disc's sagittal tilt
    (:func:`sagittal_frame`). Elsewhere trilinear fractions are binarised with the volume kept
    (:func:`discgeo.segmentation.binarise`). Either way the cube is centred on the disc's bounding box
    in its own axes.
    """
    idx = np.argwhere(mask)
    if idx.size == 0:
        raise InvalidDataError("empty disc mask")
    # voxel sizes to 1e-5 mm: a label map that went through NIfTI's float32 affine (the encoder
    # service's input) crops exactly as the original
    spacing = np.round(np.linalg.norm(affine[:3, :3], axis=0), 5)
    size = spec.size
    spacing_mm = np.asarray(spec.spacing_mm)
    if spec.alignment == "sagittal":
        points_mm = idx * spacing
        frame = sagittal_frame(points_mm)  # rows: the cube's R, A, S axes in voxel-axis mm
        along = points_mm @ frame.T
        # a voxel's half-extent along each cube axis: half its box projected onto that axis
        half = 0.5 * np.abs(frame) @ spacing
        lo, hi = along.min(axis=0) - half, along.max(axis=0) + half
        if np.any(hi - lo > size * spacing_mm):
            return None
        centre = (lo + hi) / 2
        offsets = (np.arange(size) - (size - 1) / 2)[None, :] * spacing_mm[:, None]  # [axis, t] in mm
        axes = [centre[a] + offsets[a] for a in range(3)]
        grid_mm = np.meshgrid(*axes, indexing="ij")  # cube coordinates in mm
        points = np.einsum("ai,a...->i...", frame, np.stack(grid_mm))  # back to voxel-axis mm
        grid = points / spacing[:, None, None, None]  # [axis, R, A, S] voxel coordinates
    else:
        lo = (idx.min(axis=0) - 0.5) * spacing  # bounding box in mm along the voxel axes
        hi = (idx.max(axis=0) + 0.5) * spacing
        if np.any(hi - lo > size * spacing_mm):
            return None
        # target voxel t (0..size-1) sits at the box centre + (t - (size-1)/2) * spacing_mm along each
        # axis, i.e. at voxel coordinate first + t * step
        step = spacing_mm / spacing
        first = ((lo + hi) / 2 - (size - 1) / 2 * spacing_mm) / spacing
        for a in range(3):
            if step[a] < 1 - 1e-6 or abs(step[a] - round(step[a])) > 1e-6:
                continue  # samples between voxels whatever the phase
            for start in sorted((np.floor(first[a]), np.ceil(first[a])), key=lambda s: abs(s - first[a])):
                if start <= idx[:, a].min() and start + step[a] * (size - 1) >= idx[:, a].max():
                    first[a] = start
                    break
        grid = np.stack(np.meshgrid(*[first[a] + step[a] * np.arange(size) for a in range(3)], indexing="ij"))
    values = ndimage.map_coordinates(
        mask.astype(np.float32), grid, order=1, mode="grid-constant", cval=0.0, prefilter=False
    )
    return binarise(values).astype(np.uint8)


def sagittal_frame(points_mm: np.ndarray) -> np.ndarray:
    """The ``sagittal`` crop's axes (rows R', A', S', right-handed) for a disc's voxel positions in mm:
    S' is the disc's normal (the direction of least spread of its voxels) projected onto the sagittal
    (A-S) plane, R' stays R, A' = S' x R'. Only the sagittal tilt is taken out (up to ~30 degrees at
    L5-S1), so the cube can be thin along S'; a coronal tilt stays, and with it R is never mixed into S
    (the native masks are 4.4 mm thick along R)."""
    centred = points_mm - points_mm.mean(axis=0)
    _, vectors = np.linalg.eigh(centred.T @ centred)
    normal = vectors[:, 0]  # smallest eigenvalue first
    a, s = normal[1], normal[2]
    if s < 0:
        a, s = -a, -s
    length = float(np.hypot(a, s))
    a, s = (0.0, 1.0) if length < 1e-9 else (a / length, s / length)
    return np.array([[1.0, 0.0, 0.0], [0.0, s, -a], [0.0, a, s]])


def disc_crops(labels: Volume, *, spec: CropSpec) -> CropResult:
    """Crops of every disc of a label map (disc identification as in :func:`discgeo.geometry.find_discs`)."""
    canonical = labels.canonical()
    array = np.asarray(canonical.array)
    if not np.issubdtype(array.dtype, np.integer):
        array = array.astype(np.int32)
    discs, _, _ = find_discs(array, canonical.affine)
    crops, levels, values, too_large = [], [], [], []
    for disc in discs:
        crop = crop_disc(disc.mask, disc.affine, spec=spec)
        if crop is None:
            spacing = np.linalg.norm(disc.affine[:3, :3], axis=0)
            idx = np.argwhere(disc.mask)
            extent = ((idx.max(axis=0) - idx.min(axis=0) + 1) * spacing).round(1).tolist()
            too_large.append({"level": disc.level, "label": disc.label, "extent_mm": extent})
            log.warning("disc %s (%s mm) does not fit the %s mm crop", disc.level, extent, spec.extent_mm)
            continue
        crops.append(crop)
        levels.append(disc.level)
        values.append(disc.label)
    size = spec.size
    stacked = np.stack(crops) if crops else np.zeros((0, size, size, size), np.uint8)
    return CropResult(stacked, levels, values, too_large)


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-sample intersection over union of two boolean batches [N, ...]."""
    a = a.reshape(a.shape[0], -1).astype(bool)
    b = b.reshape(b.shape[0], -1).astype(bool)
    inter = np.count_nonzero(a & b, axis=1)
    union = np.count_nonzero(a | b, axis=1)
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


MAX_CROPS_PER_REQUEST = 256


def pack_crops(crops: np.ndarray) -> bytes:
    """Binary crops [N, S, S, S] (S a multiple of 8) as a compressed .npz of packed bits (~1-3 kB a disc)."""
    x = np.asarray(crops)
    if x.ndim != 4 or len(set(x.shape[1:])) != 1 or x.shape[1] % 8:
        raise InvalidDataError(
            f"crops must be cubes [N, S, S, S] with S a multiple of 8, got {list(x.shape)}"
        )
    buffer = io.BytesIO()
    np.savez_compressed(buffer, packed=np.packbits(x.astype(bool), axis=-1), count=np.array(len(x)))
    return buffer.getvalue()


def _check_npz_headers(data: bytes, *, size: int, limit: int) -> None:
    """Refuse an .npz before anything is inflated: only ``packed`` and ``count``, uncompressed sizes
    within ``limit`` crops, and .npy headers whose dtype and shape fit (a header may declare any
    shape: it is read alone, without its data)."""
    most = limit * size * size * (size // 8) + 4096
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = {m.filename: m for m in archive.infolist()}
            if set(members) != {"packed.npy", "count.npy"}:
                raise UnsupportedFormatError(
                    f"crops .npz must hold exactly 'packed' and 'count', got {sorted(members)[:5]}"
                )
            for name, member in members.items():
                if member.file_size > (most if name == "packed.npy" else 4096):
                    raise TooLargeError(
                        f"{name} inflates to {member.file_size} bytes; the limit is {limit} crops"
                    )
                with archive.open(member) as handle:
                    version = np.lib.format.read_magic(handle)
                    reader = (
                        np.lib.format.read_array_header_1_0
                        if version == (1, 0)
                        else np.lib.format.read_array_header_2_0
                    )
                    shape, _, dtype = reader(handle)
                if dtype.hasobject:
                    raise UnsupportedFormatError(f"{name} holds Python objects (pickle): refused")
                if name == "packed.npy" and (
                    len(shape) != 4 or shape[1:] != (size, size, size // 8) or shape[0] > limit
                ):
                    raise InvalidDataError(
                        f"packed crops must be uint8 [N <= {limit}, {size}, {size}, {size // 8}], "
                        f"got {list(shape)}"
                    )
    except (zipfile.BadZipFile, ValueError, EOFError) as exc:
        raise UnsupportedFormatError(
            f"crops must be an .npz with 'packed' bits and 'count' ({exc})"
        ) from None


def unpack_crops(data: bytes, *, size: int, limit: int = MAX_CROPS_PER_REQUEST) -> np.ndarray:
    """Inverse of :func:`pack_crops`, with validation (a clear error for anything else)."""
    if not data.startswith(b"PK"):
        raise UnsupportedFormatError("crops must be an .npz archive (see discgeo.encoding.pack_crops)")
    _check_npz_headers(data, size=size, limit=limit)
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            packed, count = npz["packed"], int(npz["count"])
    except (ValueError, OSError, KeyError, zipfile.BadZipFile, EOFError) as exc:
        raise UnsupportedFormatError(
            f"crops must be an .npz with 'packed' bits and 'count' ({exc})"
        ) from None
    expected = (count, size, size, size // 8)
    if packed.dtype != np.uint8 or packed.shape != expected:
        raise InvalidDataError(
            f"packed crops must be uint8 {list(expected)}, got {packed.dtype} {list(packed.shape)}"
        )
    if count > limit:
        raise TooLargeError(f"{count} crops in one request; the limit is {limit}")
    return np.unpackbits(packed, axis=-1)


class Encoder:
    """The autoencoder's encoder and decoder, from an artifact folder (see :mod:`discgeo.artifacts`)."""

    def __init__(
        self,
        folder: Path,
        metadata: dict[str, Any],
        providers: Sequence[str] | None = None,
        threads: int | None = None,
    ) -> None:
        self.folder = folder
        self.metadata = metadata
        self.version = str(metadata["version"])
        self.crop_spec = CropSpec.from_metadata(metadata)
        self.unusual_below = _unusual_threshold(metadata)
        files = metadata["files"]
        self.encoder = open_session(folder / files["encoder"], providers, threads)
        self.decoder = open_session(folder / files["decoder"], providers, threads)
        self.latent_dim = int(metadata["latent_dim"])

    @classmethod
    def from_artifact(
        cls, path: str | Path, *, providers: Sequence[str] | None = None, threads: int | None = None
    ) -> Encoder:
        """Load and verify an encoder artifact folder (``metadata.json`` + ONNX files)."""
        from discgeo.artifacts import load_artifact

        folder, metadata = load_artifact(path, kind="autoencoder")
        return cls(folder, metadata, providers, threads)

    @classmethod
    def from_settings(cls, settings: Settings, artifact: str | Path | None = None) -> Encoder:
        """The configured encoder: ``artifact`` (default: the settings' autoencoder artifact) with the
        settings' ONNX providers and threads."""
        return cls.from_artifact(
            artifact or settings.artifact("autoencoder"),
            providers=settings.onnx_providers or None,
            threads=settings.onnx_threads,
        )

    def crop(self, labels: Volume) -> CropResult:
        """Crops of every disc of a label map, as this encoder was trained on them."""
        return disc_crops(labels, spec=self.crop_spec)

    @property
    def provider(self) -> str:
        """The ONNX Runtime execution provider in use."""
        return str(self.encoder.get_providers()[0])

    def encode(self, crops: np.ndarray, *, batch_size: int = 32) -> np.ndarray:
        """Latent codes [N, latent_dim] of binary crops [N, S, S, S] (or [N, 1, S, S, S])."""
        x = _as_batch(crops, self.crop_spec.size)
        out = [
            self.encoder.run(None, {"crops": x[i : i + batch_size]})[0] for i in range(0, len(x), batch_size)
        ]
        return np.concatenate(out) if out else np.zeros((0, self.latent_dim), np.float32)

    def decode(self, latents: np.ndarray, *, batch_size: int = 32) -> np.ndarray:
        """Occupancy probabilities [N, S, S, S] decoded from latents [N, latent_dim]."""
        z = np.ascontiguousarray(latents, dtype=np.float32)
        out = [
            self.decoder.run(None, {"latents": z[i : i + batch_size]})[0]
            for i in range(0, len(z), batch_size)
        ]
        size = self.crop_spec.size
        return np.concatenate(out)[:, 0] if out else np.zeros((0, size, size, size), np.float32)

    def encode_with_quality(self, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Latents and per-disc reconstruction IoU (low = a shape unlike the training data)."""
        latents = self.encode(crops)
        recon = self.decode(latents) >= 0.5
        return latents, iou(recon, _as_batch(crops, self.crop_spec.size)[:, 0] >= 0.5)

    def is_unusual(self, reconstruction_iou: float) -> bool:
        """True when a disc reconstructs worse than this artifact's ``unusual_shape`` threshold."""
        return self.unusual_below is not None and reconstruction_iou < self.unusual_below


def _unusual_threshold(metadata: dict[str, Any]) -> float | None:
    """The artifact's ``unusual_shape`` IoU threshold (None: the artifact defines none)."""
    entry = metadata.get("unusual_shape")
    return None if entry is None else float(entry["below_iou"])


def _as_batch(crops: np.ndarray, size: int) -> np.ndarray:
    x = np.asarray(crops)
    if x.ndim == 4:
        x = x[:, None]
    if x.ndim != 5 or x.shape[1:] != (1, size, size, size):
        raise InvalidDataError(
            f"crops must be [N, {size}, {size}, {size}] or [N, 1, {size}, {size}, {size}], "
            f"got {list(x.shape)}"
        )
    return np.ascontiguousarray(x, dtype=np.float32)
