"""The gateway with the four stage services, all real ``bentoml serve`` processes: dcmtk ``storescu``
and STOW-RS deliver a study, the job runs, SEG and SR come out; duplicates and strangers are handled."""

from __future__ import annotations

import subprocess
import time

import httpx
import numpy as np
import pydicom
import pytest

from discgeo.gateway import stow_body
from discgeo.io.dicom import SeriesTags, write_dicom_series
from discgeo.local import free_port, pipeline_services
from discgeo.phantom import make_case

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, threshold_segmenter_artifact):
    dicom_port = free_port()
    settings = {
        "DISCGEO_GATEWAY_DATA": str(tmp_path_factory.mktemp("gateway-data")),
        "DISCGEO_GATEWAY_DICOM_PORT": str(dicom_port),
        "DISCGEO_GATEWAY_IDLE_S": "1",
        "DISCGEO_GATEWAY_ALLOWED_AES": "STORESCU,DISCGEO-TEST",
    }
    env = {"DISCGEO_SEGMENTER_ARTIFACT": str(threshold_segmenter_artifact)}
    with pipeline_services(tmp_path_factory.mktemp("services"), env=env, gateway=settings) as urls:
        yield urls["gateway"], dicom_port


def _study(tmp_path, seed: int, name: str):
    case = make_case(seed, 0, spacing=(3.5, 0.9, 0.9), full_coverage=True)
    image = case.labels.with_array((case.labels.array > 200).astype(np.float32) * 900.0 + 100.0)
    files = write_dicom_series(image, tmp_path / name, tags=SeriesTags(uid_seed=f"gateway-{seed}"))
    return case, files


def _wait_for_job(url: str, study_uid: str, timeout: float = 120.0) -> dict:
    from discgeo.errors import hashed_uid

    key = hashed_uid(study_uid).removeprefix("uid:")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = httpx.get(f"{url}/gateway/jobs/{key}", timeout=10)
        if response.status_code == 200 and response.json()["state"] in ("done", "failed"):
            return response.json()
        time.sleep(0.5)
    raise AssertionError(f"job {key} not finished in {timeout} s")


def test_storescu_study_is_processed_once(gateway, tmp_path):
    url, port = gateway
    case, files = _study(tmp_path, 40, "cstore")
    subprocess.run(
        ["storescu", "-aet", "STORESCU", "-aec", "DISCGEO", "127.0.0.1", str(port), *map(str, files)],
        check=True,
        capture_output=True,
    )
    study_uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    job = _wait_for_job(url, study_uid)
    assert job["state"] == "done", job
    assert job["instances"] == len(files) and {"results.json", "seg.dcm", "sr.dcm", "overview.png"} <= set(
        job["files"]
    )
    results = httpx.get(f"{url}/gateway/jobs/{job['key']}/files/results.json", timeout=10).json()
    assert [d["level"] for d in results["discs"]] == [d["level"] for d in case.truth["discs"]]
    seg = pydicom.dcmread(
        __import__("io").BytesIO(
            httpx.get(f"{url}/gateway/jobs/{job['key']}/files/seg.dcm", timeout=10).content
        )
    )
    assert seg.Modality == "SEG" and seg.StudyInstanceUID == study_uid
    # sent again: acknowledged, not processed again
    subprocess.run(
        ["storescu", "-aet", "STORESCU", "-aec", "DISCGEO", "127.0.0.1", str(port), *map(str, files)],
        check=True,
        capture_output=True,
    )
    time.sleep(3)
    again = httpx.get(f"{url}/gateway/jobs/{job['key']}", timeout=10).json()
    assert again["attempts"] == 1 and again["state"] == "done"


def test_unknown_calling_ae_is_rejected(gateway, tmp_path):
    _, port = gateway
    _, files = _study(tmp_path, 41, "stranger")
    run = subprocess.run(
        ["storescu", "-aet", "STRANGER", "-aec", "DISCGEO", "127.0.0.1", str(port), str(files[0])],
        capture_output=True,
        text=True,
    )
    assert run.returncode != 0 and "Association Rejected" in (run.stdout + run.stderr)


def test_stow_rs_study_is_processed(gateway, tmp_path):
    url, _ = gateway
    _, files = _study(tmp_path, 42, "stow")
    body, content_type = stow_body(files, boundary="discgeo-test")
    response = httpx.post(
        f"{url}/gateway/dicomweb/studies",
        content=body,
        timeout=60,
        headers={"Content-Type": content_type},
    )
    assert response.status_code == 200, response.text
    assert len(response.json()["00081199"]["Value"]) == len(files)
    job = _wait_for_job(url, str(pydicom.dcmread(files[0]).StudyInstanceUID))
    assert job["state"] == "done" and "sr.dcm" in job["files"]
    bad = httpx.post(
        f"{url}/gateway/dicomweb/studies",
        content=b"x",
        timeout=10,
        headers={"Content-Type": "application/dicom"},
    )
    assert bad.status_code == 400 and "multipart/related" in bad.text
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    assert (
        'discgeo_gateway_jobs_total{outcome="done"}' in metrics and "discgeo_gateway_queue_depth" in metrics
    )
