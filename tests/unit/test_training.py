"""Training loops on tiny data: oversampling of real cases, mixed precision, step decay on resume,
the figures written into the exported artifacts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow


def test_segmenter_epoch_items_repeat_real_cases():
    from training.segmenter import _samples

    rng = np.random.default_rng(0)
    phantom = (np.zeros((6, 8, 8), np.float32), np.zeros((6, 8, 8), np.uint8))
    phantom[1][1:4, 2:5, 2:5] = 1  # 3 slices with disc (+2 without)
    real = (np.ones((5, 8, 8), np.float32), np.zeros((5, 8, 8), np.uint8))
    real[1][0:2, 3:6, 3:6] = 1  # 2 slices with disc (+2 without)
    items = _samples([phantom, real], 2, rng, [1, 4])
    from_real = sum(float(item["image"].max()) == 1.0 for item in items)
    assert len(items) == 5 + 4 * 4
    assert from_real == 16
    assert all(item["image"].shape == (1, 8, 8) for item in items)


def test_segmenter_augmentation_workers_each_draw_their_own_transforms():
    from training.segmenter import CONFIGS, SAMPLES_PER_ITEM, _batches, _transforms

    image = np.linspace(0, 1, 60 * 60, dtype=np.float32).reshape(1, 60, 60)
    labels = np.zeros((1, 60, 60), np.uint8)
    labels[0, 20:40, 10:50] = 1
    items = [{"image": image, "label": labels, "foreground": labels}] * 8  # one slice, eight times
    batches = list(_batches(items, _transforms(CONFIGS["cpu"], 0), 2 * SAMPLES_PER_ITEM, workers=2, seed=0))
    assert len(batches) == 4
    assert all(b["image"].shape == (8, 1, 128, 128) and b["label"].shape == (8, 1, 128, 128) for b in batches)
    # consecutive batches come from different workers: identical seeds would give identical patches
    assert not torch.equal(batches[0]["image"], batches[1]["image"])
    # a batch smaller than one item's patches (the 3D configuration's 2) takes one whole item, both ways
    for workers in (0, 2):
        small = list(_batches(items, _transforms(CONFIGS["cpu"], 0), 2, workers=workers, seed=0))
        assert [b["image"].shape[0] for b in small] == [SAMPLES_PER_ITEM] * 8


def test_segmenter_trains_resumes_at_a_lower_rate_and_exports(tmp_path, monkeypatch):
    import training.segmenter
    from discgeo.phantom import make_case
    from discgeo.segmentation import Segmenter, dice_per_level
    from discgeo.volume import Volume
    from training.segmenter import _phantom_summary, average, compare, export, train

    # four tiny "phantoms": a bright slab (the disc) in dark slices; two are kept for validation
    data = tmp_path / "data"
    data.mkdir()
    cases = []
    for i in range(4):
        image = np.full((3, 40, 40), 0.1, np.float16)
        labels = np.zeros((3, 40, 40), np.uint8)
        labels[:, 16 + i : 22 + i, 8:32] = 1
        image[labels == 1] = 0.9
        np.savez_compressed(data / f"phantom-0-{i}.npz", image=image, labels=labels)
        cases.append({"name": f"phantom-0-{i}", "source": "phantom"})
    old = {"config": "cpu", "seed": 0, "cases": cases}  # no target codes: data of an older format
    (data / "index.json").write_text(json.dumps(old))
    run = tmp_path / "run"
    common = {"config_name": "cpu", "seed": 0, "threads": 2, "max_minutes": 10, "exclude": []}
    with pytest.raises(SystemExit, match="older format"):
        train(data, run, epochs=1, steps_per_epoch=1, **common)
    (data / "index.json").write_text(json.dumps({**old, "target_codes": training.segmenter.TARGET_CODES}))
    train(data, run, epochs=1, steps_per_epoch=1, snapshots_from=1, **common)
    split = torch.load(run / "last.pt", weights_only=False)["validation"]
    assert split == ["phantom-0-2", "phantom-0-3"]  # seed 0's split (seed 1 would pick 0-1 and 0-2)
    # resumed at a lower rate with another sampling seed (augmented by two worker processes): the run
    # keeps its split
    train(
        data, run, epochs=2, steps_per_epoch=1, lr=3e-5, snapshots_from=1, workers=2, **{**common, "seed": 1}
    )
    assert sorted(p.name for p in run.glob("epoch-*.pt")) == ["epoch-001.pt", "epoch-002.pt"]
    state = torch.load(run / "last.pt", weights_only=False)
    assert state["validation"] == split and state["seed"] == 0
    history = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [(h["lr"], h["seed"]) for h in history] == [(3e-4, 0), (3e-5, 1)]
    with pytest.raises(SystemExit, match="trained with --exclude"):
        train(data, run, epochs=3, steps_per_epoch=1, **{**common, "exclude": ["phantom-0-0"]})
    # the wide 2D configuration trains on data prepared for the cpu one (same spacing)
    train(data, tmp_path / "wide", epochs=1, steps_per_epoch=1, **{**common, "config_name": "wide"})
    assert torch.load(tmp_path / "wide" / "last.pt", weights_only=False)["config"] == "wide"

    # the weights of epochs 1 and 2 averaged: the mean of the two, the latest run's history kept
    states = [torch.load(run / name, weights_only=False) for name in ("epoch-001.pt", "epoch-002.pt")]
    assert "optimiser" not in states[1]
    averaged = average([run / "epoch-001.pt", run / "epoch-002.pt"], data, tmp_path / "averaged")
    key = next(iter(averaged["model"]))
    assert torch.allclose(averaged["model"][key], (states[0]["model"][key] + states[1]["model"][key]) / 2)
    assert not (states[0]["model"][key] == states[1]["model"][key]).all()
    other = {**states[1], "validation": ["phantom-0-0", "phantom-0-1"]}
    torch.save(other, tmp_path / "other.pt")
    with pytest.raises(SystemExit, match=r"differs .* in validation"):
        average([run / "last.pt", tmp_path / "other.pt"], data, tmp_path / "refused")

    metadata = export(tmp_path / "averaged", tmp_path / "artifact", score=False)
    assert metadata["training"]["optimiser"] == "AdamW, lr 0.0003 for epochs 1-1, 3e-05 for epochs 2-2"
    assert metadata["training"]["sampling_seeds"] == [0, 1] and metadata["training"]["seed"] == 0
    assert [a["epoch"] for a in metadata["training"]["weight_average"]] == [1, 2]
    assert metadata["version"] == "0.3.0-cpu-rw1-e2-avg2"
    assert metadata["metrics"]["validation_dice"] == averaged["best"]

    # candidates are compared on the tuning phantoms (one here), through the inference path
    monkeypatch.setattr(training.segmenter, "TUNING_PHANTOMS", (4242, 1))
    rows = compare([tmp_path / "averaged"], tmp_path / "candidates.md", scales=[[1.0], [0.9, 1.1]])
    assert [r["inference_mm"] for r in rows] == ["1", "0.9 + 1.1"]
    assert all(r["discs"] == 5 and r["epoch"] == 2 and 0 <= r["mean_dice"] <= 1 for r in rows)
    assert "--scales 1 0.9,1.1`" in (tmp_path / "candidates.md").read_text()
    # each spacing ran once per phantom and was shared between the sets: same figures as predict
    candidate = Segmenter.from_artifact(tmp_path / "averaged" / "artifact")
    candidate.inference_spacings = [[0.9] * 3, [1.1] * 3]
    case = make_case(4242, 0)
    discs = Volume(np.where(case.labels.array > 200, case.labels.array, 0), case.labels.affine)
    direct = _phantom_summary(dice_per_level(candidate.predict(case.image), discs), 4242, 1)
    assert {k: rows[1][k] for k in direct} == direct
    assert metadata["metrics"]["parity_max_abs_logit_diff"] <= 1e-4
    segmenter = Segmenter.from_artifact(tmp_path / "artifact")  # loads through the verified loader
    probability = segmenter.disc_probability(Volume(np.zeros((2, 40, 40), np.float32), np.eye(4)))
    assert probability.shape == (2, 40, 40) and np.all((probability >= 0) & (probability <= 1))


def test_autoencoder_training_and_float32_export_figures(tmp_path):
    import torch

    from discgeo.artifacts import load_artifact
    from discgeo.encoding import Encoder, iou
    from training.autoencoder import CROP, export, train
    from training.torchrun import resolve_precision

    # eight boxes of different sizes: six for training, one held-out phantom, one held-out "real"
    crops = np.zeros((8, 64, 64, 64), np.uint8)
    for i in range(8):
        crops[i, 28 - i : 36 + i, 12:52, 20 : 44 + i] = 1
    held = np.array([False] * 6 + [True, True])
    sources = np.array(["phantom"] * 7 + ["real-native"])
    patients = np.array([f"p{i}" for i in range(7)] + ["ivd-25"])
    data = tmp_path / "data"
    data.mkdir()
    np.savez_compressed(
        data / "crops.npz", packed=np.packbits(crops, axis=-1), held=held, patients=patients, sources=sources
    )
    (data / "summary.json").write_text(
        json.dumps({"discs": 8, "train": 6, "held_out": 2, "held_out_real_subjects": ["ivd-25"]})
    )
    torch.manual_seed(0)
    run = tmp_path / "run"
    train(data, run, bottleneck=4, epochs=3, batch=3, seed=0, threads=2, max_minutes=10, checkpoint_every=2)
    history = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert len(history) == 3
    assert torch.load(run / "last.pt", weights_only=False)["epoch"] == 2  # the last epoch is always kept
    with pytest.raises(ValueError, match="checkpoint_every"):
        train(
            data, run, bottleneck=4, epochs=4, batch=3, seed=0, threads=2, max_minutes=1, checkpoint_every=0
        )
    # an epoch logged after the last checkpoint (a run killed in between) is dropped on resume
    with (run / "log.jsonl").open("a") as log:
        log.write(json.dumps({**history[-1], "epoch": 3}) + "\n")
    assert history[-1]["loss"] < history[0]["loss"]
    # resumed at a lower learning rate (step decay); the schedule is recorded
    train(data, run, bottleneck=4, epochs=4, batch=3, seed=0, threads=2, max_minutes=10, lr=1e-4)
    logged = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in logged] == [0, 1, 2, 3] and logged[-1]["lr"] == 1e-4
    # a run stops once the training IoU exceeds its stop_iou (here at once), with its checkpoint
    quick = tmp_path / "quick"
    train(data, quick, bottleneck=4, epochs=5, batch=3, seed=0, threads=2, max_minutes=10, stop_iou=-1.0)
    assert len((quick / "log.jsonl").read_text().splitlines()) == 1
    assert torch.load(quick / "last.pt", weights_only=False)["stop_iou"] == -1.0

    metadata = export(run, tmp_path / "artifact", data=data, curve=tmp_path / "curve.png")
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"
    assert metadata["training"]["precision"] == resolve_precision("auto")  # bf16 only where it is native
    assert metadata["training"]["optimiser"] == "Adam, lr 0.001 for epochs 1-3, 0.0001 for epochs 4-4"
    quality = metadata["metrics"]["quality_float32"]
    assert quality["train"]["discs"] == 6 and quality["held_out"]["discs"] == 2
    assert quality["held_out_real"]["patients"] == ["ivd-25"]
    # the unusual_shape threshold is the held-out real discs' lower Tukey fence, kept in the artifact
    assert metadata["unusual_shape"]["held_out_real_discs"] == 1
    assert metadata["crop_size"] == 64 and metadata["crop_spacing_mm"] == [1.0, 0.75, 0.35]
    # the recorded figure is what the shipped ONNX models give through the inference path
    encoder = Encoder.from_artifact(tmp_path / "artifact")
    assert encoder.crop_spec == CROP and CROP.alignment == "sagittal"  # the artifact owns its crop
    recon = encoder.decode(encoder.encode(crops[:6])) >= 0.5
    assert quality["train"]["mean_iou"] == pytest.approx(float(iou(recon, crops[:6]).mean()), abs=2e-3)
    assert metadata["metrics"]["train_iou"] == quality["train"]["mean_iou"]
    # the 145 real healthy discs through the exported encoder, recorded after the export
    real = load_artifact(tmp_path / "artifact", kind="autoencoder")[1]["metrics"]["real_healthy_discs"]
    assert (
        real["all"]["discs"] == 145 and real["held_out"]["discs"] == 5 and real["held_out"]["subjects"] == 1
    )

    # bottleneck sweep: a finished run (b4, 4 epochs) is read, not retrained; the table is cut at the
    # common budget and recorded in the artifact's metadata, which still verifies
    import shutil

    from training.autoencoder import sweep

    shutil.copytree(run, tmp_path / "sweep" / "b4")
    (tmp_path / "sweep" / "b4" / "last.pt").unlink()  # a run trained elsewhere brings back its log alone
    rows = sweep(
        data,
        tmp_path / "sweep",
        tmp_path / "sweep.md",
        bottlenecks=[3, 4],
        epochs=2,
        batch=3,
        threads=2,
        artifact=tmp_path / "artifact",
    )
    assert [(r["bottleneck"], r["epochs_run"]) for r in rows] == [(3, 2), (4, 2)]
    assert len((tmp_path / "sweep" / "b4" / "log.jsonl").read_text().splitlines()) == 4  # not retrained
    assert rows[1]["train_iou"] == history[1]["train_iou"]
    assert (tmp_path / "sweep.md").read_text().count("\n") == 4  # header, rule, two rows
    assert load_artifact(tmp_path / "artifact", kind="autoencoder")[1]["metrics"]["bottleneck_sweep"] == rows
    # an unfinished run without its checkpoint is refused, not retrained over its log
    with pytest.raises(SystemExit, match="no checkpoint to continue from"):
        sweep(data, tmp_path / "sweep", tmp_path / "sweep.md", bottlenecks=[4], epochs=6, batch=3, threads=2)


def test_real_case_scoring_leaves_levels_beyond_the_masks_out_of_the_headline():
    from discgeo.io import read_labels
    from training.segmenter import SHARED, score_real_case

    truth = read_labels(SHARED / "case-20_discs.nii.gz")

    class ReferencePlusDiscAbove:
        """Predicts the manual masks exactly, plus a disc 36 mm above the top one (as T12-L1)."""

        def predict(self, volume):
            canonical = truth.canonical()
            array = np.asarray(canonical.array).copy()
            assert canonical.affine[2, 2] > 0  # RAS+: axis 2 runs superior
            top = np.argwhere(array == 5) + np.array([0, 0, 36])
            array[tuple(top.T)] = 6
            return canonical.with_array(array)

    row = score_real_case(ReferencePlusDiscAbove(), "case-20")
    assert row["discs_found"] == 6
    assert row["levels_beyond_reference"] == ["T12-L1"]
    assert row["mean_dice_reference_levels"] == 1.0
    assert row["mean_dice_per_level"] == pytest.approx(5 / 6, abs=1e-3)
    assert row["dice_all_discs"] < 1.0


def test_segmenter_3d_configuration_prepares_trains_exports_and_segments(tmp_path, monkeypatch):
    """The GPU configuration's code path on a CPU: isotropic 3D data, 3D patches, the dynamo export of
    a 3D SwinUNETR-V2 (parity), 3D sliding-window inference through ONNX Runtime. The network is
    shrunk (feature size 12, 32 x 64 x 64 windows) and the volumes are tiny so that it runs in about a minute;
    the rest is the real recipe."""
    from discgeo.phantom import make_case
    from discgeo.segmentation import Segmenter
    from discgeo.volume import Volume
    from training import segmenter as seg

    monkeypatch.setitem(seg.CONFIGS, "gpu", {**seg.CONFIGS["gpu"], "feature_size": 12, "roi": (32, 64, 64)})
    case = make_case(5, 0)
    image, labels = seg.prepare(
        case.image.array, case.labels.array > 200, case.image.spacing, seg.CONFIGS["gpu"]
    )
    extent = np.array(case.image.shape) * np.array(case.image.spacing)  # mm along each voxel axis
    assert np.allclose(image.shape, extent, atol=1) and labels.shape == image.shape  # 1 mm isotropic

    data, run = tmp_path / "data", tmp_path / "run"
    data.mkdir()
    cases = []
    for i in range(3):  # a bright slab (the disc) in a dark volume; validation takes two
        image = np.full((24, 60, 60), 0.1, np.float16)
        labels = np.zeros(image.shape, np.uint8)
        labels[4:20, 26 + i : 34 + i, 8:52] = 1
        image[labels == 1] = 0.9
        np.savez_compressed(data / f"phantom-0-{i}.npz", image=image, labels=labels)
        cases.append({"name": f"phantom-0-{i}", "source": "phantom"})
    index = {"config": "gpu", "seed": 0, "target_codes": seg.TARGET_CODES, "cases": cases}
    (data / "index.json").write_text(json.dumps(index))
    common = {"seed": 0, "threads": 2, "max_minutes": 10, "exclude": [], "steps_per_epoch": 1}
    with pytest.raises(SystemExit, match="prepared for the 'gpu' configuration"):
        seg.train(data, run, config_name="cpu", epochs=1, **common)
    seg.train(data, run, config_name="gpu", epochs=1, **common)
    record = json.loads((run / "log.jsonl").read_text())
    assert 0.0 <= record["val_dice"] <= 1.0 and np.isfinite(record["loss"])

    metadata = seg.export(run, tmp_path / "artifact", score=False)
    assert metadata["dims"] == 3 and metadata["roi"] == [32, 64, 64] and metadata["spacing_mm"] == [1.0] * 3
    assert metadata["metrics"]["parity_max_abs_logit_diff"] <= 1e-4
    segmenter = Segmenter.from_artifact(tmp_path / "artifact")
    volume = Volume(np.full((12, 60, 60), 0.2, np.float32), np.diag([2.0, 1.0, 1.0, 1.0]))
    probability = segmenter.disc_probability(volume)  # resampled to 1 mm, 3D windows, back to 2 mm
    assert probability.shape == (12, 60, 60) and np.all((probability >= 0) & (probability <= 1))


def test_segmenter_data_reads_the_spider_layout(tmp_path, spider_dir, capsys):
    """The real SPIDER mask (3.3 x 0.6 x 0.5 mm, discs 201-207, vertebrae, canal) with an image made on
    its grid: cached at 1 mm in-plane with the discs alone as foreground, disc volume kept; a mask
    without its image is reported; a root without any pair is refused."""
    import SimpleITK as sitk

    from training.segmenter import build_data

    mask = sitk.ReadImage(str(spider_dir / "masks" / "1_t1.mha"))
    labels = sitk.GetArrayFromImage(mask)
    root = tmp_path / "SPIDER"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    intensity = np.where(labels > 200, 900, np.where(labels > 0, 500, 100)).astype(np.int16)
    image = sitk.GetImageFromArray(intensity)
    image.CopyInformation(mask)
    sitk.WriteImage(image, str(root / "images" / "1_t1.mha"))
    sitk.WriteImage(mask, str(root / "masks" / "1_t1.mha"))
    sitk.WriteImage(mask, str(root / "masks" / "2_t2.mha"))  # no image for this one

    summary = build_data(tmp_path / "data", phantoms=0, seed=0, config_name="cpu", spider=root)
    assert "1 of 2 masks have no image, left out" in capsys.readouterr().out
    assert [c["name"] for c in summary["cases"] if c["source"] == "spider"] == ["spider-1_t1"]
    cached = np.load(tmp_path / "data" / "spider-1_t1.npz")
    spacing = np.array(mask.GetSpacing())  # x (sagittal), y, z: the canonical array's axes 0, 1, 2
    assert cached["labels"].shape == (50, 280, 289)  # sagittal slices kept, 0.625 x 0.5 mm -> ~1 mm
    disc_mm3 = np.count_nonzero(labels > 200) * float(np.prod(spacing))
    cached_mm3 = np.count_nonzero(cached["labels"]) * float(np.prod(spacing * [1, 448 / 280, 578 / 289]))
    assert abs(cached_mm3 / disc_mm3 - 1) < 0.005  # thresholding at 0.5 alone gave +9.5 % here
    assert set(np.unique(cached["labels"])) == {0, 1}
    assert cached["image"][cached["labels"] == 1].mean() > 0.9  # the disc intensity, normalised

    (root / "images" / "1_t1.mha").unlink()
    with pytest.raises(SystemExit, match=r"no masks/\*\.mha with a matching images"):
        build_data(tmp_path / "none", phantoms=0, seed=0, config_name="cpu", spider=root)
