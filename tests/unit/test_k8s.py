"""Kubernetes manifests: every overlay renders and validates; the validator catches real mistakes."""

from __future__ import annotations

import copy

import pytest

from deploy.k8s.validate import crd_problems, policy_problems, render, schema_problems, validate


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_overlays_validate(overlay):
    count, problems = validate(overlay)
    assert count >= 25 and problems == []


def test_gpu_overlay_puts_models_on_gpus_and_uses_keda():
    objects = render("gpu")
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objects}
    assert ("ScaledObject", "discgeo-segmenter") in kinds
    assert ("HorizontalPodAutoscaler", "discgeo-segmenter") not in kinds  # KEDA owns its HPA
    assert ("HorizontalPodAutoscaler", "discgeo-geometry") in kinds

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
    assert any("no stage token from a Secret" in p for p in problems)
    assert any("10.0.0.0/8 admits a whole network" in p for p in problems)
    assert any("no livenessProbe" in p for p in problems)
    assert any("root filesystem is writable" in p for p in problems)
    assert any("not pinned" in p for p in problems)
    container["imagePullPolcy"] = "Always"  # typo: strict schema validation rejects it
    assert schema_problems([deployment])
    scaled = copy.deepcopy(next(o for o in render("gpu") if o["kind"] == "ScaledObject"))
    del scaled["spec"]["scaleTargetRef"]
    assert any("INVALID" in p for p in crd_problems([scaled]))


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
