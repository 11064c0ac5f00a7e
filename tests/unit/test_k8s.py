"""Kubernetes manifests: every overlay renders and validates; the validator catches real mistakes."""

from __future__ import annotations

import copy

import pytest

from deploy.k8s.validate import (
    capacity_problems,
    crd_problems,
    policy_problems,
    render,
    schema_problems,
    stage_concurrency,
    validate,
)


def _get(objects: list[dict], kind: str, name: str) -> dict:
    return next(o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name)


@pytest.mark.parametrize("overlay", ["cpu", "gpu", "local"])
def test_overlays_validate(overlay):
    count, problems = validate(overlay)
    assert count >= 25 and problems == []


def test_gpu_overlay_puts_models_on_gpus_and_uses_keda():
    objects = render("gpu")
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objects}
    assert ("ScaledObject", "discgeo-segmenter") in kinds
    assert ("HorizontalPodAutoscaler", "discgeo-segmenter") not in kinds  # KEDA owns its HPA
    for fixed in ("discgeo-encoder", "discgeo-geometry", "discgeo-classifier"):  # one replica takes all
        assert ("HorizontalPodAutoscaler", fixed) not in kinds and ("ScaledObject", fixed) not in kinds
    assert _get(objects, "ScaledObject", "discgeo-segmenter")["spec"]["maxReplicaCount"] == 4

    def segmenter(objects: list[dict]) -> dict:
        return next(
            o["spec"]["template"]["spec"]["containers"][0]
            for o in objects
            if o["kind"] == "Deployment" and o["metadata"]["name"] == "discgeo-segmenter"
        )

    container = segmenter(objects)
    assert container["image"].endswith("-gpu")
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["DISCGEO_SEGMENTER_MODE"] == "accurate"  # on a GPU the four scales cost little
    assert env["DISCGEO_ONNX_PROVIDERS"].startswith("CUDAExecutionProvider")
    assert "DISCGEO_SEGMENTER_MODE" not in {e["name"] for e in segmenter(render("cpu"))["env"]}


def test_validator_catches_mistakes():
    objects = render("cpu")
    deployment = copy.deepcopy(next(o for o in objects if o["kind"] == "Deployment"))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    del container["livenessProbe"]
    container["securityContext"]["readOnlyRootFilesystem"] = False
    container["image"] = "discgeo/x:latest"
    container["env"] = [e for e in container["env"] if e["name"] != "DISCGEO_STAGE_TOKEN_FILE"]
    policy = copy.deepcopy(next(o for o in objects if o["metadata"]["name"] == "discgeo-gateway-from-pacs"))
    policy["spec"]["ingress"][0]["from"].append({"ipBlock": {"cidr": "10.0.0.0/8"}})
    problems = policy_problems([deployment, policy], gpu=True)
    assert any("no stage token from a secret volume" in p for p in problems)
    assert any("10.0.0.0/8 admits a whole network" in p for p in problems)
    assert any("no livenessProbe" in p for p in problems)
    assert any("root filesystem is writable" in p for p in problems)
    assert any("not pinned" in p for p in problems)
    container["imagePullPolcy"] = "Always"  # typo: strict schema validation rejects it
    assert schema_problems([deployment])
    scaled = copy.deepcopy(next(o for o in render("gpu") if o["kind"] == "ScaledObject"))
    del scaled["spec"]["scaleTargetRef"]
    assert any("INVALID" in p for p in crd_problems([scaled]))


def test_stage_scaling_matches_what_the_gateway_feeds():
    concurrency = stage_concurrency()
    assert concurrency == {
        "discgeo-segmenter": 2,
        "discgeo-encoder": 16,
        "discgeo-geometry": 4,
        "discgeo-classifier": 32,
    }
    objects = render("gpu")
    gateway = _get(objects, "Deployment", "discgeo-gateway")
    assert gateway["spec"]["replicas"] == 2
    env = {e["name"]: e for e in gateway["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["DISCGEO_GATEWAY_DATABASE"]["value"].startswith("postgresql://")
    assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "discgeo-postgres"
    assert capacity_problems(objects, concurrency) == []

    more_workers = copy.deepcopy(objects)
    config = next(o for o in more_workers if o["kind"] == "ConfigMap")
    config["data"]["DISCGEO_GATEWAY_WORKERS"] = "8"  # 16 studies in flight: segmenter 8, geometry 4
    feeds = "requests at once, but the gateway works on 16 studies at once (2 x 8 workers)"
    assert capacity_problems(more_workers, concurrency) == [
        f"discgeo-geometry: at most 2 x 4 {feeds}",
        f"discgeo-segmenter: at most 4 x 2 {feeds}",
    ]
    idle = copy.deepcopy(objects)
    _get(idle, "Deployment", "discgeo-encoder")["spec"]["replicas"] = 3
    _get(idle, "ScaledObject", "discgeo-segmenter")["spec"]["triggers"][0]["metadata"]["threshold"] = "8"
    problems = capacity_problems(idle, concurrency)
    assert any(p.startswith("discgeo-encoder: scales to 3 replicas") for p in problems)
    assert any("KEDA in-flight threshold 8, but one replica serves 2" in p for p in problems)
    cpu = render("cpu")
    _get(cpu, "HorizontalPodAutoscaler", "discgeo-segmenter")["spec"]["maxReplicas"] = 8
    assert capacity_problems(cpu, concurrency) == [
        "discgeo-segmenter: scales to 8 replicas, but the gateway works on 8 studies at once"
        " (2 x 4 workers): 4 take them all"
    ]


def test_local_overlay_keeps_one_gateway_on_sqlite():
    objects = render("local")
    gateway = _get(objects, "Deployment", "discgeo-gateway")
    assert gateway["spec"]["replicas"] == 1 and gateway["spec"]["strategy"] == {"type": "Recreate"}
    names = {e["name"] for e in gateway["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert not names & {"DISCGEO_GATEWAY_DATABASE", "PGPASSWORD"}
    # its policy check reads the tokens from the named volumes podman fills, not from Secrets
    assert any("secret volume" in p for p in policy_problems(objects, gpu=False))
    assert policy_problems(objects, gpu=False, token_volume="persistentVolumeClaim") == []


def test_grafana_dashboard_queries_known_metrics():
    import json
    import re

    from deploy.k8s.validate import ROOT

    dashboard = json.loads((ROOT / "deploy" / "grafana" / "discgeo-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    names = set(re.findall(r"\b(discgeo_[a-z_]+|bentoml_[a-z_]+)", " ".join(exprs)))
    known = {
        "discgeo_studies_processed_total",
        "discgeo_discs_processed_total",
        "discgeo_stage_seconds_bucket",
        "discgeo_errors_total",
        "discgeo_gateway_queue_depth",
        "discgeo_gateway_jobs_total",
        "bentoml_service_request_in_progress",
        "bentoml_service_adaptive_batch_size_sum",
        "bentoml_service_adaptive_batch_size_count",
    }
    assert names <= known, names - known
    assert {"Studies per minute", "Errors by stage and reason"} <= {p["title"] for p in dashboard["panels"]}
