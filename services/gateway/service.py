"""Gateway service: a thin BentoML adapter over :mod:`discgeo.gateway` (API under ``/gateway``,
C-STORE SCP, workers calling the stage services with the stage token).

    DISCGEO_GATEWAY_DATA=/var/lib/discgeo DISCGEO_GATEWAY_TOKENS_FILE=... DISCGEO_STAGE_TOKEN_FILE=... \
    DISCGEO_SEGMENTER_URL=... bentoml serve service.py:Gateway

Every setting is read by :class:`discgeo.config.Settings`; ``/readyz`` follows the workers' heartbeat.
"""

from __future__ import annotations

import threading

import bentoml

from discgeo import __version__
from discgeo.config import Settings
from discgeo.gateway import Gateway as GatewayCore
from discgeo.gateway.http import create_app
from discgeo.pipeline import RemoteStages
from discgeo.serving import check_tokens, protect

QUEUE = bentoml.metrics.Gauge(
    name="discgeo_gateway_queue_depth", documentation="Studies received, queued or in work"
)
JOBS = bentoml.metrics.Counter(
    name="discgeo_gateway_jobs_total", documentation="Job outcomes by state", labelnames=["outcome"]
)
STUDIES = bentoml.metrics.Counter(name="discgeo_studies_processed_total", documentation="Studies processed")

core: GatewayCore | None = None


def _core() -> GatewayCore:
    if core is None:
        raise RuntimeError("gateway not started")
    return core


@bentoml.service(name="discgeo-gateway", traffic={"timeout": 600}, labels={"discgeo_version": __version__})
@bentoml.asgi_app(create_app(_core), path="/gateway")
class Gateway:
    def __init__(self) -> None:
        global core
        check_tokens("gateway")
        settings = Settings.from_env()
        core = GatewayCore(settings, lambda: RemoteStages.from_settings(settings))

        def done(state: str) -> None:
            # the gauge first: a scrape that sees the job counted never sees it still queued
            QUEUE.set(_core().store.queue_depth())
            JOBS.labels(outcome=state).inc()
            if state in ("done", "results_ready"):
                STUDIES.inc()

        core.on_job_done = done
        core.start()
        threading.Thread(target=self._watch_queue, daemon=True).start()

    def __is_ready__(self) -> bool:
        return _core().ready()

    def _watch_queue(self) -> None:
        while True:
            QUEUE.set(_core().store.queue_depth())
            threading.Event().wait(1.0)

    @bentoml.api
    def health(self) -> dict:
        """Queue depth and the number of jobs per state."""
        return {"queue_depth": _core().store.queue_depth(), "jobs": _core().store.counts()}


protect(Gateway, audience="gateway", max_body_bytes=None)  # STOW-RS bodies are bounded as they stream
