"""The gateway with the four stage services, all real ``bentoml serve`` processes: dcmtk ``storescu``
and STOW-RS deliver a study, the job runs, SEG and SR come out; every HTTP endpoint needs the token,
paths cannot escape the results, oversized and malformed bodies are refused with their reasons."""

from __future__ import annotations

import io
import subprocess
import time

import httpx
import numpy as np
import pydicom
import pytest

from discgeo.gateway.ingest import stow_body
from discgeo.local import client_headers, free_port, pipeline_services
from discgeo.phantom import SeriesTags, make_case, write_dicom_series

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, threshold_segmenter_artifact):
    dicom_port = free_port()
    settings = {
        "DISCGEO_GATEWAY_DATA": str(tmp_path_factory.mktemp("gateway-data")),
        "DISCGEO_GATEWAY_DICOM_PORT": str(dicom_port),
        "DISCGEO_GATEWAY_IDLE_S": "1",
        "DISCGEO_GATEWAY_ALLOWED_AES": "STORESCU,DISCGEO-TEST",
        "DISCGEO_GATEWAY_MAX_BODY_BYTES": str(20_000_000),
    }
    env = {"DISCGEO_SEGMENTER_ARTIFACT": str(threshold_segmenter_artifact)}
    with pipeline_services(tmp_path_factory.mktemp("services"), env=env, gateway=settings) as urls:
        yield urls["gateway"], dicom_port


def _study(tmp_path, seed: int, name: str):
    case = make_case(seed, 0, spacing=(3.5, 0.9, 0.9), full_coverage=True)
    image = case.labels.with_array((case.labels.array > 200).astype(np.float32) * 900.0 + 100.0)
    files = write_dicom_series(image, tmp_path / name, tags=SeriesTags(uid_seed=f"gateway-{seed}"))
    return case, files


def _get(url: str, **kwargs) -> httpx.Response:
    return httpx.get(url, headers=client_headers("gateway"), timeout=10, **kwargs)


def _wait_for_job(url: str, study_uid: str, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = _get(f"{url}/gateway/jobs", params={"study": study_uid}).json()
        if found and found[0]["state"] in ("done", "failed", "dead"):
            return found[0]
        time.sleep(0.5)
    raise AssertionError(f"study not finished in {timeout} s")


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
    results = _get(f"{url}/gateway/jobs/{job['job_id']}/files/results.json").json()
    assert [d["level"] for d in results["discs"]] == [d["level"] for d in case.truth["discs"]]
    seg = pydicom.dcmread(io.BytesIO(_get(f"{url}/gateway/jobs/{job['job_id']}/files/seg.dcm").content))
    assert seg.Modality == "SEG" and seg.StudyInstanceUID == study_uid
    # sent again: acknowledged, nothing new, not processed again
    subprocess.run(
        ["storescu", "-aet", "STORESCU", "-aec", "DISCGEO", "127.0.0.1", str(port), *map(str, files)],
        check=True,
        capture_output=True,
    )
    time.sleep(3)
    again = _get(f"{url}/gateway/jobs/{job['job_id']}").json()
    assert again["attempts"] == 1 and again["state"] == "done" and again["revision"] == 1
    # a reprocess runs again and keeps the UIDs (same input, same models)
    answer = httpx.post(f"{url}/gateway/jobs/{job['job_id']}/reprocess", headers=client_headers("gateway"))
    assert answer.status_code == 202
    time.sleep(1)
    job = _wait_for_job(url, study_uid)
    again = pydicom.dcmread(io.BytesIO(_get(f"{url}/gateway/jobs/{job['job_id']}/files/seg.dcm").content))
    assert again.SOPInstanceUID == seg.SOPInstanceUID


def test_every_endpoint_needs_the_token_and_paths_stay_inside(gateway, tmp_path):
    url, _ = gateway
    for path in ("/gateway/jobs", "/gateway/jobs/AAAAAAAAAAAAAAAA", "/health"):
        assert httpx.get(url + path, timeout=10).status_code == 401
        wrong = {"Authorization": "Bearer not-the-token-but-long-enough"}
        assert httpx.get(url + path, headers=wrong, timeout=10).status_code == 401
    assert httpx.post(url + "/gateway/dicomweb/studies", content=b"x", timeout=10).status_code == 401
    assert httpx.get(url + "/readyz", timeout=10).status_code == 200
    for attack in (
        "/gateway/jobs/../files/jobs.sqlite",
        "/gateway/jobs/%2e%2e/files/jobs.sqlite",
        "/gateway/jobs/..%2f..%2fjobs.sqlite/files/secret",
        "/gateway/files/jobs.sqlite",
    ):
        answer = subprocess.run(
            [
                "curl",
                "-s",
                "--path-as-is",
                "-H",
                client_headers("gateway")["Authorization"].join(["Authorization: ", ""]),
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                url + attack,
            ],
            capture_output=True,
            text=True,
        )
        assert answer.stdout == "404", (attack, answer.stdout)


def test_stow_rs_study_is_processed_and_failures_have_reasons(gateway, tmp_path):
    url, _ = gateway
    _, files = _study(tmp_path, 42, "stow")
    broken = pydicom.dcmread(files[-1])
    del broken.SOPClassUID
    del broken.file_meta.MediaStorageSOPClassUID
    broken.save_as(tmp_path / "broken.dcm", enforce_file_format=False)
    body, content_type = stow_body([*files[:-1], tmp_path / "broken.dcm"], boundary="discgeo-test")
    response = httpx.post(
        f"{url}/gateway/dicomweb/studies",
        content=b"".join(body),
        timeout=60,
        headers={**client_headers("gateway"), "Content-Type": content_type},
    )
    assert response.status_code == 202, response.text
    answer = response.json()
    assert len(answer["00081199"]["Value"]) == len(files) - 1
    (failure,) = answer["00081198"]["Value"]
    assert failure["00081155"]["Value"] == [str(broken.SOPInstanceUID)] and failure["00081197"]["Value"] == [
        0xA900
    ]
    job = _wait_for_job(url, str(pydicom.dcmread(files[0]).StudyInstanceUID))
    assert job["state"] == "done" and "sr.dcm" in job["files"]
    auth = client_headers("gateway")
    bad = httpx.post(
        f"{url}/gateway/dicomweb/studies",
        content=b"x",
        timeout=10,
        headers={**auth, "Content-Type": "application/dicom"},
    )
    assert bad.status_code == 400 and "multipart/related" in bad.text
    part = [b"--discgeo-test\r\nContent-Type: application/dicom\r\n\r\n", *[b"x" * 1_000_000] * 25]
    for content in (iter(part), b"".join(part)):  # chunked (the streamed bytes count), Content-Length
        huge = httpx.post(
            f"{url}/gateway/dicomweb/studies",
            content=content,
            timeout=30,
            headers={**auth, "Content-Type": content_type},
        )
        assert huge.status_code == 413, huge.text
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    assert (
        'discgeo_gateway_jobs_total{outcome="done"}' in metrics and "discgeo_gateway_queue_depth" in metrics
    )
