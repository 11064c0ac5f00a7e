"""Train the SwinUNETR-V2 disc segmenter (MONAI), export it to ONNX, write the artifact.

    python -m training.segmenter data   --out build/seg-data --phantoms 60 [--spider /path/to/SPIDER]
                                        [--workers N]   (phantoms made in N processes)
                                        [--vb-mri]   (the training half of vb-mri, partial labels)
    python -m training.segmenter train  --data build/seg-data --run build/seg-run [--config cpu|wide|gpu]
                                        [--real-weight 5] [--exclude case-NN] [--precision auto|bf16|fp32]
                                        [--epochs N] [--lr RATE]   (resume with a lower --lr: step decay)
                                        [--snapshots-from EPOCH]   (keep RUN/epoch-NNN.pt from then on)
                                        [--workers N]   (augmentation in N processes: needed on a GPU)
                                        [--init-from ARTIFACT]   (a new run from an exported model)
    python -m training.segmenter average --checkpoints RUN/epoch-071.pt ... --out build/seg-avg
    python -m training.segmenter compare --runs build/seg-run build/seg-avg [--scales 1.0 0.85,0.95]
                                        (tuning phantoms, seed 4242; --scales: inference spacings to try)
    python -m training.segmenter export --run build/seg-run --out models/segmenter
    python -m training.segmenter loo    --runs build/seg-loo-case-11 build/seg-loo-case-20 \
                                               build/seg-loo-case-25 [--artifact models/segmenter]

Configurations
--------------
``cpu`` (default): 2D SwinUNETR-V2, feature_size 12, on sagittal slices resampled to 1.0 mm in-plane,
random 128 x 128 patches. A 2D model sees every sagittal slice as an independent image, which on two
CPU cores trains about an order of magnitude more patches per second than 3D windows; slice
thickness of lumbar protocols (3-4.5 mm) carries little through-plane context anyway.
``anatomy``: the ``cpu`` network with four classes (background, disc, vertebral body, sacrum).
``wide``: the ``cpu`` configuration at feature_size 24 (7.2 M parameters, ~29 MB; about 4x the
compute): for training on a GPU and serving on CPU; it reads data prepared for ``cpu``.
``gpu``: 3D SwinUNETR-V2, feature_size 48 (the reference study's), 1.0 mm isotropic, 96^3 patches;
72.8 M parameters, a ~290 MB ONNX file: too large to ship in ``models/`` (kept under
:data:`SHIPPED_LIMIT_MB`), so ``make train-segmenter CONFIG=gpu`` exports it to ``build/segmenter-gpu``.
Data are prepared for one configuration's spacing (``data --config``); ``train`` refuses data of
another spacing or a checkpoint of another configuration.

Data: phantom studies (T1- and T2-like, generated here), the real shared T2 cases (manual disc
masks; ``--exclude case-NN`` leaves one out for leave-one-case-out testing) and, with ``--spider``,
the SPIDER layout (images/*.mha, masks/*.mha, discs = labels 201+) and, with ``--vb-mri``, vertebral-
body masks turned into partial disc labels (:func:`vertebra_partial_labels`; unknown voxels are left
out of the loss, :func:`dice_ce_loss`). Two classes, background and disc, except in the ``anatomy``
configuration: background, disc, vertebral body and sacrum (phantoms label all four; the real T2 cases
their discs, "not disc" elsewhere; ``vb-mri`` its bodies and the partial disc labels), for levels
named from the vertebral chain (:mod:`discgeo.spine`).
Augmentation (MONAI): intensity scale/shift, bias field, Gaussian noise, contrast inversion, small
rotations and zoom (spacing), flips across the lateral axis (3D). Seeded; checkpoints every epoch
(``RUN/last.pt``, ``RUN/best.pt``), resumable; per-epoch loss, validation Dice and learning rate in
``RUN/log.jsonl``. The shipped model (``cpu`` configuration): 16 epochs at 3e-4, resumed to 32 at 1e-4 and
to 40 at 3e-5, warm restarts to 64 at 1e-4 and 80 at 3e-5 (on CPU) and to 87 at 1e-4 and 94 at 3e-5
(on a GPU), the weights of epochs 88-94 averaged (``make train-segmenter``).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import itertools
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from discgeo import realdata
from discgeo.config import SEGMENTER_MODES
from discgeo.segmentation import binarise, dice, normalise, resample, sliding_window
from training.torchrun import autocast, device, lr_schedule, resolve_precision, save_checkpoint, set_lr

ROOT = Path(__file__).resolve().parents[1]
SHARED = realdata.ivd_t2_dir()
REAL_CASES = realdata.REAL_CASES
SAMPLES_PER_ITEM = 4  # patches cropped from each training slice (2D) or volume (3D)
SHIPPED_LIMIT_MB = 40  # models/segmenter stays this small (the 3D feature-size-48 model is ~290 MB)
CONFIGS: dict[str, dict[str, Any]] = {
    "cpu": {
        "dims": 2,
        "feature_size": 12,
        "roi": (128, 128),
        "spacing": (None, 1.0, 1.0),
        # inference modes: fast = the training spacing; accurate = four scales from the training spacing
        # down to 0.85 mm averaged (chosen on the tuning phantoms, training/results/segmenter-scales.md;
        # 31 windows per 221 mm slice against fast's 4)
        "inference_spacings": {
            "fast": ((None, 1.0, 1.0),),
            "accurate": tuple((None, mm, mm) for mm in (0.85, 0.9, 0.95, 1.0)),
        },
        "batch": 16,
        "lr": 3e-4,
        "classes": ("background", "disc"),
    },
    "gpu": {
        "dims": 3,
        "feature_size": 48,
        "roi": (96, 96, 96),
        "spacing": (1.0, 1.0, 1.0),
        "inference_spacings": {"fast": ((1.0, 1.0, 1.0),)},
        "batch": 2,
        "lr": 1e-4,
        "classes": ("background", "disc"),
    },
}


# the 2D network at twice the width (7.2 M parameters, ~29 MB, ~4x the compute): trained on a GPU,
# served on CPU; it reads data prepared for ``cpu`` (same spacing)
CONFIGS["wide"] = {**CONFIGS["cpu"], "feature_size": 24}
# the 2D network predicting vertebral bodies and the sacrum beside the discs (the levels are then
# named from the vertebral chain, :mod:`discgeo.spine`); its data carry those classes
CONFIGS["anatomy"] = {
    **CONFIGS["cpu"],
    "classes": ("background", "disc", "vertebral_body", "sacrum"),
    "batch_dice": True,  # the sacrum is in few patches (see dice_ce_loss)
}


def build_model(config: dict[str, Any]) -> torch.nn.Module:
    from monai.networks.nets import SwinUNETR

    return SwinUNETR(
        in_channels=1,
        out_channels=len(config["classes"]),
        feature_size=config["feature_size"],
        use_v2=True,
        spatial_dims=config["dims"],
    )


# -------------------------------------------------------------------------------------------- data
# Training targets: a class index (0 background, 1 disc, 2 vertebral body, 3 sacrum; the first
# ``len(config["classes"])``) or a set of classes the voxel may belong to (partial labels): the loss
# (:func:`dice_ce_loss`) scores the probability of the set.
DISC, BODY, SACRUM = 1, 2, 3
NOT_DISC = 254  # any class but disc (a real case whose discs alone are labelled)
IGNORE = 255  # unknown: no loss there
TARGET_CODES = {"not_disc": NOT_DISC, "ignore": IGNORE}  # recorded with the data; train checks them


def prepare(
    image: np.ndarray, targets: np.ndarray, spacing: tuple[float, ...], config: dict[str, Any]
) -> tuple[np.ndarray, np.ndarray]:
    """A training volume at the configuration's spacing: the image normalised (float16) and its
    targets (uint8, see :data:`DISC`): the disc resampled with its volume kept, the other classes where
    more than half of a voxel is theirs, sets of classes by the nearest voxel."""
    target = config["spacing"]
    x = resample(normalise(image), spacing, target)
    y = resample(targets, spacing, target, order=0)
    for cls in range(BODY, len(config["classes"])):
        y[resample((targets == cls).astype(np.float32), spacing, target) >= 0.5] = cls
    disc = binarise(resample((targets == DISC).astype(np.float32), spacing, target))  # volume kept
    y[(y == DISC) & ~disc] = NOT_DISC if len(config["classes"]) > 2 else 0
    y[disc] = DISC
    return x.astype(np.float16), y.astype(np.uint8)


def anatomy_targets(labels: np.ndarray, bodies: np.ndarray | None, config: dict[str, Any]) -> np.ndarray:
    """Targets of a fully labelled image (SPIDER-labelled ``labels``; ``bodies`` the vertebral bodies
    and sacrum, :attr:`discgeo.phantom.PhantomCase.bodies`) for the configuration's classes; with no
    ``bodies`` the discs alone are known (:data:`NOT_DISC` elsewhere when the model has more classes)."""
    from discgeo import levels

    anatomy = len(config["classes"]) > 2
    y = np.full(labels.shape, NOT_DISC if anatomy and bodies is None else 0, np.uint8)
    if anatomy and bodies is not None:
        y[(bodies > 0) & (bodies != levels.SACRUM_LABEL)] = BODY
        y[bodies == levels.SACRUM_LABEL] = SACRUM
    y[labels > levels.DISC_LABEL_BASE] = DISC
    return y


BULGE_MM = 3.0  # around a pseudo-labelled disc: its rim may bulge past the bodies, left unknown
SACRUM_MARGIN_MM = 30.0  # below the lowest labelled body: the L5-S1 disc may reach this far down
MAX_DISC_GAP_MM = 20.0  # a gap between two bodies taller than this along S is not a disc space


def vertebra_partial_labels(
    bodies: np.ndarray, spacing: tuple[float, float, float], *, anatomy: bool = False
) -> np.ndarray:
    """Disc training labels (0 background, 1 disc, :data:`IGNORE` unknown) from vertebral-body masks
    alone (RAS+ voxel order, axis 2 superior; bodies labelled 1 = lowest, counting upward), for
    healthy spines. Between two adjacent bodies the disc fills the disc space: in each column along S
    that meets both, the voxels between the lower body's top and the upper body's bottom are disc
    (where that gap is at most :data:`MAX_DISC_GAP_MM`). Unknown: a :data:`BULGE_MM` rim around those
    discs; the L5-S1 region, which has no labelled body below it: every voxel outside a body from
    :data:`SACRUM_MARGIN_MM` under the lowest body up to the highest point of its lower surface (plus
    the rim: a tilted L5-S1 disc rises above the lowest point of that surface); and everything above
    the lowest point of the highest body's lower surface (the next disc up). Background: every body
    voxel, the rest of the spine between the labelled bodies, and the sacrum and pelvis further down:
    no lumbar disc lies there. With ``anatomy`` (a model of vertebral bodies and the sacrum too) the
    bodies are :data:`BODY` and the sacrum and pelvis :data:`NOT_DISC`."""
    present = sorted(int(v) for v in np.unique(bodies) if v > 0)
    if len(present) < 2:
        raise ValueError("vertebral-body partial labels need at least two labelled bodies")
    s_index = np.arange(bodies.shape[2])
    disc = np.zeros(bodies.shape, bool)
    for lower, upper in itertools.pairwise(present):
        if upper != lower + 1:
            continue
        low, up = bodies == lower, bodies == upper
        top = np.where(low.any(axis=2), bodies.shape[2] - 1 - np.argmax(low[:, :, ::-1], axis=2), -1)
        bottom = np.where(up.any(axis=2), np.argmax(up, axis=2), -1)
        gap = (bottom - top - 1) * spacing[2]
        column = (top >= 0) & (bottom >= 0) & (gap > 0) & (gap <= MAX_DISC_GAP_MM)
        disc |= column[:, :, None] & (s_index > top[:, :, None]) & (s_index < bottom[:, :, None])
    is_body = bodies > 0
    disc &= ~is_body
    out = np.zeros(bodies.shape, np.uint8)
    radius = [max(1, round(BULGE_MM / mm)) for mm in spacing]
    rim = ndimage.binary_dilation(disc, structure=np.ones([2 * r + 1 for r in radius], bool))
    out[rim & ~is_body] = IGNORE
    lowest = bodies == present[0]
    lowest_bottom = np.where(lowest.any(axis=2), np.argmax(lowest, axis=2), -1)
    below = max(0, int(lowest_bottom[lowest_bottom >= 0].min()) - round(SACRUM_MARGIN_MM / spacing[2]))
    # up to the highest point of the lowest body's lower surface (and a rim): a tilted L5-S1 disc
    # reaches above the lowest point of that surface
    up_to = int(lowest_bottom.max()) + radius[2] + 1
    highest = bodies == present[-1]
    highest_bottom = np.where(highest.any(axis=2), np.argmax(highest, axis=2), bodies.shape[2])
    above = int(highest_bottom.min())  # the lowest point of the highest body's lower surface
    out[:, :, below:up_to][~is_body[:, :, below:up_to]] = IGNORE
    out[:, :, above:][~is_body[:, :, above:]] = IGNORE
    out[disc] = DISC
    if anatomy:
        out[:, :, :below][~is_body[:, :, :below]] = NOT_DISC
        out[is_body] = BODY
    return out


def _write_phantom(out: Path, seed: int, config_name: str, case: int) -> dict[str, str]:
    from discgeo.phantom import make_case

    c = make_case(seed, case)
    config = CONFIGS[config_name]
    targets = anatomy_targets(c.labels.array, None if c.bodies is None else c.bodies.array, config)
    x, y = prepare(c.image.array, targets, c.image.spacing, config)
    name = f"phantom-{seed}-{case}"
    np.savez_compressed(out / f"{name}.npz", image=x, labels=y)
    return {"name": name, "source": "phantom", "contrast": c.truth["contrast"]}


def write_spider_series(
    out: Path, image_path: Path, mask_path: Path, config: dict[str, Any], *, reuse: bool = False
) -> dict[str, str]:
    """Cache one SPIDER series (discs = labels 201+) at the configuration's spacing as
    ``OUT/spider-<series>.npz`` (kept as it is with ``reuse`` when it exists); its index entry."""
    from discgeo.io import read_labels, read_volume

    name = f"spider-{mask_path.stem}"
    if not (reuse and (out / f"{name}.npz").exists()):
        image = read_volume(image_path)
        labels = read_labels(mask_path)
        x, y = prepare(image.array, anatomy_targets(labels.array, None, config), image.spacing, config)
        np.savez_compressed(out / f"{name}.npz", image=x, labels=y)
    return {"name": name, "source": "spider"}


def vb_mri_split() -> tuple[list[str], list[str]]:
    """The ``vb-mri`` volumes (one subject each) trained on and held out: within each source, in name
    order, every second volume is held out (VB2: 5 train / 4 held out; VB3: 13 / 12)."""
    train, held = [], []
    for source in ("VB2", "VB3"):
        names = realdata.vb_mri_volumes(source)
        train += names[0::2]
        held += names[1::2]
    return train, held


def write_vb_mri_volume(out: Path, name: str, config: dict[str, Any]) -> dict[str, str]:
    """Cache one ``vb-mri`` volume with the partial disc labels of its vertebral bodies
    (:func:`vertebra_partial_labels`) at the configuration's spacing as ``OUT/vb-<name>.npz``."""
    from discgeo.io import read_labels, read_volume

    image = read_volume(realdata.vb_mri_dir() / f"{name}.nii.gz")
    bodies = read_labels(realdata.vb_mri_dir() / f"{name}_vertebrae.nii.gz")
    labels = vertebra_partial_labels(
        np.asarray(bodies.array), bodies.spacing, anatomy=len(config["classes"]) > 2
    )
    x = resample(normalise(image.array), image.spacing, config["spacing"])
    y = resample(labels, image.spacing, config["spacing"], order=0)  # nearest: the classes stay
    np.savez_compressed(out / f"vb-{name}.npz", image=x.astype(np.float16), labels=y.astype(np.uint8))
    return {"name": f"vb-{name}", "source": "vb-mri"}


