"""What every BentoML adapter shares: error mapping, Prometheus metrics, timing.

Only the service processes import this module (it needs bentoml); it must not import torch.
Metric names follow the conventions: ``discgeo_`` prefix, base units, counters end in ``_total``,
no per-study labels.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http import HTTPStatus
from typing import Any

import bentoml
from bentoml.exceptions import BentoMLException

from discgeo.auth import BearerAuth, accepted_tokens, send_json
from discgeo.config import Settings
from discgeo.errors import DiscgeoError

log = logging.getLogger("discgeo.service")

STAGE_SECONDS = bentoml.metrics.Histogram(
    name="discgeo_stage_seconds",
    documentation="Wall time of one stage request, seconds",
    labelnames=["stage"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0),
)
REQUESTS = bentoml.metrics.Counter(
    name="discgeo_requests_total",
    documentation="Stage requests by outcome (ok, client_error, server_error)",
    labelnames=["stage", "outcome"],
)
ERRORS = bentoml.metrics.Counter(
    name="discgeo_errors_total",
    documentation="Rejected or failed stage requests by reason (the error code)",
    labelnames=["stage", "reason"],
)
DISCS = bentoml.metrics.Counter(
    name="discgeo_discs_processed_total",
    documentation="Discs handled by a stage",
    labelnames=["stage"],
)
INPUT_BYTES = bentoml.metrics.Histogram(
    name="discgeo_request_input_bytes",
    documentation="Size of the request payload, bytes",
    labelnames=["stage"],
    buckets=(1e3, 1e4, 1e5, 1e6, 1e7, 1e8),
)

MODEL_INFO = bentoml.metrics.Gauge(
    name="discgeo_model_info",
    documentation="Loaded model artifact (value 1): stage, version and ONNX Runtime provider",
    labelnames=["stage", "version", "provider"],
)


class _ClientErrorTracebacks(logging.Filter):
    """BentoML logs every exception an API raises as an ERROR with its traceback. A refused input
    (4xx) is the client's fault and already logged by :func:`stage_request` at INFO: drop the
    traceback; server errors keep theirs."""

    def filter(self, record: logging.LogRecord) -> bool:
        from pydantic import ValidationError

        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, ValidationError):
            return False
        return not (isinstance(exc, BentoMLException) and int(exc.error_code) < 500)


logging.getLogger("bentoml._internal.server.http_app").addFilter(_ClientErrorTracebacks())
# discgeo's own INFO lines (models and providers loaded, jobs, refusals) reach the service log; BentoML
# leaves the root logger at WARNING
logging.getLogger("discgeo").setLevel(logging.INFO)


class BodyLimit:
    """Pure ASGI middleware: a request body must declare its length (411 otherwise) and stay within
    ``limit`` bytes (413), answered before any of it is read. ``DISCGEO_MAX_BODY_BYTES`` overrides
    the service's own limit."""

    def __init__(self, app: Any, *, limit: int) -> None:
        self.app = app
        self.limit = Settings.from_env().max_body_bytes or limit

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length", b"").decode("latin-1")
        if not declared.isdigit():
            status, message = 411, "the request must declare its Content-Length"
        elif int(declared) > self.limit:
            status, message = (
                413,
                f"the request body is larger than {self.limit} bytes (DISCGEO_MAX_BODY_BYTES)",
            )
        else:
            await self.app(scope, receive, send)
            return
        log.info("refused %s %s: %s", scope.get("method"), scope.get("path"), message)
        code = "request_too_large" if status == 413 else "length_required"
        await send_json(send, status, {"error": code, "message": message})


def protect(service: Any, audience: str = "stage", *, max_body_bytes: int | None) -> Any:
    """Require a bearer token on every endpoint of ``service`` but the probes and metrics, and bound
    the request body to ``max_body_bytes`` (:class:`BodyLimit`; None: the service bounds its bodies
    itself, as the gateway does while it streams STOW-RS bodies, which may come chunked)."""
    if max_body_bytes is not None:
        service.add_asgi_middleware(BodyLimit, limit=max_body_bytes)
    service.add_asgi_middleware(BearerAuth, audience=audience)
    return service


def check_tokens(audience: str = "stage") -> None:
    """Fail the service's start (not its first request) when no token is configured."""
    accepted_tokens(audience)


def record_model(stage: str, version: str, provider: str = "none") -> None:
    """Publish which model a stage serves (``discgeo_model_info``)."""
    MODEL_INFO.labels(stage=stage, version=version, provider=provider).set(1)


@contextmanager
def stage_request(stage: str) -> Iterator[None]:
    """Time a request, count its outcome and turn discgeo errors into HTTP errors with their status."""
    start = time.perf_counter()
    refusal = None
    try:
        yield
    except DiscgeoError as exc:
        REQUESTS.labels(
            stage=stage, outcome="client_error" if exc.http_status < 500 else "server_error"
        ).inc()
        ERRORS.labels(stage=stage, reason=exc.code).inc()
        log.info("%s request rejected: %s", stage, exc.code)
        refusal = BentoMLException(exc.message, error_code=HTTPStatus(exc.http_status))
    except Exception:
        REQUESTS.labels(stage=stage, outcome="server_error").inc()
        ERRORS.labels(stage=stage, reason="internal").inc()
        raise
    else:
        REQUESTS.labels(stage=stage, outcome="ok").inc()
    finally:
        STAGE_SECONDS.labels(stage=stage).observe(time.perf_counter() - start)
    if refusal is not None:
        # raised here, outside the handler: no traceback of the refused input's frames (which may hold
        # a volume of hundreds of MB) stays attached to what the server keeps of the error
        raise refusal
