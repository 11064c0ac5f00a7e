"""Device and precision choices shared by the torch training scripts (segmenter, autoencoder)."""

from __future__ import annotations

import torch


def device() -> torch.device:
    """CUDA when torch sees a GPU, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(precision: str) -> torch.autocast:
    """Mixed precision for training steps: ``bf16`` runs convolutions and matrix products in
    bfloat16 (weights, losses, validation and export stay float32), ``fp32`` disables it.

    Measured on 2 AVX-512-BF16 CPU cores: autoencoder step (batch 8) 0.83 -> 0.45 s, 2D segmenter
    step (batch 16) 1.05 -> 0.80 s.
    """
    return torch.autocast(device().type, dtype=torch.bfloat16, enabled=precision == "bf16")
