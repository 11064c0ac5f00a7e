"""Gateway service: DICOMweb STOW-RS and DICOM C-STORE in, the pipeline over the stage services, results
as JSON, DICOM SEG and SR (optionally forwarded to a PACS).

    DISCGEO_GATEWAY_DATA=/var/lib/discgeo DISCGEO_SEGMENTER_URL=... bentoml serve service.py:Gateway

HTTP (mounted under /gateway):
  POST /gateway/dicomweb/studies            STOW-RS (multipart/related; type="application/dicom")
  GET  /gateway/jobs                        all jobs
  GET  /gateway/jobs/{key}                  one job (state, instances, error, result files)
  GET  /gateway/jobs/{key}/files/{name}     a result file (results.json, seg.dcm, sr.dcm, overview.png...)
  POST /gateway/jobs/{key}/reprocess        process a finished study again
DICOM: C-STORE SCP on DISCGEO_GATEWAY_DICOM_PORT (AE title DISCGEO_GATEWAY_AE_TITLE, calling AE titles
restricted to DISCGEO_GATEWAY_ALLOWED_AES when set).
"""

from __future__ import annotations

import os
import threading

import bentoml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from discgeo import __version__
from discgeo.errors import DiscgeoError
from discgeo.gateway import Gateway as GatewayCore
from discgeo.gateway import GatewayConfig
from discgeo.pipeline import RemoteStages, ServiceURLs

QUEUE = bentoml.metrics.Gauge(
    name="discgeo_gateway_queue_depth", documentation="Studies received or queued but not yet processed"
)
JOBS = bentoml.metrics.Counter(
    name="discgeo_gateway_jobs_total", documentation="Finished jobs by outcome", labelnames=["outcome"]
)
STUDIES = bentoml.metrics.Counter(name="discgeo_studies_processed_total", documentation="Studies processed")

core: GatewayCore | None = None


def _core() -> GatewayCore:
    if core is None:
        raise RuntimeError("gateway not started")
    return core


async def stow(request: Request) -> Response:
    try:
        status, answer = _core().stow(await request.body(), request.headers.get("content-type", ""))
    except DiscgeoError as exc:
        return JSONResponse({"error": exc.message}, status_code=exc.http_status)
    return JSONResponse(answer, status_code=status, media_type="application/dicom+json")


async def jobs(request: Request) -> Response:
    return JSONResponse(_core().store.jobs())


async def job(request: Request) -> Response:
    found = _core().store.job(request.path_params["key"])
    return JSONResponse(found) if found else JSONResponse({"error": "no such job"}, status_code=404)


async def job_file(request: Request) -> Response:
    folder = _core().store.results / request.path_params["key"]
    name = request.path_params["name"]
    path = folder / name
    if "/" in name or name.startswith(".") or not path.is_file():
        return JSONResponse({"error": "no such result file"}, status_code=404)
    return FileResponse(path)


async def reprocess(request: Request) -> Response:
    if _core().store.force(request.path_params["key"]):
        return JSONResponse({"queued": True}, status_code=202)
    return JSONResponse({"error": "no finished job with this key"}, status_code=404)


app = Starlette(
    routes=[
        Route("/dicomweb/studies", stow, methods=["POST"]),
        Route("/jobs", jobs),
        Route("/jobs/{key}", job),
        Route("/jobs/{key}/files/{name}", job_file),
        Route("/jobs/{key}/reprocess", reprocess, methods=["POST"]),
    ]
)


@bentoml.service(name="discgeo-gateway", traffic={"timeout": 300}, labels={"discgeo_version": __version__})
@bentoml.asgi_app(app, path="/gateway")
class Gateway:
    def __init__(self) -> None:
        global core
        urls = ServiceURLs(
            **{
                name: os.environ[f"DISCGEO_{name.upper()}_URL"]
                for name in ("segmenter", "encoder", "geometry", "classifier")
            }
        )
        core = GatewayCore(GatewayConfig.from_env(), lambda: RemoteStages(urls))

        def done(key: str, state: str) -> None:
            JOBS.labels(outcome=state).inc()
            if state == "done":
                STUDIES.inc()

        core.on_job_done = done
        core.start()
        threading.Thread(target=self._watch_queue, daemon=True).start()

    def _watch_queue(self) -> None:
        while True:
            QUEUE.set(_core().store.queue_depth())
            threading.Event().wait(1.0)

    @bentoml.api
    def health(self) -> dict:
        """Queue depth and the number of jobs per state."""
        states: dict[str, int] = {}
        for entry in _core().store.jobs():
            states[entry["state"]] = states.get(entry["state"], 0) + 1
        return {"queue_depth": _core().store.queue_depth(), "jobs": states}
