"""The service images, built here by ``make images``' code (deploy/images.py, CPU variant) with podman or
docker, and run as a cluster runs them: read-only root filesystem, UID 10001, models and tokens
mounted, no torch inside; the containerised segmenter segments a real case as the library does, and
a CPU limit on the container sets ONNX Runtime's thread count."""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from deploy import images
from discgeo import realdata
from discgeo.auth import bearer_header, new_token_file
from discgeo.config import SOURCE_MODELS_DIR, Settings
from discgeo.io import read_volume
from discgeo.local import free_port
from discgeo.pipeline import RemoteStages, ServiceURLs
from discgeo.segmentation import Segmenter

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(images.available() is None, reason="no container engine (podman or a running docker)"),
]


@pytest.fixture(scope="module")
def built() -> dict:
    return images.build(["cpu"])


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tokens")
    folder.chmod(0o755)  # pytest makes it 0700: UID 10001 in the container must read it
    new_token_file(folder / "stage.token").chmod(0o644)  # as a Kubernetes Secret volume: readable
    new_token_file(folder / "gateway.token").chmod(0o644)
    return folder


@contextlib.contextmanager
def container(name: str, port: int, tokens: Path, *extra: str) -> Iterator[str]:
    """One service container on the host network at ``port``, read-only, models and tokens mounted."""
    engine = images.engine()
    cid = subprocess.run(
        [
            *engine, "run", "-d", "--rm", "--network", "host", "--read-only",
            "-e", f"DISCGEO_PORT={port}",
            "-e", "DISCGEO_STAGE_TOKEN_FILE=/run/discgeo/stage.token",
            "-e", "DISCGEO_GATEWAY_TOKENS_FILE=/run/discgeo/gateway.token",
            "-v", f"{tokens}:/run/discgeo:ro", "-v", f"{SOURCE_MODELS_DIR}:/models:ro",
            *extra, images.image(name, "cpu"),
        ],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    try:
        yield cid
    finally:
        subprocess.run([*engine, "rm", "-f", cid], capture_output=True)


def _ready(port: int, cid: str, timeout_s: float = 120) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return time.monotonic() - start
        time.sleep(0.5)
    logs = subprocess.run([*images.engine(), "logs", cid], capture_output=True, text=True)
    raise AssertionError(
        f"no /readyz 200 on {port} within {timeout_s} s: {(logs.stdout + logs.stderr)[-3000:]}"
    )


def _exec(cid: str, *command: str) -> subprocess.CompletedProcess:
    return subprocess.run([*images.engine(), "exec", cid, *command], capture_output=True, text=True)


def test_images_are_thin_layers_on_one_runtime(built):
    info = built["variants"]["cpu"]
    assert set(info["service_adds_bytes"]) == set(images.SERVICES)
    assert all(0 < added < 1_000_000 for added in info["service_adds_bytes"].values())  # adapters only
    assert info["runtime_bytes"] < 1.5e9


def test_every_service_runs_read_only_as_non_root_without_torch_or_models(built, tokens, tmp_path):
    data = tmp_path / "gateway-data"
    data.mkdir(mode=0o777)
    data.chmod(0o777)  # the gateway's volume; UID 10001 writes there
    ports = {name: free_port() for name in images.SERVICES}
    with contextlib.ExitStack() as stack:
        volume = {"gateway": ("-e", "DISCGEO_GATEWAY_DATA=/data", "-v", f"{data}:/data")}
        ids = {}
        for name in images.SERVICES:
            ids[name] = stack.enter_context(container(name, ports[name], tokens, *volume.get(name, ())))
        for name, port in ports.items():
            cid = ids[name]
            _ready(port, cid)
            assert _exec(cid, "id", "-u").stdout.strip() == "10001", name
            assert _exec(cid, "python", "-c", "import torch").returncode != 0, name
            assert _exec(cid, "touch", "/app/service/x").returncode != 0, name  # read-only root
            # models are mounted, not baked (ONNX Runtime's own test graphs in site-packages aside)
            find = "find / -xdev ( -path /models -o -path /opt/discgeo/lib ) -prune -o -name *.onnx -print"
            baked = _exec(cid, "sh", "-c", f"set -f; {find} 2>/dev/null")
            assert not baked.stdout.strip(), (name, baked.stdout)
            # every endpoint but the probes needs the token
            assert httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).status_code == 200
        answer = httpx.post(f"http://127.0.0.1:{ports['classifier']}/predict", json={"rows": [[0.0]]})
        assert answer.status_code == 401
        assert httpx.get(f"http://127.0.0.1:{ports['gateway']}/gateway/jobs", timeout=5).status_code == 401
        assert list(data.iterdir())  # the gateway keeps its state on the volume


def test_containerised_segmenter_matches_the_library_on_a_real_case(built, tokens):
    volume = read_volume(realdata.ivd_t2_dir() / "case-20.nii.gz")
    port = free_port()
    with container("segmenter", port, tokens, "--cpus", "1") as cid:
        _ready(port, cid)
        url = f"http://127.0.0.1:{port}"
        headers = bearer_header(tokens / "stage.token", "stage token")
        remote = RemoteStages(ServiceURLs(url, url, url, url), headers=headers).segment(volume)
        logs = subprocess.run([*images.engine(), "logs", cid], capture_output=True, text=True)
    local = Segmenter.from_settings(Settings.from_env({})).predict(volume.canonical())
    same = np.mean(remote.array == local.array)
    assert same > 0.9999, same
    assert (remote.array > 0).sum() > 10_000  # discs were found
    text = logs.stdout + logs.stderr
    # one CPU for the container: its cgroup quota gives ONNX Runtime one thread, not one per host core
    assert "providers available" in text and ", 1 threads" in text, text[-2000:]
