"""Bearer-token authentication for every HTTP endpoint of the gateway and the stage services.

Tokens come from files (one per line; a mounted Kubernetes Secret), never from the command line.
Probes and metrics (``/readyz``, ``/livez``, ``/healthz``, ``/metrics``) stay open: Kubernetes and
Prometheus call them, and the NetworkPolicies limit who can reach them. A missing or wrong token gets
401 with a ``WWW-Authenticate: Bearer`` header; tokens are compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

from discgeo.config import Settings, read_tokens

log = logging.getLogger("discgeo.auth")

OPEN_PATHS = frozenset({"/readyz", "/livez", "/healthz", "/metrics"})
Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Any, Any], Awaitable[None]]


def accepted_tokens(audience: str) -> tuple[str, ...]:
    """The tokens a service accepts: ``stage`` (the gateway's token, ``DISCGEO_STAGE_TOKEN_FILE``) or
    ``gateway`` (its clients', ``DISCGEO_GATEWAY_TOKENS_FILE``); raises when none is configured."""
    settings = Settings.from_env()
    if audience == "stage":
        return read_tokens(settings.stage_token_file, "DISCGEO_STAGE_TOKEN_FILE")
    return read_tokens(settings.gateway.tokens_file, "DISCGEO_GATEWAY_TOKENS_FILE")


class BearerAuth:
    """Pure ASGI middleware: every request but the open paths needs ``Authorization: Bearer <token>``
    with one of the ``audience``'s tokens (:func:`accepted_tokens`, read when the app is built)."""

    def __init__(self, app: ASGIApp, *, audience: str) -> None:
        self.app = app
        self.digests = [hashlib.sha256(t.encode()).digest() for t in accepted_tokens(audience)]

    def allowed(self, headers: list[tuple[bytes, bytes]]) -> bool:
        value = next((v for k, v in headers if k.lower() == b"authorization"), b"")
        scheme, _, token = value.decode("latin-1").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        digest = hashlib.sha256(token.strip().encode()).digest()
        return any(hmac.compare_digest(digest, d) for d in self.digests)

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("path", "") in OPEN_PATHS or self.allowed(scope["headers"]):
            await self.app(scope, receive, send)
            return
        log.info("refused %s %s: missing or wrong bearer token", scope.get("method"), scope.get("path"))
        payload = {"error": "unauthorized", "message": "a valid bearer token is required"}
        await send_json(send, 401, payload, [(b"www-authenticate", b'Bearer realm="discgeo"')])


async def send_json(
    send: Any, status: int, payload: dict[str, str], headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    """Answer an ASGI request with ``payload`` as JSON (for middleware that refuses a request)."""
    body = json.dumps(payload).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                *(headers or []),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def bearer_header(tokens_file: Path | None, what: str) -> dict[str, str]:
    """The ``Authorization`` header for calls to a service that accepts the tokens in ``tokens_file``."""
    return {"Authorization": f"Bearer {read_tokens(tokens_file, what)[0]}"}


def new_token_file(path: Path) -> Path:
    """Write a fresh random token (mode 0600) to ``path``; for local stacks and tests."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_text(secrets.token_urlsafe(32) + "\n")
    return path
