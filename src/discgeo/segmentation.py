"""Disc segmentation with an exported SwinUNETR-V2, run by ONNX Runtime (no torch at inference).

``Segmenter.predict(volume)``:

1. canonical orientation (RAS+), intensities scaled to [0, 1] between the 0.5th and 99.5th
   percentile (contrast-agnostic enough for T1 and T2 with the training augmentations);
2. resampled (trilinear) to the model's spacing; for a 2D model only the sagittal plane is resampled
   and each sagittal slice is segmented on its own;
3. sliding-window inference with the model's fixed ROI, 25 % overlap and Gaussian weighting of the
   window centres, batched;
4. class probabilities resampled back to the original grid, each voxel given its most probable class
   (for a disc-only model: disc probability at least 0.5);
5. post-processing: connected components under ``min_fragment_mm3`` dropped and components much
   larger than the median disc split at their narrowest part (touching discs); then components under
   20 % of the typical disc (the median of the five largest: a lumbar view holds at least five discs)
   dropped, as are smaller ones more than 20 mm in front of or behind the column of discs; pieces at
   the same height merged (one disc segmented in parts); levels named (SPIDER labels 201+): from the
   vertebral chain anchored at the sacrum (:mod:`discgeo.spine`) when the model also segments
   vertebral bodies and the sacrum (``class_names`` in its metadata), else counted from the lowest
   disc.

The artifact's metadata states ``dims`` (2 or 3), ``spacing_mm`` (the training spacing), ``roi``,
``classes`` and the ONNX input/output names, and may name inference modes in ``inference_spacings_mm``
(``{"fast": [...], "accurate": [...]}``; without it, ``fast`` is the training spacing). Steps 2-4 run
once per spacing of the chosen mode and the probabilities are averaged before the threshold
(multi-scale inference: the model saw a +-15 % zoom range in training, and averaging scales places
boundaries more precisely, at the cost of more windows).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from discgeo import levels, spine
from discgeo.config import Settings
from discgeo.errors import InvalidDataError
from discgeo.runtime import open_session
from discgeo.volume import Volume

log = logging.getLogger(__name__)

DEFAULT_MIN_FRAGMENT_MM3 = 200.0
MAX_DISCS = 12  # a sagittal lumbar view holds 5-8 discs; more components are segmentation noise
RELATIVE_FRAGMENT = 0.2  # components under this fraction of the typical disc are dropped
TYPICAL_DISCS = 5  # the typical disc size is the median of this many largest components
MERGE_IN_PLANE_MM = 35.0  # pieces of one disc lie closer than this side by side (discs are 35-50 mm wide)
OFF_SPINE_MM = 20.0  # a smaller component this far in front of or behind the disc column is not a disc
# what a label map's metadata says about its segmentation: travels beside it between services, as
# JSON in the segmenter's response header
SEGMENTATION_META = ("dropped_fragments", "levels_from", "levels_uncertain", "level_notes")
SEGMENTATION_HEADER = "X-Discgeo-Segmentation"


def segmentation_header(labels: Volume) -> str:
    """The :data:`SEGMENTATION_META` of a label map as one line of ASCII JSON (an HTTP header)."""
    return json.dumps({key: labels.meta[key] for key in SEGMENTATION_META if key in labels.meta})


def with_segmentation_header(labels: Volume, header: str | None) -> Volume:
    """``labels`` with the metadata of a :func:`segmentation_header` (none when ``header`` is None)."""
    if header is None:
        return labels
    try:
        meta = json.loads(header)
    except json.JSONDecodeError as exc:
        raise InvalidDataError(f"{SEGMENTATION_HEADER} is not JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise InvalidDataError(f"{SEGMENTATION_HEADER} is not a JSON object")
    return labels.with_array(labels.array, **{k: meta[k] for k in SEGMENTATION_META if k in meta})


def normalise(array: np.ndarray) -> np.ndarray:
    """Scale intensities to [0, 1] between the 0.5th and 99.5th percentile of the non-zero voxels."""
    values = array[array > 0] if np.any(array > 0) else array.ravel()
    lo, hi = np.percentile(values, [0.5, 99.5])
    scale = hi - lo if hi > lo else 1.0
    return np.clip((array - lo) / scale, 0.0, 1.0).astype(np.float32)


def resample(
    array: np.ndarray, spacing: Sequence[float], target: Sequence[float | None], *, order: int = 1
) -> np.ndarray:
    """Resample along each axis to ``target`` spacing (None keeps that axis), aligned at voxel centres."""
    factors = [1.0 if t is None else s / t for s, t in zip(spacing, target, strict=True)]
    shape = [max(1, round(n * f)) for n, f in zip(array.shape, factors, strict=True)]
    return resize(array, shape, order=order)


def resize(array: np.ndarray, shape: Sequence[int], *, order: int = 1) -> np.ndarray:
    """Resize to ``shape`` mapping voxel centres onto each other (corner-aligned extents)."""
    if tuple(shape) == array.shape:
        return array
    coords = [(np.arange(n) + 0.5) * (old / n) - 0.5 for n, old in zip(shape, array.shape, strict=True)]
    grid = np.meshgrid(*coords, indexing="ij", sparse=False)
    return ndimage.map_coordinates(array, grid, order=order, mode="nearest", prefilter=False)


def binarise(fraction: np.ndarray) -> np.ndarray:
    """A resampled binary mask from its interpolated foreground fractions, with its volume kept.

    The voxels with the largest fractions are kept, as many as the fractions add up to. Thresholding at
    0.5 alone inflates a mask whenever samples fall halfway between source voxels (1 mm data cropped
    with a half-voxel offset, 0.5 mm data resampled to 1 mm): every boundary sample then ties at 0.5.
    Ties are broken by a ramp along the sum of the coordinates, so a tied boundary layer is kept on its
    far side and dropped on its near side (the mask moves by under a voxel, its surface stays smooth).
    """
    keep = round(float(fraction.sum()))
    out = np.zeros(fraction.shape, bool)
    if keep == 0:
        return out
    ramp = sum(
        np.arange(n, dtype=np.float32).reshape([-1 if a == i else 1 for a in range(fraction.ndim)])
        for i, n in enumerate(fraction.shape)
    )
    key = (fraction.astype(np.float32) + np.float32(1e-4 / sum(fraction.shape)) * ramp).ravel()
    out.ravel()[np.argpartition(key, key.size - keep)[key.size - keep :]] = True
    return out


def _gaussian(roi: Sequence[int]) -> np.ndarray:
    axes = [np.exp(-0.5 * ((np.arange(n) - (n - 1) / 2) / (n / 8)) ** 2) for n in roi]
    weight = axes[0]
    for axis in axes[1:]:
        weight = np.multiply.outer(weight, axis)
    return np.maximum(weight / weight.max(), 1e-3).astype(np.float32)


def _starts(size: int, roi: int, overlap: float) -> list[int]:
    if size <= roi:
        return [0]
    step = max(1, int(roi * (1 - overlap)))
    starts = [*list(range(0, size - roi, step)), size - roi]
    return sorted(set(starts))


def sliding_window(
    run: Any,
    image: np.ndarray,
    roi: Sequence[int],
    classes: int,
    *,
    overlap: float = 0.25,
    batch_size: int = 8,
) -> np.ndarray:
    """Class probabilities [classes, *image.shape] from a model on fixed ``roi`` windows.

    ``image`` is 2D or 3D; it is zero-padded up to the ROI where smaller. ``run`` maps a batch
    [B, 1, *roi] of float32 to logits [B, classes, *roi]. A 2D ``roi`` on a 3D ``image`` runs the
    model on every slice along the first axis, the windows of all slices batched together (same
    result as slice by slice, in fewer and fuller batches).
    """
    if len(roi) == image.ndim - 1:

        def run_slices(batch: np.ndarray) -> np.ndarray:  # [B, 1, 1, *roi] -> [B, classes, 1, *roi]
            return np.asarray(run(batch[:, :, 0]))[:, :, None]

        return sliding_window(run_slices, image, (1, *roi), classes, overlap=overlap, batch_size=batch_size)
    pad = [(0, max(0, r - n)) for n, r in zip(image.shape, roi, strict=True)]
    padded = np.pad(image, pad)
    weight = _gaussian(roi)
    total = np.zeros((classes, *padded.shape), np.float32)
    norm = np.zeros(padded.shape, np.float32)
    corners = np.stack(
        np.meshgrid(*[_starts(n, r, overlap) for n, r in zip(padded.shape, roi, strict=True)], indexing="ij"),
        axis=-1,
    ).reshape(-1, len(roi))
    for i in range(0, len(corners), batch_size):
        chunk = corners[i : i + batch_size]
        windows = [tuple(slice(c, c + r) for c, r in zip(corner, roi, strict=True)) for corner in chunk]
        batch = np.stack([padded[w] for w in windows])[:, None].astype(np.float32)
        logits = run(batch)
        logits = logits - logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        probs /= probs.sum(axis=1, keepdims=True)
        for w, p in zip(windows, probs, strict=True):
            total[(slice(None), *w)] += p * weight
            norm[w] += weight
    total /= norm
    crop = tuple(slice(0, n) for n in image.shape)
    return total[(slice(None), *crop)]


def split_touching(mask: np.ndarray, *, voxel_mm3: float, min_fragment_mm3: float) -> tuple[np.ndarray, int]:
    """Connected discs: drop small fragments, split components that hold two discs.

    A component over 1.5 times the median of the others is eroded until it falls into 2-4 substantial
    cores (two discs joined by a bridge), and every voxel goes to the nearest core; the split is kept
    only if every piece is at least half the median disc (a large wedged disc erodes into uneven
    parts). Returns a label array (1..n, unordered) and the number of dropped fragments. Work is done
    in each component's bounding box.
    """
    labelled, count = ndimage.label(mask)
    if count == 0:
        return labelled, 0
    sizes = np.bincount(labelled.ravel())[1:] * voxel_mm3
    keep = [i + 1 for i, size in enumerate(sizes) if size >= min_fragment_mm3]
    boxes = ndimage.find_objects(labelled)
    out = np.zeros(labelled.shape, np.int32)
    next_label = 1
    for k in keep:
        box = boxes[k - 1]
        assert box is not None
        component = labelled[box] == k
        others = [sizes[j - 1] for j in keep if j != k]
        reference = float(np.median(others)) if others else 0.0
        pieces = _split(component) if others and sizes[k - 1] > 1.5 * reference else None
        if pieces is not None:  # every piece must be disc-sized, or this was one big (e.g. wedged) disc
            piece_sizes = np.bincount(pieces.ravel())[1:] * voxel_mm3
            if piece_sizes.min() < 0.5 * reference:
                pieces = None
        if pieces is None:
            out[box][component] = next_label
            next_label += 1
            continue
        for value in range(1, int(pieces.max()) + 1):
            out[box][pieces == value] = next_label
            next_label += 1
    return out, count - len(keep)


def _split(component: np.ndarray) -> np.ndarray | None:
    """Split a component at its narrowest part: erode until it falls into 2-4 cores of at least 20 % of
    the remaining volume each, then give every voxel to the nearest core. None when no such split exists."""
    core = component
    for _ in range(6):
        core = ndimage.binary_erosion(core)
        cores, n = ndimage.label(core)
        if n == 0:
            return None
        if n >= 2:
            sizes = np.bincount(cores.ravel())[1:]
            big = np.flatnonzero(sizes >= 0.2 * sizes.sum()) + 1
            if not 2 <= len(big) <= 4:
                continue
            seeds = np.where(np.isin(cores, big), cores, 0)
            _, index = ndimage.distance_transform_edt(seeds == 0, return_indices=True)
            nearest = seeds[tuple(index)]
            relabel = np.zeros(int(nearest.max()) + 1, np.int32)
            relabel[big] = np.arange(1, len(big) + 1)
            return np.where(component, relabel[nearest], 0)
    return None


MIN_EXTENT_MM = 40.0  # anterior-posterior and superior-inferior field of view: less holds no lumbar disc


def check_image(volume: Volume) -> None:
    """Refuse what no segmentation can come from: complex voxels, a constant image, a field of view
    smaller than a lumbar disc and its neighbours (RAS+ volume)."""
    array = np.asarray(volume.array)
    if np.iscomplexobj(array) or array.dtype.kind not in "iuf":
        raise InvalidDataError(f"image voxels must be real numbers, got {array.dtype}")
    extent = [n * s for n, s in zip(volume.shape, volume.spacing, strict=True)]
    if min(extent[1], extent[2]) < MIN_EXTENT_MM:
        raise InvalidDataError(
            f"the image covers {extent[1]:.0f} x {extent[2]:.0f} mm (anterior-posterior x "
            f"superior-inferior); a lumbar spine needs at least {MIN_EXTENT_MM:.0f} mm in both"
        )
    if array.size and float(array.max()) == float(array.min()):
        raise InvalidDataError("the image is constant: there is nothing to segment")


class Segmenter:
    """A disc segmentation model from an artifact folder (metadata.json + ONNX)."""

    def __init__(
        self,
        folder: Path,
        metadata: dict[str, Any],
        providers: Sequence[str] | None = None,
        threads: int | None = None,
        mode: str = "fast",
    ) -> None:
        self.folder = folder
        self.metadata = metadata
        self.version = str(metadata["version"])
        self.dims = int(metadata["dims"])
        modes = metadata.get("inference_spacings_mm", {"fast": [metadata["spacing_mm"]]})
        if mode not in modes:
            from discgeo.errors import ConfigurationError

            raise ConfigurationError(
                f"segmenter {self.version} offers the inference modes {', '.join(modes)}, not {mode!r}"
            )
        self.mode = mode
        self.inference_spacings = [
            [None if s is None else float(s) for s in spacing] for spacing in modes[mode]
        ]
        self.roi = [int(r) for r in metadata["roi"]]
        self.classes = int(metadata["classes"])
        self.class_names = list(metadata.get("class_names", ["background", "disc"]))
        if len(self.class_names) != self.classes or self.class_names[:2] != ["background", "disc"]:
            raise InvalidDataError(
                f"segmenter {self.version}: classes {self.class_names} do not start with background, disc"
            )
        self.anatomy = {"vertebral_body", "sacrum"} <= set(self.class_names)
        self.session = open_session(folder / metadata["files"]["model"], providers, threads)
        self.input_name = self.session.get_inputs()[0].name

    @classmethod
    def from_artifact(
        cls,
        path: str | Path,
        *,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
        mode: str = "fast",
    ) -> Segmenter:
        """Load and verify a segmenter artifact folder; ``mode`` picks its inference spacings."""
        from discgeo.artifacts import load_artifact

        folder, metadata = load_artifact(path, kind="segmenter")
        return cls(folder, metadata, providers, threads, mode)

    @classmethod
    def from_settings(cls, settings: Settings, artifact: str | Path | None = None) -> Segmenter:
        """The configured segmenter: ``artifact`` (default: the settings' segmenter artifact) with the
        settings' ONNX providers, threads and inference mode."""
        return cls.from_artifact(
            artifact or settings.artifact("segmenter"),
            providers=settings.onnx_providers or None,
            threads=settings.onnx_threads,
            mode=settings.segmenter_mode,
        )

    @property
    def provider(self) -> str:
        """The ONNX Runtime execution provider in use."""
        return str(self.session.get_providers()[0])

    def _run(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(self.session.run(None, {self.input_name: batch})[0])

    def scale_probabilities(
        self, volume: Volume, spacings: Sequence[Sequence[float | None]]
    ) -> list[np.ndarray]:
        """The probabilities of the classes but background (``[classes - 1, *shape]``, disc first) of
        the model run at each of ``spacings``, each on the (canonical) grid of ``volume``."""
        image = normalise(np.asarray(volume.array, dtype=np.float32))
        found = []
        for spacing in spacings:
            target = (None, spacing[-2], spacing[-1]) if self.dims == 2 else tuple(spacing)
            work = resample(image, volume.spacing, target)
            probs = sliding_window(self._run, work, self.roi, self.classes)[1:]  # 2D: over the slices
            found.append(np.stack([resize(p, volume.shape, order=1) for p in probs]))
        return found

    def probabilities(self, volume: Volume) -> np.ndarray:
        """The classes' probabilities but background's on the (canonical) grid of ``volume``: the
        mean over the mode's inference spacings of the model run at that spacing."""
        return mean_probability(self.scale_probabilities(volume, self.inference_spacings))

    def disc_probability(self, volume: Volume) -> np.ndarray:
        """The disc probability on the (canonical) grid of ``volume`` (see :meth:`probabilities`)."""
        return self.probabilities(volume)[0]

    def predict(self, volume: Volume, *, min_fragment_mm3: float = DEFAULT_MIN_FRAGMENT_MM3) -> Volume:
        """Label map of the discs (SPIDER labels 201+, lowest = L5-S1) on the grid of ``volume``."""
        canonical = volume.canonical()
        check_image(canonical)
        return self.label_discs(canonical, self.probabilities(canonical), min_fragment_mm3=min_fragment_mm3)

    def label_discs(
        self,
        canonical: Volume,
        probabilities: np.ndarray,
        *,
        min_fragment_mm3: float = DEFAULT_MIN_FRAGMENT_MM3,
    ) -> Volume:
        """Steps 4-5 of :meth:`predict`: ``probabilities`` (:meth:`probabilities`, on the grid of the
        canonical volume ``canonical``) turned into the most probable class per voxel, the discs
        post-processed and labelled by level: from the vertebral chain (:mod:`discgeo.spine`) when the
        model finds vertebral bodies and the sacrum, else counted from the lowest disc.

        The label map's metadata says how: ``levels_from`` (``sacrum``, ``lowest body`` or ``lowest
        disc``), ``levels_uncertain`` and ``level_notes`` (:data:`SEGMENTATION_META`)."""
        if len(probabilities) == 1:  # disc only: the disc wins where its probability is at least 0.5
            winner, mask = None, probabilities[0] >= 0.5
        else:
            background = 1.0 - probabilities.sum(axis=0)
            winner = np.argmax(np.concatenate([background[None], probabilities]), axis=0)
            mask = winner == 1
        voxel_mm3 = float(np.prod(canonical.spacing))
        parts, dropped = split_touching(mask, voxel_mm3=voxel_mm3, min_fragment_mm3=min_fragment_mm3)
        sizes = np.bincount(parts.ravel())
        present = np.flatnonzero(sizes[1:]) + 1
        if len(present):  # a disc is never a small fraction of the typical disc: such pieces are noise
            typical = float(np.median(np.sort(sizes[present])[-TYPICAL_DISCS:]))
            present = present[sizes[present] >= RELATIVE_FRAGMENT * typical]
            present = _on_spine(parts, present, sizes[present] >= 0.5 * typical, canonical.affine)
        largest = present[np.argsort(sizes[present])[::-1][:MAX_DISCS]]
        dropped += int(np.count_nonzero(sizes[1:])) - len(largest)
        parts = merge_same_level(np.where(np.isin(parts, largest), parts, 0), canonical.affine)
        present, centres = _centres(parts, canonical.affine)
        meta: dict[str, Any] = {"levels_from": "lowest disc", "levels_uncertain": False, "level_notes": []}
        if self.anatomy and winner is not None:
            sizes = np.bincount(parts.ravel())
            chain = spine.place_discs(
                {int(v): c for v, c in zip(present, centres, strict=True)},
                {int(v): int(sizes[v]) for v in present},
                winner == self.class_names.index("vertebral_body"),
                winner == self.class_names.index("sacrum"),
                canonical.affine,
            )
            index = chain.index
            dropped += len(chain.rejected)
            meta = {
                "levels_from": "sacrum" if chain.anchored else "lowest body",
                "levels_uncertain": chain.uncertain,
                "level_notes": chain.notes,
            }
        else:
            order = [int(v) for v in present[np.argsort(centres[:, 2], kind="stable")]]
            index = {part: i for i, part in enumerate(order)}
        labels = np.zeros(canonical.shape, np.uint8)
        for part, level in index.items():
            labels[parts == part] = levels.disc_label(level)
        if dropped:
            log.info("dropped %d fragment(s) under %g mm3 or off the spine", dropped, min_fragment_mm3)
        return canonical.with_array(labels, segmenter=self.version, dropped_fragments=dropped, **meta)


def mean_probability(probabilities: Sequence[np.ndarray]) -> np.ndarray:
    """The mean of probability maps of one grid, summed in their order (multi-scale inference)."""
    total = np.zeros(probabilities[0].shape, np.float32)
    for probability in probabilities:
        total += probability
    return total / len(probabilities)


def merge_same_level(parts: np.ndarray, affine: np.ndarray, *, overlap: float = 0.5) -> np.ndarray:
    """Merge components that sit at the same level of the spine: discs are stacked along it, so two
    pieces whose extents along the spine's local axis overlap by more than ``overlap`` of the thinner
    one are one disc.

    The local axis of a pair is the normal (least-spread direction) of the disc-sized component
    nearest to them, which may be one of the two (disc-sized: at least half the median of the
    :data:`TYPICAL_DISCS` largest; a disc is a thin slab, so its normal is well defined); with none,
    the superior axis. A disc split into front and back pieces at the lumbosacral junction, tilted by
    30 degrees or more, overlaps itself along its neighbour's normal but not along the superior axis;
    two adjacent discs overlap along neither. Pieces whose centres lie more than
    :data:`MERGE_IN_PLANE_MM` apart across the axis are never merged (a vessel in front of a disc)."""
    values = _present(parts)
    if len(values) < 2:
        return parts
    index = np.nonzero(parts)
    points = np.stack(index, axis=1) @ affine[:3, :3].T + affine[:3, 3]
    owner = parts[index]
    members = {v: points[owner == v] for v in values}
    centres = {v: m.mean(axis=0) for v, m in members.items()}
    sizes = {v: len(m) for v, m in members.items()}
    typical = float(np.median(sorted(sizes.values())[-TYPICAL_DISCS:]))
    normals = {}
    for v in values:
        if sizes[v] >= 0.5 * typical and sizes[v] >= 10:
            centred = members[v] - centres[v]
            normal = np.linalg.eigh(centred.T @ centred)[1][:, 0]
            normals[v] = normal if normal[2] >= 0 else -normal
    half_voxel = 0.5 * np.linalg.norm(affine[:3, :3], axis=0)
    target = {v: v for v in values}

    def root(v: int) -> int:
        while target[v] != v:
            v = target[v]
        return v

    for i, a in enumerate(values):
        for b in values[i + 1 :]:
            middle = (centres[a] + centres[b]) / 2
            nearest = min(normals, key=lambda v: float(np.linalg.norm(centres[v] - middle)), default=None)
            axis = normals[nearest] if nearest is not None else np.array([0.0, 0.0, 1.0])
            apart = centres[a] - centres[b]
            if np.linalg.norm(apart - (apart @ axis) * axis) > MERGE_IN_PLANE_MM:
                continue  # side by side further than a disc is wide: a fragment beside a disc
            pad = float(half_voxel @ np.abs(axis))  # a voxel's half-extent along the axis
            (a0, a1), (b0, b1) = (
                (float(p.min()) - pad, float(p.max()) + pad) for p in (members[a] @ axis, members[b] @ axis)
            )
            shared = min(a1, b1) - max(a0, b0)
            thinner = max(min(a1 - a0, b1 - b0), 1e-6)
            if shared > overlap * thinner:
                target[root(b)] = root(a)
    if all(root(v) == v for v in values):
        return parts
    lookup = np.zeros(int(parts.max()) + 1, dtype=parts.dtype)
    for v in values:
        lookup[v] = root(v)
    return lookup[parts]


def _present(parts: np.ndarray) -> list[int]:
    """The non-zero labels present in ``parts`` (a bincount: far faster than np.unique on a volume)."""
    return [int(v) for v in np.flatnonzero(np.bincount(parts.ravel())[1:]) + 1]


def _centres(parts: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The labels present and the world (RAS+ mm) centre of mass of each."""
    index = np.nonzero(parts)  # discs are ~1 % of the voxels: work on those only
    values = parts[index]
    counts = np.bincount(values)
    present = np.flatnonzero(counts)  # label 0 never counted: only non-zero voxels were taken
    voxel = np.stack([np.bincount(values, weights=i)[present] for i in index], axis=1) / counts[present, None]
    return present, voxel @ affine[:3, :3].T + affine[:3, 3]


def _on_spine(
    parts: np.ndarray, candidates: np.ndarray, disc_sized: np.ndarray, affine: np.ndarray
) -> np.ndarray:
    """Drop smaller components lying off the column of discs.

    A line AP = f(SI) is fitted through the centres of the disc-sized components (``disc_sized``, at
    least three); a smaller component whose centre is more than :data:`OFF_SPINE_MM` in front of or
    behind it (a sacral or vascular fragment) is dropped. A line, not a curve: it extrapolates safely to
    a partly visible disc at either end of the view."""
    if disc_sized.sum() < 3 or disc_sized.all():
        return candidates
    labels, centres = _centres(parts, affine)
    points = centres[np.searchsorted(labels, candidates)]
    slope, intercept = np.polyfit(points[disc_sized, 2], points[disc_sized, 1], 1)
    offset = np.abs(points[:, 1] - (slope * points[:, 2] + intercept))
    return candidates[disc_sized | (offset <= OFF_SPINE_MM)]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks (1.0 when both are empty)."""
    total = np.count_nonzero(a) + np.count_nonzero(b)
    return float(2 * np.count_nonzero(a & b) / total) if total else 1.0


def dice_per_level(pred: Volume, truth: Volume) -> list[dict[str, Any]]:
    """Dice and IoU per disc level (levels from each map's own disc identification)."""
    from discgeo.geometry import find_discs

    def by_level(vol: Volume) -> dict[str, np.ndarray]:
        canonical = vol.canonical()
        array = np.asarray(canonical.array).astype(np.int32)
        discs, _, _ = find_discs(array, canonical.affine)
        full = {}
        for disc in discs:
            mask = np.zeros(array.shape, bool)
            offset = np.rint(np.linalg.solve(canonical.affine, disc.affine)[:3, 3]).astype(int)
            box = tuple(slice(o, o + n) for o, n in zip(offset, disc.mask.shape, strict=True))
            mask[box] = disc.mask
            full[disc.level] = mask
        return full

    if pred.shape != truth.shape or not np.allclose(
        pred.canonical().affine, truth.canonical().affine, atol=1e-3
    ):
        from discgeo.errors import InvalidDataError

        raise InvalidDataError("prediction and ground truth must share one voxel grid")
    p, t = by_level(pred), by_level(truth)
    rows = []
    for level in sorted(set(p) | set(t), key=lambda name: levels.level_from_name(name) or 0):
        a = p.get(level, np.zeros(pred.shape, bool))
        b = t.get(level, np.zeros(pred.shape, bool))
        union = np.count_nonzero(a | b)
        rows.append(
            {
                "level": level,
                "dice": dice(a, b),
                "iou": float(np.count_nonzero(a & b) / union) if union else 1.0,
                "predicted": level in p,
                "reference": level in t,
            }
        )
    return rows
