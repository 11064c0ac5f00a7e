"""Run BentoML services on loopback, each with its own BENTOML_HOME (tests, benchmarks, laptops)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ROOT / "services"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def bentoml_service(
    target: str, workdir: Path, home: Path, *, env: dict[str, str] | None = None, timeout: float = 90.0
) -> Iterator[str]:
    """Run ``bentoml serve target`` from ``workdir``; yield its base URL once /readyz answers 200."""
    port = free_port()
    home.mkdir(parents=True, exist_ok=True)
    log = open(home / "serve.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "bentoml"),
            "serve",
            target,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        cwd=workdir,
        env={**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true", **(env or {})},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if b"Initializing service error" in (home / "serve.log").read_bytes():
                raise RuntimeError(f"{target} failed to start:\n{(home / 'serve.log').read_text()[-3000:]}")
            if process.poll() is not None:
                raise RuntimeError(
                    f"{target} exited with {process.returncode}:\n{(home / 'serve.log').read_text()}"
                )
            try:
                with urllib.request.urlopen(url + "/readyz", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{target} not ready after {timeout} s:\n{(home / 'serve.log').read_text()}"
                )
            time.sleep(0.5)
        yield url
    finally:
        if process.poll() is None:
            os.killpg(process.pid, 15)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, 9)
        log.close()
