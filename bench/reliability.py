"""The reliability suite: the real stack on loopback (the four stage services with the shipped models,
the gateway, Orthanc as the PACS), driven with the malformed-input corpus of :mod:`bench.corpus`
through every entry point, then under load and under faults, then audited for patient data.

    python -m bench.reliability          # writes bench/results/reliability.{json,md}  (make reliability)

Entry points: STOW-RS and C-STORE (pynetdicom as the PACS) into the gateway, whose studies are followed
to their final job state; ``/segment`` (NIfTI, and every DICOM case zipped), ``/measure`` and
``/encode_discs`` (NIfTI), ``/encode`` (.npz), ``/predict`` (JSON) on the stage services; ``discgeo run``
on every study-shaped case in one process. After each refused input the same entry point is given a
small valid request. Peak memory per service is the growth of its processes' peak resident set (VmHWM,
reset through /proc/PID/clear_refs) over the resident set before the phase, for the valid reference
inputs and for the corpus.

Load: 50 studies sent at once by 50 ``storescu`` processes. Faults: each stage service killed with
SIGKILL while a batch is in work and started again; the gateway killed during an association and
while studies are processed, then started again. Nothing may be lost or forwarded twice (Orthanc is
asked for the SEG and SR of every study).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import re
import resource
import signal
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom

from bench import corpus
from bench.corpus import Case
from bench.gateway import send_studies
from discgeo.classification import NarrowingClassifier
from discgeo.config import Settings
from discgeo.gateway.ingest import stow_body
from discgeo.local import (
    SERVICES,
    STAGES,
    bentoml_service,
    client_headers,
    free_port,
    orthanc,
    reset_peak_memory,
    service_memory_mib,
    stack_tokens,
)

ROOT = Path(__file__).resolve().parents[1]
FINAL = ("done", "forwarded", "failed", "dead")
SUCCESS = ("done", "forwarded")
GENERIC = re.compile(r"^(internal server error|bad request|error|unprocessable entity)?\.?$", re.I)
LOAD_STUDIES = 50
TRACEBACK = "Traceback (most recent call last)"
SERVER_ERROR = re.compile(r"\(status=5\d\d,")  # BentoML's access log: every answer of every process
SERVICE_OF = {
    "segment": "segmenter",
    "measure": "geometry",
    "encode_discs": "encoder",
    "encode": "encoder",
    "predict": "classifier",
}


# ------------------------------------------------------------------------------------------ stack
class Stack:
    """The services, each in its own context so that it can be killed and started again."""

    def __init__(self, root: Path, orthanc_dicom: int) -> None:
        self.root = root
        self.ports = {name: free_port() for name in (*STAGES, "gateway")}
        self.urls = {name: f"http://127.0.0.1:{port}" for name, port in self.ports.items()}
        self.dicom_port = free_port()
        self.env = stack_tokens(root)
        self.gateway_env = {
            **self.env,
            "DISCGEO_GATEWAY_DATA": str(root / "gateway-data"),
            "DISCGEO_GATEWAY_DICOM_PORT": str(self.dicom_port),
            "DISCGEO_GATEWAY_ALLOWED_AES": "STORESCU,PACS",
            "DISCGEO_GATEWAY_IDLE_S": "1",
            "DISCGEO_GATEWAY_STABLE_S": "15",
            "DISCGEO_GATEWAY_WORKERS": "2",
            "DISCGEO_GATEWAY_RETRY_S": "120",
            "DISCGEO_GATEWAY_MAX_BODY_BYTES": str(64 << 20),
            "DISCGEO_GATEWAY_FORWARD": f"dicom://ORTHANC@127.0.0.1:{orthanc_dicom}",
            **{f"DISCGEO_{n.upper()}_URL": self.urls[n] for n in STAGES},
        }
        self.running: dict[str, ExitStack] = {}
        self.logs: dict[str, list[str]] = {name: [] for name in self.ports}

    def start(self, name: str) -> None:
        stack = ExitStack()
        target = f"service.py:{STAGES.get(name, 'Gateway')}"
        env = self.gateway_env if name == "gateway" else self.env
        stack.enter_context(
            bentoml_service(
                target, SERVICES / name, self.root / name, env=env, port=self.ports[name], timeout=180
            )
        )
        self.running[name] = stack

    def kill(self, name: str) -> None:
        """SIGKILL every process of the service (no shutdown of any kind), keeping its log."""
        for pid in service_memory_mib(name)["pids"]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.running.pop(name).close()
        self.logs[name].append(self.log(name))

    def log(self, name: str) -> str:
        path = self.root / name / "serve.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def all_logs(self) -> dict[str, str]:
        return {name: "".join(self.logs[name]) + self.log(name) for name in self.ports}

    def close(self) -> None:
        for stack in self.running.values():
            stack.close()


# ---------------------------------------------------------------------------------------- clients
def _message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:300]
    if isinstance(body, dict):
        for key in ("message", "error", "detail"):
            if key in body:
                return str(body[key])[:300]
    return json.dumps(body)[:300]


class Clients:
    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.stage = httpx.Client(headers=client_headers("stage"), timeout=300)
        self.gateway = httpx.Client(headers=client_headers("gateway"), timeout=300)

    def upload(self, endpoint: str, field: str, name: str, data: bytes, ctype: str) -> httpx.Response:
        url = f"{self.stack.urls[SERVICE_OF[endpoint]]}/{endpoint}"
        if endpoint == "predict":
            return self.stage.post(url, content=data, headers={"Content-Type": ctype})
        return self.stage.post(url, files={field: (name, data, ctype)})

    def raw(self, service: str, path: str, data: bytes | Iterator[bytes], headers: dict) -> httpx.Response:
        client = self.gateway if service == "gateway" else self.stage
        return client.post(f"{self.stack.urls[service]}{path}", content=data, headers=headers)

    def stow(self, instances: list[bytes]) -> httpx.Response:
        chunks, ctype = stow_body(instances)
        return self.raw("gateway", "/gateway/dicomweb/studies", b"".join(chunks), {"Content-Type": ctype})

    def close(self) -> None:
        self.stage.close()
        self.gateway.close()

    def jobs_of(self, study_uid: str) -> list[dict]:
        response = self.gateway.get(f"{self.stack.urls['gateway']}/gateway/jobs", params={"study": study_uid})
        response.raise_for_status()
        return list(response.json())


def c_store(
    port: int, instances: list[bytes], *, abort_after: int | None = None, pause_s: float = 0.0
) -> dict:
    """Send instances with pynetdicom as AE PACS; the statuses and comments the gateway answered."""
    from pynetdicom import AE, StoragePresentationContexts

    readable = []
    for data in instances:
        try:
            readable.append(pydicom.dcmread(io.BytesIO(data)))
        except Exception as exc:
            return {"outcome": "not sendable", "message": f"the sender cannot read it ({type(exc).__name__})"}
    ae = AE(ae_title="PACS")
    ae.requested_contexts = StoragePresentationContexts
    assoc = ae.associate("127.0.0.1", port, ae_title="DISCGEO")
    if not assoc.is_established:
        return {"outcome": "association refused", "message": "association refused"}
    statuses, comments = [], []
    try:
        for i, ds in enumerate(readable):
            if abort_after is not None and i == abort_after:
                assoc.abort()
                return {"outcome": "aborted", "statuses": statuses}
            try:
                answer = assoc.send_c_store(ds)
            except RuntimeError:  # the gateway went away in the middle of the association
                return {"outcome": "association lost", "statuses": statuses, "comments": comments}
            except (AttributeError, ValueError) as exc:
                statuses.append(None)
                comments.append(f"the sender cannot send it: {exc}"[:200])
                continue
            statuses.append(int(answer.Status) if "Status" in answer else None)
            comments.append(str(answer.get("ErrorComment", "")))
            time.sleep(pause_s)
    finally:
        if assoc.is_established:
            assoc.release()
    return {"outcome": "sent", "statuses": statuses, "comments": comments}


# --------------------------------------------------------------------------------------- the corpus
def _valid_requests(features: list[str]) -> dict[str, tuple[str, str, bytes, str]]:
    """The smallest valid request per stage endpoint (field, file name, body, content type)."""
    image = np.zeros((9, 64, 70), np.float32)
    image[2:7, 20:44, 10:60:12] = 900.0
    labels = corpus._label_map()
    crops = np.zeros((1, 64, 64, 64), np.uint8)
    crops[:, 24:40, 16:48, 16:48] = 1
    from discgeo.encoding import pack_crops

    row = {name: 0.5 for name in features}
    return {
        "segment": ("volume", "volume.nii.gz", corpus.nifti_bytes(image), "application/gzip"),
        "measure": (
            "labels",
            "labels.nii.gz",
            corpus.nifti_bytes(labels, np.diag([3.5, 0.9, 0.9, 1])),
            "application/gzip",
        ),
        "encode_discs": (
            "labels",
            "labels.nii.gz",
            corpus.nifti_bytes(labels, np.diag([3.5, 0.9, 0.9, 1])),
            "application/gzip",
        ),
        "encode": ("crops", "crops.npz", pack_crops(crops), "application/octet-stream"),
        "predict": ("", "", json.dumps({"discs": [row]}).encode(), "application/json"),
    }


def _zip_instances(instances: list[bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for i, data in enumerate(instances):
            archive.writestr(f"{i:03d}.dcm", data)
    return buffer.getvalue()


def _record(case: Case, entry: str, status: int | None, message: str, **extra: Any) -> dict:
    return {
        "case": case.name,
        "family": case.family,
        "expect": case.expected(entry),
        "entry": entry,
        "status": status,
        "message": message,
        **extra,
    }


def _stage_sends(case: Case, data: bytes | list[bytes]) -> list[tuple[str, str, str, bytes, str]]:
    """(entry, field, file name, body, content type) for the stage endpoints that take this case."""
    gz = "application/gzip"
    if case.family == "dicom":
        return [("segment", "volume", "study.zip", _zip_instances(data), "application/zip")]  # type: ignore[arg-type]
    assert isinstance(data, bytes)
    if case.family in ("nifti", "labels"):
        out = [
            ("measure", "labels", "labels.nii.gz", data, gz),
            ("encode_discs", "labels", "labels.nii.gz", data, gz),
        ]
        return ([("segment", "volume", "volume.nii.gz", data, gz)] if case.family == "nifti" else []) + out
    if case.family == "zip":
        return [("segment", "volume", "study.zip", data, "application/zip")]
    if case.family == "npz":
        return [("encode", "crops", "crops.npz", data, "application/octet-stream")]
    if case.family == "json":
        return [("predict", "", "", data, "application/json")]
    return []


def _http_sends(case: Case) -> list[tuple[str, str, bytes | Iterator[bytes], dict]]:
    """(service, path, body, headers) of an HTTP-level case for every endpoint."""
    endpoints = [
        ("gateway", "/gateway/dicomweb/studies"),
        ("segmenter", "/segment"),
        ("geometry", "/measure"),
        ("encoder", "/encode"),
        ("encoder", "/encode_discs"),
        ("classifier", "/predict"),
    ]
    out = []
    for service, path in endpoints:
        json_api = path == "/predict"
        if case.name == "http_empty_body":
            headers = {"Content-Type": "application/json" if json_api else "multipart/form-data; boundary=x"}
            out.append((service, path, b"", headers))
        elif case.name == "http_wrong_content_type":
            out.append((service, path, b"hello", {"Content-Type": "text/plain"}))
        elif case.name == "http_no_content_type":
            out.append((service, path, b"hello", {}))
        elif case.name == "http_oversized":
            size = 80 << 20  # over the gateway's 64 MiB limit of this run; far over any valid stage request
            if service == "gateway":
                ctype = 'multipart/related; type="application/dicom"; boundary=b'
                chunks = (bytes(1 << 20) for _ in range(80))  # streamed: the gateway refuses it by its length
                out.append((service, path, chunks, {"Content-Type": ctype, "Content-Length": str(size)}))
            elif json_api:
                out.append(
                    (
                        service,
                        path,
                        b'{"discs": [' + b"{}," * (size // 3) + b"{}]}",
                        {"Content-Type": "application/json"},
                    )
                )
            else:
                field = {"/segment": "volume", "/encode": "crops"}.get(path, "labels")
                boundary = "oversized"
                body = (
                    (
                        f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="big.bin"'
                        f"\r\nContent-Type: application/octet-stream\r\n\r\n"
                    ).encode()
                    + os.urandom(size)
                    + f"\r\n--{boundary}--\r\n".encode()
                )
                out.append(
                    (service, path, body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
                )
    return out


def run_corpus(
    stack: Stack, clients: Clients, cases: list[Case], work: Path, progress: Callable[[str], None]
) -> dict:
    features = list(NarrowingClassifier.from_artifact(Settings.from_env().artifact("classifier")).features)
    valid = _valid_requests(features)
    records: list[dict] = []
    studies: list[dict] = []  # instances sent to the gateway: followed to the end of their jobs
    run_dir = work / "run-inputs"
    run_dir.mkdir(parents=True, exist_ok=True)

    def then_valid(entry: str) -> int:
        if entry in ("stow", "c-store"):
            return clients.gateway.get(f"{stack.urls['gateway']}/gateway/jobs").status_code
        field, name, body, ctype = valid[entry]
        return clients.upload(entry, field, name, body, ctype).status_code

    for i, case in enumerate(cases):
        progress(f"corpus {i + 1}/{len(cases)}: {case.name}")
        if case.family == "dicom":
            stow_data = case.build(f"rel-{case.name}-stow", work / "cases" / case.name / "stow")
            store_data = case.build(f"rel-{case.name}-cstore", work / "cases" / case.name / "cstore")
            run_data = case.build(f"rel-{case.name}-run", work / "cases" / case.name / "run")
            response = clients.stow(stow_data)
            records.append(
                _record(case, "stow", response.status_code, _message(response), then_valid=then_valid("stow"))
            )
            studies.append(
                {
                    "case": case.name,
                    "entry": "stow",
                    "uids": _study_uids(stow_data),
                    "answer": response.status_code,
                }
            )
            sent = c_store(stack.dicom_port, store_data)
            statuses = sent.get("statuses") or []
            if statuses and all(s is None for s in statuses):
                sent["outcome"], statuses = "not sendable", []
            failures = sorted({s for s in statuses if s not in (0, None)})
            records.append(
                _record(
                    case,
                    "c-store",
                    failures[0] if failures else (0 if statuses else None),
                    "; ".join(sorted({c for c in sent.get("comments", []) if c})) or sent.get("message", ""),
                    outcome=sent["outcome"],
                    statuses=sorted({s for s in statuses if s is not None}),
                    then_valid=then_valid("c-store"),
                )
            )
            studies.append(
                {
                    "case": case.name,
                    "entry": "c-store",
                    "uids": _study_uids(store_data),
                    "answer": failures[0] if failures else 0,
                }
            )
            folder = run_dir / case.name
            folder.mkdir(parents=True, exist_ok=True)
            for k, data in enumerate(run_data):
                (folder / f"{k:03d}.dcm").write_bytes(data)
            sends = _stage_sends(case, run_data)
        elif case.family == "http":
            for service, path, body, headers in _http_sends(case):
                try:
                    response = clients.raw(service, path, body, headers)
                    status, message = response.status_code, _message(response)
                except httpx.HTTPError as exc:
                    status, message = None, f"connection: {type(exc).__name__}"
                entry = {"/gateway/dicomweb/studies": "stow"}.get(path, path.strip("/"))
                records.append(_record(case, entry, status, message, then_valid=then_valid(entry)))
            continue
        else:
            data = case.build()
            sends = _stage_sends(case, data)
            if case.family in ("nifti", "zip"):
                (run_dir / f"{case.name}{'.zip' if case.family == 'zip' else '.nii.gz'}").write_bytes(data)
        for entry, field, name, body, ctype in sends:
            response = clients.upload(entry, field, name, body, ctype)
            records.append(
                _record(
                    case,
                    entry,
                    response.status_code,
                    _message(response) if response.status_code >= 400 else "",
                    then_valid=then_valid(entry),
                )
            )
    progress("corpus: discgeo run on every study-shaped case")
    records += _discgeo_run(cases, run_dir, work / "run-out")
    progress("corpus: waiting for the gateway's jobs")
    jobs = _follow(clients, studies)
    return {"records": records, "jobs": jobs}


def _study_uids(instances: list[bytes]) -> list[str]:
    uids = set()
    for data in instances:
        with contextlib.suppress(Exception):
            uid = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).get("StudyInstanceUID")
            if uid:
                uids.add(str(uid))
    return sorted(uids)


def _follow(clients: Clients, studies: list[dict], timeout_s: float = 300) -> list[dict]:
    """Each sent study's jobs once all are final (or the deadline passed)."""
    deadline = time.monotonic() + timeout_s
    while True:
        out = []
        for item in studies:
            jobs = [j for uid in item["uids"] for j in clients.jobs_of(uid)]
            out.append(
                {
                    **{k: item[k] for k in ("case", "entry", "answer")},
                    "jobs": [
                        {"state": j["state"], "error": j.get("error"), "revision": j.get("revision")}
                        for j in jobs
                    ],
                }
            )
        if all(j["state"] in FINAL for o in out for j in o["jobs"]) or time.monotonic() > deadline:
            return out
        time.sleep(1)


