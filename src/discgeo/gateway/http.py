"""The gateway's HTTP API (Starlette; mounted under ``/gateway`` by the BentoML adapter).

  POST /dicomweb/studies                  STOW-RS (multipart/related; type="application/dicom")
  GET  /jobs[?study=StudyInstanceUID]     the newest jobs, or the job of one study
  GET  /jobs/{job_id}                     one job: state, revision, instances, error, warnings, files
  GET  /jobs/{job_id}/files/{name}        a result file (results.json, seg.dcm, sr.dcm, ...)
  POST /jobs/{job_id}/reprocess           process a finished study again (same UIDs with the same models)

Authentication is the service's bearer-token middleware (:mod:`discgeo.auth`). Path parameters are
validated against fixed patterns (no traversal); the STOW-RS body is capped (the declared
Content-Length, and the bytes actually streamed for chunked bodies) and written part by part to disk
in a worker thread: never held in memory, never parsed on the event loop.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from discgeo.errors import DiscgeoError
from discgeo.gateway.ingest import PartWriter, boundary_of, stow_store
from discgeo.gateway.worker import Gateway

log = logging.getLogger("discgeo.gateway")
JOB_ID = re.compile(r"^[A-Za-z0-9_-]{16}$")
RESULT_FILES = {
    "results.json": "application/json",
    "labels.nii.gz": "application/gzip",
    "overview.png": "image/png",
    "seg.dcm": "application/dicom",
    "sr.dcm": "application/dicom",
}
FLUSH_BYTES = 4 * 1024 * 1024


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def create_app(gateway: Callable[[], Gateway]) -> Starlette:
    """The API over the gateway returned by ``gateway()`` (created when the service starts)."""

    async def stow(request: Request) -> Response:
        core = gateway()
        limit = core.config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            return _error(
                413, f"the request body is larger than {limit} bytes (DISCGEO_GATEWAY_MAX_BODY_BYTES)"
            )
        try:
            boundary = boundary_of(request.headers.get("content-type", ""))
        except DiscgeoError as exc:
            return _error(exc.http_status, exc.message)
        writer = PartWriter(boundary, core.store.incoming)
        total, pending = 0, bytearray()
        try:
            async for chunk in request.stream():
                total += len(chunk)
                if total > limit:
                    await run_in_threadpool(writer.discard)
                    return _error(413, f"the request body is larger than {limit} bytes")
                pending += chunk
                if len(pending) >= FLUSH_BYTES:
                    data, pending = bytes(pending), bytearray()
                    await run_in_threadpool(writer.write, data)
            await run_in_threadpool(writer.write, bytes(pending))
            writer.close()
            status, answer = await run_in_threadpool(stow_store, core.ingest, writer.parts)
        except DiscgeoError as exc:
            await run_in_threadpool(writer.discard)
            return _error(exc.http_status, exc.message)
        except OSError as exc:  # the spool's disk is full or failing: nothing of this body was kept
            log.error("STOW-RS body could not be written to the spool: %s", exc.strerror)
            await run_in_threadpool(writer.discard)
            return _error(
                507, "the gateway could not write the body to disk; nothing was stored, send it again"
            )
        except Exception as exc:
            log.info("STOW-RS body refused: %s", type(exc).__name__)
            await run_in_threadpool(writer.discard)
            return _error(400, "the multipart body could not be parsed")
        return JSONResponse(answer, status_code=status, media_type="application/dicom+json")

    def _job_id(request: Request) -> str | None:
        job_id = str(request.path_params["job_id"])
        return job_id if JOB_ID.match(job_id) else None

    async def jobs(request: Request) -> Response:
        study = request.query_params.get("study")
        store = gateway().store
        if study is None:
            return JSONResponse(await run_in_threadpool(store.jobs))
        job_id = store.job_of_study(study)
        found = store.job(job_id) if job_id else None
        return JSONResponse([found] if found else [])

    async def job(request: Request) -> Response:
        job_id = _job_id(request)
        found = await run_in_threadpool(gateway().store.job, job_id) if job_id else None
        return JSONResponse(found) if found else _error(404, "no such job")

    async def job_file(request: Request) -> Response:
        job_id, name = _job_id(request), str(request.path_params["name"])
        store = gateway().store
        found = store.job(job_id) if job_id else None
        if not found or name not in RESULT_FILES or name not in found["files"]:
            return _error(404, "no such result file")
        key = store.key_of(str(job_id))
        path: Path = store.results_dir(str(key), int(found["processed_revision"])) / name
        return FileResponse(path, media_type=RESULT_FILES[name])

    async def reprocess(request: Request) -> Response:
        job_id = _job_id(request)
        force: Callable[[str], bool] = gateway().store.force
        if job_id is not None and await run_in_threadpool(force, job_id):
            return JSONResponse({"queued": True}, status_code=202)
        return _error(404, "no finished job with this id")

    return Starlette(
        routes=[
            Route("/dicomweb/studies", stow, methods=["POST"]),
            Route("/jobs", jobs),
            Route("/jobs/{job_id}", job),
            Route("/jobs/{job_id}/files/{name}", job_file),
            Route("/jobs/{job_id}/reprocess", reprocess, methods=["POST"]),
        ]
    )