def build_data(
    out: Path,
    *,
    phantoms: int,
    seed: int,
    config_name: str,
    spider: Path | None,
    workers: int = 1,
    vb_mri: bool = False,
) -> dict[str, Any]:
    """Cache training volumes at the model's spacing: phantoms (``workers`` processes), the real T2
    cases, with ``vb_mri`` the training half of ``vb-mri`` with partial labels, and optionally SPIDER."""
    from tqdm import tqdm

    from discgeo.io import read_labels, read_volume

    config = CONFIGS[config_name]
    out.mkdir(parents=True, exist_ok=True)
    write = functools.partial(_write_phantom, out, seed, config_name)
    with concurrent.futures.ProcessPoolExecutor(max(1, workers)) as pool:
        index = list(tqdm(pool.map(write, range(phantoms)), total=phantoms, desc="phantoms", unit="case"))
    for case in REAL_CASES:
        image = read_volume(SHARED / f"{case}.nii.gz")
        labels = realdata.as_spider_labels(read_labels(SHARED / f"{case}_discs.nii.gz"))
        x, y = prepare(image.array, anatomy_targets(labels.array, None, config), image.spacing, config)
        np.savez_compressed(out / f"{case}.npz", image=x, labels=y)
        index.append({"name": case, "source": "real-t2"})
    for name in tqdm(vb_mri_split()[0] if vb_mri else [], desc="vb-mri", unit="volume"):
        index.append(write_vb_mri_volume(out, name, config))
    if spider is not None:
        masks = sorted((spider / "masks").glob("*.mha"))
        pairs = [(m, spider / "images" / m.name) for m in masks if (spider / "images" / m.name).is_file()]
        if not pairs:
            raise SystemExit(f"{spider}: no masks/*.mha with a matching images/*.mha (SPIDER layout)")
        if len(pairs) < len(masks):
            unpaired = sorted({m.name for m in masks} - {m.name for m, _ in pairs})
            print(f"SPIDER: {len(unpaired)} of {len(masks)} masks have no image, left out: {unpaired[:5]}")
        for mask_path, image_path in tqdm(pairs, desc="SPIDER", unit="series"):
            index.append(write_spider_series(out, image_path, mask_path, config))
    summary = {"config": config_name, "seed": seed, "target_codes": TARGET_CODES, "cases": index}
    (out / "index.json").write_text(json.dumps(summary, indent=1))
    return summary