def _discgeo_run(cases: list[Case], inputs: Path, out: Path) -> list[dict]:
    """``discgeo run`` on the folder of cases (one process): one record per case from its exit lines."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    done = subprocess.run(
        [str(Path(sys.executable).parent / "discgeo"), "run", str(inputs), "--out", str(out), "--quiet"],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    lines = done.stderr.splitlines()
    records = []
    for case in cases:
        if case.family not in ("dicom", "nifti", "zip"):
            continue
        mine = [
            line
            for line in lines
            if re.match(rf"discgeo: (internal )?error: {re.escape(case.name)}(\.nii\.gz|\.zip)?: ", line)
        ]
        result = out / case.name / "results.json"
        status = "error" if mine else ("processed" if result.exists() else "missing")
        message = mine[0].split(": ", 3)[-1] if mine else ""
        internal = any("internal error" in line for line in mine)
        records.append(_record(case, "discgeo run", None, message, outcome=status, internal=internal))
    tracebacks = done.stderr.count(TRACEBACK)
    records.append(
        {
            "case": "(all)",
            "entry": "discgeo run",
            "exit_code": done.returncode,
            "tracebacks": tracebacks,
            "peak_mib": round(max(peak, before) / 1024, 1),
        }
    )
    return records


# ------------------------------------------------------------------------------------ load and faults
def _uid(files: list[Path]) -> str:
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


def in_pacs(orthanc_url: str) -> dict[str, dict[str, int]]:
    """Per StudyInstanceUID, how many instances of each modality Orthanc holds."""
    out: dict[str, dict[str, int]] = {}
    for study in httpx.get(f"{orthanc_url}/studies", params={"expand": ""}, timeout=30).json():
        uid = study["MainDicomTags"]["StudyInstanceUID"]
        counts = out.setdefault(uid, {})
        for series in study["Series"]:
            info = httpx.get(f"{orthanc_url}/series/{series}", timeout=30).json()
            modality = info["MainDicomTags"].get("Modality", "?")
            counts[modality] = counts.get(modality, 0) + len(info["Instances"])
    return out


def _final_jobs(clients: Clients, uids: list[str], timeout_s: float) -> tuple[list[list[dict]], float]:
    start = time.monotonic()
    while True:
        jobs = [clients.jobs_of(uid) for uid in uids]
        if (
            all(j and all(x["state"] in FINAL for x in j) for j in jobs)
            or time.monotonic() - start > timeout_s
        ):
            return jobs, time.monotonic() - start
        time.sleep(1)


def _outcome(jobs: list[list[dict]], uids: list[str], pacs: dict[str, dict[str, int]]) -> dict:
    states = [x["state"] for j in jobs for x in j]
    return {
        "studies": len(uids),
        "jobs": len(states),
        "states": {s: states.count(s) for s in sorted(set(states))},
        "failed_reasons": sorted({str(x.get("error")) for j in jobs for x in j if x["state"] not in SUCCESS}),
        "lost": sum(1 for j in jobs if not j),
        "not_final": sum(1 for j in jobs for x in j if x["state"] not in FINAL),
        "forwarded_once": sum(1 for u in uids if pacs.get(u) == {"SEG": 1, "SR": 1}),
        "forwarded_twice": sum(1 for u in uids if any(n > 1 for n in pacs.get(u, {}).values())),
    }


def run_load(stack: Stack, clients: Clients, orthanc_url: str, work: Path) -> dict:
    batch = [corpus.study(f"rel-load-{i}", work / "load" / f"{i}") for i in range(LOAD_STUDIES)]
    uids = [_uid(f) for f in batch]
    reset_peak_memory("gateway")
    start = time.monotonic()
    codes = send_studies(stack.dicom_port, batch)
    received = time.monotonic() - start
    jobs, _ = _final_jobs(clients, uids, timeout_s=400)
    drain = time.monotonic() - start
    time.sleep(3)  # the last forwards
    memory = service_memory_mib("gateway")
    return {
        **_outcome(jobs, uids, in_pacs(orthanc_url)),
        "storescu_failed": sum(1 for c in codes if c),
        "received_s": round(received, 1),
        "drain_s": round(drain, 1),
        "gateway_peak_mib": memory["peak_mib"],
        "gateway_rss_mib": memory["rss_mib"],
    }


def run_faults(
    stack: Stack, clients: Clients, orthanc_url: str, work: Path, progress: Callable[[str], None]
) -> dict:
    """Each stage killed (SIGKILL) and started again while a batch is in work; then the gateway killed
    during an association and while it processes, started again, and the cut study sent again."""
    batch = [corpus.study(f"rel-fault-{i}", work / "faults" / f"{i}") for i in range(8)]
    uids = [_uid(f) for f in batch]
    start = time.monotonic()
    sender = threading.Thread(target=send_studies, args=(stack.dicom_port, batch))
    sender.start()
    kills = []
    for name in STAGES:
        time.sleep(2)
        progress(f"faults: SIGKILL {name}")
        stack.kill(name)
        time.sleep(2)
        began = time.monotonic()
        stack.start(name)
        kills.append({"service": name, "down_s": round(time.monotonic() - began + 2, 1)})
    sender.join()
    _final_jobs(clients, uids, timeout_s=600)
    stages_took = round(time.monotonic() - start, 1)

    progress("faults: SIGKILL the gateway during an association and while processing")
    cut = corpus.study("rel-fault-cut", work / "faults" / "cut")
    busy = [corpus.study(f"rel-fault-busy-{i}", work / "faults" / f"busy-{i}") for i in range(3)]
    send_studies(stack.dicom_port, busy)
    association = threading.Thread(
        target=c_store, args=(stack.dicom_port, [f.read_bytes() for f in cut]), kwargs={"pause_s": 0.5}
    )
    association.start()
    time.sleep(2.0)  # about four of nine instances sent; the busy studies are queued or in work
    stack.kill("gateway")
    association.join()
    stack.start("gateway")
    send_studies(stack.dicom_port, [cut])  # the PACS sends the cut study again, as Orthanc would retry
    all_uids = [_uid(f) for f in [cut, *busy]]
    jobs, _ = _final_jobs(clients, all_uids, timeout_s=600)
    time.sleep(3)  # the last forwards
    pacs = in_pacs(orthanc_url)
    stage_jobs, _ = _final_jobs(clients, uids, timeout_s=1)
    return {
        "stages": {**_outcome(stage_jobs, uids, pacs), "kills": kills, "took_s": stages_took},
        "gateway": _outcome(jobs, all_uids, pacs),
    }


# ------------------------------------------------------------------------------------------- audit
def phi_audit(stack: Stack, clients: Clients, work: Path, texts: list[str]) -> dict:
    """Where the distinctive patient name, ID and birth date appear: logs, metrics, job listings,
    messages and file names (of the gateway's data, the CLI's outputs and the run's homes)."""
    places: dict[str, str] = {f"log:{name}": text for name, text in stack.all_logs().items()}
    for name, url in stack.urls.items():
        with contextlib.suppress(httpx.HTTPError):
            places[f"metrics:{name}"] = httpx.get(f"{url}/metrics", timeout=30).text
    places["jobs"] = clients.gateway.get(f"{stack.urls['gateway']}/gateway/jobs", params={"limit": 1000}).text
    places["messages"] = "\n".join(texts)
    names = [
        str(p.relative_to(work))
        for folder in (stack.root, work / "run-out")
        if folder.exists()
        for p in folder.rglob("*")
    ]
    places["file names"] = "\n".join(names)
    hits = {
        where: sorted({s for s in corpus.PHI if s.lower() in text.lower()}) for where, text in places.items()
    }
    return {"places": sorted(places), "hits": {k: v for k, v in hits.items() if v}}


def log_events(stack: Stack) -> dict[str, dict[str, int]]:
    """Per service, the tracebacks and the 5xx answers in its log so far (the 5xx include those the
    gateway's own stage calls and each API process's calls to its model process got)."""
    logs = stack.all_logs()
    return {
        "tracebacks": {name: text.count(TRACEBACK) for name, text in logs.items()},
        "5xx": {name: len(SERVER_ERROR.findall(text)) for name, text in logs.items()},
    }


def _since(now: dict[str, dict[str, int]], then: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    return {kind: {n: c - then[kind][n] for n, c in counts.items()} for kind, counts in now.items()}


def traceback_excerpts(stack: Stack, limit: int = 3) -> list[str]:
    """The first tracebacks of the services' logs, each with the log line before it (for the report)."""
    out = []
    for name, text in stack.all_logs().items():
        start = 0
        while len(out) < limit and (i := text.find(TRACEBACK, start)) >= 0:
            out.append(f"{name}: " + text[max(0, text.rfind("\n", 0, max(i - 1, 0))) : i + 2500])
            start = i + 1
    return out


# -------------------------------------------------------------------------------------------- run
def _phase_memory(names: list[str]) -> dict[str, float]:
    return {n: service_memory_mib(n)["rss_mib"] for n in names}


def _growth(names: list[str], before: dict[str, float]) -> dict[str, float]:
    return {n: round(service_memory_mib(n)["peak_mib"] - before[n], 1) for n in names}


def run(work: Path, *, progress: Callable[[str], None] = print) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()}}
    names = [*STAGES, "gateway"]
    with ExitStack() as outer:
        orthanc_url, orthanc_dicom = outer.enter_context(orthanc(work / "orthanc", gateway_port=free_port()))
        stack = Stack(work / "stack", orthanc_dicom)
        outer.callback(stack.close)
        progress("starting the stage services and the gateway")
        for name in names:
            stack.start(name)
        results["startup_s"] = round(time.monotonic() - start, 1)
        clients = Clients(stack)
        outer.callback(clients.close)

        reference = corpus.study("rel-reference", work / "reference")
        series = [f.read_bytes() for f in reference]
        cases = corpus.corpus(
            series,
            list(NarrowingClassifier.from_artifact(Settings.from_env().artifact("classifier")).features),
        )
        by_name = {c.name: c for c in cases}

        progress("valid reference inputs (memory baseline)")
        for n in names:
            reset_peak_memory(n)
        before = _phase_memory(names)
        assert clients.stow(series).status_code == 200
        for entry, field, name, body, ctype in (
            _stage_sends(by_name["nifti_valid"], by_name["nifti_valid"].build())
            + _stage_sends(by_name["labels_valid"], by_name["labels_valid"].build())
            + _stage_sends(by_name["npz_valid"], by_name["npz_valid"].build())
            + _stage_sends(by_name["json_valid"], by_name["json_valid"].build())
        ):
            clients.upload(entry, field, name, body, ctype)
        _final_jobs(clients, [_uid(reference)], timeout_s=300)
        valid_growth = _growth(names, before)

        for n in names:
            reset_peak_memory(n)
        before = _phase_memory(names)
        results["corpus"] = run_corpus(stack, clients, cases, work, progress)
        results["memory_mib"] = {"valid": valid_growth, "corpus": _growth(names, before)}
        results["cases"] = len(cases)
        (work / "corpus.json").write_text(
            json.dumps(results, indent=1, default=str)
        )  # to look at while it runs

        after_corpus = results["logged"] = log_events(stack)  # no refusal may log a traceback or a 5xx
        results["traceback_excerpts"] = traceback_excerpts(stack)
        progress(f"load: {LOAD_STUDIES} studies at once")
        results["load"] = run_load(stack, clients, orthanc_url, work)
        after_load = log_events(stack)
        results["load"]["logged"] = _since(after_load, after_corpus)
        results["faults"] = run_faults(stack, clients, orthanc_url, work, progress)
        messages = [r.get("message", "") for r in results["corpus"]["records"]]
        messages += [str(j.get("error")) for s in results["corpus"]["jobs"] for j in s["jobs"]]
        results["phi"] = phi_audit(stack, clients, work, messages)
        # a killed dependency may make a service log a traceback or answer 5xx: reported, not a goal
        results["faults"]["logged"] = _since(log_events(stack), after_load)
    results["goals"] = goals(results)
    results["took_s"] = round(time.monotonic() - start, 1)
    return results


