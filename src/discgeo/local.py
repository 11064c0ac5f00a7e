"""Run the services on loopback: each BentoML service with its own BENTOML_HOME, and Orthanc as the PACS.

Used by the tests and benchmarks (context managers) and by ``make up`` / ``make down``::

    python -m discgeo.local up     # five services + Orthanc in the background, state in build/up/
    python -m discgeo.local down
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ROOT / "services"
STAGES = {"segmenter": "Segmenter", "encoder": "Encoder", "geometry": "Geometry", "classifier": "Classifier"}
UP_DIR = ROOT / "build" / "up"
UP_PORTS = {"segmenter": 3001, "encoder": 3002, "geometry": 3003, "classifier": 3004, "gateway": 3005}


def stack_tokens(folder: Path) -> dict[str, str]:
    """The token files of a local stack: those the environment names, else new ones in ``folder``,
    which are then named in this process's environment too (for :func:`client_headers`). The stage
    services accept the stage token, which the gateway sends; clients use the gateway's."""
    from discgeo.auth import new_token_file

    env = {}
    names = (("DISCGEO_STAGE_TOKEN_FILE", "stage.token"), ("DISCGEO_GATEWAY_TOKENS_FILE", "gateway.token"))
    for variable, name in names:
        path = folder / name
        env[variable] = os.environ.get(variable) or str(path if path.exists() else new_token_file(path))
        os.environ[variable] = env[variable]
    return env


def client_headers(audience: str = "stage") -> dict[str, str]:
    """The Authorization header for the local stack's stage services or gateway (tokens of the
    environment, as :func:`stack_tokens` left them)."""
    from discgeo.auth import bearer_header

    variable = "DISCGEO_STAGE_TOKEN_FILE" if audience == "stage" else "DISCGEO_GATEWAY_TOKENS_FILE"
    value = os.environ.get(variable)
    return bearer_header(Path(value) if value else None, variable)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def service_memory_mib(name: str) -> dict[str, Any]:
    """Resident memory of a local service's processes (those whose working directory is
    services/NAME, as :func:`bentoml_service` starts them): ``rss_mib`` now, ``peak_mib`` the sum of
    their peaks (VmHWM) and their ``pids``."""
    rss = peak = 0
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.readlink(entry / "cwd") != str(SERVICES / name):
                continue
            status = (entry / "status").read_text().splitlines()
        except OSError:
            continue
        fields = {
            line.split(":")[0]: int(line.split()[1]) for line in status if line.startswith(("VmRSS", "VmHWM"))
        }
        rss += fields.get("VmRSS", 0)
        peak += fields.get("VmHWM", 0)
        pids.append(int(entry.name))
    return {"rss_mib": round(rss / 1024, 1), "peak_mib": round(peak / 1024, 1), "pids": pids}


def reset_peak_memory(name: str) -> None:
    """Reset the peak resident set (VmHWM) of a local service's processes to their present size."""
    for pid in service_memory_mib(name)["pids"]:
        with contextlib.suppress(OSError):
            Path(f"/proc/{pid}/clear_refs").write_text("5")