def _load(data: Path, names: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    out = []
    for name in names:
        with np.load(data / f"{name}.npz") as npz:
            out.append((npz["image"].astype(np.float32), npz["labels"]))
    return out


def _split(index: dict[str, Any], exclude: list[str], seed: int) -> tuple[list[str], list[str]]:
    """Training and validation names: a tenth of the phantoms (at least 2) validate, or of the SPIDER
    series when there are no phantoms (``training.reproduce``: SPIDER's training subset alone)."""
    names = [c["name"] for c in index["cases"] if c["name"] not in exclude]
    source = {c["name"]: c["source"] for c in index["cases"]}
    pool = [n for n in names if source[n] == "phantom"] or [n for n in names if source[n] == "spider"]
    rng = np.random.default_rng(seed)
    validation = sorted(rng.choice(pool, size=max(2, len(pool) // 10), replace=False).tolist())
    return [n for n in names if n not in validation], validation


def _invert(image: Any) -> Any:
    """Contrast inversion of a [0, 1] image (a module-level function: worker processes pickle it)."""
    return 1.0 - image


def _seed(*keys: int) -> int:
    """A 32-bit seed drawn from several integers (run seed, epoch...)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


def _transforms(config: dict[str, Any], seed: int) -> Any:
    from monai import transforms as T  # noqa: N812

    roi = config["roi"]
    keys = ["image", "label"]
    pipeline = [
        T.RandCropByPosNegLabeld(
            keys,
            label_key="foreground",  # patches centred on a labelled structure (not on unknown voxels)
            spatial_size=roi,
            pos=2,
            neg=1,
            num_samples=SAMPLES_PER_ITEM,
            allow_smaller=True,
        ),
        T.DeleteItemsd("foreground"),
        T.SpatialPadd(keys, spatial_size=roi),
        T.RandAffined(
            keys,
            prob=0.5,
            rotate_range=[0.17] * (1 if config["dims"] == 2 else 3),
            scale_range=[0.15] * config["dims"],
            mode=("bilinear", "nearest"),
            padding_mode="zeros",
        ),
        T.RandScaleIntensityd("image", factors=0.2, prob=0.5),
        T.RandShiftIntensityd("image", offsets=0.1, prob=0.5),
        T.RandBiasFieldd("image", prob=0.3, coeff_range=(0.0, 0.3)),
        T.RandGaussianNoised("image", prob=0.3, std=0.05),
        T.RandLambdad("image", func=_invert, prob=0.3),  # contrast inversion (T1 <-> T2-like)
    ]
    if config["dims"] == 3:
        pipeline.append(T.RandFlipd(keys, prob=0.5, spatial_axis=0))  # left-right
    compose = T.Compose(pipeline)
    compose.set_random_state(seed=seed)
    return compose


def _samples(
    volumes: list[tuple[np.ndarray, np.ndarray]],
    dims: int,
    rng: np.random.Generator,
    repeats: list[int],
) -> list[dict[str, np.ndarray]]:
    """One epoch's items: 2D sagittal slices (with some disc) or whole 3D volumes, channel first;
    volume ``i`` contributes its items ``repeats[i]`` times (oversampling the few real cases)."""
    items = []
    for (image, labels), repeat in zip(volumes, repeats, strict=True):
        if dims == 3:
            items += [
                {"image": image[None], "label": labels[None], "foreground": _foreground(labels)[None]}
            ] * repeat
            continue
        with_disc = np.flatnonzero((labels.reshape(labels.shape[0], -1) == DISC).any(axis=1))
        without = np.setdiff1d(np.arange(labels.shape[0]), with_disc)
        chosen = list(with_disc) + list(rng.choice(without, size=min(len(without), 2), replace=False))
        items += [
            {"image": image[i][None], "label": labels[i][None], "foreground": _foreground(labels[i])[None]}
            for i in chosen
        ] * repeat
    order = rng.permutation(len(items))
    return [items[i] for i in order]


def _foreground(labels: np.ndarray) -> np.ndarray:
    """The voxels of a known structure (disc, body, sacrum: a class index above background)."""
    return ((labels >= DISC) & (labels < NOT_DISC)).astype(np.uint8)


def _batches(
    items: list[dict[str, np.ndarray]], transforms: Any, size: int, workers: int, seed: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Augmented training batches of whole items, each cropped into ``SAMPLES_PER_ITEM`` patches:
    ``size`` patches per batch, at least one item (the 3D configuration's batch of 2 takes 4).

    ``workers`` = 0 augments in this process (the CPU recipe); more runs MONAI's DataLoader, whose
    workers reseed the random transforms from ``seed`` and their number, so that augmentation keeps
    a GPU busy."""
    per_batch = max(1, size // SAMPLES_PER_ITEM)
    if workers == 0:
        for i in range(0, len(items) - per_batch + 1, per_batch):
            patches = [patch for item in items[i : i + per_batch] for patch in transforms(item)]
            yield {k: torch.stack([torch.as_tensor(p[k]) for p in patches]) for k in ("image", "label")}
        return
    from monai.data import DataLoader, Dataset

    yield from DataLoader(
        Dataset(items, transforms),
        batch_size=per_batch,
        num_workers=workers,
        drop_last=True,
        pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(seed),
    )


def allowed_classes(target: torch.Tensor, classes: int) -> torch.Tensor:
    """``[B, classes, ...]`` booleans: the classes each voxel's target (``[B, ...]``, see :data:`DISC`)
    allows; one for a class index, several for :data:`NOT_DISC`, all for :data:`IGNORE`."""
    table = torch.zeros(256, classes, dtype=torch.bool, device=target.device)
    table[torch.arange(classes), torch.arange(classes)] = True
    table[NOT_DISC] = True
    table[NOT_DISC, DISC] = False
    table[IGNORE] = True
    return table[target].movedim(-1, 1)


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor, *, batch: bool = False) -> torch.Tensor:
    """MONAI's ``DiceCELoss(to_onehot_y=True, softmax=True)`` (soft Dice per sample and class, every
    class, plus mean cross-entropy) for partial labels; with every voxel's class known it is that loss
    exactly (tested).

    A voxel whose target is a set of classes (:data:`NOT_DISC`) adds the cross-entropy of the set's
    total probability (the marginal loss of partially labelled segmentation) and counts in the Dice of
    the classes it excludes (a known negative), not of those it allows; :data:`IGNORE` voxels add
    nothing. With ``batch`` the Dice pools the batch's patches, as MONAI's ``batch=True``: a class
    absent from most patches (the sacrum) is then not pushed to zero in each patch without it."""
    target = target[:, 0].long()
    classes = logits.shape[1]
    allowed = allowed_classes(target, classes)
    informative = (allowed.sum(1) < classes).float()
    log_p = torch.log_softmax(logits, dim=1)
    ce = -torch.logsumexp(log_p.masked_fill(~allowed, -1e4), dim=1)
    ce = (ce * informative).sum() / informative.sum().clamp_min(1.0)
    probability = log_p.exp()
    positive = (allowed & (allowed.sum(1, keepdim=True) == 1)).float()
    known = positive + (~allowed).float()
    axes = (0, *range(2, logits.ndim)) if batch else tuple(range(2, logits.ndim))
    intersection = (probability * positive).sum(axes)
    total = (probability * known).sum(axes) + positive.sum(axes)
    smooth = 1e-5
    dice_loss = 1.0 - (2.0 * intersection + smooth) / (total + smooth)
    return dice_loss.mean() + ce


def weights_from_onnx(model: torch.nn.Module, path: Path) -> None:
    """Load a ``cpu``/``wide`` SwinUNETR-V2 exported by :func:`export_onnx` back into ``model``.

    The dynamo exporter keeps most parameters under their names; it stores each linear layer's weight
    transposed under a generated name (found as the MatMul before the Add of the layer's named bias, or
    after the patch-merging norm for the bias-free reduction) and each attention block's relative
    position bias gathered through the block's index (``[1, heads, 49, 49]`` or ``[49 * 49, heads]``,
    in the order of the blocks in the graph). Every table row occurs in the index, so the tables are
    recovered exactly. Raises ValueError when the graph does not fit the model."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    stored = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    first_use: dict[str, int] = {}
    for i, node in enumerate(graph.node):
        for name in node.input:
            consumers.setdefault(name, []).append(node)
            first_use.setdefault(name, i)
    passing = ("Reshape", "Transpose")

    def upstream_matmul(tensor: str) -> np.ndarray | None:
        node = producer.get(tensor)
        while node is not None and node.op_type in passing:
            node = producer.get(node.input[0])
        ok = node is not None and node.op_type == "MatMul" and node.input[1] in stored
        return stored[node.input[1]] if ok else None

    def downstream_matmul(tensor: str) -> np.ndarray | None:
        nodes = consumers.get(tensor, [])
        while len(nodes) == 1 and nodes[0].op_type in passing:
            nodes = consumers.get(nodes[0].output[0], [])
        ok = len(nodes) == 1 and nodes[0].op_type == "MatMul" and nodes[0].input[1] in stored
        return stored[nodes[0].input[1]] if ok else None

    state = model.state_dict()
    weights: dict[str, np.ndarray] = {}
    tables = [k for k in state if k.endswith("relative_position_bias_table")]
    for key, value in state.items():
        if key in stored and key.startswith("out.") and stored[key].shape[0] < value.shape[0]:
            # more classes than the graph's: the new classes keep the model's own random start (a copy
            # of another class's head would learn only as fast as the two drift apart)
            weights[key] = np.concatenate([stored[key], value.numpy()[stored[key].shape[0] :]])
        elif key in stored:
            weights[key] = stored[key]
        elif key.endswith("relative_position_index"):
            weights[key] = value.numpy()
        elif key.endswith(".weight") and key not in tables:
            found = None
            bias = key.removesuffix("weight") + "bias"
            for add in consumers.get(bias, []):
                if found is None:
                    found = upstream_matmul(next(x for x in add.input if x != bias))
            if bias not in stored:  # patch merging: norm, then a linear layer without bias
                for norm in consumers.get(key.replace("reduction.weight", "norm.weight"), []):
                    found = downstream_matmul(norm.output[0])
            if found is None or found.T.shape != tuple(value.shape):
                raise ValueError(f"{path}: no weight for {key} in the graph")
            weights[key] = found.T
    gathered = sorted(
        (
            n
            for n, a in stored.items()
            if (a.ndim == 4 and a.shape[0] == 1 and a.shape[2] == a.shape[3] == 49)
            or (a.ndim == 2 and a.shape[0] == 49 * 49)
        ),
        key=lambda n: first_use.get(n, len(graph.node)),
    )
    if len(gathered) != len(tables):
        raise ValueError(f"{path}: {len(gathered)} stored position biases for {len(tables)} attention blocks")
    for key, name in zip(tables, gathered, strict=True):
        index = state[key.replace("bias_table", "index")].numpy().reshape(-1)
        array = stored[name]
        flat = array[0].reshape(array.shape[1], -1).T if array.ndim == 4 else array  # [49 * 49, heads]
        table = np.zeros(tuple(state[key].shape), np.float32)
        if flat.shape[1] != table.shape[1] or len(np.unique(index)) != len(table):
            raise ValueError(f"{path}: stored position bias {name} {array.shape} does not fit {key}")
        table[index] = flat
        weights[key] = table
    model.load_state_dict({k: torch.as_tensor(np.array(v)) for k, v in weights.items()})


def predict_volume(model: torch.nn.Module, image: np.ndarray, config: dict[str, Any]) -> np.ndarray:
    """Class probabilities ``[classes, ...]`` of a prepared volume with the torch model (same windowing
    as inference)."""
    where = next(model.parameters()).device

    def run(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(batch).to(where)).float().cpu().numpy()

    # windows per call: a GPU takes the 2D windows of many slices at once (3D windows are large); on
    # CPU larger batches gain nothing
    batch = 8 if where.type == "cpu" else 64 if config["dims"] == 2 else 2
    return sliding_window(run, image, config["roi"], len(config["classes"]), batch_size=batch)


def validate(
    model: torch.nn.Module, volumes: list[tuple[np.ndarray, np.ndarray]], config: dict[str, Any]
) -> dict[str, float]:
    """Mean Dice per class but background (the most probable class) over prepared validation volumes
    (phantoms: every voxel's class known), keyed by class name."""
    model.eval()
    scores: dict[str, list[float]] = {name: [] for name in config["classes"][1:]}
    for image, labels in volumes:
        predicted = np.argmax(predict_volume(model, image, config), axis=0)
        for cls, name in enumerate(config["classes"][1:], start=1):
            scores[name].append(dice(predicted == cls, labels == cls))
    return {name: float(np.mean(values)) for name, values in scores.items()}


def train(
    data: Path,
    run: Path,
    *,
    config_name: str,
    epochs: int,
    seed: int,
    threads: int,
    max_minutes: float,
    exclude: list[str],
    steps_per_epoch: int,
    real_weight: int = 1,
    precision: str = "auto",
    lr: float | None = None,
    snapshots_from: int | None = None,
    workers: int = 0,
    init_from: Path | None = None,
) -> dict[str, Any]:
    """Train (or resume) a run; with ``snapshots_from``, the weights of every epoch from that one
    (1-based) on are also kept as ``RUN/epoch-NNN.pt`` for :func:`average`. A new run starts from the
    weights of the segmenter artifact ``init_from`` when given (fine-tuning; :func:`weights_from_onnx`)."""
    precision = resolve_precision(precision)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    config = CONFIGS[config_name]
    lr = config["lr"] if lr is None else lr
    index = json.loads((data / "index.json").read_text())
    prepared = CONFIGS.get(index.get("config"), {})
    if index.get("target_codes") != TARGET_CODES:
        raise SystemExit(
            f"{data} holds targets of an older format: rebuild it with `python -m training.segmenter data`"
        )
    same = prepared.get("spacing") == config["spacing"] and prepared.get("classes") == config["classes"]
    if not same:  # configurations of one spacing and classes share their data
        raise SystemExit(
            f"{data} holds data prepared for the '{index.get('config')}' configuration, not '{config_name}': "
            f"rebuild it with `python -m training.segmenter data --config {config_name} --out {data}`"
        )
    model = build_model(config).to(device())
    print(f"training on {device()}")
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-5)
    run.mkdir(parents=True, exist_ok=True)
    start, history, best = 0, [], -1.0
    train_names, val_names = _split(index, exclude, seed)
    split_seed = seed
    init = None
    if init_from is not None and not (run / "last.pt").exists():
        metadata = json.loads((init_from / "metadata.json").read_text())
        other = CONFIGS[metadata["training"]["config"]]
        if any(other[key] != config[key] for key in ("dims", "feature_size", "roi", "spacing")):
            raise SystemExit(
                f"{init_from} is a '{metadata['training']['config']}' model, another network than "
                f"'{config_name}'"
            )
        weights_from_onnx(model, init_from / metadata["files"]["model"])
        init = {"artifact": str(init_from), "version": metadata["version"], "training": metadata["training"]}
        print(f"starting from {metadata['version']} ({init_from})")
    if (run / "last.pt").exists():
        state = torch.load(run / "last.pt", weights_only=False, map_location=device())
        if state["config"] != config_name:
            raise SystemExit(
                f"{run} holds a '{state['config']}' run, not '{config_name}': resume it with "
                f"--config {state['config']} or train into another --run folder"
            )
        model.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimiser"])
        set_lr(optimiser, lr)
        start, history, best = state["epoch"] + 1, state["history"], state["best"]
        init = state.get("init_from")
        if sorted(state["exclude"]) != sorted(exclude):
            raise SystemExit(f"{run} was trained with --exclude {' '.join(state['exclude']) or '(none)'}")
        # the split is the run's, whatever --seed says now (the seed then only changes sampling)
        train_names, val_names, split_seed = state["train"], state["validation"], state["seed"]
        print(f"resumed at epoch {start}")
    train_volumes, val_volumes = _load(data, train_names), _load(data, val_names)
    # the three real T2 cases (and SPIDER) are oversampled; phantoms and the many vb-mri volumes are not
    repeats = [1 if name.startswith(("phantom", "vb-")) else real_weight for name in train_names]
    transforms = _transforms(config, _seed(seed, start))  # a resumed stage draws new augmentations
    started = time.monotonic()
    for epoch in range(start, epochs):
        rng = np.random.default_rng([seed, epoch])
        model.train()
        t0 = time.monotonic()
        losses = []
        items = _samples(train_volumes, config["dims"], rng, repeats)
        batches = _batches(items, transforms, config["batch"], workers, _seed(seed, epoch))
        for step, batch in enumerate(batches, start=1):
            x = batch["image"].float().to(device(), non_blocking=True)
            y = batch["label"].long().to(device(), non_blocking=True)
            with autocast(precision):
                logits = model(x)
            value = dice_ce_loss(logits.float(), y, batch=config.get("batch_dice", False))
            optimiser.zero_grad()
            value.backward()
            optimiser.step()
            losses.append(value.detach())  # no GPU synchronisation per step
            if step >= steps_per_epoch:
                break
        scores = validate(model, val_volumes, config)
        record = {
            "epoch": epoch,
            "loss": float(torch.stack(losses).mean()),
            "val_dice": scores.pop("disc"),
            **{f"val_dice_{name}": value for name, value in scores.items()},
            "lr": lr,
            "seed": seed,
            "seconds": round(time.monotonic() - t0, 1),
        }
        history.append(record)
        print(json.dumps(record), flush=True)
        with (run / "log.jsonl").open("a") as log:
            log.write(json.dumps(record) + "\n")
        state = {
            "model": model.state_dict(),
            "optimiser": optimiser.state_dict(),
            "epoch": epoch,
            "history": history,
            "best": max(best, record["val_dice"]),
            "config": config_name,
            "seed": split_seed,
            "exclude": exclude,
            "real_weight": real_weight,
            "precision": precision,
            "train": train_names,
            "validation": val_names,
            **({"init_from": init} if init else {}),
        }
        save_checkpoint(state, run / "last.pt")
        if record["val_dice"] > best:
            best = record["val_dice"]
            save_checkpoint(state, run / "best.pt")
        if snapshots_from is not None and epoch + 1 >= snapshots_from:
            save_checkpoint(
                {k: v for k, v in state.items() if k != "optimiser"}, run / f"epoch-{epoch + 1:03d}.pt"
            )
        if (time.monotonic() - started) / 60 > max_minutes:
            print(f"time budget of {max_minutes} min reached")
            break
    return history[-1] if history else {}


def average(checkpoints: list[Path], data: Path, out: Path) -> dict[str, Any]:
    """Average the weights of checkpoints of one run (or of runs resumed from one parent: same
    configuration, split and exclusions) into ``OUT/best.pt``, scored on the run's validation volumes.

    Averaging late checkpoints of a run (stochastic weight averaging) or the ends of runs that share a
    parent (a "model soup") smooths the epoch-to-epoch noise of the weights at no inference cost. The
    result holds no optimiser state and is not resumable; ``export`` reads it like any ``best.pt``."""
    states = [torch.load(c, weights_only=False, map_location="cpu") for c in checkpoints]
    first = states[0]
    for path, state in zip(checkpoints, states, strict=True):
        for key in ("config", "train", "validation", "exclude", "real_weight", "precision"):
            if state.get(key) != first.get(key):
                raise SystemExit(
                    f"{path} differs from {checkpoints[0]} in {key}: only checkpoints of one run average"
                )
    config = CONFIGS[first["config"]]
    model = build_model(config)
    model.load_state_dict(
        {key: torch.stack([s["model"][key].float() for s in states]).mean(0) for key in first["model"]}
    )
    scores = validate(model, _load(data, first["validation"]), config)
    score = scores["disc"]
    latest = max(states, key=lambda s: s["epoch"])
    state = {
        **{k: v for k, v in latest.items() if k != "optimiser"},
        "model": model.state_dict(),
        "best": score,
        "averaged": [
            {"checkpoint": f"{c.parent.name}/{c.name}", "epoch": s["epoch"] + 1}
            for c, s in zip(checkpoints, states, strict=True)
        ],
    }
    out.mkdir(parents=True, exist_ok=True)
    torch.save(state, out / "best.pt")
    print(json.dumps({"averaged": len(states), "val_dice": scores}))
    return state


def export_onnx(model: torch.nn.Module, config: dict[str, Any], path: Path) -> dict[str, float]:
    """Export with the dynamo exporter (fixed ROI, dynamic batch) and check it: the max |logit|
    difference between ONNX Runtime and the same weights evaluated by torch in float64 (the exact
    function; torch's own float32 result is off by ~1e-4 on this network, so comparing two float32
    runs measures rounding, not the export) on 8 seeded random windows; the float32 figures beside it."""
    import copy

    import onnxruntime as ort

    model.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.rand(2, 1, *config["roi"])
    batch = torch.export.Dim("batch", min=1, max=64)
    torch.onnx.export(
        model,
        (example,),
        path,
        input_names=["image"],
        output_names=["logits"],
        dynamic_shapes={"x_in": {0: batch}},
        dynamo=True,
        external_data=False,
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    probe = torch.rand(8, 1, *config["roi"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exact = copy.deepcopy(model).double()(probe.double()).numpy()
        single = model(probe).numpy()
    onnx = session.run(None, {"image": probe.numpy()})[0]
    parity = {
        "parity_max_abs_logit_diff": float(np.abs(onnx - exact).max()),
        "torch_float32_max_abs_logit_diff": float(np.abs(single - exact).max()),
        "onnx_vs_torch_float32_max_abs_logit_diff": float(np.abs(onnx - single).max()),
    }
    print(json.dumps(parity))
    return parity


def _recipe(state: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's training recipe (defaults for runs saved before each option existed)."""
    return {
        "real_weight": state.get("real_weight", 1),
        "precision": state.get("precision", "fp32"),
        "sampling_seeds": sorted({h.get("seed", state["seed"]) for h in state["history"]}),
        **({"weight_average": state["averaged"]} if "averaged" in state else {}),
        "optimiser": "AdamW, " + lr_schedule(state["history"], CONFIGS[state["config"]]["lr"]),
    }


def export(run: Path, out: Path, *, score: bool = True) -> dict[str, Any]:
    """Export best.pt to ONNX, check parity with torch, write metadata.json (with
    :func:`score_artifact`'s figures unless ``score`` is False)."""
    from discgeo.artifacts import write_artifact

    state = torch.load(run / "best.pt", weights_only=False, map_location="cpu")
    config = CONFIGS[state["config"]]
    model = build_model(config)
    model.load_state_dict(state["model"])
    parity = export_onnx(model, config, out / "segmenter.onnx")
    megabytes = (out / "segmenter.onnx").stat().st_size / 1e6
    if megabytes > SHIPPED_LIMIT_MB:
        print(
            f"segmenter.onnx is {megabytes:.0f} MB, over the {SHIPPED_LIMIT_MB} MB kept in models/: serve it "
            f"from its folder with DISCGEO_SEGMENTER_ARTIFACT={out}"
        )
    recipe = _recipe(state)
    averaged = f"-avg{len(state['averaged'])}" if "averaged" in state else ""
    init = state.get("init_from")
    if init and init["training"]["config"] == state["config"]:  # fine-tuned from that artifact
        version = f"{init['version']}+ft{state['epoch'] + 1}{averaged}"
    elif init:  # another configuration (more classes) grown from that artifact's network
        version = f"0.4.0-{state['config']}-ft{state['epoch'] + 1}{averaged}"
    else:
        version = f"0.3.0-{state['config']}-rw{recipe['real_weight']}-e{state['epoch'] + 1}{averaged}"
    metadata = {
        "kind": "segmenter",
        "name": "discgeo-swinunetr-v2",
        "version": version,
        "dims": config["dims"],
        "spacing_mm": list(config["spacing"]),
        "inference_spacings_mm": {
            mode: [list(spacing) for spacing in spacings]
            for mode, spacings in config["inference_spacings"].items()
        },
        "roi": list(config["roi"]),
        "classes": len(config["classes"]),
        "class_names": list(config["classes"]),
        "files": {"model": "segmenter.onnx"},
        "inputs": {"name": "image", "dtype": "float32", "shape": ["N", 1, *config["roi"]]},
        "outputs": {
            "name": "logits",
            "dtype": "float32",
            "shape": ["N", len(config["classes"]), *config["roi"]],
        },
        "training": {
            "config": state["config"],
            "seed": state["seed"],
            "epochs": state["epoch"] + 1,
            "excluded": state["exclude"],
            **recipe,
            "train_cases": len(state["train"]),
            "validation_cases": state["validation"],
            "vb_mri_trained": sorted(n.removeprefix("vb-") for n in state["train"] if n.startswith("vb-")),
            **({"init_from": init} if init else {}),
            "command": "python -m training.segmenter data/train/export (see training/segmenter.py)",
        },
        "metrics": {
            "validation_dice": state["best"],
            **parity,
            "parity_reference": "torch float64 on 8 seeded random windows",
            "history_tail": state["history"][-5:],
        },
    }
    write_artifact(out, metadata)
    if score:
        metadata["metrics"].update(score_artifact(out, excluded=state["exclude"]))
        for mode in config["inference_spacings"]:
            if mode != "fast":
                metadata["metrics"][f"{mode}_mode"] = score_artifact(
                    out, excluded=state["exclude"], mode=mode
                )
        print(json.dumps(metadata["metrics"], indent=1))
        write_artifact(out, metadata)
    return metadata


HELD_OUT_PHANTOMS = (909, 8)  # seed and count of the phantoms no training run ever sees
# phantoms for choosing between candidates (never trained on, and not the held-out set)
TUNING_PHANTOMS = (4242, 10)


def score_phantoms(
    segmenter: Any, seed: int, count: int, spacing_sets: list[list[list[float | None]]] | None = None
) -> list[dict[str, Any]]:
    """Per-disc Dice/IoU of ``count`` phantoms of ``seed`` through the inference path (a missed level
    scores 0), one summary per set of inference spacings in ``spacing_sets`` (default: the segmenter's
    own). The model runs once per phantom and distinct spacing; each set averages those probabilities
    as ``Segmenter.disc_probability`` does."""
    from discgeo.phantom import make_case
    from discgeo.segmentation import dice_per_level, mean_probability
    from discgeo.volume import Volume

    sets = spacing_sets or [segmenter.inference_spacings]
    rows: list[list[dict[str, Any]]] = [[] for _ in sets]
    for case in range(count):
        c = make_case(seed, case)
        canonical = c.image.canonical()
        discs = Volume(np.where(c.labels.array > 200, c.labels.array, 0), c.labels.affine)
        distinct = list(dict.fromkeys(tuple(spacing) for spacings in sets for spacing in spacings))
        at = dict(zip(distinct, segmenter.scale_probabilities(canonical, distinct), strict=True))
        for spacings, found in zip(sets, rows, strict=True):
            probability = mean_probability([at[tuple(spacing)] for spacing in spacings])
            found += dice_per_level(segmenter.label_discs(canonical, probability), discs)
    return [_phantom_summary(found, seed, count) for found in rows]


def _phantom_summary(rows: list[dict[str, Any]], seed: int, count: int) -> dict[str, Any]:
    matched = [r for r in rows if r["predicted"] and r["reference"]]
    scores = np.array([r["dice"] for r in rows if r["reference"]])
    return {
        "command": f"{count} phantoms of seed {seed} (never used in training), Segmenter.predict",
        "discs": len(scores),
        "mean_dice": round(float(scores.mean()), 4),
        "median_dice": round(float(np.median(scores)), 4),
        "mean_iou": round(float(np.mean([r["iou"] for r in rows if r["reference"]])), 4),
        "mean_dice_matched_levels": round(float(np.mean([r["dice"] for r in matched])), 4),
        "spurious_levels": sum(r["predicted"] and not r["reference"] for r in rows),
        "missed_levels": sum(r["reference"] and not r["predicted"] for r in rows),
    }


def score_real_case(segmenter: Any, case: str) -> dict[str, Any]:
    """Segment a real shared case with the inference path; Dice per level and of all discs.

    The manual masks cover five lumbar discs (L5-S1 to L1-L2) only, so a disc found above them
    (T12-L1 where the field of view shows it) cannot be scored: it is listed in
    ``levels_beyond_reference`` and left out of ``mean_dice_reference_levels`` (a missed reference
    level counts 0 there); ``mean_dice_per_level`` counts it as 0."""
    from discgeo.io import read_labels, read_volume
    from discgeo.segmentation import dice_per_level

    truth = read_labels(SHARED / f"{case}_discs.nii.gz")
    predicted = segmenter.predict(read_volume(SHARED / f"{case}.nii.gz"))
    per_level = dice_per_level(predicted, truth)
    a, b = np.asarray(predicted.canonical().array) > 0, np.asarray(truth.canonical().array) > 0
    return {
        "case": case,
        "discs_found": int(sum(r["predicted"] for r in per_level)),
        "dice_by_level": {r["level"]: round(r["dice"], 3) for r in per_level},
        "mean_dice_per_level": round(float(np.mean([r["dice"] for r in per_level])), 3),
        "mean_dice_reference_levels": round(
            float(np.mean([r["dice"] for r in per_level if r["reference"]])), 3
        ),
        "levels_beyond_reference": [r["level"] for r in per_level if not r["reference"]],
        "dice_all_discs": round(dice(a, b), 3),
    }


def score_artifact(folder: Path, *, excluded: list[str], mode: str = "fast") -> dict[str, Any]:
    """The artifact's quality through the inference path: per-disc Dice/IoU on phantoms no run
    trains on (:data:`HELD_OUT_PHANTOMS`) and Dice on each real case (``held_out`` when the
    training excluded it)."""
    from discgeo.segmentation import Segmenter

    segmenter = Segmenter.from_artifact(folder, mode=mode)
    phantoms = score_phantoms(segmenter, *HELD_OUT_PHANTOMS)[0]
    real = {}
    for case in REAL_CASES:
        row = score_real_case(segmenter, case)
        real[case] = {"held_out": case in excluded, **{k: v for k, v in row.items() if k != "case"}}
    return {"held_out_phantoms_per_disc": phantoms, "real_t2_cases": real}


def _run_segmenter(run: Path, mode: str = "fast") -> Any:
    """The inference path of a run's best.pt (exported unscored to ``RUN/artifact``, again whenever
    best.pt is newer than that export)."""
    from discgeo.segmentation import Segmenter

    exported = run / "artifact" / "metadata.json"
    if not exported.exists() or exported.stat().st_mtime < (run / "best.pt").stat().st_mtime:
        export(run, run / "artifact", score=False)
    return Segmenter.from_artifact(run / "artifact", mode=mode)


def compare(runs: list[Path], out: Path, *, scales: list[list[float]] | None = None) -> list[dict[str, Any]]:
    """Choose between candidate models without touching the held-out phantoms: per-disc Dice of
    each run's best.pt on :data:`TUNING_PHANTOMS`, as a table in ``out`` (and ``out`` .json).

    ``scales``: inference spacing sets to try instead of the exported one (each a list of spacings in
    mm, in-plane for a 2D model, isotropic for 3D; several are averaged)."""
    rows = []
    for run in runs:
        state = torch.load(run / "best.pt", weights_only=False, map_location="cpu")
        segmenter = _run_segmenter(run)
        sets = [segmenter.inference_spacings]
        if scales:  # disc_probability keeps a 2D model's slice axis as it is
            sets = [[[mm] * 3 for mm in choice] for choice in scales]
        for spacings, summary in zip(sets, score_phantoms(segmenter, *TUNING_PHANTOMS, sets), strict=True):
            rows.append(
                {
                    "run": run.name,
                    "epoch": state["epoch"] + 1,
                    "val_dice": round(state["best"], 4),
                    "inference_mm": " + ".join(f"{s[-1]:g}" for s in spacings),
                    **summary,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    seed, count = TUNING_PHANTOMS
    scale_args = f" --scales {' '.join(','.join(f'{mm:g}' for mm in c) for c in scales)}" if scales else ""
    lines = [
        "# Segmenter candidates on the tuning phantoms",
        "",
        f"`python -m training.segmenter compare --runs {' '.join(str(r) for r in runs)}{scale_args}`: "
        f"per-disc Dice on {count} phantoms of seed {seed} (never trained on, and not the held-out seed-909 "
        "set), through the inference path (probabilities averaged over the inference spacings). Validation "
        "Dice: the run's 5 validation phantoms, whole-volume, torch, at the training spacing.",
        "",
        "| run | epoch | validation Dice | inference spacing, mm | tuning per-disc Dice mean / median | IoU "
        "| spurious / missed |",
        "|---|---|---|---|---|---|---|",
        *[
            f"| {r['run']} | {r['epoch']} | {r['val_dice']:.4f} | {r['inference_mm']} | "
            f"{r['mean_dice']:.4f} / {r['median_dice']:.4f} | {r['mean_iou']:.4f} | "
            f"{r['spurious_levels']} / {r['missed_levels']} |"
            for r in rows
        ],
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    return rows


def leave_one_out(
    runs: list[Path], out: Path, *, artifact: Path | None = None, mode: str = "fast"
) -> list[dict[str, Any]]:
    """Score each run's model on the real cases it never saw (its ``--exclude``): export it to
    ``RUN/artifact``, segment the case with the inference path in ``mode``, Dice per level and of all
    discs. With ``artifact``, the table is also recorded in that artifact's metadata (the model trained
    with the same recipe on all cases) as ``leave_one_case_out`` (``leave_one_case_out_<mode>`` for a
    mode other than fast)."""
    from discgeo.artifacts import record_metric

    rows = []
    for run in runs:
        state = torch.load(run / "best.pt", weights_only=False, map_location="cpu")
        segmenter = _run_segmenter(run, mode)
        facts = _recipe(state)
        recipe = f"real weight {facts['real_weight']}, {facts['precision']}, {facts['optimiser']}"
        for case in state["exclude"]:
            row = score_real_case(segmenter, case)
            rows.append(
                {"case": case, "run": run.name, "best_epoch": state["epoch"] + 1, "recipe": recipe, **row}
            )
            print(json.dumps(rows[-1]), flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    lines = [
        "# Segmenter: leave-one-case-out on the real T2 cases",
        "",
        f"`python -m training.segmenter loo --runs {' '.join(str(r) for r in runs)} --mode {mode}`: "
        "each model never saw its case; the full inference path (ONNX Runtime, post-processing, levels), "
        f"in the {mode} mode (inference spacings {segmenter.inference_spacings}).",
        "",
        "The manual masks cover L5-S1 to L1-L2 only: a disc found above them is listed, not scored, "
        "in the annotated-levels mean (it counts 0 in the all-levels mean and as false positive "
        "voxels in the Dice of all discs).",
        "",
        "| held-out case | model (run, best epoch; recipe) | discs found | Dice per level "
        "| mean Dice, annotated levels | found above the annotated levels | mean Dice, all levels "
        "| Dice of all discs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        levels = ", ".join(f"{k} {v}" for k, v in r["dice_by_level"].items())
        beyond = ", ".join(r["levels_beyond_reference"]) or "-"
        lines.append(
            f"| {r['case']} | {r['run']}, e{r['best_epoch']}; {r['recipe']} | {r['discs_found']} "
            f"| {levels} | {r['mean_dice_reference_levels']} | {beyond} "
            f"| {r['mean_dice_per_level']} | {r['dice_all_discs']} |"
        )
    mean = float(np.mean([r["mean_dice_reference_levels"] for r in rows]))
    mean_all = float(np.mean([r["mean_dice_per_level"] for r in rows]))
    lines += [
        "",
        f"Mean over the held-out cases: {mean:.3f} per annotated disc level (goal 0.85); "
        f"{mean_all:.3f} counting levels beyond the annotation as 0.",
    ]
    out.write_text("\n".join(lines) + "\n")
    if artifact is not None:
        summary = {"mean_dice_reference_levels": round(mean, 3), "mean_dice_per_level": round(mean_all, 3)}
        name = "leave_one_case_out" + ("" if mode == "fast" else f"_{mode}")
        record_metric(artifact, kind="segmenter", name=name, value={**summary, "cases": rows})
    print("\n".join(lines))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("data")
    d.add_argument("--out", type=Path, default=ROOT / "build" / "seg-data")
    d.add_argument("--phantoms", type=int, default=60)
    d.add_argument("--seed", type=int, default=11)
    d.add_argument("--config", choices=sorted(CONFIGS), default="cpu")
    d.add_argument("--spider", type=Path, help="SPIDER root with images/ and masks/")
    d.add_argument("--workers", type=int, default=1, help="processes making phantoms")
    d.add_argument(
        "--vb-mri", action="store_true", help="add the training half of vb-mri with partial disc labels"
    )
    t = sub.add_parser("train")
    t.add_argument("--data", type=Path, default=ROOT / "build" / "seg-data")
    t.add_argument("--run", type=Path, default=ROOT / "build" / "seg-run")
    t.add_argument("--config", choices=sorted(CONFIGS), default="cpu")
    t.add_argument("--epochs", type=int, default=200)
    t.add_argument("--steps-per-epoch", type=int, default=50)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--max-minutes", type=float, default=1e9)
    t.add_argument("--workers", type=int, default=0, help="augmentation processes (0: this process)")
    t.add_argument("--exclude", nargs="*", default=[], help="case names left out (e.g. case-25)")
    t.add_argument(
        "--real-weight",
        type=int,
        default=1,
        help="each real T2 or SPIDER case's slices appear this many times per epoch "
        "(phantoms and vb-mri volumes once)",
    )
    t.add_argument(
        "--precision",
        choices=("auto", "bf16", "fp32"),
        default="auto",
        help="auto: bf16 autocast where the hardware runs it natively, else fp32 (float32 weights, "
        "validation and export either way)",
    )
    t.add_argument(
        "--snapshots-from",
        type=int,
        metavar="EPOCH",
        help="also keep the weights of every epoch from this one on (RUN/epoch-NNN.pt, for `average`)",
    )
    t.add_argument(
        "--init-from",
        type=Path,
        metavar="ARTIFACT",
        help="start a new run from this segmenter artifact's weights (fine-tuning; e.g. models/segmenter)",
    )
    t.add_argument(
        "--lr",
        type=float,
        help="AdamW learning rate (default: the configuration's); also applied on resume (step decay)",
    )
    lo = sub.add_parser("loo", help="score runs on the real cases they excluded")
    lo.add_argument("--runs", type=Path, nargs="+", required=True)
    lo.add_argument("--out", type=Path, default=ROOT / "training" / "results" / "segmenter-loo.md")
    lo.add_argument("--artifact", type=Path, help="also record the table in this artifact's metadata")
    lo.add_argument("--mode", choices=SEGMENTER_MODES, default="fast", help="inference mode scored")
    a = sub.add_parser("average", help="average the weights of checkpoints of one run into OUT/best.pt")
    a.add_argument("--checkpoints", type=Path, nargs="+", required=True)
    a.add_argument("--data", type=Path, default=ROOT / "build" / "seg-data")
    a.add_argument("--out", type=Path, required=True)
    c = sub.add_parser("compare", help="score candidate runs (their best.pt) on the tuning phantoms")
    c.add_argument("--runs", type=Path, nargs="+", required=True)
    c.add_argument(
        "--scales",
        nargs="+",
        type=lambda text: [float(mm) for mm in text.split(",")],
        help="inference spacing sets to try, e.g. 1.0 0.9 0.85,0.95 (comma: averaged); default: the exported",
    )
    c.add_argument("--out", type=Path, default=ROOT / "training" / "results" / "segmenter-candidates.md")
    e = sub.add_parser("export")
    e.add_argument("--run", type=Path, default=ROOT / "build" / "seg-run")
    e.add_argument("--out", type=Path, default=ROOT / "models" / "segmenter")
    args = parser.parse_args()
    if args.command == "data":
        build_data(
            args.out,
            phantoms=args.phantoms,
            seed=args.seed,
            config_name=args.config,
            spider=args.spider,
            workers=args.workers,
            vb_mri=args.vb_mri,
        )
    elif args.command == "train":
        train(
            args.data,
            args.run,
            config_name=args.config,
            epochs=args.epochs,
            seed=args.seed,
            threads=args.threads,
            max_minutes=args.max_minutes,
            exclude=args.exclude,
            steps_per_epoch=args.steps_per_epoch,
            real_weight=args.real_weight,
            precision=args.precision,
            lr=args.lr,
            snapshots_from=args.snapshots_from,
            workers=args.workers,
            init_from=args.init_from,
        )
    elif args.command == "average":
        average(args.checkpoints, args.data, args.out)
    elif args.command == "compare":
        compare(args.runs, args.out, scales=args.scales)
    elif args.command == "loo":
        leave_one_out(args.runs, args.out, artifact=args.artifact, mode=args.mode)
    else:
        export(args.run, args.out)


if __name__ == "__main__":
    main()
