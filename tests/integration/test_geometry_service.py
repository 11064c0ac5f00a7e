"""The geometry service as a real ``bentoml serve`` process on loopback."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import urllib.request

import httpx
import nibabel as nib
import numpy as np
import pytest

from discgeo.geometry import measure_discs
from discgeo.io import read_labels
from discgeo.local import ROOT, bentoml_service, client_headers

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def geometry_url(tmp_path_factory):
    home = tmp_path_factory.mktemp("bentoml-geometry")
    with bentoml_service(
        "service.py:Geometry", ROOT / "services" / "geometry", home, env={"DISCGEO_MAX_DIM": "400"}
    ) as url:
        yield url


def _post(url: str, data: bytes, name: str = "labels.nii.gz") -> httpx.Response:
    return httpx.post(
        headers=client_headers(),
        url=url + "/measure",
        files={"labels": (name, data, "application/gzip")},
        timeout=60,
    )


def _nifti_bytes(array: np.ndarray, affine=None) -> bytes:
    image = nib.Nifti1Image(array, np.eye(4) if affine is None else affine)
    return gzip.compress(image.to_bytes())


def test_same_result_over_http_as_in_process(geometry_url, ivd_dir):
    path = ivd_dir / "case-20_discs.nii.gz"
    response = _post(geometry_url, path.read_bytes())
    assert response.status_code == 200, response.text
    local = measure_discs(read_labels(path))
    assert response.json() == json.loads(local.model_dump_json())
    assert [d["level"] for d in response.json()["discs"]] == ["L5-S1", "L4-L5", "L3-L4", "L2-L3", "L1-L2"]


@pytest.mark.parametrize(
    ("payload", "status", "message"),
    [
        (b"this is not a nifti file at all" * 20, 415, "not a NIfTI file"),
        (b"\x1f\x8b" + b"\x00" * 400, 400, "damaged gzip"),
        ("zeros", 400, "empty"),
        ("fractional", 400, "integers"),
        ("huge", 413, "DISCGEO_MAX_DIM"),
        ("nan", 400, "NaN"),
    ],
)
def test_bad_input_gets_a_specific_4xx(geometry_url, payload, status, message):
    if payload == "zeros":
        payload = _nifti_bytes(np.zeros((8, 8, 8), np.uint8))
    elif payload == "fractional":
        payload = _nifti_bytes(np.full((8, 8, 8), 0.5, np.float32))
    elif payload == "huge":
        payload = _nifti_bytes(np.zeros((401, 2, 2), np.uint8))
    elif payload == "nan":
        payload = _nifti_bytes(np.full((8, 8, 8), np.nan, np.float32))
    response = _post(geometry_url, payload)
    assert response.status_code == status, response.text
    assert message in response.text


def test_truncated_upload(geometry_url, ivd_dir):
    data = (ivd_dir / "case-11_discs.nii.gz").read_bytes()
    response = _post(geometry_url, data[: len(data) // 2])
    assert response.status_code == 400 and "truncated" in response.text


def test_metrics_count_requests_and_errors(geometry_url, ivd_dir):
    _post(geometry_url, (ivd_dir / "case-25_discs.nii.gz").read_bytes())
    _post(geometry_url, b"junk" * 100)
    with urllib.request.urlopen(geometry_url + "/metrics") as response:
        text = response.read().decode()
    values = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("discgeo_")
    }
    assert values['discgeo_requests_total{outcome="ok",stage="geometry"}'] >= 1
    assert values['discgeo_errors_total{reason="unsupported_format",stage="geometry"}'] >= 1
    assert values['discgeo_discs_processed_total{stage="geometry"}'] >= 5
    assert values['discgeo_stage_seconds_count{stage="geometry"}'] >= 2
    assert "bentoml_service_request_total" in text


def test_service_process_never_imports_torch():
    code = (
        "import sys; sys.path.insert(0, 'services/geometry'); import service; "
        "bad = [m for m in ('torch', 'onnxruntime', 'monai') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_nifti_upload_helper_checks_limits_before_inflating():
    from discgeo.config import Settings
    from discgeo.errors import TooLargeError
    from discgeo.io.nifti import nifti_from_bytes

    bomb = _nifti_bytes(np.zeros((1000, 1000, 50), np.uint8))  # 50 MB of zeros, ~50 kB compressed
    assert len(bomb) < 200_000
    with pytest.raises(TooLargeError):
        nifti_from_bytes(bomb, settings=Settings(max_voxels=10_000_000))