def _spawn(command: list[str], *, cwd: Path, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as handle:
        return subprocess.Popen(
            command,
            cwd=cwd,
            env={**os.environ, **env},
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _wait_ready(process: subprocess.Popen[bytes], url: str, log: Path, *, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        text = log.read_bytes() if log.exists() else b""
        if b"Initializing service error" in text or process.poll() is not None:
            raise RuntimeError(f"{what} failed to start:\n{text.decode(errors='replace')[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{what} not ready after {timeout} s:\n{text.decode(errors='replace')[-3000:]}"
            )
        time.sleep(0.5)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def _serve_command(target: str, port: int) -> list[str]:
    return [
        str(Path(sys.executable).parent / "bentoml"),
        "serve",
        target,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]


@contextmanager
def bentoml_service(
    target: str,
    workdir: Path,
    home: Path,
    *,
    env: dict[str, str] | None = None,
    timeout: float = 90.0,
    port: int | None = None,
) -> Iterator[str]:
    """Run ``bentoml serve target`` from ``workdir``; yield its base URL once /readyz answers 200."""
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    process = _spawn(
        _serve_command(target, port),
        cwd=workdir,
        log=home / "serve.log",
        env={"BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true", **stack_tokens(home), **(env or {})},
    )
    try:
        _wait_ready(process, url + "/readyz", home / "serve.log", what=target, timeout=timeout)
        yield url
    finally:
        _stop(process)


def orthanc_config(folder: Path, *, http_port: int, dicom_port: int, gateway_port: int) -> Path:
    """deploy/orthanc/orthanc.json with this run's ports and folders."""
    config = json.loads((ROOT / "deploy" / "orthanc" / "orthanc.json").read_text())
    config.update(
        {
            "StorageDirectory": str(folder / "storage"),
            "IndexDirectory": str(folder / "storage"),
            "HttpPort": http_port,
            "DicomPort": dicom_port,
            "StableAge": 2,
            "LuaScripts": [str(ROOT / "deploy" / "orthanc" / "route-to-discgeo.lua")],
            "DicomModalities": {"discgeo": ["DISCGEO", "127.0.0.1", gateway_port]},
        }
    )
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "orthanc.json"
    path.write_text(json.dumps(config, indent=1))
    return path


@contextmanager
def orthanc(
    folder: Path, *, gateway_port: int, http_port: int | None = None, dicom_port: int | None = None
) -> Iterator[tuple[str, int]]:
    """Run Orthanc (Debian package) routing stable MR studies to the gateway; yield (REST URL, DICOM port)."""
    binary = shutil.which("Orthanc")
    if binary is None:
        raise RuntimeError("Orthanc is not installed (Debian package orthanc; `make system-deps`)")
    http_port, dicom_port = http_port or free_port(), dicom_port or free_port()
    config = orthanc_config(folder, http_port=http_port, dicom_port=dicom_port, gateway_port=gateway_port)
    process = _spawn([binary, str(config)], cwd=folder, env={}, log=folder / "orthanc.log")
    url = f"http://127.0.0.1:{http_port}"
    try:
        _wait_ready(process, url + "/system", folder / "orthanc.log", what="Orthanc", timeout=60)
        yield url, dicom_port
    finally:
        _stop(process)


def prometheus_config(folder: Path, targets: list[str], *, interval_s: float = 5.0) -> Path:
    """deploy/prometheus/prometheus.yml with these scrape targets (host:port) and interval."""
    import yaml

    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = f"{interval_s:g}s"
    config["scrape_configs"][0]["static_configs"] = [{"targets": targets}]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def _prometheus_command(config: Path, folder: Path, port: int) -> list[str]:
    binary = shutil.which("prometheus")
    if binary is None:
        raise RuntimeError("Prometheus is not installed (Debian package prometheus; `make system-deps`)")
    return [
        binary,
        f"--config.file={config}",
        f"--storage.tsdb.path={folder / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]


@contextmanager
def prometheus(folder: Path, targets: list[str], *, interval_s: float = 1.0) -> Iterator[str]:
    """Run Prometheus (Debian package) scraping ``targets``; yield its URL once ready."""
    port = free_port()
    config = prometheus_config(folder, targets, interval_s=interval_s)
    process = _spawn(
        _prometheus_command(config, folder, port), cwd=folder, env={}, log=folder / "prometheus.log"
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(process, url + "/-/ready", folder / "prometheus.log", what="Prometheus", timeout=60)
        yield url
    finally:
        _stop(process)


def _postgres_bin() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda p: int(p.parts[-3]))
    if not found:
        raise RuntimeError("PostgreSQL is not installed (Debian package postgresql; `make system-deps`)")
    return found[-1].parent


@contextmanager
def postgres(folder: Path | None = None, *, port: int | None = None) -> Iterator[str]:
    """Run a throw-away PostgreSQL server (Debian package) on 127.0.0.1 with trust authentication;
    yield the URL of its ``postgres`` database as user ``discgeo``. PostgreSQL refuses to run as
    root, so as root it runs as the package's ``postgres`` user (``folder`` must be reachable by it:
    not under a private temporary folder). Without ``folder``, a temporary one, removed afterwards."""
    if folder is None:
        temporary = Path(tempfile.mkdtemp(prefix="discgeo-pg-"))  # under /tmp: reachable by postgres
        try:
            with postgres(temporary, port=port) as url:
                yield url
        finally:
            shutil.rmtree(temporary, ignore_errors=True)
        return
    bindir = _postgres_bin()
    folder.mkdir(parents=True, exist_ok=True)
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    data = folder / "data"
    subprocess.run(
        [*as_user, str(bindir / "initdb"), "-D", str(data), "-U", "discgeo", "-A", "trust", "--no-sync"],
        check=True,
        capture_output=True,
    )
    port = port or free_port()
    process = _spawn(
        # fsync off: a test server's durability is not under test, its speed is
        [
            *as_user,
            str(bindir / "postgres"),
            "-D",
            str(data),
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-k",
            str(folder),
            "-c",
            "fsync=off",
            "-c",
            "max_connections=200",
        ],
        cwd=folder,
        env={},
        log=folder / "postgres.log",
    )
    url = f"postgresql://discgeo@127.0.0.1:{port}/postgres"
    try:
        import psycopg

        deadline = time.monotonic() + 60
        while True:
            try:
                psycopg.connect(url, connect_timeout=2).close()
                break
            except psycopg.OperationalError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"PostgreSQL did not start (log beside {folder})") from None
                time.sleep(0.2)
        yield url
    finally:
        _stop(process)


def new_database(server_url: str, name: str) -> str:
    """Create the database ``name`` on the server of ``server_url``; its URL."""
    import psycopg

    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return server_url.rsplit("/", 1)[0] + f"/{name}"


@contextmanager
def pipeline_services(
    root: Path,
    *,
    env: dict[str, str] | None = None,
    gateway: dict[str, str] | None = None,
    ports: dict[str, int] | None = None,
) -> Iterator[dict[str, str]]:
    """The four stage services, and the gateway when ``gateway`` (its DISCGEO_GATEWAY_* settings) is given;
    all share the token files of :func:`stack_tokens`."""
    ports = ports or {}
    env = {**stack_tokens(root), **(env or {})}
    with ExitStack() as stack:
        urls = {
            name: stack.enter_context(
                bentoml_service(
                    f"service.py:{cls}", SERVICES / name, root / name, env=env, port=ports.get(name)
                )
            )
            for name, cls in STAGES.items()
        }
        if gateway is not None:
            gateway_env = {
                **(env or {}),
                **gateway,
                **{f"DISCGEO_{n.upper()}_URL": u for n, u in urls.items()},
            }
            urls["gateway"] = stack.enter_context(
                bentoml_service(
                    "service.py:Gateway",
                    SERVICES / "gateway",
                    root / "gateway",
                    env=gateway_env,
                    port=ports.get("gateway"),
                )
            )
        yield urls


# ------------------------------------------------------------------------------------ make up/down
def up() -> dict[str, Any]:
    """Start the five services and Orthanc in the background; the state goes to build/up/state.json."""
    if (UP_DIR / "state.json").exists():
        raise SystemExit("already up (build/up/state.json exists); run `make down` first")
    env = {"BENTOML_DO_NOT_TRACK": "true", **stack_tokens(UP_DIR)}
    processes: dict[str, int] = {}
    urls: dict[str, str] = {}
    try:
        for name, cls in STAGES.items():
            port = UP_PORTS[name]
            home = UP_DIR / name
            process = _spawn(
                _serve_command(f"service.py:{cls}", port),
                cwd=SERVICES / name,
                log=home / "serve.log",
                env={**env, "BENTOML_HOME": str(home)},
            )
            processes[name], urls[name] = process.pid, f"http://127.0.0.1:{port}"
            _wait_ready(process, urls[name] + "/readyz", home / "serve.log", what=name, timeout=120)
        gateway_env = {
            **env,
            "BENTOML_HOME": str(UP_DIR / "gateway"),
            "DISCGEO_GATEWAY_DATA": str(UP_DIR / "data"),
            "DISCGEO_GATEWAY_DICOM_PORT": "11112",
            "DISCGEO_GATEWAY_FORWARD": "dicom://ORTHANC@127.0.0.1:4242",
            "DISCGEO_GATEWAY_ALLOWED_AES": "ORTHANC,STORESCU",
            **{f"DISCGEO_{n.upper()}_URL": u for n, u in urls.items()},
        }
        process = _spawn(
            _serve_command("service.py:Gateway", UP_PORTS["gateway"]),
            cwd=SERVICES / "gateway",
            log=UP_DIR / "gateway" / "serve.log",
            env=gateway_env,
        )
        processes["gateway"], urls["gateway"] = process.pid, f"http://127.0.0.1:{UP_PORTS['gateway']}"
        _wait_ready(
            process,
            urls["gateway"] + "/readyz",
            UP_DIR / "gateway" / "serve.log",
            what="gateway",
            timeout=120,
        )
        if shutil.which("Orthanc"):
            folder = UP_DIR / "orthanc"
            config = orthanc_config(folder, http_port=8042, dicom_port=4242, gateway_port=11112)
            process = _spawn(
                [shutil.which("Orthanc") or "Orthanc", str(config)],
                cwd=folder,
                env={},
                log=folder / "orthanc.log",
            )
            processes["orthanc"], urls["orthanc"] = process.pid, "http://127.0.0.1:8042"
            _wait_ready(
                process, urls["orthanc"] + "/system", folder / "orthanc.log", what="Orthanc", timeout=60
            )
    except BaseException:
        for pid in processes.values():
            _kill_group(pid)
        raise
    state = {
        "pids": processes,
        "urls": urls,
        "gateway_dicom": "DISCGEO@127.0.0.1:11112",
        "gateway_token_file": env["DISCGEO_GATEWAY_TOKENS_FILE"],
        "orthanc_dicom": "ORTHANC@127.0.0.1:4242" if "orthanc" in urls else None,
    }
    (UP_DIR / "state.json").write_text(json.dumps(state, indent=1))
    return state


def down() -> list[str]:
    """Stop whatever ``up`` started."""
    path = UP_DIR / "state.json"
    if not path.exists():
        return []
    state = json.loads(path.read_text())
    for pid in state["pids"].values():
        _kill_group(pid)
    path.unlink()
    return list(state["pids"])


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)


def main() -> None:
    parser = argparse.ArgumentParser(description="start or stop the local discgeo stack")
    parser.add_argument("action", choices=("up", "down"))
    args = parser.parse_args()
    if args.action == "up":
        state = up()
        for name, url in state["urls"].items():
            print(f"{name:11s} {url}")
        print(f"gateway DICOM  {state['gateway_dicom']} (C-STORE from AE titles ORTHANC and STORESCU)")
        print(
            f'gateway token  {state["gateway_token_file"]} (curl -H "Authorization: Bearer $(cat FILE)" ...)'
        )
        if state["orthanc_dicom"]:
            print(
                f"Orthanc DICOM  {state['orthanc_dicom']}: stable MR studies are routed to the gateway, "
                "results come back"
            )
        print("stop with: make down")
    else:
        stopped = down()
        print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))


if __name__ == "__main__":
    main()
