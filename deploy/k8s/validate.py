"""Render every overlay with ``kubectl kustomize`` and validate what comes out (``make k8s-validate``).

* core objects: the Kubernetes OpenAPI schemas of kubernetes-validate, strict (unknown fields fail);
* KEDA ScaledObject, ServiceMonitor, PrometheusRule: their CRD schemas via kubernetes-models (npm),
  run by ``crd-check/check.mjs`` (the npm packages install into build/k8s-crd-check on first use);
  types, required fields and enums are checked, unknown fields are not (the compiled schemas allow them);
* policy: every Deployment and StatefulSet has readiness, liveness and startup probes, CPU and memory
  requests and limits, runs as non-root with a read-only root filesystem and no privilege escalation,
  uses a pinned image tag; discgeo containers read the stage token from a Secret (in the local overlay,
  from its token volume); in the gpu overlay the segmenter and encoder request an NVIDIA GPU;
* capacity: the stages scale to what the gateway can feed. The gateway works on replicas x
  DISCGEO_GATEWAY_WORKERS studies at once, each one request per stage; a stage replica is sized for
  its BentoML traffic concurrency (services/*/service.py: BentoML's ideal number of simultaneous
  requests, a scaling hint, not a hard limit; the rule holds as far as those values are right). So a
  stage's most replicas must reach ceil(studies in flight / concurrency) and go no further than that
  or two (for availability; more could get no work), and a KEDA in-flight trigger's threshold is the
  concurrency. In the local overlay (podman runs no autoscalers) the Deployments' replica counts are
  what counts.
"""

from __future__ import annotations

import ast
import ipaddress
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
OVERLAYS = ("cpu", "gpu", "local")
KUBERNETES_VERSION = "1.32.0"
CRD_GROUPS = ("keda.sh/", "monitoring.coreos.com/")
GPU_WORKLOADS = ("discgeo-segmenter", "discgeo-encoder")
AVAILABLE = 2  # replicas a stage may keep beyond what it is fed: one can go down (its PDB) while one serves


def render(overlay: str) -> list[dict[str, Any]]:
    """The objects of one overlay."""
    out = subprocess.run(
        ["kubectl", "kustomize", str(HERE / "overlays" / overlay)], check=True, capture_output=True, text=True
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def policy_problems(objects: list[dict[str, Any]], *, gpu: bool, token_volume: str = "secret") -> list[str]:
    """Policy violations of the workloads, as readable lines; ``token_volume``: the kind of volume the
    stage token comes from (``secret``; the local overlay's ``persistentVolumeClaim``)."""
    problems = []
    for obj in objects:
        if obj.get("kind") == "NetworkPolicy":
            for rule in obj["spec"].get("ingress", []):
                for peer in rule.get("from", []):
                    cidr = peer.get("ipBlock", {}).get("cidr")
                    if cidr and ipaddress.ip_network(cidr, strict=False).num_addresses > 256:
                        problems.append(f"{obj['metadata']['name']}: ipBlock {cidr} admits a whole network")
        if obj.get("kind") not in ("Deployment", "StatefulSet"):
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
            image = container.get("image", "")
            env = {e["name"]: e.get("value", "") for e in container.get("env", [])}
            token = env.get("DISCGEO_STAGE_TOKEN_FILE", "")
            mounted = {
                m["mountPath"]
                for m in container.get("volumeMounts", [])
                for v in pod.get("volumes", [])
                if v["name"] == m["name"] and token_volume in v
            }
            if image.startswith("discgeo/") and not any(token.startswith(path + "/") for path in mounted):
                problems.append(
                    f"{where}: no stage token from a {token_volume} volume (DISCGEO_STAGE_TOKEN_FILE)"
                )
            if ":" not in image or image.endswith(":latest"):
                problems.append(f"{where}: image {image!r} is not pinned")
            if gpu and name in GPU_WORKLOADS and "nvidia.com/gpu" not in resources.get("limits", {}):
                problems.append(f"{where}: no nvidia.com/gpu limit in the gpu overlay")
    return problems


def stage_concurrency() -> dict[str, int]:
    """Each BentoML service's traffic concurrency by service name, read from ``@bentoml.service(...)``
    in services/*/service.py (parsed, not imported: no model loads)."""
    found = {}
    for path in sorted((ROOT / "services").glob("*/service.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "bentoml.service":
                keywords = {k.arg: k.value for k in node.keywords}
                traffic = ast.literal_eval(keywords["traffic"]) if "traffic" in keywords else {}
                if "name" in keywords and "concurrency" in traffic:
                    found[ast.literal_eval(keywords["name"])] = int(traffic["concurrency"])
    return found


def capacity_problems(
    objects: list[dict[str, Any]], concurrency: dict[str, int], *, autoscalers: bool = True
) -> list[str]:
    """Stages that scale past, or short of, what the gateway's workers can feed (module docstring)."""
    found = {(o["kind"], o["metadata"]["name"]): o for o in objects}
    gateway = found.get(("Deployment", "discgeo-gateway"))
    if gateway is None:
        return ["no Deployment discgeo-gateway"]
    config = next(
        (
            found[("ConfigMap", source["configMapRef"]["name"])]
            for c in gateway["spec"]["template"]["spec"]["containers"]
            for source in c.get("envFrom", [])
            if ("ConfigMap", source.get("configMapRef", {}).get("name")) in found
        ),
        {},
    )
    if "DISCGEO_GATEWAY_WORKERS" not in config.get("data", {}):
        return ["discgeo-gateway: DISCGEO_GATEWAY_WORKERS is not in its ConfigMap"]

    def most(name: str) -> int:
        fixed = int(found[("Deployment", name)]["spec"].get("replicas", 1))
        if not autoscalers:
            return fixed
        if ("ScaledObject", name) in found:
            return int(found[("ScaledObject", name)]["spec"].get("maxReplicaCount", 100))
        if ("HorizontalPodAutoscaler", name) in found:
            return int(found[("HorizontalPodAutoscaler", name)]["spec"]["maxReplicas"])
        return fixed

    workers = int(config["data"]["DISCGEO_GATEWAY_WORKERS"])
    replicas = most("discgeo-gateway")
    in_flight = replicas * workers
    feeds = f"the gateway works on {in_flight} studies at once ({replicas} x {workers} workers)"
    problems = []
    for kind, name in sorted(found):
        if kind != "Deployment" or name not in concurrency:
            continue
        per_replica = concurrency[name]
        needed = math.ceil(in_flight / per_replica)
        top = most(name)
        if top < needed:
            problems.append(f"{name}: at most {top} x {per_replica} requests at once, but {feeds}")
        elif top > max(needed, AVAILABLE):
            problems.append(f"{name}: scales to {top} replicas, but {feeds}: {needed} take them all")
        for trigger in found.get(("ScaledObject", name), {}).get("spec", {}).get("triggers", []):
            query = trigger.get("metadata", {}).get("query", "")
            threshold = trigger.get("metadata", {}).get("threshold")
            if "request_in_progress" in query and float(threshold) != per_replica:
                problems.append(
                    f"{name}: KEDA in-flight threshold {threshold}, but one replica serves {per_replica}"
                )
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
    local = overlay == "local"
    problems = (
        schema_problems(objects)
        + crd_problems(objects)
        + policy_problems(
            objects, gpu=overlay == "gpu", token_volume="persistentVolumeClaim" if local else "secret"
        )
        + capacity_problems(objects, stage_concurrency(), autoscalers=not local)
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
