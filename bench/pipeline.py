"""The pipeline benchmark: where a study's time goes, how fast studies flow, and how that compares with
the reference recipe and with what the machine could do.

    python -m bench.pipeline            # make bench        (about 6 minutes on 2 CPU cores)
    python -m bench.pipeline --quick    # make bench-quick  (under 3 minutes)

Measured in one run, on one real T2 case (case-20, 221x221x67 at 1 mm; Menezes-Reis et al. 2016, see
the README) written as a DICOM series:

- per-stage wall time of a study (read DICOM, segment, measure, encode, classify, write JSON + NIfTI +
  PNG + SEG + SR) and studies per minute, embedded (in-process) and over HTTP (the four BentoML
  services on loopback, :class:`~discgeo.pipeline.RemoteStages`);
- time inside the models (every ONNX Runtime ``run``), hence pipeline overhead = everything else;
- model FLOPs per study (``torch.utils.flop_counter`` on the same architectures) against the measured
  float32 matmul speed of this machine: the achieved fraction of peak;
- torch vs ONNX Runtime on the same code path (segmenter sliding window, encoder batch of 32);
- encoder batch 1 vs 32, in-process and over HTTP;
- scaling with slices, in-plane size and number of studies; peak memory (child processes);
- the reference recipe (Perrone et al. 2025): MONAI SwinUNETR 3D, feature_size 48, torch
  ``sliding_window_inference``; per-disc torch autoencoder at batch 1; geometry in voxels from
  principal axes, on the same input. Untrained weights (timing only); its per-disc steps run on the
  discs our segmenter found, so both recipes handle the same discs.

Torch models in the comparisons have the shipped architectures with untrained weights: compute time
does not depend on weight values. With a GPU, ONNX Runtime takes the CUDA provider and torch the CUDA
device; the results name the card. Writes ``bench/results/pipeline[-quick].{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from discgeo import realdata

ROOT = Path(__file__).resolve().parents[1]
SHARED = realdata.ivd_t2_dir()
CASE = "case-20"
TARGETS = {"http_vs_embedded": 0.85, "overhead_fraction": 0.15, "speedup_vs_reference": 5.0}
# the reference recipe's segmenter and sliding window (MONAI defaults, but 4 windows per batch)
REF_FEATURE_SIZE, REF_ROI, REF_OVERLAP, REF_SW_BATCH = 48, (96, 96, 96), 0.25, 4


# ------------------------------------------------------------------------------------- machine
def machine() -> dict[str, Any]:
    import onnxruntime as ort
    import torch

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "memory_gib": round(mem_kb / 2**20, 1),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "onnxruntime_providers": ort.get_available_providers(),
    }


def torch_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def matmul_gflops(*, size: int = 2048, repeats: int = 5) -> float:
    """Measured float32 matmul speed (torch, all cores or the GPU): the machine's practical peak."""
    import torch

    device = torch_device()
    a = torch.rand(size, size, device=device)
    b = torch.rand(size, size, device=device)
    best = float("inf")
    for _ in range(repeats + 1):
        start = time.perf_counter()
        (a @ b).sum().item()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


# ---------------------------------------------------------------------------------- model clock
@dataclass
class Clock:
    """Seconds spent inside model calls and the number of items (windows, crops) they processed."""

    seconds: float = 0.0
    items: int = 0


class TimedSession:
    """An ONNX Runtime session (or :class:`TorchSession`) that adds every ``run`` to a :class:`Clock`."""

    def __init__(self, session: Any, clock: Clock) -> None:
        self.session, self.clock = session, clock

    def run(self, outputs: Any, feeds: dict[str, np.ndarray]) -> Any:
        start = time.perf_counter()
        result = self.session.run(outputs, feeds)
        self.clock.seconds += time.perf_counter() - start
        self.clock.items += len(next(iter(feeds.values())))
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self.session, name)


