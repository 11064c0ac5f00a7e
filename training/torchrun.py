"""Device, precision, learning-rate and checkpoint helpers shared by the torch training scripts."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import torch


def device() -> torch.device:
    """CUDA when torch sees a GPU (with cuDNN choosing its fastest algorithms for the fixed patch and
    crop shapes of both scripts), else CPU."""
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
        return torch.device("cuda")
    return torch.device("cpu")


def bf16_is_native() -> bool:
    """True where bfloat16 arithmetic runs in hardware: a CUDA device that supports it, or a CPU with
    AVX-512-BF16 or AMX (without them torch emulates it, several times slower than float32)."""
    if torch.cuda.is_available():
        return bool(torch.cuda.is_bf16_supported())
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str) -> str:
    """``auto`` -> ``bf16`` where it is native (:func:`bf16_is_native`), else ``fp32``."""
    if precision == "auto":
        return "bf16" if bf16_is_native() else "fp32"
    return precision


def autocast(precision: str) -> torch.autocast:
    """Mixed precision for training steps: ``bf16`` runs convolutions and matrix products in
    bfloat16 (weights, losses, validation and export stay float32), ``fp32`` disables it.

    Measured on 2 AVX-512-BF16 CPU cores: autoencoder step (batch 8) 0.83 -> 0.45 s, 2D segmenter
    step (batch 16) 1.05 -> 0.80 s. On 2 AMD EPYC cores without AVX-512 an autoencoder step took
    2.1 s in float32 and several times that in (emulated) bfloat16: ``auto`` picks float32 there.
    """
    return torch.autocast(device().type, dtype=torch.bfloat16, enabled=resolve_precision(precision) == "bf16")


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write a checkpoint atomically: a run stopped mid-write keeps its previous one."""
    partial = path.with_name(path.name + ".tmp")
    torch.save(state, partial)
    partial.replace(path)


def set_lr(optimiser: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group's rate: a resumed run may continue at another rate (step decay)."""
    for group in optimiser.param_groups:
        group["lr"] = lr


def logged_lr(record: dict[str, Any], default: float) -> float:
    """Learning rate of one logged epoch (``default`` for records written before rates were logged)."""
    return float(record.get("lr", default))


def lr_schedule(history: list[dict[str, Any]], default: float) -> str:
    """The learning rates of a run as text, e.g. 'lr 0.001 for epochs 1-60, 0.0001 for epochs 61-80'."""
    parts = []
    for rate, group in itertools.groupby(history, key=lambda h: logged_lr(h, default)):
        epochs = [h["epoch"] + 1 for h in group]
        parts.append(f"{rate:g} for epochs {epochs[0]}-{epochs[-1]}")
    return "lr " + ", ".join(parts)
