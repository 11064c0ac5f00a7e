"""Segmenter training on partial labels: disc labels from vertebral bodies alone (``vb-mri``), the
loss that ignores the unknown voxels, and fine-tuning from a shipped ONNX artifact's weights."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from training.segmenter import (  # noqa: E402
    BODY,
    CONFIGS,
    DISC,
    IGNORE,
    NOT_DISC,
    SACRUM,
    anatomy_targets,
    build_model,
    dice_ce_loss,
    prepare,
    vertebra_partial_labels,
    weights_from_onnx,
)


def _spine() -> np.ndarray:
    """Three 20 x 20 mm bodies along S (RAS+, 1 mm) with 8 mm disc spaces; L4 tilted by a step."""
    bodies = np.zeros((30, 40, 160), np.uint8)
    bodies[5:25, 10:30, 40:65] = 1  # lowest (L5): S 40-64
    bodies[5:25, 10:20, 73:98] = 2  # L4, posterior half: disc space S 65-72 (8 mm)
    bodies[5:25, 20:30, 74:99] = 2  # anterior half one voxel higher: 9 mm
    bodies[5:25, 10:30, 106:131] = 3
    return bodies


def test_disc_spaces_between_adjacent_bodies_are_disc_and_the_rest_is_known_or_ignored():
    labels = vertebra_partial_labels(_spine(), (1.0, 1.0, 1.0))
    disc = labels == 1
    assert disc[5:25, 10:20, 65:73].all() and disc[5:25, 20:30, 65:74].all()  # L5-L4, both halves
    assert disc[5:25, 10:20, 98:106].all() and disc[5:25, 20:30, 99:106].all()  # L4-L3
    assert disc.sum() == 20 * 10 * 8 + 20 * 10 * 9 + 20 * 10 * 8 + 20 * 10 * 7
    assert not (labels[_spine() > 0]).any()  # every body voxel is background
    # a 3 mm rim around each disc is unknown, and so is anything below L5 down to 30 mm under it
    assert labels[15, 8, 68] == IGNORE and labels[15, 5, 68] == 0
    assert (labels[:, :, 10:40] == IGNORE).all() and (labels[:, :, :10] == 0).all()
    # above the lowest point of the highest body's lower surface: the next disc up, unknown
    assert (labels[:, :, 131:] == IGNORE).all() and labels[0, 0, 105] == 0
    with pytest.raises(ValueError, match="at least two"):
        vertebra_partial_labels((_spine() == 1).astype(np.uint8), (1.0, 1.0, 1.0))


def test_a_tilted_lowest_body_leaves_the_whole_l5_s1_region_unknown():
    bodies = _spine()
    bodies[5:25, 10:20, 36:40] = 1  # L5's back reaches 4 mm lower than its front (bottom at S 36-40)
    labels = vertebra_partial_labels(bodies, (1.0, 1.0, 1.0))
    # the L5-S1 disc under the front part rises above the body's lowest point: not background
    assert (labels[5:25, 20:30, 36:40] == IGNORE).all()
    assert (labels[:, :, 6:36] == IGNORE).all() and (labels[:, :, :6] == 0).all()  # 30 mm under S 36


def test_a_gap_taller_than_a_disc_space_is_no_disc():
    bodies = _spine()
    bodies[bodies == 3] = 0
    bodies[5:25, 10:30, 125:150] = 3  # 26 mm above L4: a missing body, not a disc
    labels = vertebra_partial_labels(bodies, (1.0, 1.0, 1.0))
    assert not (labels[:, :, 99:125] == 1).any()


def test_the_loss_is_monai_dice_ce_without_ignored_voxels_and_blind_to_them():
    from monai.losses import DiceCELoss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 2, 24, 24, generator=g)
    target = (torch.rand(4, 1, 24, 24, generator=g) > 0.7).long()
    expected = DiceCELoss(to_onehot_y=True, softmax=True)(logits, target)
    assert torch.allclose(dice_ce_loss(logits, target), expected, atol=1e-6)
    partial = target.clone()
    partial[:, :, :8] = IGNORE
    changed = logits.clone()
    changed[:, :, :8] = torch.randn(4, 2, 8, 24, generator=g) * 10
    assert torch.allclose(dice_ce_loss(logits, partial), dice_ce_loss(changed, partial))
    assert not torch.allclose(dice_ce_loss(logits, partial), expected)


def test_four_classes_the_loss_is_monai_dice_ce_and_a_set_of_classes_scores_its_total():
    from monai.losses import DiceCELoss

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 16, 16, generator=g)
    target = torch.randint(0, 4, (2, 1, 16, 16), generator=g)
    expected = DiceCELoss(to_onehot_y=True, softmax=True)(logits, target)
    assert torch.allclose(dice_ce_loss(logits, target), expected, atol=1e-6)
    pooled = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)(logits, target)
    assert torch.allclose(dice_ce_loss(logits, target, batch=True), pooled, atol=1e-6)
    # "not disc" everywhere: the Dice of the disc class (all known negatives) and -log(1 - p_disc)
    not_disc = torch.full_like(target, NOT_DISC)
    p = torch.softmax(logits, 1)
    ce = -torch.log(1 - p[:, DISC]).mean()
    # Dice loss per sample and class: the disc's has no positive, 1 - smooth / (sum p + smooth); the
    # other classes know no voxel, 1 - smooth / smooth = 0
    dice = torch.zeros(2, 4)
    dice[:, DISC] = 1 - 1e-5 / (p[:, DISC].sum((1, 2)) + 1e-5)
    assert torch.allclose(dice_ce_loss(logits, not_disc), dice.mean() + ce, atol=1e-6)
    # moving probability among background, body and sacrum changes nothing there
    shuffled = logits.clone()
    shuffled[:, [0, 2, 3]] = logits[:, [3, 0, 2]]
    assert torch.allclose(dice_ce_loss(logits, not_disc), dice_ce_loss(shuffled, not_disc), atol=1e-6)


def test_anatomy_targets_and_their_resampling_keep_each_class():
    from discgeo import levels

    labels = np.zeros((4, 40, 40), np.int16)
    bodies = np.zeros((4, 40, 40), np.uint8)
    bodies[:, 5:35, 2:12] = levels.SACRUM_LABEL
    bodies[:, 5:35, 15:25] = 1
    labels[:, 5:35, 12:15] = 201
    config = CONFIGS["anatomy"]
    y = anatomy_targets(labels, bodies, config)
    assert set(np.unique(y)) == {0, DISC, BODY, SACRUM}
    assert set(np.unique(anatomy_targets(labels, None, config))) == {DISC, NOT_DISC}
    assert set(np.unique(anatomy_targets(labels, bodies, CONFIGS["cpu"]))) == {0, DISC}
    image = np.random.default_rng(0).random((4, 40, 40)).astype(np.float32)
    _, resampled = prepare(image, y, (3.0, 0.5, 0.5), config)  # to 1 mm in-plane
    assert resampled.shape == (4, 20, 20)
    for cls, voxels in ((DISC, 3 * 30), (BODY, 10 * 30), (SACRUM, 10 * 30)):  # per slice at 0.5 mm
        assert abs(int((resampled == cls).sum()) - 4 * voxels / 4) <= 4 * 12, cls


def test_the_shipped_segmenter_weights_come_back_from_its_onnx_file():
    import onnxruntime as ort

    from discgeo.config import Settings

    folder = Settings().artifact("segmenter")
    metadata = json.loads((folder / "metadata.json").read_text())
    path = folder / metadata["files"]["model"]
    config = CONFIGS[metadata["training"]["config"]]
    model = build_model(config).eval()
    weights_from_onnx(model, path)
    windows = torch.rand(2, 1, 128, 128, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = model(windows).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    onnx = session.run(None, {"image": windows.numpy()})
    assert np.abs(ours - onnx[0]).max() < 1e-3  # float32 rounding only (a wrong table gives > 0.1)
    with pytest.raises(ValueError, match=r"no weight for|position bias"):
        weights_from_onnx(build_model({**config, "feature_size": 24}), path)
    # a model of more classes starts from the same network: the graph's classes come out unchanged
    more = build_model({**config, "classes": (*config["classes"], "extra-a", "extra-b")}).eval()
    weights_from_onnx(more, path)
    with torch.no_grad():
        logits = more(windows).numpy()
    assert logits.shape[1] == len(config["classes"]) + 2
    assert np.abs(logits[:, : len(config["classes"])] - onnx[0]).max() < 1e-3
