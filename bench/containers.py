"""The containerised stack (``make kube-play``: the Kubernetes manifests under ``podman kube play``)
end to end: container start to ready per service, studies sent by ``storescu`` to the gateway
container coming back as SEG + SR in Orthanc (on the host, as the PACS), Prometheus scraping every
container's ``/metrics``, and studies per minute on the same real study as the embedded gateway bench.

    python -m bench.containers [--studies N]   # writes bench/results/containers.{json,md}

The studies are the real T2 case-20 of ``../shared/data/ivd-t2-mri`` (Menezes-Reis et al. 2016) as DICOM
series with distinct UIDs (:func:`bench.gateway.studies`). Needs the CPU images (``make images``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pydicom

from bench.gateway import send_all, studies, wait_done
from deploy import images, kube
from discgeo.local import orthanc, prometheus

ROOT = Path(__file__).resolve().parents[1]
DICOM_PORT = 11112  # the gateway container's C-STORE port, published on the host


def in_orthanc(url: str, study_uid: str) -> dict[str, int]:
    """Instances per modality that Orthanc holds for a study."""
    found = httpx.post(f"{url}/tools/lookup", content=study_uid, timeout=10).json()
    counts: dict[str, int] = {}
    for item in found:
        for series in httpx.get(f"{url}/studies/{item['ID']}/series", timeout=10).json():
            modality = series["MainDicomTags"]["Modality"]
            counts[modality] = counts.get(modality, 0) + len(series["Instances"])
    return counts


def scraped(prometheus_url: str, targets: list[str], timeout_s: float = 60) -> dict[str, bool]:
    """Whether Prometheus scrapes each target successfully (``up == 1``)."""
    deadline, up = time.monotonic() + timeout_s, {}
    while time.monotonic() < deadline:
        result = httpx.get(f"{prometheus_url}/api/v1/query", params={"query": "up"}, timeout=10).json()
        up = {r["metric"]["instance"]: r["value"][1] == "1" for r in result["data"]["result"]}
        if all(up.get(t) for t in targets):
            break
        time.sleep(1)
    return {t: bool(up.get(t)) for t in targets}


def run(work: Path, count: int = 4) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    batch = studies(work / "studies", count, "containers")
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()}}
    with ExitStack() as stack:
        orthanc_url, orthanc_dicom = stack.enter_context(orthanc(work / "orthanc", gateway_port=DICOM_PORT))
        forward = f"dicom://ORTHANC@host.containers.internal:{orthanc_dicom}"
        stack.callback(kube.down)  # also when the play fails half-way
        played = kube.play({"DISCGEO_GATEWAY_FORWARD": forward})
        results["kube"] = played
        targets = [f"127.0.0.1:{port}" for port in played["ports"].values()]
        prometheus_url = stack.enter_context(prometheus(work / "prometheus", targets))
        os.environ["DISCGEO_GATEWAY_TOKENS_FILE"] = str(kube.BUILD / "tokens" / "gateway.token")
        gateway = f"http://127.0.0.1:{played['ports']['gateway']}"
        start = time.perf_counter()
        send_all(DICOM_PORT, batch)
        jobs = wait_done(gateway, batch, timeout=900, final=("forwarded", "failed", "dead"))
        took = time.perf_counter() - start
        uids = [str(pydicom.dcmread(files[0]).StudyInstanceUID) for files in batch]
        results["studies"] = {
            "count": count,
            "states": [j["state"] for j in jobs],
            "drain_s": round(took, 1),
            "studies_per_min": round(60 * count / took, 2),
            "in_orthanc": [in_orthanc(orthanc_url, uid) for uid in uids],
        }
        results["prometheus_up"] = scraped(prometheus_url, targets)
    results["engine"] = images.engine()[0]
    return results


def markdown(results: dict[str, Any]) -> str:
    kube_run, batch = results["kube"], results["studies"]
    embedded = json.loads((ROOT / "bench" / "results" / "gateway.json").read_text())
    same = next(
        (
            r
            for r in embedded["throughput"]
            if r["studies"] == batch["count"] and r["workers"] == 2 and r["replicas"] == 1
        ),
        None,
    )
    lines = [
        "# The containerised stack",
        "",
        f"`python -m bench.containers` on {results['machine']['cpus']} CPU cores: the manifests of "
        f"`deploy/k8s/overlays/local` under `{results['engine']} kube play` (one pod per service), "
        f"Orthanc on the host as the PACS, Prometheus on the host scraping the containers.",
        "",
        "| service | container start to /readyz 200 (s) |",
        "|---|---|",
        *(f"| {name} | {seconds} |" for name, seconds in sorted(kube_run["ready_s"].items())),
        "",
        f"{batch['count']} studies (real case-20 as DICOM) sent at once by `storescu` to the gateway "
        "container: "
        f"{batch['drain_s']} s until all were forwarded, **{batch['studies_per_min']} studies/min** "
        + (
            f"(embedded gateway, same studies and 2 workers: {same['studies_per_min']} studies/min, "
            "`bench/results/gateway.md`)"
            if same
            else ""
        )
        + f"; in Orthanc per study: {batch['in_orthanc']}; Prometheus scraping every container: "
        + ("yes" if all(results["prometheus_up"].values()) else f"no {results['prometheus_up']}")
        + ".",
        "",
        "Not run by podman (cluster features): " + ", ".join(kube_run["dropped"]) + ".",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=4)
    parser.add_argument("--work", type=Path, default=ROOT / "build" / "containers")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    results = run(args.work, args.studies)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "containers.json").write_text(json.dumps(results, indent=1))
    (args.out / "containers.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
