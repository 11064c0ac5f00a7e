"""A real Prometheus scrapes the locally started services while a study goes through the gateway; its
HTTP API then reports the discgeo counters."""

from __future__ import annotations

import subprocess
import time

import httpx
import numpy as np
import pytest

from discgeo.local import free_port, pipeline_services, prometheus
from discgeo.phantom import SeriesTags, make_case, write_dicom_series

pytestmark = pytest.mark.slow


def _query(url: str, expr: str) -> float:
    body = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert body["status"] == "success", body
    return sum(float(item["value"][1]) for item in body["data"]["result"])


def _settled(url: str, expr: str, *, at_least: float, timeout_s: float = 30.0) -> float:
    """The value once it reaches ``at_least`` (or the last value at the deadline): each target is
    scraped on its own 5 s cycle, so a stage's counter can show up a scrape after the gateway's."""
    deadline = time.monotonic() + timeout_s
    value = _query(url, expr)
    while value < at_least and time.monotonic() < deadline:
        time.sleep(1)
        value = _query(url, expr)
    return value


def test_prometheus_sees_discgeo_metrics(tmp_path_factory, threshold_segmenter_artifact):
    root = tmp_path_factory.mktemp("stack")
    dicom_port = free_port()
    settings = {
        "DISCGEO_GATEWAY_DATA": str(root / "gateway-data"),
        "DISCGEO_GATEWAY_DICOM_PORT": str(dicom_port),
        "DISCGEO_GATEWAY_IDLE_S": "1",
        "DISCGEO_GATEWAY_ALLOWED_AES": "STORESCU",
    }
    env = {"DISCGEO_SEGMENTER_ARTIFACT": str(threshold_segmenter_artifact)}
    case = make_case(45, 0, spacing=(3.5, 0.9, 0.9), full_coverage=True)
    image = case.labels.with_array((case.labels.array > 200).astype(np.float32) * 900.0 + 100.0)
    files = write_dicom_series(image, root / "study", tags=SeriesTags(uid_seed="prometheus-test"))
    with pipeline_services(root / "services", env=env, gateway=settings) as urls:
        targets = [u.removeprefix("http://") for u in urls.values()]
        with prometheus(root / "prometheus", targets) as prom:
            subprocess.run(
                ["storescu", "-aec", "DISCGEO", "127.0.0.1", str(dicom_port), *map(str, files)],
                check=True,
                capture_output=True,
            )
            assert _settled(prom, "discgeo_studies_processed_total", at_least=1, timeout_s=120) == 1
            assert _query(prom, 'discgeo_gateway_jobs_total{outcome="done"}') == 1
            discs = len(case.truth["discs"])
            for stage in ("segmenter", "geometry", "encoder", "classifier"):
                ok = f'discgeo_requests_total{{stage="{stage}",outcome="ok"}}'
                timed = f'discgeo_stage_seconds_count{{stage="{stage}"}}'
                assert _settled(prom, ok, at_least=1) >= 1, stage
                assert _settled(prom, timed, at_least=1) >= 1, stage
            assert _settled(prom, 'discgeo_discs_processed_total{stage="geometry"}', at_least=discs) == discs
            assert _query(prom, "discgeo_gateway_queue_depth") == 0
            assert _query(prom, "bentoml_service_request_total") > 0
            assert _query(prom, 'up{job="discgeo"}') == len(targets)
            assert _query(prom, 'discgeo_model_info{stage="segmenter",version="threshold-test"}') == 1
            assert _query(prom, 'discgeo_model_info{stage="encoder"}') >= 1
            assert _query(prom, 'discgeo_model_info{stage="classifier"}') >= 1