# ------------------------------------------------------------------------------------------ goals
def _refused(record: dict) -> bool | None:
    """Whether an entry point refused the input (None: it could not be sent at all)."""
    if record["entry"] == "discgeo run":
        return record["outcome"] == "error"
    if record["entry"] == "c-store" and record.get("outcome") != "sent":
        return None if record.get("outcome") == "not sendable" else True
    return record["status"] not in (0, 200)


def goals(results: dict) -> dict[str, Any]:
    """Each goal of the suite with what was measured and whether it holds."""
    records = [r for r in results["corpus"]["records"] if r["case"] != "(all)"]
    run_summary = next(r for r in results["corpus"]["records"] if r["case"] == "(all)")
    http = [r for r in records if r["entry"] not in ("c-store", "discgeo run")]
    jobs = results["corpus"]["jobs"]
    job_of = {(s["case"], s["entry"]): s for s in jobs}

    def decided(record: dict) -> bool | None:
        """Refused, with the gateway's verdict taken from the study's jobs when the answer was a success."""
        refused = _refused(record)
        if record["entry"] in ("stow", "c-store") and refused is False and record["family"] == "dicom":
            states = [j["state"] for j in job_of[(record["case"], record["entry"])]["jobs"]]
            return not states or any(s not in SUCCESS for s in states)
        return refused

    wrong = [
        f"{r['case']} via {r['entry']}: expected {r['expect']}"
        for r in records
        if r["expect"] != "either" and (d := decided(r)) is not None and d != (r["expect"] == "refuse")
    ]
    refusals = [r for r in records if decided(r)]
    vague = [
        f"{r['case']} via {r['entry']}: {r['message']!r}"
        for r in refusals
        if r["entry"] in ("stow", "segment", "measure", "encode", "encode_discs", "predict")
        and r["status"] not in (0, 200)
        and (len(r["message"]) < 8 or GENERIC.match(r["message"]))
    ]
    job_reasons = [j["error"] for s in jobs for j in s["jobs"] if j["state"] not in SUCCESS]
    vague += [f"job: {e!r}" for e in job_reasons if not e or "internal error" in str(e)]
    vague += [f"{r['case']} via discgeo run: internal error" for r in records if r.get("internal")]
    memory = results["memory_mib"]
    bounds = memory_bounds(results)
    grew = {n: (memory["corpus"][n], bounds[n]) for n in memory["corpus"] if memory["corpus"][n] > bounds[n]}
    load, faults = results["load"], results["faults"]
    checks = {
        "corpus cases": (results["cases"], results["cases"] >= 40),
        "inputs sent": (len(records), True),
        "5xx or no answer": (
            n5 := sum(1 for r in http if r["status"] is None or r["status"] >= 500),
            n5 == 0,
        ),
        "not answering a valid request right after": (
            nv := sum(1 for r in records if "then_valid" in r and r["then_valid"] != 200),
            nv == 0,
        ),
        "tracebacks in service logs for the corpus": (
            nt := sum(results["logged"]["tracebacks"].values()) + run_summary["tracebacks"],
            nt == 0,
        ),
        "5xx in service logs (any caller) for the corpus": (
            ne := sum(results["logged"]["5xx"].values()),
            ne == 0,
        ),
        "tracebacks or 5xx in service logs under load": (
            nl := sum(sum(c.values()) for c in load["logged"].values()),
            nl == 0,
        ),
        "outcome other than expected": (wrong, not wrong),
        "refusals without a specific message": (vague, not vague),
        "jobs not final": (nf := sum(1 for s in jobs for j in s["jobs"] if j["state"] not in FINAL), nf == 0),
        "services growing over 2x their largest legitimate input": (grew, not grew),
        "load: processed exactly once": (
            f"{load['forwarded_once']} of {load['studies']}",
            load["forwarded_once"] == load["studies"]
            and load["forwarded_twice"] == 0
            and load["lost"] == 0
            and load["storescu_failed"] == 0,
        ),
        "faults: lost, stuck or forwarded twice": (
            nl := sum(
                faults[k]["lost"] + faults[k]["not_final"] + faults[k]["forwarded_twice"]
                for k in ("stages", "gateway")
            ),
            nl == 0,
        ),
        "PHI found": (results["phi"]["hits"], not results["phi"]["hits"]),
    }
    return {name: {"measured": value, "ok": bool(ok)} for name, (value, ok) in checks.items()}