class TorchSession:
    """A torch module behind ONNX Runtime's ``run`` interface, to time torch on the same code path."""

    def __init__(self, module: Any, provider: str) -> None:
        self.device = torch_device()
        self.module, self.provider = module.eval().to(self.device), provider

    def run(self, outputs: Any, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(next(iter(feeds.values()))).to(self.device)
            return [self.module(x).float().cpu().numpy()]

    def get_providers(self) -> list[str]:
        return [self.provider]


def segmenter_module(metadata: dict[str, Any]) -> Any:
    from training.segmenter import CONFIGS, build_model

    return build_model(CONFIGS[metadata["training"]["config"]])


def autoencoder_modules(latent_dim: int) -> tuple[Any, Any]:
    from training.autoencoder import DiscDecoder, DiscEncoder, Probabilities

    return DiscEncoder(latent_dim), Probabilities(DiscDecoder(latent_dim))


def flops(module: Any, shape: tuple[int, ...]) -> float:
    """FLOPs (2 per multiply-add) of one forward pass of ``module`` on a zero tensor of ``shape``."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        module.eval()(torch.zeros(shape))
    return float(counter.get_total_flops())


def model_flops(stages: Any) -> dict[str, float]:
    """FLOPs per item of the shipped models: per segmenter window, per encoded and decoded crop."""
    encoder, decoder = autoencoder_modules(stages.encoder.latent_dim)
    return {
        "segmenter_per_window": flops(
            segmenter_module(stages.segmenter.metadata), (1, 1, *stages.segmenter.roi)
        ),
        "encoder_per_crop": flops(encoder, (1, 1, 64, 64, 64)),
        "decoder_per_crop": flops(decoder, (1, stages.encoder.latent_dim)),
    }


@contextmanager
def clocked(stages: Any) -> Iterator[dict[str, Clock]]:
    """Time every model call of ``stages`` (LocalStages) while the block runs."""
    clocks = {"segmenter": Clock(), "encoder": Clock(), "decoder": Clock()}
    seg, enc = stages.segmenter, stages.encoder
    originals = (seg.session, enc.encoder, enc.decoder)
    seg.session = TimedSession(seg.session, clocks["segmenter"])
    enc.encoder = TimedSession(enc.encoder, clocks["encoder"])
    enc.decoder = TimedSession(enc.decoder, clocks["decoder"])
    try:
        yield clocks
    finally:
        seg.session, enc.encoder, enc.decoder = originals


# --------------------------------------------------------------------------------------- studies
def write_study(volume: Any, folder: Path, name: str) -> list[Path]:
    from discgeo.phantom import SeriesTags, write_dicom_series

    return write_dicom_series(
        volume, folder, tags=SeriesTags(series_description="SAG T2 TSE", contrast="t2", uid_seed=name)
    )


def run_study(files: list[Path], stages: Any, out: Path) -> dict[str, float]:
    """One study as ``discgeo run`` does it (:func:`discgeo.api.process_study`); seconds per step
    (read, the pipeline's stages, write)."""
    from discgeo.api import process_study

    start = time.perf_counter()
    processed = process_study(files, stages=stages, out=out, study=out.name)
    timings = {k: v for k, v in processed.result.timings_s.items() if k not in ("read", "total")}
    return {
        "read": processed.read_s,
        **timings,
        "write": processed.write_s,
        "total": time.perf_counter() - start,
        "discs": len(processed.result.discs),
    }


def best_of(runs: list[dict[str, float]]) -> dict[str, float]:
    """The run with the smallest total (the least disturbed one), rounded."""
    best = min(runs, key=lambda r: r["total"])
    return {k: round(v, 4) for k, v in best.items()}


def embedded(files: list[Path], tmp: Path, repeats: int) -> dict[str, Any]:
    from discgeo.pipeline import LocalStages

    stages = LocalStages()
    run_study(files, stages, tmp / "warm")  # first-call allocations are not a study's cost
    runs, model_s, items = [], [], []
    for i in range(repeats):
        with clocked(stages) as clocks:
            runs.append(run_study(files, stages, tmp / f"embedded-{i}"))
        model_s.append({k: c.seconds for k, c in clocks.items()})
        items.append({k: c.items for k, c in clocks.items()})
    best = int(np.argmin([r["total"] for r in runs]))
    per_item = model_flops(stages)
    count = items[best]
    study_flops = {
        "segmenter": per_item["segmenter_per_window"] * count["segmenter"],
        "encoder": per_item["encoder_per_crop"] * count["encoder"],
        "decoder": per_item["decoder_per_crop"] * count["decoder"],
    }
    return {
        "versions": stages.versions(),
        "provider": stages.segmenter.provider,
        "stages_s": best_of(runs),
        "model_s": {k: round(v, 4) for k, v in model_s[best].items()},
        "model_items": count,
        "flops_per_item": per_item,
        "flops_per_study": study_flops,
        "stages": stages,
    }


def http(
    files: list[Path], tmp: Path, repeats: int, study_counts: list[int], crops: np.ndarray, local: Any
) -> dict[str, Any]:
    """The same studies through the four services; N studies with 1 and 2 client workers; encoder
    batching in-process (``local`` stages) and against the running encoder service."""
    from discgeo.local import client_headers, pipeline_services
    from discgeo.pipeline import RemoteStages, ServiceURLs

    with pipeline_services(tmp / "services") as urls:
        services = ServiceURLs(**urls)
        stages = RemoteStages(services, headers=client_headers())
        try:
            run_study(files, stages, tmp / "http-warm")
            runs = [run_study(files, stages, tmp / f"http-{i}") for i in range(repeats)]
            scaling = []
            for n in study_counts:
                for workers in (1, 2):
                    folder = tmp / f"http-n{n}-w{workers}"
                    start = time.perf_counter()
                    with ThreadPoolExecutor(workers) as pool:
                        list(
                            pool.map(
                                lambda i, folder=folder: _remote_study(files, services, folder / str(i)),
                                range(n),
                            )
                        )
                    wall = time.perf_counter() - start
                    scaling.append(
                        {
                            "studies": n,
                            "client_workers": workers,
                            "wall_s": round(wall, 2),
                            "studies_per_min": round(60 * n / wall, 2),
                        }
                    )
            memory = service_peak_rss_mib()
            batching = encoder_batching(crops, local.encoder, urls["encoder"])
        finally:
            stages.close()
    return {
        "stages_s": best_of(runs),
        "scaling": scaling,
        "services_peak_rss_mib": memory,
        "encoder_batching": batching,
    }


def _remote_study(files: list[Path], services: Any, out: Path) -> None:
    from discgeo.local import client_headers
    from discgeo.pipeline import RemoteStages

    stages = RemoteStages(services, headers=client_headers())  # one client per worker thread
    try:
        run_study(files, stages, out)
    finally:
        stages.close()


def service_peak_rss_mib() -> float:
    """Sum of the peak resident memory (VmHWM) of every process below this one (the services)."""
    import psutil

    total_kb = 0
    for child in psutil.Process().children(recursive=True):
        try:
            status = Path(f"/proc/{child.pid}/status").read_text()
        except OSError:
            continue
        total_kb += next(
            (int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM")), 0
        )
    return round(total_kb / 1024, 1)


def embedded_scaling(volume: Any, stages: Any, repeats: int) -> list[dict[str, Any]]:
    """The pipeline's stages on the case resampled to other slice counts and in-plane sizes (the same
    anatomy on a finer or coarser grid)."""
    from discgeo.pipeline import analyse_study
    from discgeo.segmentation import resize
    from discgeo.volume import Volume

    canonical = volume.canonical()
    n_slices, n_ap, n_si = canonical.shape  # RAS+: axis 0 runs across the sagittal slices
    rows = []
    for slices, inplane in [(34, n_ap), (n_slices, n_ap), (134, n_ap), (n_slices, 160), (n_slices, 320)]:
        shape = (slices, inplane, round(n_si * inplane / n_ap))
        affine = canonical.affine.copy()
        affine[:3, :3] = affine[:3, :3] * (np.array(canonical.shape) / np.array(shape))
        scaled = Volume(resize(np.asarray(canonical.array, np.float32), shape, order=1), affine)
        runs = [analyse_study(scaled, stages)[0] for _ in range(repeats)]
        best = min(runs, key=lambda r: r.timings_s["total"])
        rows.append(
            {
                "shape": list(shape),
                "spacing_mm": [round(s, 3) for s in scaled.spacing],
                "voxels_millions": round(float(np.prod(shape)) / 1e6, 2),
                "segment_s": best.timings_s["segment"],
                "total_s": best.timings_s["total"],
                "discs": len(best.discs),
            }
        )
    return rows


# -------------------------------------------------------------------------------- torch vs ORT
def torch_vs_ort(volume: Any, stages: Any, crops: np.ndarray, *, segmenter: bool) -> dict[str, Any]:
    """A 32-crop encoder batch and (when ``segmenter``) the segmenter's sliding-window probability map of
    the study, ONNX Runtime vs torch."""
    result: dict[str, Any] = {"torch_device": torch_device()}
    if segmenter:
        seg = stages.segmenter
        canonical = volume.canonical()
        ort_session = seg.session
        result["segmenter_ort_s"] = _best(lambda: seg.disc_probability(canonical), 1)
        seg.session = TorchSession(segmenter_module(seg.metadata), "torch")
        try:
            result["segmenter_torch_s"] = _best(lambda: seg.disc_probability(canonical), 1)
        finally:
            seg.session = ort_session
        result["segmenter_torch_over_ort"] = round(result["segmenter_torch_s"] / result["segmenter_ort_s"], 2)
    batch = np.resize(crops, (32, *crops.shape[1:]))
    enc = stages.encoder
    result["encoder32_ort_s"] = _best(lambda: enc.encode(batch), 3)
    ort_encoder = enc.encoder
    enc.encoder = TorchSession(autoencoder_modules(enc.latent_dim)[0], "torch")
    try:
        result["encoder32_torch_s"] = _best(lambda: enc.encode(batch), 3)
    finally:
        enc.encoder = ort_encoder
    result["encoder_torch_over_ort"] = round(result["encoder32_torch_s"] / result["encoder32_ort_s"], 2)
    return result


def _best(fn: Callable[[], Any], repeats: int) -> float:
    """Best wall time of ``repeats`` calls, after one untimed warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return round(min(times), 4)


# ------------------------------------------------------------------------------ encoder batching
def encoder_batching(crops: np.ndarray, enc: Any, url: str) -> dict[str, float]:
    """Discs per second at batch 1 and 32, in-process and over HTTP (the study's crops, repeated)."""
    import httpx

    from discgeo.encoding import pack_crops

    batch = np.resize(crops, (32, *crops.shape[1:]))
    rates = {
        "in_process_batch1": 32 / _best(lambda: [enc.encode(batch[i : i + 1]) for i in range(32)], 2),
        "in_process_batch32": 32 / _best(lambda: enc.encode(batch), 3),
        "in_process_batch32_with_quality": 32 / _best(lambda: enc.encode_with_quality(batch), 3),
    }
    with httpx.Client(timeout=120) as client:

        def post(x: np.ndarray) -> Any:
            files = {"crops": ("c.npz", pack_crops(x), "application/octet-stream")}
            return client.post(url + "/encode", files=files).raise_for_status()

        rates["http_batch1_with_quality"] = 32 / _best(lambda: [post(batch[i : i + 1]) for i in range(32)], 1)
        rates["http_batch32_with_quality"] = 32 / _best(lambda: post(batch), 3)
    return {k: round(v, 1) for k, v in rates.items()}


# ---------------------------------------------------------------------------- reference recipe
def reference_study(image_path: Path, labels_path: Path) -> dict[str, Any]:
    """The reference recipe on one study (runs in a child process for its peak memory)."""
    import torch
    from monai.inferers import sliding_window_inference
    from monai.networks.nets import SwinUNETR
    from scipy import ndimage

    from discgeo.artifacts import load_artifact
    from discgeo.config import Settings
    from discgeo.encoding import CropSpec, crop_disc
    from discgeo.io import read_labels, read_volume
    from discgeo.segmentation import normalise, resample

    device = torch_device()
    segmenter = (
        SwinUNETR(in_channels=1, out_channels=2, feature_size=REF_FEATURE_SIZE, spatial_dims=3)
        .eval()
        .to(device)
    )
    encoder = autoencoder_modules(4)[0].eval().to(device)
    crop_spec = CropSpec.from_metadata(
        load_artifact(Settings.from_env().artifact("autoencoder"), kind="autoencoder")[1]
    )
    volume = read_volume(image_path).canonical()
    discs_found = read_labels(labels_path).canonical()
    timings: dict[str, float] = {}
    start = time.perf_counter()
    image = resample(normalise(np.asarray(volume.array, np.float32)), volume.spacing, (1.0, 1.0, 1.0))
    timings["prepare"] = time.perf_counter() - start
    windows = 0

    def predictor(batch: torch.Tensor) -> torch.Tensor:
        nonlocal windows
        windows += len(batch)
        return segmenter(batch)

    t0 = time.perf_counter()
    with torch.inference_mode():
        x = torch.from_numpy(image)[None, None].to(device)
        logits = sliding_window_inference(x, REF_ROI, REF_SW_BATCH, predictor, overlap=REF_OVERLAP)
        assert isinstance(logits, torch.Tensor)
        mask = logits.argmax(1)[0].cpu().numpy()
    timings["segment"] = time.perf_counter() - t0
    del logits, mask
    t0 = time.perf_counter()
    # the per-disc steps run on the discs our segmenter found (untrained weights segment nothing useful)
    labels = np.asarray(discs_found.array)
    components, count = ndimage.label(labels > 0)
    masks = [components == k for k in range(1, count + 1)]
    latents, geometry = [], []
    with torch.inference_mode():
        for disc in masks:
            crop = crop_disc(disc, discs_found.affine, spec=crop_spec)
            if crop is not None:
                latents.append(encoder(torch.from_numpy(crop[None, None].astype(np.float32)).to(device)))
    timings["encode"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for disc in masks:
        geometry.append(voxel_geometry(disc))
    timings["measure"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - start
    return {
        "timings_s": {k: round(v, 4) for k, v in timings.items()},
        "discs": len(masks),
        "device": device,
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "flops_per_window": flops(segmenter.cpu(), (1, 1, *REF_ROI)),
        "windows": windows,
    }


def voxel_geometry(mask: np.ndarray) -> dict[str, float]:
    """The study's six features in voxel units: extents and angles of the principal axes."""
    points = np.argwhere(mask).astype(np.float64)
    centred = points - points.mean(axis=0)
    _, vectors = np.linalg.eigh(np.cov(centred.T))
    axes = vectors[:, ::-1]  # largest first: lateral, AP, height
    extent = [float(np.ptp(centred @ axes[:, i])) + 1 for i in range(3)]
    angles = [float(np.degrees(np.arctan2(axes[j, 2], axes[k, 2]))) for j, k in ((0, 1), (0, 2), (1, 2))]
    return {
        "lateral": extent[0],
        "ap": extent[1],
        "height": extent[2],
        "sagittal": angles[0],
        "axial": angles[1],
        "frontal": angles[2],
    }


def child(section: str, *args: str) -> dict[str, Any]:
    """Run one section in a fresh Python process; returns its JSON (which includes its peak memory)."""
    command = [sys.executable, "-m", "bench.pipeline", "--child", section, *args]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"bench child {section} failed:\n{done.stderr[-3000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def embedded_memory(files_dir: Path) -> dict[str, Any]:
    """Peak memory of loading the models and running one study in-process."""
    from discgeo.pipeline import LocalStages

    files = sorted(files_dir.glob("*.dcm"))
    with tempfile.TemporaryDirectory() as tmp:
        timings = run_study(files, LocalStages(), Path(tmp) / "study")
    return {
        "total_s": round(timings["total"], 3),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


# ------------------------------------------------------------------------------------- the run
def run(quick: bool) -> dict[str, Any]:
    from discgeo.io import read_volume
    from discgeo.io.nifti import write_nifti

    repeats = 1 if quick else 3
    results: dict[str, Any] = {"mode": "quick" if quick else "full", "case": CASE, "machine": machine()}
    log = lambda msg: print(f"[bench] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    results["matmul_gflops"] = round(matmul_gflops(), 1)
    log(f"matmul {results['matmul_gflops']} GFLOP/s")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        volume = read_volume(SHARED / f"{CASE}.nii.gz")
        files = write_study(volume, tmp / "dicom", CASE)
        results["input"] = {
            "shape": list(volume.shape),
            "spacing_mm": [round(s, 3) for s in volume.spacing],
            "dicom_files": len(files),
        }
        emb = embedded(files, tmp, repeats)
        stages = emb.pop("stages")
        results["embedded"] = emb
        log(f"embedded {emb['stages_s']}")
        if not quick:
            results["embedded_peak"] = child("embedded-memory", str(tmp / "dicom"))
        labels = stages.segmenter.predict(volume)
        crops = stages.encoder.crop(labels).crops
        labels_path = write_nifti(labels, tmp / "labels.nii.gz")
        results["reference"] = child("reference", str(SHARED / f"{CASE}.nii.gz"), str(labels_path))
        log(f"reference {results['reference']['timings_s']}")
        results["torch_vs_ort"] = torch_vs_ort(volume, stages, crops, segmenter=not quick)
        log(f"torch vs ORT {results['torch_vs_ort']}")
        results["http"] = http(files, tmp, repeats, [] if quick else [4], crops, stages)
        log(f"http {results['http']['stages_s']}, encoder {results['http']['encoder_batching']}")
        if not quick:
            results["scaling"] = embedded_scaling(volume, stages, 1)
            n_studies = []
            for n in (1, 4):
                start = time.perf_counter()
                for i in range(n):
                    run_study(files, stages, tmp / f"scale-{n}-{i}")
                wall = time.perf_counter() - start
                n_studies.append(
                    {"studies": n, "wall_s": round(wall, 2), "studies_per_min": round(60 * n / wall, 2)}
                )
            results["embedded_study_scaling"] = n_studies
    results["summary"] = summarise(results)
    return results


def summarise(r: dict[str, Any]) -> dict[str, Any]:
    """Ratios against the targets."""
    emb, ref = r["embedded"], r["reference"]
    wall = emb["stages_s"]["total"]
    model_s = sum(emb["model_s"].values())
    peak = r["matmul_gflops"] * 1e9
    ours_flops = sum(emb["flops_per_study"].values())
    ref_seg_flops = ref["flops_per_window"] * ref["windows"]
    pipeline_s = sum(emb["stages_s"][k] for k in ("segment", "measure", "encode", "classify"))
    summary = {
        "embedded_studies_per_min": round(60 / wall, 2),
        "http_studies_per_min": round(60 / r["http"]["stages_s"]["total"], 2),
        "http_vs_embedded": round(wall / r["http"]["stages_s"]["total"], 3),
        "model_seconds_per_study": round(model_s, 3),
        "overhead_fraction": round(1 - model_s / wall, 3),
        "ours_gflop_per_study": round(ours_flops / 1e9, 1),
        "ours_achieved_fraction_of_matmul": round(ours_flops / model_s / peak, 3),
        "reference_gflop_per_study": round(ref_seg_flops / 1e9, 1),
        "reference_segmenter_achieved_fraction_of_matmul": round(
            ref_seg_flops / ref["timings_s"]["segment"] / peak, 3
        ),
        "ours_pipeline_s": round(pipeline_s, 3),
        "reference_pipeline_s": ref["timings_s"]["total"],
        "speedup_vs_reference": round(ref["timings_s"]["total"] / pipeline_s, 2),
    }
    summary["targets"] = {
        "http_vs_embedded": {
            "target": f">= {TARGETS['http_vs_embedded']}",
            "met": summary["http_vs_embedded"] >= TARGETS["http_vs_embedded"],
        },
        "overhead_fraction": {
            "target": f"<= {TARGETS['overhead_fraction']}",
            "met": summary["overhead_fraction"] <= TARGETS["overhead_fraction"],
        },
        "speedup_vs_reference": {
            "target": f">= {TARGETS['speedup_vs_reference']}",
            "met": summary["speedup_vs_reference"] >= TARGETS["speedup_vs_reference"],
        },
    }
    return summary


# ---------------------------------------------------------------------------------------- report
def markdown(r: dict[str, Any]) -> str:
    s, m = r["summary"], r["machine"]
    emb, ht, ref = r["embedded"]["stages_s"], r["http"]["stages_s"], r["reference"]["timings_s"]
    command = "python -m bench.pipeline" + (" --quick" if r["mode"] == "quick" else "")
    hw = m["gpu"] or f"{m['cores']} CPU cores ({m['cpu']})"
    embedded_peak = f"{r['embedded_peak']['peak_rss_mib']} MiB" if "embedded_peak" in r else "in the full run"
    lines = [
        f"# Pipeline benchmark ({r['mode']})",
        "",
        f"`{command}` on {hw}, {m['memory_gib']} GiB; torch {m['torch']}, onnxruntime {m['onnxruntime']} "
        f"({r['embedded']['provider']}); models {r['embedded']['versions']}.",
        f"Input: real T2 {r['case']} {r['input']['shape']} at {r['input']['spacing_mm']} mm, as "
        f"{r['input']['dicom_files']} DICOM files. Best of {1 if r['mode'] == 'quick' else 3} studies "
        "after one warm-up.",
        "",
        "## Targets",
        "",
        "| measure | target | measured | met |",
        "|---|---|---|---|",
    ]
    for key, target in s["targets"].items():
        met = "yes" if target["met"] else "NO"
        lines.append(f"| {key.replace('_', ' ')} | {target['target']} | {s[key]} | {met} |")
    lines += [
        "",
        "## Seconds per study",
        "",
        "| step | embedded | HTTP | reference recipe |",
        "|---|---|---|---|",
    ]
    for step in ("read", "segment", "measure", "encode", "classify", "write", "total"):
        lines.append(f"| {step} | {emb.get(step, '-')} | {ht.get(step, '-')} | {ref.get(step, '-')} |")
    lines += [
        f"| studies per minute | {s['embedded_studies_per_min']} | {s['http_studies_per_min']} | "
        f"{round(60 / ref['total'], 2)} (pipeline only) |",
        "",
        f"Reference recipe: SwinUNETR 3D feature_size {REF_FEATURE_SIZE}, MONAI sliding window "
        f"ROI {REF_ROI}, overlap {REF_OVERLAP}, sw_batch_size {REF_SW_BATCH} "
        f"({r['reference']['windows']} windows), per-disc torch encoder at batch 1, voxel geometry; "
        f"normalising and resampling to 1 mm took {ref['prepare']} s more. "
        f"Pipeline (segment+measure+encode+classify) ours {s['ours_pipeline_s']} s vs reference "
        f"{s['reference_pipeline_s']} s: **{s['speedup_vs_reference']}x**. Peak memory: embedded "
        f"{embedded_peak}, reference "
        f"{r['reference']['peak_rss_mib']} MiB, "
        f"the four stage services (all their processes) together {r['http']['services_peak_rss_mib']} MiB.",
        "",
        "## Compute against the machine",
        "",
        f"Measured float32 matmul: {r['matmul_gflops']} GFLOP/s.",
        "",
        "| model | items per study | GFLOP per study | seconds in model | achieved GFLOP/s "
        "| fraction of matmul |",
        "|---|---|---|---|---|---|",
    ]
    e, tvo = r["embedded"], r["torch_vs_ort"]
    for name in ("segmenter", "encoder", "decoder"):
        gflop = e["flops_per_study"][name] / 1e9
        sec = e["model_s"][name]
        lines.append(
            f"| ours: {name} | {e['model_items'][name]} | {gflop:.1f} | {sec:.3f} | {gflop / sec:.1f} | "
            f"{gflop / sec / r['matmul_gflops']:.3f} |"
        )
    ref_gflop = r["reference"]["flops_per_window"] * r["reference"]["windows"] / 1e9
    lines += [
        f"| reference: SwinUNETR 3D fs48 | {r['reference']['windows']} | {ref_gflop:.0f} | "
        f"{ref['segment']:.2f} | "
        f"{ref_gflop / ref['segment']:.1f} | {s['reference_segmenter_achieved_fraction_of_matmul']} |",
        "",
        f"Time in models {s['model_seconds_per_study']} s of {emb['total']} s per study: non-model overhead "
        f"**{s['overhead_fraction']:.1%}** (DICOM read, resampling, post-processing, geometry, crops, "
        "outputs).",
        "",
        "## torch vs ONNX Runtime (same code path, same architecture)",
        "",
        "| work | ONNX Runtime s | torch s | torch / ORT |",
        "|---|---|---|---|",
        f"| segmenter probability map, one study | {tvo.get('segmenter_ort_s', 'full run only')} | "
        f"{tvo.get('segmenter_torch_s', '-')} | {tvo.get('segmenter_torch_over_ort', '-')} |",
        f"| encoder, 32 crops | {tvo['encoder32_ort_s']} | {tvo['encoder32_torch_s']} | "
        f"{tvo['encoder_torch_over_ort']} |",
        "",
        "## Encoder batching (discs per second)",
        "",
        "| path | discs/s |",
        "|---|---|",
        *[f"| {k.replace('_', ' ')} | {v} |" for k, v in r["http"]["encoder_batching"].items()],
    ]
    if "scaling" in r:
        lines += [
            "",
            "## Scaling with image size (embedded, the same anatomy resampled)",
            "",
            "| shape (slices, AP, SI) | spacing mm | Mvoxels | segment s | pipeline s | discs |",
            "|---|---|---|---|---|---|",
            *[
                f"| {x['shape']} | {x['spacing_mm']} | {x['voxels_millions']} | {x['segment_s']} | "
                f"{x['total_s']} | {x['discs']} |"
                for x in r["scaling"]
            ],
            "",
            "## Scaling with the number of studies",
            "",
            "| path | studies | client workers | wall s | studies/min |",
            "|---|---|---|---|---|",
            *[
                f"| embedded | {x['studies']} | 1 | {x['wall_s']} | {x['studies_per_min']} |"
                for x in r["embedded_study_scaling"]
            ],
            *[
                f"| HTTP | {x['studies']} | {x['client_workers']} | {x['wall_s']} | {x['studies_per_min']} |"
                for x in r["http"]["scaling"]
            ],
        ]
    return "\n".join(lines) + "\n"


def plot(r: dict[str, Any], path: Path) -> None:
    """Stacked bars of seconds per study by step: embedded, HTTP, reference recipe; ours alone below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = ("read", "prepare", "segment", "measure", "encode", "classify", "write")
    paths = {
        "embedded": r["embedded"]["stages_s"],
        "HTTP": r["http"]["stages_s"],
        "reference recipe": r["reference"]["timings_s"],
    }
    fig, axes = plt.subplots(2, 1, figsize=(7.5, 4.6), height_ratios=(3, 2))
    for ax, shown in zip(axes, (paths, dict(list(paths.items())[:2])), strict=True):
        for i, times in enumerate(shown.values()):
            left = 0.0
            for j, step in enumerate(steps):
                width = float(times.get(step, 0.0))
                colour = plt.get_cmap("tab10")(j)
                ax.barh(i, width, left=left, color=colour, label=step if i == 0 and ax is axes[0] else None)
                left += width
            ax.text(left, i, f" {left:.2f} s", va="center", fontsize=8)
        ax.set_yticks(range(len(shown)), list(shown))
        ax.invert_yaxis()
        ax.margins(x=0.12)
    axes[0].set_title("seconds per study, by step", fontsize=9)
    axes[1].set_xlabel("seconds (lower panel: ours only, to see the small steps)")
    fig.legend(ncol=7, fontsize=7, loc="upper center", frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="one study per path, no scaling (< 3 min)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        section, *rest = args.child
        if section == "reference":
            print(json.dumps(reference_study(Path(rest[0]), Path(rest[1]))))
        elif section == "embedded-memory":
            print(json.dumps(embedded_memory(Path(rest[0]))))
        return
    started = time.perf_counter()
    results = run(args.quick)
    results["bench_wall_s"] = round(time.perf_counter() - started, 1)
    name = "pipeline-quick" if args.quick else "pipeline"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(results, indent=1))
    text = markdown(results)
    (args.out / f"{name}.md").write_text(text)
    plot(results, args.out / f"{name}.png")
    print(text)
    print(f"[bench] {results['bench_wall_s']} s", file=sys.stderr)


if __name__ == "__main__":
    main()
