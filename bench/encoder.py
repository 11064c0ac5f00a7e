"""Encoder throughput: discs per second at batch 1 and 32, in-process (ONNX Runtime) and over HTTP.

    python -m bench.encoder            # needs models/autoencoder; starts the encoder service itself

Writes bench/results/encoder.json and bench/results/encoder.md.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from discgeo.config import Settings
from discgeo.encoding import Encoder, disc_crops, pack_crops
from discgeo.io import read_labels
from discgeo.local import bentoml_service

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "ivd-t2-mri"


def _rate(fn, discs: int, repeats: int = 3) -> float:
    fn()
    best = min(_timed(fn) for _ in range(repeats))
    return discs / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    crops = np.concatenate(
        [
            disc_crops(read_labels(SHARED / f"{c}_discs.nii.gz")).crops
            for c in ("case-11", "case-20", "case-25")
        ]
    )
    batch = np.concatenate([crops, crops, crops])[:32]
    encoder = Encoder.from_artifact(Settings.from_env().artifact("autoencoder"), threads=2)
    results: dict[str, object] = {
        "machine": {
            "cpus": os.cpu_count(),
            "processor": platform.processor(),
            "python": platform.python_version(),
        },
        "model_version": encoder.version,
        "provider": encoder.provider,
    }
    results["in_process_batch1_discs_per_s"] = _rate(
        lambda: [encoder.encode(batch[i : i + 1]) for i in range(8)], 8
    )
    results["in_process_batch32_discs_per_s"] = _rate(lambda: encoder.encode(batch, batch_size=32), 32)
    results["in_process_batch32_with_quality_discs_per_s"] = _rate(
        lambda: encoder.encode_with_quality(batch), 32
    )

    with (
        tempfile.TemporaryDirectory() as home,
        bentoml_service("service.py:Encoder", ROOT / "services" / "encoder", Path(home)) as url,
        httpx.Client(timeout=120) as client,
    ):

        def post(x: np.ndarray) -> None:
            r = client.post(
                url + "/encode", files={"crops": ("c.npz", pack_crops(x), "application/octet-stream")}
            )
            r.raise_for_status()

        results["http_batch1_discs_per_s"] = _rate(lambda: [post(batch[i : i + 1]) for i in range(8)], 8)
        results["http_batch32_discs_per_s"] = _rate(lambda: post(batch), 32)
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "encoder.json").write_text(json.dumps(results, indent=1))
    rows = [
        (k.replace("_discs_per_s", "").replace("_", " "), v)
        for k, v in results.items()
        if k.endswith("per_s")
    ]
    lines = [
        "# Encoder throughput",
        "",
        f"`python -m bench.encoder`; model {encoder.version}, {encoder.provider}, "
        f"{os.cpu_count()} CPU cores, ONNX Runtime intra-op threads 2. Latents plus reconstruction IoU "
        "(encode + decode) over HTTP.",
        "",
        "| path | discs per second |",
        "|---|---|",
    ]
    lines += [f"| {name} | {value:.1f} |" for name, value in rows]
    (out / "encoder.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
