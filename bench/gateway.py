"""The gateway under load, with the four stage services and the shipped models (real ``bentoml serve``
processes on loopback): studies per minute with K = 1, 2 and 4 workers for four studies sent at once,
the drain time of ten concurrent studies, two replicas over one PostgreSQL job store against one on
SQLite, and the gateway's peak memory and probe latency while it receives a 300 MB STOW-RS body.

    python -m bench.gateway            # writes bench/results/gateway.{json,md}  (make bench-gateway)

The studies are the real T2 case-20 of ``../shared/data/ivd-t2-mri`` (Menezes-Reis et al. 2016, see
README) written as DICOM series with distinct UIDs, sent by dcmtk ``storescu`` (one process per study).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom

from discgeo import realdata
from discgeo.io import read_volume
from discgeo.local import (
    SERVICES,
    bentoml_service,
    client_headers,
    free_port,
    new_database,
    pipeline_services,
    postgres,
    service_memory_mib,
)
from discgeo.phantom import SeriesTags, write_dicom_series
from discgeo.volume import Volume

ROOT = Path(__file__).resolve().parents[1]
CASE = "case-20"


def studies(folder: Path, count: int, prefix: str) -> list[list[Path]]:
    image = read_volume(realdata.ivd_t2_dir() / f"{CASE}.nii.gz")
    tags = [
        SeriesTags(series_description="SAG T2 TSE", contrast="t2", uid_seed=f"{prefix}-{i}")
        for i in range(count)
    ]
    return [write_dicom_series(image, folder / f"{prefix}-{i}", tags=t) for i, t in enumerate(tags)]


def send_studies(ports: int | list[int], batch: list[list[Path]]) -> list[int]:
    """One ``storescu`` process per study, all at once (to the ``ports`` in turn); their exit codes."""
    ports = [ports] if isinstance(ports, int) else ports
    processes = [
        subprocess.Popen(
            [
                "storescu",
                "-aet",
                "STORESCU",
                "-aec",
                "DISCGEO",
                "127.0.0.1",
                str(ports[i % len(ports)]),
                *map(str, files),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for i, files in enumerate(batch)
    ]
    return [p.wait() for p in processes]


def send_all(ports: int | list[int], batch: list[list[Path]]) -> None:
    if any(send_studies(ports, batch)):
        raise RuntimeError("storescu failed")


def wait_done(
    url: str,
    batch: list[list[Path]],
    timeout: float = 1800,
    final: tuple[str, ...] = ("done", "failed", "dead"),
) -> list[dict[str, Any]]:
    """The jobs of the batch's studies once every one is in a ``final`` state."""
    uids = [str(pydicom.dcmread(files[0]).StudyInstanceUID) for files in batch]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = []
        for uid in uids:
            found = httpx.get(
                f"{url}/gateway/jobs", params={"study": uid}, headers=client_headers("gateway"), timeout=30
            ).json()
            jobs.append(found[0] if found else {"state": "unknown"})
        if all(j["state"] in final for j in jobs):
            return jobs
        time.sleep(0.5)
    raise RuntimeError("studies not finished in time")


def run_batch(
    urls: dict[str, str],
    root: Path,
    batch: list[list[Path]],
    workers: int,
    *,
    replicas: int = 1,
    database: str | None = None,
) -> dict[str, Any]:
    """``batch`` sent at once to ``replicas`` gateways (the studies dealt out in turn) of ``workers``
    each, sharing one data folder and the PostgreSQL ``database`` (else SQLite: one replica)."""
    name = f"{replicas}x{workers}-{len(batch)}"
    ports = [free_port() for _ in range(replicas)]
    env = {
        "DISCGEO_GATEWAY_DATA": str(root / f"data-{name}"),
        "DISCGEO_GATEWAY_ALLOWED_AES": "STORESCU",
        "DISCGEO_GATEWAY_IDLE_S": "1",
        "DISCGEO_GATEWAY_WORKERS": str(workers),
        **({"DISCGEO_GATEWAY_DATABASE": database} if database else {}),
        **{f"DISCGEO_{n.upper()}_URL": u for n, u in urls.items()},
    }
    with ExitStack() as stack:
        gateways = [
            stack.enter_context(
                bentoml_service(
                    "service.py:Gateway",
                    SERVICES / "gateway",
                    root / f"gw-{name}-{i}",
                    env={**env, "DISCGEO_GATEWAY_DICOM_PORT": str(port)},
                )
            )
            for i, port in enumerate(ports)
        ]
        start = time.perf_counter()
        send_all(ports, batch)
        received = time.perf_counter() - start
        jobs = wait_done(gateways[0], batch)
        total = time.perf_counter() - start
    states = [j["state"] for j in jobs]
    return {
        "replicas": replicas,
        "store": "PostgreSQL" if database else "SQLite",
        "workers": workers,
        "studies": len(batch),
        "received_s": round(received, 1),
        "drain_s": round(total, 1),
        "studies_per_min": round(60 * len(batch) / total, 2),
        "states": {s: states.count(s) for s in set(states)},
    }


