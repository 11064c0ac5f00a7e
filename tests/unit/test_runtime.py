"""ONNX Runtime's thread count follows DISCGEO_ONNX_THREADS, else the CPU quota of the process's cgroup
(a container's CPU limit), not the host's core count."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from discgeo.config import Settings
from discgeo.encoding import Encoder
from discgeo.errors import ConfigurationError
from discgeo.runtime import CGROUP_ROOT, available_cpus, cgroup_cpu_quota
from discgeo.segmentation import Segmenter

CPUS = len(os.sched_getaffinity(0))


def _tree(tmp_path: Path, proc: str, files: dict[str, str]) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    root.mkdir(parents=True)
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (tmp_path / "proc").write_text(proc)
    return root, tmp_path / "proc"


def test_cgroup_v2_quota_of_the_container_rounds_down(tmp_path):
    root, proc = _tree(tmp_path, "0::/\n", {"cpu.max": "150000 100000\n"})
    assert cgroup_cpu_quota(root, proc) == 1.5
    assert available_cpus(root, proc) == 1


def test_cgroup_v2_without_a_limit_leaves_the_affinity(tmp_path):
    root, proc = _tree(
        tmp_path, "0::/pod/ctr\n", {"cpu.max": "max 100000\n", "pod/ctr/cpu.max": "max 100000"}
    )
    assert cgroup_cpu_quota(root, proc) is None
    assert available_cpus(root, proc) == CPUS


def test_the_smallest_quota_on_the_path_wins_v1_hybrid(tmp_path):
    # a pod's limit on the parent, a looser one on the container (cgroup v1 beside a v2 mount)
    files = {
        "unified/cgroup.procs": "",
        "cpu,cpuacct/kubepods/pod/cpu.cfs_quota_us": "100000",
        "cpu,cpuacct/kubepods/pod/cpu.cfs_period_us": "100000",
        "cpu,cpuacct/kubepods/pod/ctr/cpu.cfs_quota_us": "400000",
        "cpu,cpuacct/kubepods/pod/ctr/cpu.cfs_period_us": "100000",
        "cpu,cpuacct/cpu.cfs_quota_us": "-1",
        "cpu,cpuacct/cpu.cfs_period_us": "100000",
    }
    root, proc = _tree(tmp_path, "4:memory:/x\n2:cpu,cpuacct:/kubepods/pod/ctr\n0::/\n", files)
    assert cgroup_cpu_quota(root, proc) == 1.0
    assert available_cpus(root, proc) == 1


def test_a_namespaced_path_missing_under_the_mount_reads_the_mount_root(tmp_path):
    root, proc = _tree(tmp_path, "0::/../../elsewhere\n", {"cpu.max": "200000 100000"})
    assert cgroup_cpu_quota(root, proc) == 2.0
    root, proc = _tree(tmp_path / "none", "0::/\n", {})
    assert cgroup_cpu_quota(root, proc) is None and available_cpus(root, proc) == CPUS


def test_discgeo_onnx_threads_sets_the_sessions_threads():
    settings = Settings.from_env({"DISCGEO_ONNX_THREADS": "1"})
    assert settings.onnx_threads == 1
    encoder = Encoder.from_settings(settings)
    assert encoder.encoder.get_session_options().intra_op_num_threads == 1
    segmenter = Segmenter.from_settings(Settings.from_env({"DISCGEO_ONNX_THREADS": "3"}))
    assert segmenter.session.get_session_options().intra_op_num_threads == 3
    default = Encoder.from_settings(Settings.from_env({}))
    assert default.decoder.get_session_options().intra_op_num_threads == available_cpus()
    for bad in ("0", "-2", "two"):
        with pytest.raises(ConfigurationError, match="DISCGEO_ONNX_THREADS"):
            Settings.from_env({"DISCGEO_ONNX_THREADS": bad})


def _cpu_cgroup() -> Path | None:
    """A writable cgroup with the CPU controller (v1 ``cpu`` or v2), or None where this host forbids it."""
    for base, quota in ((CGROUP_ROOT / "cpu", "cpu.cfs_quota_us"), (CGROUP_ROOT, "cpu.max")):
        if base.is_dir():
            folder = base / f"discgeo-test-{uuid.uuid4().hex[:8]}"
            try:
                folder.mkdir()
            except OSError:
                continue
            if (folder / quota).exists():
                return folder
            folder.rmdir()
    return None


def test_a_real_one_cpu_cgroup_gives_one_onnx_thread():
    folder = _cpu_cgroup()
    if folder is None:
        pytest.skip("this host does not let the tests create a cgroup with a CPU quota")
    try:
        if (folder / "cpu.max").exists():
            (folder / "cpu.max").write_text("100000 100000")
        else:
            (folder / "cpu.cfs_quota_us").write_text("100000")
        code = (
            "from discgeo.config import Settings; from discgeo.encoding import Encoder;"
            "from discgeo.runtime import available_cpus;"
            "e = Encoder.from_settings(Settings.from_env({}));"
            "print(available_cpus(), e.encoder.get_session_options().intra_op_num_threads)"
        )
        # the child moves itself into the cgroup before anything reads the quota
        mover = f'echo $$ > {folder / "cgroup.procs"} && exec {sys.executable} -c "$0"'
        done = subprocess.run(["sh", "-c", mover, code], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == ["1", "1"]
    finally:
        folder.rmdir()
