"""The gateway engine in this process (real C-STORE SCP, real dcmtk ``storescu`` and pynetdicom as the
PACS, real Orthanc as the archive results go to, the pipeline with the exact threshold segmenter):
nothing lost, nothing processed from a partial study, nothing written twice, strangers refused."""

from __future__ import annotations

import contextlib
import http.server
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest

from discgeo.config import GatewaySettings, Settings
from discgeo.gateway import Gateway
from discgeo.local import free_port, orthanc
from discgeo.phantom import SeriesTags, make_case, write_dicom_series
from discgeo.pipeline import LocalStages, RemoteStages, ServiceURLs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stages_factory(threshold_stages):
    shared = threshold_stages
    return lambda: LocalStages(
        segmenter=shared.segmenter, encoder=shared.encoder, classifier=shared.classifier
    )


@contextlib.contextmanager
def running(tmp_path: Path, stages_factory, **overrides) -> Iterator[Gateway]:
    config = {
        "data_dir": tmp_path / "gateway",
        "dicom_port": free_port(),
        "allowed_aes": ("STORESCU", "PACS"),
        "idle_s": 0.5,
        "stable_s": 4.0,
        "workers": 2,
        **overrides,
    }
    gateway = Gateway(Settings(gateway=GatewaySettings(**config)), stages_factory)
    gateway.start()
    try:
        yield gateway
    finally:
        gateway.stop()


def _study(folder: Path, seed: int) -> list[Path]:
    case = make_case(seed, 0, spacing=(3.5, 0.9, 0.9), full_coverage=True)
    image = case.labels.with_array((case.labels.array > 200).astype(np.float32) * 900.0 + 100.0)
    return write_dicom_series(image, folder, tags=SeriesTags(uid_seed=f"semantics-{seed}"))


def _storescu(gateway: Gateway, files: list[Path], aet: str = "STORESCU", aec: str = "DISCGEO"):
    port = str(gateway.config.dicom_port)
    return subprocess.run(
        ["storescu", "-aet", aet, "-aec", aec, "127.0.0.1", port, *map(str, files)],
        capture_output=True,
        text=True,
    )


def _job(gateway: Gateway, files: list[Path]) -> dict:
    job_id = gateway.store.job_of_study(str(pydicom.dcmread(files[0]).StudyInstanceUID))
    assert job_id is not None
    return gateway.store.job(job_id)


