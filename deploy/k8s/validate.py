"""Render every overlay with ``kubectl kustomize`` and validate what comes out (``make k8s-validate``).

* core objects: the Kubernetes OpenAPI schemas of kubernetes-validate, strict (unknown fields fail);
* KEDA ScaledObject, ServiceMonitor, PrometheusRule: their CRD schemas via kubernetes-models (npm),
  run by ``crd-check/check.mjs`` (the npm packages install into build/k8s-crd-check on first use);
  types, required fields and enums are checked, unknown fields are not (the compiled schemas allow them);
* policy: every Deployment has readiness, liveness and startup probes, CPU and memory requests and
  limits, runs as non-root with a read-only root filesystem and no privilege escalation, uses a
  pinned image tag; in the gpu overlay the segmenter and encoder request an NVIDIA GPU.
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
OVERLAYS = ("cpu", "gpu")
KUBERNETES_VERSION = "1.32.0"
CRD_GROUPS = ("keda.sh/", "monitoring.coreos.com/")
GPU_WORKLOADS = ("discgeo-segmenter", "discgeo-encoder")


def render(overlay: str) -> list[dict[str, Any]]:
    """The objects of one overlay."""
    out = subprocess.run(
        ["kubectl", "kustomize", str(HERE / "overlays" / overlay)], check=True, capture_output=True, text=True
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def policy_problems(objects: list[dict[str, Any]], *, gpu: bool) -> list[str]:
    """Policy violations of the Deployments, as readable lines."""
    problems = []
    for obj in objects:
        if obj.get("kind") == "NetworkPolicy":
            for rule in obj["spec"].get("ingress", []):
                for peer in rule.get("from", []):
                    cidr = peer.get("ipBlock", {}).get("cidr")
                    if cidr and ipaddress.ip_network(cidr, strict=False).num_addresses > 256:
                        problems.append(f"{obj['metadata']['name']}: ipBlock {cidr} admits a whole network")
        if obj.get("kind") != "Deployment":
            continue
        name = obj["metadata"]["name"]
        pod = obj["spec"]["template"]["spec"]
        pod_security = pod.get("securityContext", {})
        for container in pod["containers"]:
            where = f"{name}/{container['name']}"
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                if probe not in container:
                    problems.append(f"{where}: no {probe}")
            resources = container.get("resources", {})
            for section in ("requests", "limits"):
                for resource in ("cpu", "memory"):
                    if resource not in resources.get(section, {}):
                        problems.append(f"{where}: no {resource} {section[:-1]}")
            security = container.get("securityContext", {})
            if not (security.get("runAsNonRoot") or pod_security.get("runAsNonRoot")):
                problems.append(f"{where}: may run as root")
            if not security.get("readOnlyRootFilesystem"):
                problems.append(f"{where}: root filesystem is writable")
            if security.get("allowPrivilegeEscalation", True):
                problems.append(f"{where}: privilege escalation allowed")
            env = {e["name"]: e.get("value", "") for e in container.get("env", [])}
            token = env.get("DISCGEO_STAGE_TOKEN_FILE", "")
            secrets = {
                m["mountPath"]
                for m in container.get("volumeMounts", [])
                for v in pod.get("volumes", [])
                if v["name"] == m["name"] and "secret" in v
            }
            if not token or not any(token.startswith(path + "/") for path in secrets):
                problems.append(f"{where}: no stage token from a Secret (DISCGEO_STAGE_TOKEN_FILE)")
            image = container.get("image", "")
            if ":" not in image or image.endswith(":latest"):
                problems.append(f"{where}: image {image!r} is not pinned")
            if gpu and name in GPU_WORKLOADS and "nvidia.com/gpu" not in resources.get("limits", {}):
                problems.append(f"{where}: no nvidia.com/gpu limit in the gpu overlay")
    return problems


def schema_problems(objects: list[dict[str, Any]]) -> list[str]:
    """Core objects against the Kubernetes schemas (strict)."""
    import kubernetes_validate

    problems = []
    for obj in objects:
        if obj["apiVersion"].startswith(CRD_GROUPS):
            continue
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except Exception as exc:  # kubernetes-validate raises several types
            problems.append(
                f"{obj['kind']} {obj['metadata']['name']}: {type(exc).__name__}: {str(exc)[:300]}"
            )
    return problems


def crd_problems(objects: list[dict[str, Any]]) -> list[str]:
    """KEDA and Prometheus Operator objects against their CRD schemas (node + kubernetes-models)."""
    crds = [obj for obj in objects if obj["apiVersion"].startswith(CRD_GROUPS)]
    if not crds:
        return []
    if shutil.which("node") is None or shutil.which("npm") is None:
        return ["node and npm are needed to validate CRD objects"]
    work = ROOT / "build" / "k8s-crd-check"
    if not (work / "node_modules" / "@kubernetes-models" / "keda").is_dir():
        work.mkdir(parents=True, exist_ok=True)
        for name in ("package.json", "check.mjs"):
            shutil.copy(HERE / "crd-check" / name, work / name)
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--silent"], cwd=work, check=True)
    shutil.copy(HERE / "crd-check" / "check.mjs", work / "check.mjs")
    run = subprocess.run(
        ["node", "check.mjs"], cwd=work, input=json.dumps(crds), capture_output=True, text=True
    )
    return [line for line in run.stdout.splitlines() if not line.startswith("ok ")] + (
        [run.stderr.strip()[:500]] if run.returncode and run.stderr.strip() else []
    )


def validate(overlay: str) -> tuple[int, list[str]]:
    """Number of objects and all problems of one overlay."""
    objects = render(overlay)
    problems = (
        schema_problems(objects) + crd_problems(objects) + policy_problems(objects, gpu=overlay == "gpu")
    )
    return len(objects), problems


def main() -> int:
    failed = False
    for overlay in OVERLAYS:
        count, problems = validate(overlay)
        print(f"{overlay}: {count} objects, {len(problems)} problem(s)")
        for problem in problems:
            print(f"  {problem}")
        failed |= bool(problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