def memory_bounds(results: dict) -> dict[str, float]:
    """Per service, twice the largest legitimate input it had to take (MiB): its own growth on the valid
    reference inputs, or the decoded size of the largest corpus input within the size limits that
    reached it (a NIfTI of 640 MB in 0.6 MB is legitimate by its size; refusing it as constant or
    empty needs it read)."""
    reached: dict[str, list[float]] = {}
    for r in results["corpus"]["records"]:
        if r.get("case") in corpus.DECODED_BYTES and r["entry"] in SERVICE_OF:
            reached.setdefault(SERVICE_OF[r["entry"]], []).append(corpus.DECODED_BYTES[r["case"]] / 2**20)
    valid = results["memory_mib"]["valid"]
    # 16 MiB: below that, growth is allocator and import noise, not the input
    return {n: round(2 * max(valid[n], *reached.get(n, [0.0]), 16.0), 1) for n in valid}


# --------------------------------------------------------------------------------------- reporting
def markdown(results: dict) -> str:
    records = [r for r in results["corpus"]["records"] if r["case"] != "(all)"]
    entries = sorted({r["entry"] for r in records})
    lines = [
        "# Reliability suite",
        "",
        f"`make reliability` (`python -m bench.reliability`) on {results['machine']['cpus']} CPU cores, "
        f"{results['took_s']:.0f} s in all (services up in {results['startup_s']:.0f} s). The real stack on "
        "loopback: the four stage services with the shipped models, the gateway (2 workers) and Orthanc as "
        f"the PACS; {results['cases']} generated cases (`bench/corpus.py`), each through every entry point "
        "that takes it.",
        "",
        "## Goals",
        "",
        "| goal | measured | holds |",
        "|---|---|---|",
    ]
    for name, goal in results["goals"].items():
        value = goal["measured"]
        shown = value if isinstance(value, int | float | str) else (json.dumps(value)[:200] or "none")
        lines.append(
            f"| {name} | {shown if value not in ([], {}) else 'none'} | {'yes' if goal['ok'] else '**no**'} |"
        )
    lines += [
        "",
        "## Inputs per entry point",
        "",
        "| entry point | inputs | refused on arrival | accepted (studies: see their jobs) | answers |",
        "|---|---|---|---|---|",
    ]
    for entry in entries:
        mine = [r for r in records if r["entry"] == entry]
        answers = sorted({str(r["status"] if r["status"] is not None else r.get("outcome")) for r in mine})
        refused = sum(1 for r in mine if _refused(r))
        lines.append(f"| {entry} | {len(mine)} | {refused} | {len(mine) - refused} | {', '.join(answers)} |")
    memory = results["memory_mib"]
    run_summary = next(r for r in results["corpus"]["records"] if r["case"] == "(all)")
    lines += [
        "",
        "## Peak memory growth (MiB)",
        "",
        "Growth of each service's peak resident set over its resident set before the phase.",
        "",
        "| service | valid reference inputs | whole corpus |",
        "|---|---|---|",
    ]
    lines += [f"| {n} | {memory['valid'][n]} | {memory['corpus'][n]} |" for n in memory["corpus"]]
    lines += [f"| `discgeo run` (whole process, peak RSS) | | {run_summary['peak_mib']} |"]
    load = results["load"]
    lines += [
        "",
        "## Studies sent, processed, lost",
        "",
        "| run | studies | done | other | lost | SEG+SR once | twice |",
        "|---|---|---|---|---|---|---|",
        _study_row(f"load: {load['studies']} at once, drained in {load['drain_s']} s", load),
    ]
    for name in ("stages", "gateway"):
        lines.append(_study_row(f"faults: {name} killed", results["faults"][name]))
    lines += [
        "",
        f"Gateway peak memory under load: {load['gateway_peak_mib']} MiB (sum of its processes' VmHWM).",
        "",
        "Stage kills: "
        + ", ".join(f"{k['service']} down {k['down_s']} s" for k in results["faults"]["stages"]["kills"])
        + "; logged after the kills: "
        + _logged(results["faults"]["logged"])
        + ".",
        "",
        "## Every input",
        "",
        "| case | entry | expect | answer | message |",
        "|---|---|---|---|---|",
    ]
    for r in records:
        answer = r["status"] if r["status"] is not None else r.get("outcome")
        message = str(r.get("message", "")).replace("|", "/").replace("\n", " ")[:120]
        lines.append(f"| {r['case']} | {r['entry']} | {r['expect']} | {answer} | {message} |")
    lines += [
        "",
        "## Jobs of the studies sent to the gateway",
        "",
        "| case | entry | answer | jobs |",
        "|---|---|---|---|",
    ]
    for s in results["corpus"]["jobs"]:
        jobs = (
            "; ".join(f"{j['state']}" + (f": {j['error']}" if j["error"] else "") for j in s["jobs"])
            or "no job"
        )
        lines.append(f"| {s['case']} | {s['entry']} | {s['answer']} | {jobs.replace('|', '/')[:160]} |")
    return "\n".join(lines) + "\n"


def _logged(logged: dict[str, dict[str, int]]) -> str:
    found = [f"{n} {c} {kind}" for kind, counts in logged.items() for n, c in counts.items() if c]
    return ", ".join(found) or "none"


def _study_row(name: str, outcome: dict) -> str:
    done = sum(outcome["states"].get(s, 0) for s in SUCCESS)
    return (
        f"| {name} | {outcome['studies']} | {done} | {outcome['jobs'] - done} | {outcome['lost']} | "
        f"{outcome['forwarded_once']} | {outcome['forwarded_twice']} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ROOT / "build" / "reliability")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    started = time.monotonic()

    def progress(text: str) -> None:
        print(f"[{time.monotonic() - started:6.1f} s] {text}", flush=True)

    import shutil

    shutil.rmtree(args.work, ignore_errors=True)
    results = run(args.work, progress=progress)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "reliability.json").write_text(json.dumps(results, indent=1, default=str))
    (args.out / "reliability.md").write_text(markdown(results))
    failed = [name for name, goal in results["goals"].items() if not goal["ok"]]
    print(markdown(results).split("## Inputs per entry point")[0])
    if failed:
        raise SystemExit(f"reliability goals not met: {', '.join(failed)}")


if __name__ == "__main__":
    main()
