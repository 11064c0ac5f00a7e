"""Two gateway replicas (real ``bentoml serve`` processes) over one PostgreSQL job store and one
shared data folder, with the four stage services: studies sent to either replica, split across
both or sent to both are each stored once and processed exactly once, and both replicas answer for
every job."""

from __future__ import annotations

import re
import subprocess
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest

from discgeo.gateway.ingest import stow_body
from discgeo.local import bentoml_service, client_headers, free_port, new_database, pipeline_services
from discgeo.phantom import SeriesTags, make_case, write_dicom_series

pytestmark = pytest.mark.slow
SERVICES = Path(__file__).resolve().parents[2] / "services"


def _study(folder: Path, seed: int):
    case = make_case(seed, 0, spacing=(3.5, 0.9, 0.9), full_coverage=True)
    image = case.labels.with_array((case.labels.array > 200).astype(np.float32) * 900.0 + 100.0)
    return case, write_dicom_series(image, folder, tags=SeriesTags(uid_seed=f"replicas-{seed}"))


def _storescu(port: int, files: list[Path]) -> None:
    subprocess.run(
        ["storescu", "-aet", "STORESCU", "-aec", "DISCGEO", "127.0.0.1", str(port), *map(str, files)],
        check=True,
        capture_output=True,
    )


def _stow(url: str, files: list[Path]) -> None:
    body, content_type = stow_body(files)
    response = httpx.post(
        f"{url}/gateway/dicomweb/studies",
        content=b"".join(body),
        timeout=60,
        headers={**client_headers("gateway"), "Content-Type": content_type},
    )
    assert response.status_code == 200, response.text


def _jobs(url: str) -> list[dict]:
    return httpx.get(f"{url}/gateway/jobs", headers=client_headers("gateway"), timeout=10).json()


def test_two_replicas_process_each_study_exactly_once(
    tmp_path, postgres_server, threshold_segmenter_artifact
):
    database = new_database(postgres_server, "replicas")
    data = tmp_path / "shared-data"  # what a ReadWriteMany volume is to the pods
    ports = [free_port(), free_port()]
    env = {"DISCGEO_SEGMENTER_ARTIFACT": str(threshold_segmenter_artifact)}
    with ExitStack() as stack:
        stages = stack.enter_context(pipeline_services(tmp_path / "services", env=env))
        gateway_env = {
            **env,
            "DISCGEO_GATEWAY_DATA": str(data),
            "DISCGEO_GATEWAY_DATABASE": database,
            "DISCGEO_GATEWAY_IDLE_S": "3",  # the split halves arrive together
            "DISCGEO_GATEWAY_WORKERS": "1",
            "DISCGEO_GATEWAY_ALLOWED_AES": "STORESCU",
            **{f"DISCGEO_{name.upper()}_URL": url for name, url in stages.items()},
        }
        urls = [
            stack.enter_context(
                bentoml_service(
                    "service.py:Gateway",
                    SERVICES / "gateway",
                    tmp_path / f"gateway-{i}",
                    env={**gateway_env, "DISCGEO_GATEWAY_DICOM_PORT": str(ports[i])},
                )
            )
            for i in range(2)
        ]
        studies = [_study(tmp_path / f"study-{i}", 60 + i) for i in range(4)]
        (_, a), (_, b), (_, c), (_, d) = studies
        half = len(c) // 2
        sends = [
            lambda: _storescu(ports[0], a),  # one study to each replica, by C-STORE and by STOW-RS
            lambda: _stow(urls[1], b),
            lambda: _storescu(ports[0], c[:half]),  # one study split across the replicas
            lambda: _stow(urls[1], c[half:]),
            lambda: _storescu(ports[0], d),  # one study sent whole to both at once
            lambda: _storescu(ports[1], d),
        ]
        threads = [threading.Thread(target=send) for send in sends]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        deadline = time.monotonic() + 180
        while not (
            len(jobs := _jobs(urls[0])) == 4 and all(j["state"] in ("done", "failed", "dead") for j in jobs)
        ):
            assert time.monotonic() < deadline, jobs
            time.sleep(1.0)
        time.sleep(3.0)  # a second processing of any study would have been claimed by now
        jobs = _jobs(urls[0])
        assert sorted(map(str, _jobs(urls[1]))) == sorted(map(str, jobs))  # one view from both
        for i, (case, files) in enumerate(studies):
            study_uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
            url = urls[i % 2]
            (job,) = httpx.get(
                f"{url}/gateway/jobs",
                params={"study": study_uid},
                headers=client_headers("gateway"),
                timeout=10,
            ).json()
            assert job["state"] == "done" and job["revision"] == 1 and job["attempts"] == 1, job
            assert job["instances"] == len(files), job
            results = httpx.get(
                f"{url}/gateway/jobs/{job['job_id']}/files/results.json",
                headers=client_headers("gateway"),
                timeout=10,
            ).json()
            assert [d["level"] for d in results["discs"]] == [d["level"] for d in case.truth["discs"]]
    logs = [(tmp_path / f"gateway-{i}" / "serve.log").read_text() for i in range(2)]
    processed = [re.findall(r"job (\S+) revision (\d+): \d+ discs", log) for log in logs]
    assert sorted(j for p in processed for j, _ in p) == sorted(j["job_id"] for j in jobs)  # exactly once
    assert all(len(p) >= 1 for p in processed), processed  # both replicas worked
    spooled = list((data / "spool").rglob("*.dcm"))
    assert len(spooled) == sum(len(f) for _, f in studies)  # every instance stored once
