"""Orthanc as the PACS: a study stored into Orthanc is routed (Lua, on stable study) to the gateway, which
sends its DICOM SEG and SR back into the same study in Orthanc."""

from __future__ import annotations

import subprocess
import time

import httpx
import numpy as np
import pytest

from discgeo.local import free_port, orthanc, pipeline_services
from discgeo.phantom import SeriesTags, make_case, write_dicom_series

pytestmark = pytest.mark.slow


def test_orthanc_routes_study_and_receives_seg_and_sr(tmp_path_factory, threshold_segmenter_artifact):
    root = tmp_path_factory.mktemp("stack")
    gateway_dicom, orthanc_dicom = free_port(), free_port()
    settings = {
        "DISCGEO_GATEWAY_DATA": str(root / "gateway-data"),
        "DISCGEO_GATEWAY_DICOM_PORT": str(gateway_dicom),
        "DISCGEO_GATEWAY_IDLE_S": "1",
        "DISCGEO_GATEWAY_ALLOWED_AES": "ORTHANC",
        "DISCGEO_GATEWAY_FORWARD": f"dicom://ORTHANC@127.0.0.1:{orthanc_dicom}",
    }
    env = {"DISCGEO_SEGMENTER_ARTIFACT": str(threshold_segmenter_artifact)}
    case = make_case(43, 0, spacing=(3.5, 0.9, 0.9), full_coverage=True)
    image = case.labels.with_array((case.labels.array > 200).astype(np.float32) * 900.0 + 100.0)
    files = write_dicom_series(image, root / "study", tags=SeriesTags(uid_seed="orthanc-test"))
    with (
        pipeline_services(root / "services", env=env, gateway=settings),
        orthanc(root / "orthanc", gateway_port=gateway_dicom, dicom_port=orthanc_dicom) as (url, port),
    ):
        subprocess.run(
            ["storescu", "-aet", "MODALITY", "-aec", "ORTHANC", "127.0.0.1", str(port), *map(str, files)],
            check=True,
            capture_output=True,
        )
        deadline = time.monotonic() + 180
        modalities: list[str] = []
        while time.monotonic() < deadline:
            studies = httpx.get(f"{url}/studies", timeout=10).json()
            if studies:
                series = httpx.get(f"{url}/studies/{studies[0]}/series", timeout=10).json()
                modalities = sorted(s["MainDicomTags"]["Modality"] for s in series)
                if modalities == ["MR", "SEG", "SR"]:
                    break
            time.sleep(1)
        assert modalities == ["MR", "SEG", "SR"], (root / "orthanc" / "orthanc.log").read_text()[-2000:]
        assert len(studies) == 1  # results went into the same study
        series = httpx.get(f"{url}/studies/{studies[0]}/series", timeout=10).json()
        seg = next(s for s in series if s["MainDicomTags"]["Modality"] == "SEG")
        assert seg["MainDicomTags"]["SeriesDescription"] == "discgeo discs: research use, not for diagnosis"
