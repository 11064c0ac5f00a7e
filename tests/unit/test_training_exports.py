"""ONNX exports of the real architectures match torch (untrained weights here; shipped weights are
checked by the export commands)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow


def test_segmenter_2d_swinunetr_v2_export_parity(tmp_path):
    from training.segmenter import CONFIGS, build_model, export_onnx

    torch.manual_seed(0)
    parity = export_onnx(build_model(CONFIGS["cpu"]), CONFIGS["cpu"], tmp_path / "seg.onnx")
    assert parity <= 1e-4


def test_autoencoder_export_parity(tmp_path):
    import onnxruntime as ort
    from training.autoencoder import DiscDecoder, DiscEncoder, export_onnx

    torch.manual_seed(0)
    encoder, decoder = DiscEncoder(4).eval(), DiscDecoder(4).eval()
    parity = export_onnx(encoder, decoder, tmp_path)
    assert parity["encoder_max_abs_diff"] <= 1e-4 and parity["decoder_max_abs_diff"] <= 1e-4
    session = ort.InferenceSession(str(tmp_path / "encoder.onnx"), providers=["CPUExecutionProvider"])
    assert session.run(None, {"crops": np.zeros((5, 1, 64, 64, 64), np.float32)})[0].shape == (5, 4)
