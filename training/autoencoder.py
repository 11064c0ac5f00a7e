"""Train the 3D CNN disc autoencoder, export encoder and decoder to ONNX, write the artifact.

    python -m training.autoencoder data   --out build/ae-data --phantoms 120 --seed 7
    python -m training.autoencoder train  --data build/ae-data --run build/ae-run --bottleneck 4
    python -m training.autoencoder export --run build/ae-run --out models/autoencoder

Architecture (Perrone et al. 2025): five stride-2 Conv3d (32-64-128-256-512, BatchNorm + ReLU),
flatten, Linear to the bottleneck; the decoder mirrors it with ConvTranspose3d and ends in a sigmoid.
The study used BCE loss, Adam 1e-3 and stopped when the training IoU exceeded 0.995. Here the
default loss is BCE + soft Dice (``--loss bce`` gives the study's): discs fill ~6 % of the cube and
plain BCE spends its first epochs predicting background, which a CPU budget cannot afford. Unlike
the study, a held-out set (whole patients never seen in training) is scored every epoch.

Training is resumable: ``train`` reloads ``RUN/last.pt`` (model, optimiser, epoch, history) when it
exists; it is written every ``--checkpoint-every`` epochs, so a killed run may repeat a few. Progress
goes to stdout and ``RUN/log.jsonl`` (rewritten from the checkpoint's history on resume).
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from discgeo.encoding import CropSpec, disc_crops
from training.torchrun import (
    autocast,
    device,
    logged_lr,
    lr_schedule,
    resolve_precision,
    save_checkpoint,
    set_lr,
)

ROOT = Path(__file__).resolve().parents[1]
CHANNELS = (32, 64, 128, 256, 512)
STOP_IOU = 0.995
DEFAULT_LR = 1e-3  # Adam, as in the study
SWEEP_TABLE = ROOT / "training" / "results" / "autoencoder-sweep.json"


# ------------------------------------------------------------------------------------------- model
class DiscEncoder(nn.Module):
    """[N, 1, 64, 64, 64] -> [N, bottleneck]."""

    def __init__(self, bottleneck: int = 4) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        previous = 1
        for channels in CHANNELS:
            layers += [
                nn.Conv3d(previous, channels, 3, stride=2, padding=1),
                nn.BatchNorm3d(channels),
                nn.ReLU(inplace=True),
            ]
            previous = channels
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(CHANNELS[-1] * 2 * 2 * 2, bottleneck)

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.features(crops), 1))


class DiscDecoder(nn.Module):
    """[N, bottleneck] -> logits [N, 1, 64, 64, 64] (sigmoid applied by :class:`Probabilities`)."""

    def __init__(self, bottleneck: int = 4) -> None:
        super().__init__()
        self.fc = nn.Linear(bottleneck, CHANNELS[-1] * 2 * 2 * 2)
        layers: list[nn.Module] = []
        reversed_channels = CHANNELS[::-1]
        for previous, channels in itertools.pairwise(reversed_channels):
            layers += [
                nn.ConvTranspose3d(previous, channels, 4, stride=2, padding=1),
                nn.BatchNorm3d(channels),
                nn.ReLU(inplace=True),
            ]
        layers.append(nn.ConvTranspose3d(CHANNELS[0], 1, 4, stride=2, padding=1))
        self.features = nn.Sequential(*layers)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.features(self.fc(latents).view(-1, CHANNELS[-1], 2, 2, 2))


class Probabilities(nn.Module):
    """Decoder followed by a sigmoid (the exported decoder)."""

    def __init__(self, decoder: DiscDecoder) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decoder(latents))


# -------------------------------------------------------------------------------------------- data
# The shipped crop: 64 voxels per side (five stride-2 layers down to 2^3), turned about R to each disc's
# sagittal tilt (discgeo.encoding.sagittal_frame), so that S runs along the disc's height and can be
# fine: a real disc (5-7 mm high, 29-32 mm AP, about 40 mm wide; training/results/real-discs.md) spans
# ~17 voxels across its height instead of ~10 in the untilted 0.6 mm cube, and the code need not spend
# one of its numbers on the tilt (geometry measures it). 64 x 48 x 22.4 mm; the tallest real disc in the
# tilted frame is 16.4 mm, the widest 52 mm (R) and 43 mm (A).
CROP = CropSpec(size=64, spacing_mm=(1.0, 0.75, 0.35), alignment="sagittal")
HELD_OUT_REAL = 7  # ivd-masks subjects held out (with their 1 mm case where there is one)


def held_out_subjects(seed: int) -> list[str]:
    """Real subjects never trained on: ivd-25 (so that one 1 mm case is held out too) and six more
    drawn by ``seed`` from those without a 1 mm case."""
    from discgeo import realdata

    with_case = {realdata.subject_of_case(c) for c in realdata.REAL_CASES}
    others = [s for s in realdata.native_subjects() if s not in with_case]
    drawn = np.random.default_rng(seed).permutation(len(others))[: HELD_OUT_REAL - 1]
    return sorted(["ivd-25", *(others[i] for i in drawn)])


def build_data(out: Path, *, phantoms: int, seed: int, holdout_fraction: float = 0.15) -> dict[str, Any]:
    """Disc crops of calibrated phantom patients and of every real mask, split by patient."""
    from tqdm import tqdm

    from discgeo import realdata
    from discgeo.phantom import make_case

    rng = np.random.default_rng(seed)
    crops, patients, sources = [], [], []
    too_large = 0
    for case in tqdm(range(phantoms), desc="phantom crops", unit="patient"):
        spacing = (float(rng.uniform(1.0, 4.0)), float(rng.uniform(0.5, 1.1)), float(rng.uniform(0.5, 1.1)))
        c = make_case(seed, case, spacing=(spacing[0], spacing[1], spacing[1]), full_coverage=True)
        result = disc_crops(c.labels, spec=CROP)
        too_large += len(result.too_large)
        crops.append(result.crops)
        patients += [f"phantom-{seed}-{case}"] * len(result.crops)
        sources += ["phantom"] * len(result.crops)
    for mask in tqdm(realdata.real_masks(), desc="real crops", unit="mask"):
        result = disc_crops(mask.labels, spec=CROP)
        too_large += len(result.too_large)
        crops.append(result.crops)
        patients += [mask.subject] * len(result.crops)
        sources += [f"real-{mask.source}"] * len(result.crops)
    array = np.concatenate(crops)
    phantom_patients = sorted({p for p, s in zip(patients, sources, strict=True) if s == "phantom"})
    order = rng.permutation(len(phantom_patients))
    n_hold = max(1, round(holdout_fraction * len(phantom_patients)))
    held_patients = {phantom_patients[i] for i in order[:n_hold]} | set(held_out_subjects(seed))
    held = np.array([p in held_patients for p in patients])
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        out / "crops.npz",
        packed=np.packbits(array, axis=-1),
        held=held,
        patients=np.array(patients),
        sources=np.array(sources),
    )
    real = np.char.startswith(np.array(sources), "real")
    summary = {
        "discs": len(array),
        "train": int((~held).sum()),
        "held_out": int(held.sum()),
        "phantom_patients": phantoms,
        "real": "ivd-masks (29 subjects, native) and ivd-t2-mri (3 cases, 1 mm), Menezes-Reis et al. 2016",
        "real_discs": int(real.sum()),
        "real_train_discs": int((real & ~held).sum()),
        "real_held_out_discs": int((real & held).sum()),
        "held_out_real_subjects": held_out_subjects(seed),
        "crop": {"size": CROP.size, "spacing_mm": list(CROP.spacing_mm), "alignment": CROP.alignment},
        "seed": seed,
        "too_large_skipped": too_large,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))
    return summary


def load_data(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    data = np.load(folder / "crops.npz")
    crops = np.unpackbits(data["packed"], axis=-1)[..., : CROP.size]
    return crops, data["held"], data["patients"], data["sources"]


# ------------------------------------------------------------------------------------------- train
def evaluate(
    encoder: DiscEncoder,
    decoder: DiscDecoder,
    crops: np.ndarray | torch.Tensor,
    *,
    batch: int = 32,
    precision: str = "fp32",
) -> np.ndarray:
    """Per-crop reconstruction IoU (eval mode), computed on the model's device. Training monitors it
    in its own precision (bf16 halves the time); :func:`export` measures the shipped figures in
    float32."""
    encoder.eval()
    decoder.eval()
    where = next(encoder.parameters()).device
    crops = torch.as_tensor(crops)
    scores = []
    with torch.no_grad(), autocast(precision):
        for i in range(0, len(crops), batch):
            truth = crops[i : i + batch].to(where).bool()
            recon = decoder(encoder(truth[:, None].float()))[:, 0] > 0  # logit > 0 <=> probability > 0.5
            inter = (recon & truth).flatten(1).sum(1)
            union = (recon | truth).flatten(1).sum(1)
            scores.append(torch.where(union > 0, inter.double() / union.clamp(min=1), 1.0).cpu())
    return torch.cat(scores).numpy()


def train(
    data: Path,
    run: Path,
    *,
    bottleneck: int,
    epochs: int,
    batch: int,
    seed: int,
    threads: int,
    max_minutes: float,
    loss: str = "bce+dice",
    precision: str = "auto",
    lr: float = DEFAULT_LR,
    stop_iou: float = STOP_IOU,
    checkpoint_every: int = 1,
    monitor: int | None = None,
) -> dict[str, Any]:
    """Train (or resume) a run until the training IoU exceeds ``stop_iou``, ``epochs`` or
    ``max_minutes``. The crops stay on the training device as uint8 (474 discs: ~125 MB), so a GPU
    epoch costs no host copies; ``RUN/last.pt`` is written every ``checkpoint_every`` epochs and at
    the end (a ~190 MB file, which outweighs a GPU epoch). A run stopped between checkpoints resumes
    from the last one; ``RUN/log.jsonl`` is then rewritten from its history, so the log never holds
    epochs that the checkpoint does not."""
    precision = resolve_precision(precision)
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be at least 1, not {checkpoint_every}")
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    crops, held, _, sources = load_data(data)
    # the left/right sense of the real masks was not recorded: their mirror images are as real
    real_train = crops[~held & np.char.startswith(sources, "real")]
    train_x = torch.from_numpy(np.concatenate([crops[~held], real_train[:, ::-1]])).to(device())
    held_x = torch.from_numpy(crops[held]).to(device())
    held_real = np.char.startswith(sources[held], "real")
    print(f"{len(train_x)} training crops ({len(real_train)} real, mirrored too), {len(held_x)} held out")
    # the training IoU logged each epoch (and compared with stop_iou) is that of a fixed sample when
    # ``monitor`` is set: scoring every crop costs a third of a CPU epoch
    every = np.arange(len(train_x))
    picked = (
        every
        if monitor is None
        else np.random.default_rng(0).choice(every, min(monitor, len(every)), replace=False)
    )
    monitored = torch.from_numpy(np.sort(picked)).to(device())
    encoder, decoder = DiscEncoder(bottleneck).to(device()), DiscDecoder(bottleneck).to(device())
    print(f"training on {device()}")
    optimiser = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=lr)
    bce = nn.BCEWithLogitsLoss()

    def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if loss == "bce":
            return bce(logits, target)
        # soft Dice on top of BCE: discs fill ~6 % of the cube, and plain BCE spends many epochs
        # predicting background first (see the module docstring)
        probs = torch.sigmoid(logits).flatten(1)
        target_flat = target.flatten(1)
        dice = 1 - (2 * (probs * target_flat).sum(1) + 1) / (probs.sum(1) + target_flat.sum(1) + 1)
        return bce(logits, target) + dice.mean()

    run.mkdir(parents=True, exist_ok=True)
    start_epoch, history = 0, []
    if (run / "last.pt").exists():
        state = torch.load(run / "last.pt", weights_only=False, map_location=device())
        encoder.load_state_dict(state["encoder"])
        decoder.load_state_dict(state["decoder"])
        optimiser.load_state_dict(state["optimiser"])
        set_lr(optimiser, lr)
        start_epoch, history = state["epoch"] + 1, state["history"]
        torch.set_rng_state(state["rng"].cpu())
        print(f"resumed at epoch {start_epoch}")
    (run / "log.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))  # = the checkpoint's
    started = time.monotonic()
    for epoch in range(start_epoch, epochs):
        encoder.train()
        decoder.train()
        t0 = time.monotonic()
        losses = []
        for i in range(0, len(train_x), batch):
            x = train_x[torch.from_numpy(_order(len(train_x), epoch, i, batch)).to(device())][:, None].float()
            with autocast(precision):
                logits = decoder(encoder(x))
            value = loss_fn(logits.float(), x)
            optimiser.zero_grad()
            value.backward()
            optimiser.step()
            losses.append(value.detach())
        train_iou = evaluate(encoder, decoder, train_x[monitored], precision=precision)
        held_iou = evaluate(encoder, decoder, held_x, precision=precision)
        record = {
            "epoch": epoch,
            "loss": float(torch.stack(losses).mean()),
            "train_iou": float(train_iou.mean()),
            "held_out_iou": float(held_iou.mean()),
            "held_out_real_iou": float(held_iou[held_real].mean()) if held_real.any() else None,
            "lr": lr,
            "seconds": round(time.monotonic() - t0, 1),
        }
        history.append(record)
        print(json.dumps(record), flush=True)
        with (run / "log.jsonl").open("a") as log:
            log.write(json.dumps(record) + "\n")
        converged = record["train_iou"] > stop_iou
        out_of_time = (time.monotonic() - started) / 60 > max_minutes
        if converged or out_of_time or epoch + 1 == epochs or (epoch + 1) % checkpoint_every == 0:
            state = {
                "encoder": encoder.state_dict(),
                "decoder": decoder.state_dict(),
                "optimiser": optimiser.state_dict(),
                "epoch": epoch,
                "history": history,
                "rng": torch.get_rng_state(),
                "bottleneck": bottleneck,
                "seed": seed,
                "loss": loss,
                "precision": precision,
                "stop_iou": stop_iou,
            }
            save_checkpoint(state, run / "last.pt")
        if converged:
            print(f"converged: train IoU {record['train_iou']:.4f} > {stop_iou}")
            break
        if out_of_time:
            print(f"time budget of {max_minutes} min reached")
            break
    return history[-1] if history else {}


def sweep(
    data: Path,
    runs: Path,
    out: Path,
    *,
    bottlenecks: list[int],
    epochs: int,
    batch: int,
    threads: int,
    artifact: Path | None = None,
) -> list[dict[str, Any]]:
    """Train one autoencoder per bottleneck with the same epoch budget (each resumable in
    ``runs/b<N>``; a finished run is only read) and write the comparison table to ``out`` (markdown)
    and ``out``.json, and into ``artifact``'s metadata when given."""
    rows = []
    for bottleneck in bottlenecks:
        run = runs / f"b{bottleneck}"
        if not _finished(run, epochs):
            logged = len(_history(run))
            if logged and not (run / "last.pt").exists():
                raise SystemExit(
                    f"{run} holds {logged} logged epochs but no checkpoint to continue from: train it to "
                    f"{epochs} epochs where its last.pt is, or sweep with --epochs {logged}"
                )
            train(
                data,
                run,
                bottleneck=bottleneck,
                epochs=epochs,
                batch=batch,
                seed=0,
                threads=threads,
                max_minutes=1e9,
            )
        history = _history(run)[:epochs]
        converged = next((h["epoch"] + 1 for h in history if h["train_iou"] > STOP_IOU), None)
        reached = {
            f"epochs_to_{level}": next((h["epoch"] + 1 for h in history if h["train_iou"] >= level), None)
            for level in (0.8, 0.85, 0.9)
        }
        last = history[-1]
        rows.append(
            {
                "bottleneck": bottleneck,
                "epochs_run": len(history),
                "epochs_to_converge": converged,
                **reached,
                "train_iou": last["train_iou"],
                "held_out_iou": last["held_out_iou"],
                "held_out_real_iou": last.get("held_out_real_iou"),
                "best_held_out_iou": max(h["held_out_iou"] for h in history),
                "seconds_per_epoch": float(np.median([h["seconds"] for h in history])),
            }
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    lines = [
        "| bottleneck | epochs run | epochs to IoU > 0.995 | epochs to 0.80 | epochs to 0.85 "
        "| epochs to 0.90 | train IoU | held-out IoU | held-out real IoU | best held-out IoU | s/epoch |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [
            r["bottleneck"],
            r["epochs_run"],
            r["epochs_to_converge"] or f"not in {r['epochs_run']}",
            r["epochs_to_0.8"] or "-",
            r["epochs_to_0.85"] or "-",
            r["epochs_to_0.9"] or "-",
            f"{r['train_iou']:.4f}",
            f"{r['held_out_iou']:.4f}",
            "-" if r.get("held_out_real_iou") is None else f"{r['held_out_real_iou']:.4f}",
            f"{r['best_held_out_iou']:.4f}",
            f"{r['seconds_per_epoch']:.2g}",
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if artifact is not None:  # the comparison travels with the model it informed
        from discgeo.artifacts import record_metric

        record_metric(artifact, kind="autoencoder", name="bottleneck_sweep", value=rows)
    return rows


def _history(run: Path) -> list[dict[str, Any]]:
    log = run / "log.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def _finished(run: Path, epochs: int) -> bool:
    """A run that reached the epoch budget or converged is only read (its checkpoint may be absent:
    runs trained elsewhere bring back their log)."""
    history = _history(run)
    return len(history) >= epochs or any(h["train_iou"] > STOP_IOU for h in history)


def plot_history(history: list[dict[str, Any]], path: Path) -> None:
    """Learning curve: train and held-out IoU per epoch (training precision), learning-rate changes
    marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] + 1 for h in history]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(epochs, [h["train_iou"] for h in history], label="train discs")
    ax.plot(epochs, [h["held_out_iou"] for h in history], label="held-out patients")
    rates = [logged_lr(h, DEFAULT_LR) for h in history]
    for i in range(1, len(rates)):
        if rates[i] != rates[i - 1]:
            ax.axvline(epochs[i], color="grey", linestyle=":")
            ax.text(epochs[i], 0.52, f" lr {rates[i]:g}", color="grey", fontsize=8)
    ax.axhline(STOP_IOU, color="black", linewidth=0.8, linestyle="--", label=f"stop at {STOP_IOU}")
    ax.set(xlabel="epoch", ylabel="reconstruction IoU", ylim=(0.5, 1.0), title="Disc autoencoder training")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def _order(n: int, epoch: int, start: int, batch: int) -> np.ndarray:
    """Indices of one mini-batch: a fixed permutation per epoch, sliced."""
    perm = np.random.default_rng([epoch, n]).permutation(n)  # resumable: depends on the epoch only
    return perm[start : start + batch]


# ------------------------------------------------------------------------------------------ export
def export_onnx(
    encoder: DiscEncoder, decoder: DiscDecoder, out: Path, sample: np.ndarray | None = None
) -> dict[str, float]:
    """Export encoder and decoder+sigmoid (dynamo exporter, dynamic batch); return the max absolute
    differences between ONNX Runtime and torch on ``sample`` crops (a box phantom when None)."""
    import onnxruntime as ort

    encoder.eval()
    decoder.eval()
    probabilities = Probabilities(decoder).eval()
    out.mkdir(parents=True, exist_ok=True)
    x = torch.zeros(2, 1, CROP.size, CROP.size, CROP.size)
    x[:, :, 24:40, 10:54, 28:36] = 1
    with torch.no_grad():
        z = encoder(x)
    batch = torch.export.Dim("batch", min=1, max=1024)
    torch.onnx.export(
        encoder,
        (x,),
        out / "encoder.onnx",
        input_names=["crops"],
        output_names=["latents"],
        dynamic_shapes={"crops": {0: batch}},
        dynamo=True,
        external_data=False,
    )
    torch.onnx.export(
        probabilities,
        (z,),
        out / "decoder.onnx",
        input_names=["latents"],
        output_names=["probabilities"],
        dynamic_shapes={"latents": {0: batch}},
        dynamo=True,
        external_data=False,
    )
    probe = x if sample is None else torch.from_numpy(sample[:, None].astype(np.float32))
    with torch.no_grad():
        z_torch = encoder(probe).numpy()
        p_torch = probabilities(torch.from_numpy(z_torch)).numpy()
    enc = ort.InferenceSession(str(out / "encoder.onnx"), providers=["CPUExecutionProvider"])
    dec = ort.InferenceSession(str(out / "decoder.onnx"), providers=["CPUExecutionProvider"])
    return {
        "encoder_max_abs_diff": float(np.abs(enc.run(None, {"crops": probe.numpy()})[0] - z_torch).max()),
        "decoder_max_abs_diff": float(np.abs(dec.run(None, {"latents": z_torch})[0] - p_torch).max()),
    }


def export(
    run: Path,
    out: Path,
    *,
    data: Path | None = None,
    curve: Path | None = None,
    sweep_table: Path | None = SWEEP_TABLE,
    healthy_discs: bool = True,
) -> dict[str, Any]:
    """Export the last checkpoint, check parity with torch, write metadata.json (with the bottleneck
    table ``sweep_table`` when it exists, and with ``healthy_discs`` the figures on the 145 real healthy
    discs), and the learning curve to ``curve`` when given."""
    from discgeo.artifacts import write_artifact

    state = torch.load(run / "last.pt", weights_only=False, map_location="cpu")
    bottleneck = state["bottleneck"]
    encoder, decoder = DiscEncoder(bottleneck), DiscDecoder(bottleneck)
    encoder.load_state_dict(state["encoder"])
    decoder.load_state_dict(state["decoder"])
    crops, held, patients, sources = load_data(data) if data is not None else (None, None, None, None)
    parity = export_onnx(encoder, decoder, out, None if crops is None else crops[:8])
    print(json.dumps(parity))
    history = state["history"]
    quality: dict[str, Any] = {}
    unusual: dict[str, Any] | None = None
    if crops is not None:  # the shipped figures: float32, every disc once, summarised per set
        every = evaluate(encoder, decoder, crops)
        real = np.char.startswith(sources, "real")
        sets = {
            "train": ~held,
            "train_real": ~held & real,
            "held_out": held,
            "held_out_phantom": held & ~real,
            "held_out_real": held & real,
            "held_out_real_native": held & (sources == "real-native"),
        }
        for name, chosen in sets.items():
            scores = every[chosen]
            if not scores.size:
                continue
            quality[name] = {
                "discs": int(chosen.sum()),
                "mean_iou": round(float(scores.mean()), 4),
                "median_iou": round(float(np.median(scores)), 4),
                "min_iou": round(float(scores.min()), 4),
                "patients": sorted(set(patients[chosen].tolist()))
                if name.startswith("held_out_real")
                else None,
            }
        print(json.dumps(quality))
        if np.any(held & real):
            unusual = unusual_shape_threshold(every[held & real])
    metadata = {
        "kind": "autoencoder",
        "name": "discgeo-disc-autoencoder",
        "version": f"0.4.0-b{bottleneck}-e{state['epoch'] + 1}",
        "latent_dim": bottleneck,
        **CROP.to_metadata(),
        "unusual_shape": unusual,
        "files": {"encoder": "encoder.onnx", "decoder": "decoder.onnx"},
        "inputs": {
            "encoder": {
                "name": "crops",
                "dtype": "float32",
                "shape": ["N", 1, CROP.size, CROP.size, CROP.size],
            },
            "decoder": {"name": "latents", "dtype": "float32", "shape": ["N", bottleneck]},
        },
        "outputs": {
            "encoder": {"name": "latents", "dtype": "float32", "shape": ["N", bottleneck]},
            "decoder": {
                "name": "probabilities",
                "dtype": "float32",
                "shape": ["N", 1, CROP.size, CROP.size, CROP.size],
            },
        },
        "training": {
            "seed": state["seed"],
            "epochs": state["epoch"] + 1,
            "stop_iou": state.get("stop_iou", STOP_IOU),
            "optimiser": "Adam, " + lr_schedule(history, DEFAULT_LR),
            "loss": state.get("loss", "bce"),
            "precision": state.get("precision", "fp32"),
            "data": json.loads((data / "summary.json").read_text()) if data else None,
            "command": "python -m training.autoencoder data/train/export (see training/autoencoder.py)",
        },
        "metrics": {
            "train_iou": quality["train"]["mean_iou"] if quality else history[-1]["train_iou"],
            "held_out_iou": quality["held_out"]["mean_iou"] if quality else history[-1]["held_out_iou"],
            "held_out_real_iou": quality["held_out_real"]["mean_iou"] if quality else None,
            "quality_float32": quality or None,
            "parity": parity,
            "history_tail": history[-5:],
        },
    }
    if sweep_table is not None and sweep_table.exists():  # the comparison travels with the model it informed
        metadata["metrics"]["bottleneck_sweep"] = json.loads(sweep_table.read_text())
    write_artifact(out, metadata)
    if data is not None and healthy_discs:  # through the inference path (ONNX Runtime), as the pipeline
        from discgeo.analysis import healthy_real_discs
        from discgeo.artifacts import record_metric
        from discgeo.encoding import Encoder

        summary = json.loads((data / "summary.json").read_text())
        figures = healthy_real_discs(Encoder.from_artifact(out), held_out=summary["held_out_real_subjects"])
        print(json.dumps(figures))
        record_metric(out, kind="autoencoder", name="real_healthy_discs", value=figures)
    if curve is not None:
        plot_history(history, curve)
    return metadata


def unusual_shape_threshold(held_out_real_iou: np.ndarray) -> dict[str, Any]:
    """The ``unusual_shape`` rule: reconstruction IoU below the lower Tukey fence (first quartile
    minus 1.5 interquartile ranges) of the held-out real discs, i.e. an outlier among healthy discs
    the autoencoder never saw."""
    q1, q3 = np.percentile(held_out_real_iou, [25, 75])
    fence = float(q1 - 1.5 * (q3 - q1))
    return {
        "below_iou": round(fence, 4),
        "rule": "lower Tukey fence of the held-out real discs' IoU: 25th percentile - 1.5 x (75th - 25th)",
        "held_out_real_discs": len(held_out_real_iou),
        "percentiles": {"p25": round(float(q1), 4), "p75": round(float(q3), 4)},
        "held_out_real_below": int((held_out_real_iou < fence).sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("data")
    d.add_argument("--out", type=Path, default=ROOT / "build" / "ae-data")
    d.add_argument("--phantoms", type=int, default=120)
    d.add_argument("--seed", type=int, default=7)
    t = sub.add_parser("train")
    t.add_argument("--data", type=Path, default=ROOT / "build" / "ae-data")
    t.add_argument("--run", type=Path, default=ROOT / "build" / "ae-run")
    t.add_argument("--bottleneck", type=int, default=4)
    t.add_argument("--epochs", type=int, default=400)
    t.add_argument("--batch", type=int, default=16)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--max-minutes", type=float, default=1e9)
    t.add_argument(
        "--loss",
        choices=("bce", "bce+dice"),
        default="bce+dice",
        help="bce = the reference study; bce+dice converges in far fewer epochs on CPU",
    )
    t.add_argument(
        "--lr", type=float, default=DEFAULT_LR, help="Adam learning rate (also on resume: step decay)"
    )
    t.add_argument(
        "--precision",
        choices=("auto", "bf16", "fp32"),
        default="auto",
        help="auto: bf16 autocast where the hardware runs it natively, else fp32 (float32 weights and "
        "evaluation either way)",
    )
    t.add_argument("--stop-iou", type=float, default=STOP_IOU, help=f"stop above this train IoU ({STOP_IOU})")
    t.add_argument("--checkpoint-every", type=int, default=1, help="write RUN/last.pt every N epochs")
    t.add_argument("--monitor", type=int, help="log the training IoU of this many fixed crops (default: all)")
    w = sub.add_parser("sweep", help="same epoch budget for several bottlenecks, then a table")
    w.add_argument("--data", type=Path, default=ROOT / "build" / "ae-data")
    w.add_argument("--runs", type=Path, default=ROOT / "build" / "ae-sweep")
    w.add_argument("--out", type=Path, default=SWEEP_TABLE.with_suffix(".md"))
    w.add_argument("--bottlenecks", type=int, nargs="+", default=[64, 8, 4, 3])
    w.add_argument("--epochs", type=int, default=40)
    w.add_argument("--batch", type=int, default=8)
    w.add_argument("--threads", type=int, default=2)
    w.add_argument("--artifact", type=Path, help="also record the table in this artifact's metadata")
    e = sub.add_parser("export")
    e.add_argument("--run", type=Path, default=ROOT / "build" / "ae-run")
    e.add_argument("--data", type=Path, default=ROOT / "build" / "ae-data")
    e.add_argument("--out", type=Path, default=ROOT / "models" / "autoencoder")
    e.add_argument("--curve", type=Path, default=ROOT / "training" / "results" / "autoencoder-curve.png")
    args = parser.parse_args()
    if args.command == "data":
        build_data(args.out, phantoms=args.phantoms, seed=args.seed)
    elif args.command == "train":
        train(
            args.data,
            args.run,
            bottleneck=args.bottleneck,
            epochs=args.epochs,
            batch=args.batch,
            seed=args.seed,
            threads=args.threads,
            max_minutes=args.max_minutes,
            loss=args.loss,
            precision=args.precision,
            lr=args.lr,
            stop_iou=args.stop_iou,
            checkpoint_every=args.checkpoint_every,
            monitor=args.monitor,
        )
    elif args.command == "sweep":
        sweep(
            args.data,
            args.runs,
            args.out,
            bottlenecks=args.bottlenecks,
            epochs=args.epochs,
            batch=args.batch,
            threads=args.threads,
            artifact=args.artifact,
        )
    else:
        export(args.run, args.out, data=args.data, curve=args.curve)


if __name__ == "__main__":
    main()
