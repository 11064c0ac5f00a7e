"""Run the Kubernetes manifests on this host with ``podman kube play`` (``make kube-play`` / ``kube-down``).

Renders ``deploy/k8s/overlays/local`` (the base with only what podman cannot do patched, see its
kustomization), keeps the kinds podman 4 runs (Deployment, ConfigMap, PersistentVolumeClaim; Services,
NetworkPolicies, HPAs and PodDisruptionBudgets are cluster features and are dropped, each listed),
fills the volumes a cluster operator fills (models, tokens), plays it (each pod in its own network
namespace on podman's bridge, its ports published on the host) and waits until every service's
readiness endpoint answers, as the readiness probes would.

    python deploy/kube.py play | down | render
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE.parent))
from deploy import images  # noqa: E402

BUILD = ROOT / "build" / "kube"
PLAYED = BUILD / "discgeo.yaml"
RUNS = ("Deployment", "ConfigMap", "PersistentVolumeClaim")  # what podman kube play creates
# the volumes this script fills (a cluster operator copies the models and creates the Secret)
FILLED = ("discgeo-models", "discgeo-stage-token", "discgeo-tokens")
CREATED = ("discgeo-gateway-data",)  # made by kube play from its PersistentVolumeClaim
TOKENS = ("stage.token", "gateway.token", "deployment.secret")
NETWORK = "podman-default-kube-network"  # the bridge podman kube play puts pods on


def podman() -> list[str]:
    """podman (``kube play``, named-volume import and networks exist in podman only)."""
    if images.engine() != ["podman"]:
        raise SystemExit("make kube-play needs podman (apt-get install podman buildah runc catatonit)")
    return ["podman"]


def render() -> tuple[list[dict[str, Any]], list[str]]:
    """The local overlay's documents podman runs, and the ``Kind/name`` of those it cannot."""
    text = subprocess.run(
        ["kubectl", "kustomize", str(HERE / "k8s" / "overlays" / "local")],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    docs = [d for d in yaml.safe_load_all(text) if d]
    kept = [d for d in docs if d["kind"] in RUNS and d["metadata"]["name"] not in FILLED]
    for doc in kept:
        if doc["kind"] == "Deployment":
            _own_empty_dirs(doc)
    dropped = [f"{d['kind']}/{d['metadata']['name']}" for d in docs if d["kind"] not in RUNS]
    return kept, dropped


def _own_empty_dirs(deployment: dict[str, Any]) -> None:
    """podman 4.3 backs every emptyDir with one named volume called after it, shared by all pods (five
    services' BentoML homes in one /tmp: their metrics files collide); a cluster gives each pod its
    own. Name each emptyDir after its deployment."""
    spec = deployment["spec"]["template"]["spec"]
    prefix = deployment["metadata"]["name"]
    renamed = {v["name"]: f"{prefix}-{v['name']}" for v in spec.get("volumes", []) if "emptyDir" in v}
    for volume in spec.get("volumes", []):
        volume["name"] = renamed.get(volume["name"], volume["name"])
    for container in spec["containers"]:
        for mount in container.get("volumeMounts", []):
            mount["name"] = renamed.get(mount["name"], mount["name"])


def empty_dirs(docs: list[dict[str, Any]]) -> list[str]:
    """The volume names the emptyDirs of ``docs`` get (removed by :func:`down`)."""
    return [
        v["name"]
        for d in docs
        if d["kind"] == "Deployment"
        for v in d["spec"]["template"]["spec"].get("volumes", [])
        if "emptyDir" in v
    ]


def ports(docs: list[dict[str, Any]]) -> dict[str, int]:
    """Service name -> the host port its HTTP port is published on in the local overlay."""
    out = {}
    for doc in docs:
        if doc["kind"] == "Deployment":
            container = doc["spec"]["template"]["spec"]["containers"][0]
            out[container["name"]] = next(p["hostPort"] for p in container["ports"] if p["name"] == "http")
    return out


def _volume(name: str, files: dict[str, tuple[bytes, int]]) -> None:
    """A podman named volume holding ``files`` (name -> (content, mode)), owned by UID 10001."""
    engine = podman()
    subprocess.run([*engine, "volume", "rm", "-f", name], capture_output=True)
    subprocess.run([*engine, "volume", "create", name], check=True, capture_output=True)
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        for path, (data, mode) in sorted(files.items()):
            info = tarfile.TarInfo(path)
            info.size, info.mode, info.uid, info.gid, info.mtime = len(data), mode, 10001, 10001, time.time()
            tar.addfile(info, io.BytesIO(data))
    subprocess.run([*engine, "volume", "import", name, "-"], input=archive.getvalue(), check=True)


def fill_volumes(models: Path = ROOT / "models") -> None:
    """The models (read-only artifacts) and the tokens (created once under build/kube/tokens)."""
    from discgeo.auth import new_token_file

    folder = BUILD / "tokens"
    for name in TOKENS:
        if not (folder / name).exists():
            new_token_file(folder / name)
    tokens = {name: ((folder / name).read_bytes(), 0o400) for name in TOKENS}
    _volume("discgeo-tokens", tokens)
    _volume("discgeo-stage-token", {"stage.token": tokens["stage.token"]})
    artifacts = {
        str(path.relative_to(models)): (path.read_bytes(), 0o444)
        for path in models.rglob("*")
        if path.is_file() and path.parent != models
    }
    _volume("discgeo-models", artifacts)


def wait_ready(service_ports: dict[str, int], timeout_s: float = 300) -> dict[str, float]:
    """Seconds from now until each service's /readyz answers 200 (what its readiness probe checks)."""
    start, ready = time.monotonic(), {}
    while len(ready) < len(service_ports) and time.monotonic() - start < timeout_s:
        for name, port in service_ports.items():
            if name not in ready:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                        ready[name] = round(time.monotonic() - start, 1)
                except httpx.HTTPError:
                    pass
        time.sleep(0.5)
    missing = sorted(set(service_ports) - set(ready))
    if missing:
        raise SystemExit(f"not ready after {timeout_s:.0f} s: {', '.join(missing)}; see podman pod logs")
    return ready


def play(gateway_env: dict[str, str] | None = None) -> dict[str, Any]:
    """Render, fill the volumes, play and wait for readiness; returns the host ports,
    the seconds to ready per service and what was dropped. ``gateway_env`` adds ConfigMap entries
    (e.g. where to forward results)."""
    down()
    docs, dropped = render()
    for doc in docs:
        if doc["kind"] == "ConfigMap":
            # a PACS on this host (Orthanc, storescu) reaches the gateway from the bridge's gateway
            # address; the cluster's ConfigMap names the PACS's own address instead
            doc["data"]["DISCGEO_GATEWAY_ALLOWED_SOURCES"] = bridge_subnet()
            doc["data"].update(gateway_env or {})
    for kind_name in dropped:
        print(f"not run by podman (a cluster feature): {kind_name}", flush=True)
    BUILD.mkdir(parents=True, exist_ok=True)
    PLAYED.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    fill_volumes()
    start = time.monotonic()
    subprocess.run([*podman(), "kube", "play", str(PLAYED)], check=True)
    service_ports = ports(docs)
    ready = wait_ready(service_ports)
    print(f"ready after (s): {json.dumps(ready)}", flush=True)
    took = round(time.monotonic() - start, 1)
    return {"ports": service_ports, "ready_s": ready, "play_s": took, "dropped": dropped}


def bridge_subnet() -> str:
    """The subnet of podman's kube network (created here when it does not exist yet)."""
    engine = podman()
    if subprocess.run([*engine, "network", "exists", NETWORK]).returncode != 0:
        subprocess.run([*engine, "network", "create", NETWORK], check=True, capture_output=True)
    inspect = [*engine, "network", "inspect", NETWORK, "--format", "{{range .Subnets}}{{.Subnet}} {{end}}"]
    subnets = subprocess.run(inspect, check=True, capture_output=True, text=True).stdout.split()
    return ",".join(subnets)


def down() -> None:
    """Remove the pods, containers and volumes a previous :func:`play` created."""
    engine = podman()
    scratch = []
    if PLAYED.exists():
        subprocess.run([*engine, "kube", "down", str(PLAYED)], capture_output=True)
        scratch = empty_dirs([d for d in yaml.safe_load_all(PLAYED.read_text()) if d])
    for name in (*FILLED, *CREATED, *scratch):
        subprocess.run([*engine, "volume", "rm", "-f", name], capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("play", "down", "render"))
    args = parser.parse_args()
    if args.action == "render":
        print(yaml.safe_dump_all(render()[0], sort_keys=False))
    elif args.action == "play":
        play()
    else:
        down()


if __name__ == "__main__":
    main()
