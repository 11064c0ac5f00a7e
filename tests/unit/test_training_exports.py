"""ONNX exports of the real architectures match torch (untrained weights here; shipped weights are
checked by the export commands; the segmenter's export is tested with its training loop)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow


def test_autoencoder_export_parity(tmp_path):
    import onnxruntime as ort

    from training.autoencoder import DiscDecoder, DiscEncoder, export_onnx

    torch.manual_seed(0)
    encoder, decoder = DiscEncoder(4).eval(), DiscDecoder(4).eval()
    parity = export_onnx(encoder, decoder, tmp_path)
    assert parity["encoder_max_abs_diff"] <= 1e-4 and parity["decoder_max_abs_diff"] <= 1e-4
    session = ort.InferenceSession(str(tmp_path / "encoder.onnx"), providers=["CPUExecutionProvider"])
    assert session.run(None, {"crops": np.zeros((5, 1, 64, 64, 64), np.float32)})[0].shape == (5, 4)


def test_shipped_segmenter_fits_the_size_limit():
    from pathlib import Path

    from training.segmenter import SHIPPED_LIMIT_MB

    model = Path(__file__).resolve().parents[2] / "models" / "segmenter" / "segmenter.onnx"
    assert model.stat().st_size <= SHIPPED_LIMIT_MB * 1e6
