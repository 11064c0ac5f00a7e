"""The pipeline benchmark's own arithmetic: FLOP counts, the model clock, the reference recipe's voxel
geometry and the target verdicts (the full run is `make bench`)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from bench.pipeline import Clock, TimedSession, TorchSession, flops, summarise, voxel_geometry  # noqa: E402


def test_flops_of_a_convolution_match_the_formula() -> None:
    conv = torch.nn.Conv3d(2, 4, 3, padding=1, bias=False)
    # 2 FLOPs per multiply-add: output voxels x out channels x in channels x kernel volume
    assert flops(conv, (1, 2, 8, 8, 8)) == 2 * 8**3 * 4 * 2 * 27


def test_timed_session_counts_items_and_time() -> None:
    clock = Clock()
    session = TimedSession(TorchSession(torch.nn.Identity(), "torch"), clock)
    out = session.run(None, {"x": np.ones((3, 1, 4, 4), np.float32)})
    session.run(None, {"x": np.ones((2, 1, 4, 4), np.float32)})
    assert clock.items == 5 and clock.seconds > 0
    assert out[0].shape == (3, 1, 4, 4)
    assert session.get_providers() == ["torch"]


def test_voxel_geometry_of_a_box() -> None:
    mask = np.zeros((40, 30, 12), bool)
    mask[5:35, 5:25, 3:9] = True  # 30 x 20 x 6 voxels
    g = voxel_geometry(mask)
    assert (g["lateral"], g["ap"], g["height"]) == pytest.approx((30, 20, 6))


def _results(*, http_total: float, model: float, reference: float) -> dict:
    stages = {"read": 0.1, "segment": 4.0, "measure": 0.2, "encode": 0.2, "classify": 0.1, "write": 0.4}
    stages["total"] = sum(stages.values())
    return {
        "matmul_gflops": 100.0,
        "embedded": {
            "stages_s": stages,
            "model_s": {"segmenter": model, "encoder": 0.0, "decoder": 0.0},
            "flops_per_study": {"segmenter": 100e9, "encoder": 0.0, "decoder": 0.0},
        },
        "http": {"stages_s": {"total": http_total}},
        "reference": {
            "timings_s": {"total": reference, "segment": 10.0},
            "flops_per_window": 1e11,
            "windows": 5,
        },
    }


def test_summary_ratios_and_verdicts() -> None:
    s = summarise(_results(http_total=5.0, model=4.5, reference=45.0))
    assert s["http_vs_embedded"] == pytest.approx(1.0)
    assert s["overhead_fraction"] == pytest.approx(0.1)
    assert s["speedup_vs_reference"] == pytest.approx(45 / 4.5)
    assert s["ours_achieved_fraction_of_matmul"] == pytest.approx(100 / 4.5 / 100, abs=1e-3)
    assert s["reference_segmenter_achieved_fraction_of_matmul"] == pytest.approx(0.5)
    assert all(t["met"] for t in s["targets"].values())
    slow = summarise(_results(http_total=10.0, model=2.0, reference=9.0))
    assert not any(t["met"] for t in slow["targets"].values())
