"""ONNX Runtime sessions: choose the execution provider and report the one actually used."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def select_providers(preferred: Sequence[str] | None = None) -> list[str]:
    """ONNX Runtime providers to ask for.

    Default: CUDA first when this build offers it and an NVIDIA device node exists, then CPU. The
    provider actually used must still be read from ``session.get_providers()``: without CUDA
    libraries ONNX Runtime falls back to CPU.
    """
    import onnxruntime as ort

    available = ort.get_available_providers()
    if preferred:
        wanted = list(preferred)
    elif Path("/dev/nvidia0").exists() or Path("/dev/nvidiactl").exists():
        wanted = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    else:
        wanted = ["CPUExecutionProvider"]
    return [p for p in wanted if p in available] or ["CPUExecutionProvider"]


CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def available_cpus(cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> int:
    """CPUs this process may keep busy: its affinity mask, capped by the CPU quota of its cgroup or any
    ancestor (a container's ``resources.limits.cpu``), rounded down, at least 1. ONNX Runtime's
    default is the host's core count, which a quota throttles: 16 threads in a 2-CPU pod."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cgroup_cpu_quota(cgroup_root, proc_cgroup)
    return max(1, min(cpus, int(quota))) if quota is not None else cpus


def cgroup_cpu_quota(cgroup_root: Path, proc_cgroup: Path) -> float | None:
    """The smallest CPU quota (in CPUs) on this process's cgroup path, v2 (``cpu.max``) or v1
    (``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``); None when there is none."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    quotas = []
    for line in lines:
        hierarchy, controllers, path = line.split(":", 2)
        if hierarchy == "0" and controllers == "":
            base = cgroup_root / "unified" if (cgroup_root / "unified").is_dir() else cgroup_root
            read = _v2_quota
        elif "cpu" in controllers.split(","):
            mounts = [d for d in (cgroup_root / controllers, cgroup_root / "cpu") if d.is_dir()]
            if not mounts:
                continue
            base, read = mounts[0], _v1_quota
        else:
            continue
        folder = base / path.lstrip("/")
        # inside a container's cgroup namespace the path may not exist under this mount: its root is the
        # container's own cgroup then
        for directory in (folder, *folder.parents) if folder.is_dir() else (base,):
            if (quota := read(directory)) is not None:
                quotas.append(quota)
            if directory == base:
                break
    return min(quotas) if quotas else None


def _v2_quota(directory: Path) -> float | None:
    try:
        limit, period = (directory / "cpu.max").read_text().split()
    except (OSError, ValueError):
        return None
    return None if limit == "max" else int(limit) / int(period)


def _v1_quota(directory: Path) -> float | None:
    try:
        limit = int((directory / "cpu.cfs_quota_us").read_text())
        period = int((directory / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if limit <= 0 else limit / period


def open_session(path: Path, providers: Sequence[str] | None = None, threads: int | None = None) -> Any:
    """An ONNX Runtime session with ``threads`` intra-op threads (default: :func:`available_cpus`);
    the providers actually used are in ``session.get_providers()``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or available_cpus()
    # idle worker threads sleep instead of spinning. Segmenting a real study on 2 cores: 4.5 s spinning vs
    # 4.9 s sleeping on an idle machine, but 15.3 s vs 11.0 s while another process trains -- a node
    # shared with other pods is the normal case in a deployment, so robustness wins
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    requested = select_providers(providers)
    if "CUDAExecutionProvider" in requested and hasattr(ort, "preload_dlls"):
        # CUDA and cuDNN from PyPI wheels (the GPU image) are found only once loaded from site-packages
        ort.preload_dlls()
    session = ort.InferenceSession(str(path), sess_options=options, providers=requested)
    if requested[0] != session.get_providers()[0]:
        log.warning("asked for %s, ONNX Runtime uses %s", requested[0], session.get_providers()[0])
    log.info(
        "%s: ONNX Runtime %s, providers available %s, used %s, %d threads",
        path.name,
        ort.__version__,
        ",".join(ort.get_available_providers()),
        ",".join(session.get_providers()),
        options.intra_op_num_threads,
    )
    return session