def big_stow(urls: dict[str, str], root: Path, megabytes: int) -> dict[str, Any]:
    """A STOW-RS body of ``megabytes`` MB, sent with Content-Length while /readyz is probed every
    0.2 s; the study is not completed during the measurement (idle and stable times of an hour), so
    only the ingest is measured."""
    slices = max(1, round(megabytes * 1e6 / (512 * 512 * 2)))
    array = np.random.default_rng(0).integers(0, 4000, (slices, 512, 512)).astype(np.float32)
    files = write_dicom_series(
        Volume(array, np.diag([1.0, 0.5, 0.5, 1.0])), root / "big", tags=SeriesTags(uid_seed="big")
    )
    boundary = "discgeo-bench"
    body_path = root / "big.body"
    with body_path.open("wb") as handle:
        for f in files:
            handle.write(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode())
            handle.write(f.read_bytes())
            handle.write(b"\r\n")
        handle.write(f"--{boundary}--\r\n".encode())
    size = body_path.stat().st_size
    env = {
        "DISCGEO_GATEWAY_DATA": str(root / "data-big"),
        "DISCGEO_GATEWAY_IDLE_S": "3600",
        "DISCGEO_GATEWAY_STABLE_S": "3600",
        "DISCGEO_GATEWAY_ALLOWED_AES": "STORESCU",
        "DISCGEO_GATEWAY_DICOM_PORT": str(free_port()),
        **{f"DISCGEO_{n.upper()}_URL": u for n, u in urls.items()},
    }
    with bentoml_service("service.py:Gateway", SERVICES / "gateway", root / "gw-big", env=env) as url:
        before = service_memory_mib("gateway")
        latencies: list[float] = []
        stop = threading.Event()

        def probe() -> None:
            while not stop.is_set():
                t0 = time.perf_counter()
                httpx.get(url + "/readyz", timeout=60)
                latencies.append(time.perf_counter() - t0)
                stop.wait(0.2)

        prober = threading.Thread(target=probe)
        prober.start()
        start = time.perf_counter()

        def chunks():
            with body_path.open("rb") as handle:
                while chunk := handle.read(1 << 20):
                    yield chunk

        response = httpx.post(
            url + "/gateway/dicomweb/studies",
            content=chunks(),
            headers={
                **client_headers("gateway"),
                "Content-Length": str(size),
                "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            },
            timeout=600,
        )
        elapsed = time.perf_counter() - start
        stop.set()
        prober.join()
        after = service_memory_mib("gateway")
    stored = len(response.json().get("00081199", {}).get("Value", [])) if response.status_code < 300 else 0
    return {
        "body_mb": round(size / 1e6, 1),
        "instances": len(files),
        "status": response.status_code,
        "stored": stored,
        "seconds": round(elapsed, 1),
        "rss_before_mib": before["rss_mib"],
        "peak_rss_mib": after["peak_mib"],
        "growth_mib": round(after["peak_mib"] - before["rss_mib"], 1),
        "readyz_max_s": round(max(latencies), 3) if latencies else None,
        "readyz_probes": len(latencies),
    }


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "# Gateway under load",
        "",
        f"`python -m bench.gateway` on {results['machine']}; studies: the real T2 {CASE}",
        "(221 x 221 x 67) as DICOM with distinct UIDs, sent by one `storescu` per study; the four stage",
        "services with the shipped models on the same cores.",
        "",
        "| gateways x workers K | job store | studies sent at once | all received (s) | drained (s) "
        "| studies / min | outcomes |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in results["throughput"]:
        lines.append(
            f"| {row['replicas']} x {row['workers']} | {row['store']} | {row['studies']} "
            f"| {row['received_s']} | {row['drain_s']} | {row['studies_per_min']} | {row['states']} |"
        )
    lines += [
        "",
        "Two gateways share one PostgreSQL job store (a local server, `discgeo.local.postgres`) and one",
        "data folder, the studies dealt out to them in turn; each study is processed once either way.",
    ]
    big = results["big_stow"]
    lines += [
        "",
        f"A {big['body_mb']} MB STOW-RS body ({big['instances']} instances): answered {big['status']} "
        f"with {big['stored']} stored in {big['seconds']} s; gateway resident memory "
        f"{big['rss_before_mib']} MiB before, peak {big['peak_rss_mib']} MiB "
        f"(growth {big['growth_mib']} MiB); "
        "`/readyz` answered within "
        f"{big['readyz_max_s']} s at worst over {big['readyz_probes']} probes during the upload.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stow-mb", type=int, default=300)
    args = parser.parse_args()
    results: dict[str, Any] = {
        "machine": f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}"
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        four = studies(root / "studies", 4, "four")
        ten = studies(root / "studies", 10, "ten")
        with pipeline_services(root / "services") as urls, postgres() as server:
            results["throughput"] = []
            runs = [(1, 1, four), (1, 2, four), (1, 4, four), (1, 2, ten), (2, 1, four), (2, 2, ten)]
            for replicas, workers, batch in runs:
                # fresh UIDs per run: each run's gateways have their own data folder and database
                database = (
                    new_database(server, f"bench_{replicas}x{workers}_{len(batch)}") if replicas > 1 else None
                )
                row = run_batch(urls, root, batch, workers, replicas=replicas, database=database)
                print(json.dumps(row), flush=True)
                results["throughput"].append(row)
            results["big_stow"] = big_stow(urls, root, args.stow_mb)
            print(json.dumps(results["big_stow"]), flush=True)
    out = ROOT / "bench" / "results"
    (out / "gateway.json").write_text(json.dumps(results, indent=1))
    (out / "gateway.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