def _wait(gateway: Gateway, files: list[Path], states: tuple[str, ...], timeout: float = 90.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = _job(gateway, files)
        if job["state"] in states:
            return job
        time.sleep(0.2)
    raise AssertionError(f"job still {job['state']} after {timeout} s: {job}")


def _send_then_abort(gateway: Gateway, files: list[Path]) -> None:
    from pynetdicom import AE

    ae = AE(ae_title="PACS")
    ae.add_requested_context(pydicom.dcmread(files[0]).SOPClassUID)
    assoc = ae.associate("127.0.0.1", gateway.config.dicom_port, ae_title="DISCGEO")
    assert assoc.is_established
    for f in files:
        assert assoc.send_c_store(pydicom.dcmread(f)).Status == 0
    assoc.abort()


def test_aborted_association_waits_and_the_full_resend_completes_it(tmp_path, stages_factory):
    files = _study(tmp_path / "study", 60)
    with running(tmp_path, stages_factory, stable_s=6.0) as gateway:
        _send_then_abort(gateway, files[:10])
        time.sleep(2.5)  # well past idle_s: an aborted association never completes a study
        job = _job(gateway, files)
        assert job["state"] == "receiving" and job["instances"] == 10
        assert _storescu(gateway, files).returncode == 0  # the PACS sends the whole study again
        job = _wait(gateway, files, ("done", "failed", "dead"))
        assert job["state"] == "done" and job["instances"] == len(files) and job["attempts"] == 1
        assert job["revision"] == 1  # it was never processed from the 10 slices
        # the whole study once more: every instance is known, nothing happens
        assert _storescu(gateway, files).returncode == 0
        time.sleep(1.5)
        assert _job(gateway, files)["attempts"] == 1 and _job(gateway, files)["revision"] == 1


def test_study_of_a_dead_sender_completes_when_stable(tmp_path, stages_factory):
    files = _study(tmp_path / "study", 61)
    with running(tmp_path, stages_factory, stable_s=3.0) as gateway:
        _send_then_abort(gateway, files)
        assert _job(gateway, files)["state"] == "receiving"
        job = _wait(gateway, files, ("done", "failed", "dead"), timeout=60)
        assert job["state"] == "done" and job["instances"] == len(files)


def test_late_series_is_stored_and_processed_as_a_new_revision(tmp_path, stages_factory):
    files = _study(tmp_path / "study", 62)
    with running(tmp_path, stages_factory) as gateway:
        assert _storescu(gateway, files[:-3]).returncode == 0
        first = _wait(gateway, files, ("done",))
        assert first["instances"] == len(files) - 3
        assert _storescu(gateway, files[-3:]).returncode == 0  # a late push of the rest
        second = _wait(gateway, files, ("done",))
        while second["revision"] == 1 or second["processed_revision"] != second["revision"]:
            time.sleep(0.2)
            second = _wait(gateway, files, ("done",))
        assert second["instances"] == len(files) and second["revision"] == 2
        key = gateway.store.key_of(second["job_id"])
        assert (gateway.store.results_dir(key, 1) / "sr.dcm").exists()
        assert (gateway.store.results_dir(key, 2) / "sr.dcm").exists()


def test_strangers_and_bad_instances_are_refused(tmp_path, stages_factory):
    files = _study(tmp_path / "study", 63)
    with running(tmp_path, stages_factory) as gateway:
        stranger = _storescu(gateway, files[:1], aet="STRANGER")
        assert stranger.returncode != 0 and "Association Rejected" in stranger.stdout + stranger.stderr
        wrong_called = _storescu(gateway, files[:1], aec="SOMEONE")
        assert (
            wrong_called.returncode != 0
            and "Association Rejected" in wrong_called.stdout + wrong_called.stderr
        )
        from pynetdicom import AE

        ae = AE(ae_title="PACS")
        ds = pydicom.dcmread(files[0])
        ae.add_requested_context(ds.SOPClassUID)
        assoc = ae.associate("127.0.0.1", gateway.config.dicom_port, ae_title="DISCGEO")
        del ds.StudyInstanceUID
        assert assoc.send_c_store(ds).Status == 0xA900  # failure: does not match the SOP class
        assoc.release()
        assert gateway.store.counts() == {}
    with running(tmp_path / "other", stages_factory, allowed_sources=("10.0.0.0/8",)) as gateway:
        refused = _storescu(gateway, files[:1])
        assert refused.returncode != 0 and gateway.store.counts() == {}


def test_stage_outage_is_retried_then_dead_lettered_with_its_reason(tmp_path):
    dead_end = "http://127.0.0.1:9"
    urls = ServiceURLs(segmenter=dead_end, encoder=dead_end, geometry=dead_end, classifier=dead_end)
    files = _study(tmp_path / "study", 64)
    with running(tmp_path, lambda: RemoteStages(urls, retries=0), retry_s=4.0) as gateway:
        assert _storescu(gateway, files).returncode == 0
        time.sleep(2.0)
        job = _job(gateway, files)
        assert job["state"] in ("queued", "processing") and "unreachable" in (job["error"] or "unreachable")
        job = _wait(gateway, files, ("dead",), timeout=30)
        assert "segmenter service unreachable" in job["error"] and "for " in job["error"]
        assert gateway.ready()
    assert not gateway.ready()  # workers and scheduler stopped: the readiness probe fails


@contextlib.contextmanager
def slow_service(delay_s: float) -> Iterator[tuple[str, list[float]]]:
    """An HTTP service that answers every POST only after ``delay_s`` (a stage busy past its timeout);
    yields its URL and the times requests arrived."""
    arrivals: list[float] = []

    class Slow(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            arrivals.append(time.monotonic())
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            time.sleep(delay_s)
            with contextlib.suppress(OSError):
                self.send_response(503)
                self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", arrivals
    finally:
        server.shutdown()
        server.server_close()


def test_a_timed_out_stage_is_not_called_again_while_it_may_still_be_busy(tmp_path):
    files = _study(tmp_path / "study", 66)
    with slow_service(3.0) as (url, arrivals):
        urls = ServiceURLs(segmenter=url, encoder=url, geometry=url, classifier=url)
        stages = lambda: RemoteStages(urls, timeouts_s={"segmenter": 1.5})  # noqa: E731
        with running(tmp_path, stages, max_attempts=2, workers=1) as gateway:
            delays: list[float] = []
            retry_later = gateway.store.retry_later

            def recording(*args, **kwargs):
                delays.append(kwargs["min_delay_s"])
                return retry_later(*args, **kwargs)

            gateway.store.retry_later = recording  # type: ignore[method-assign]
            assert _storescu(gateway, files).returncode == 0
            deadline = time.monotonic() + 30
            while not (job := _job(gateway, files))["error"] and time.monotonic() < deadline:
                time.sleep(0.1)
            assert job["state"] == "queued"
            assert "did not answer within 2 s" in job["error"] and len(arrivals) == 1  # no retry in the try
            # the next try waits at least the stage's whole timeout: the abandoned call may run that long
            assert delays == [1.5]
            not_before = gateway.store.sql("SELECT not_before FROM studies")[0][0]
            assert not_before - time.time() >= 1.0
            gateway.store.sql("UPDATE studies SET not_before=0")  # skip the backoff (test time)
            job = _wait(gateway, files, ("dead",), timeout=30)
            assert job["error"].endswith("(after 2 attempts)") and len(arrivals) == 2 and delays == [1.5, 1.5]


def test_readiness_fails_while_a_worker_hangs_past_its_deadline(tmp_path, stages_factory, monkeypatch):
    from discgeo.gateway import worker

    monkeypatch.setattr(worker, "HEARTBEAT_LIMIT_S", 1.0)
    hang = threading.Event()

    def hanging_stages():
        stages = stages_factory()
        segment = stages.segment

        def segment_after_hanging(volume):
            hang.wait(20)
            return segment(volume)

        stages.segment = segment_after_hanging
        return stages

    files = _study(tmp_path / "study", 67)
    with running(tmp_path, hanging_stages, study_timeout_s=1.0, workers=1) as gateway:
        assert gateway.ready()
        assert _storescu(gateway, files).returncode == 0
        _wait(gateway, files, ("processing",), timeout=30)
        deadline = time.monotonic() + 10
        while gateway.ready() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not gateway.ready()  # busy for longer than the deadline plus the heartbeat limit
        hang.set()
        _wait(gateway, files, ("done",), timeout=60)
        time.sleep(1.0)
        assert gateway.ready()  # the worker beats again


@pytest.mark.skipif(
    subprocess.run(["which", "Orthanc"], capture_output=True).returncode != 0, reason="no Orthanc"
)
def test_results_reach_the_pacs_exactly_once_through_an_outage(tmp_path, stages_factory):
    files = _study(tmp_path / "study", 65)
    pacs_port = free_port()
    forward = f"dicom://ORTHANC@127.0.0.1:{pacs_port}"
    with running(tmp_path, stages_factory, forward=forward) as gateway:
        assert _storescu(gateway, files[:-1]).returncode == 0  # the last slice comes late (below)
        job = _wait(gateway, files, ("results_ready",))
        time.sleep(2.0)  # the PACS is down: the results wait in the outbox, nothing is lost
        job = _job(gateway, files)
        assert job["state"] == "results_ready" and job["forward_attempts"] >= 1 and job["forward_error"]
        gateway.store.sql("UPDATE outbox SET not_before=0")  # skip the rest of the backoff
        with orthanc(tmp_path / "orthanc", gateway_port=gateway.config.dicom_port, dicom_port=pacs_port) as (
            url,
            _,
        ):
            job = _wait(gateway, files, ("forwarded",), timeout=60)
            assert gateway.store.force(job["job_id"])  # a reprocess with the same models and input
            _wait(gateway, files, ("results_ready", "processing", "queued"), timeout=10)
            gateway.store.sql("UPDATE outbox SET not_before=0")
            job = _wait(gateway, files, ("forwarded",), timeout=60)
            studies = httpx.get(f"{url}/studies", timeout=10).json()
            assert len(studies) == 1
            series = httpx.get(f"{url}/studies/{studies[0]}/series", timeout=10).json()
            modalities = sorted(s["MainDicomTags"]["Modality"] for s in series)
            assert modalities == ["SEG", "SR"]  # one SEG and one SR although sent twice
            assert all(len(s["Instances"]) == 1 for s in series)
            # the late slice: a new revision, whose results are new objects beside the first ones
            assert _storescu(gateway, files[-1:]).returncode == 0
            job = _wait(gateway, files, ("forwarded",), timeout=60)
            assert job["revision"] == 2
            series = httpx.get(f"{url}/studies/{studies[0]}/series", timeout=10).json()
            assert sorted(s["MainDicomTags"]["Modality"] for s in series) == ["SEG", "SEG", "SR", "SR"]
            assert all(len(s["Instances"]) == 1 for s in series)  # one SEG and one SR per revision


@contextlib.contextmanager
def disk_full(limit_bytes: int) -> Iterator[None]:
    """No file of this process may grow past ``limit_bytes`` (RLIMIT_FSIZE; Python ignores SIGXFSZ, so
    the write fails with EFBIG as on a full disk): the spool, the job database and every other file."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_full_spool_disk_fails_the_sender_and_loses_nothing_acknowledged(tmp_path, stages_factory):
    from starlette.testclient import TestClient

    from discgeo.gateway.http import create_app
    from discgeo.gateway.ingest import stow_body

    files = _study(tmp_path / "study", 66)
    stowed = _study(tmp_path / "stowed", 67)
    with running(tmp_path, stages_factory) as gateway:
        client = TestClient(create_app(lambda: gateway))
        with disk_full(16 * 1024):  # smaller than one instance
            sent = _storescu(gateway, files)
            body, ctype = stow_body(stowed)
            answer = client.post("/dicomweb/studies", content=b"".join(body), headers={"Content-Type": ctype})
        assert sent.returncode != 0  # storescu saw failure statuses (0xA700, out of resources)
        assert answer.status_code == 507, answer.text
        for study in (files, stowed):
            uid = str(pydicom.dcmread(study[0]).StudyInstanceUID)
            job_id = gateway.store.job_of_study(uid)
            assert job_id is None or gateway.store.job(job_id)["instances"] == 0  # nothing acknowledged
        # space again: the PACS's retry is stored and processed
        assert _storescu(gateway, files).returncode == 0
        body, ctype = stow_body(stowed)
        answer = client.post("/dicomweb/studies", content=b"".join(body), headers={"Content-Type": ctype})
        assert answer.status_code == 200, answer.text
        for study in (files, stowed):
            job = _wait(gateway, study, ("done", "failed"))
            assert job["state"] == "done" and job["instances"] == len(study)
