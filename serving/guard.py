"""ASGI middleware in front of every route: auth, body limit, and the one parse of image requests.

- Bearer-token auth when a token is configured (401), except the health probes and the viewer's static files.
- POST bodies: refused over the size limit (413, from Content-Length before reading, or while
  reading), read once; image endpoints' bodies are parsed and validated here
  (`serving.inputs.parse_image_request`), the result handed to the endpoint in the ASGI scope's
  state, so BentoML never parses the body again; other POST bodies must be a JSON object of
  bounded nesting. Every refusal is a 4xx JSON answer and one short log line.
"""
from __future__ import annotations

import hmac
import logging
from typing import Any, Awaitable, Callable

from .inputs import STATE_KEY, RequestError, check_json_body, parse_image_request
from .settings import ServeSettings
from .web import is_ui_path

logger = logging.getLogger("cltvit.serving")

OPEN_PATHS = frozenset({"/livez", "/readyz", "/healthz"})
IMAGE_PATHS = frozenset({"/classify", "/explain", "/embed", "/intervene"})

Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


def log_client_error(method: str, path: str, exc: RequestError) -> None:
    """One line per refused request (a client mistake is not a server error)."""
    logger.info("%d %s %s: %s", exc.status, method, path, exc.message)


class RequestGuard:
    """See the module docstring. `on_reject(path, status)` counts refusals (metrics)."""

    def __init__(self, app: Any, settings: ServeSettings, on_reject: Callable[[str, int], None] | None = None) -> None:
        self.app = app
        self.settings = settings
        self.token = (settings.api_token or "").encode()
        self.on_reject = on_reject

    async def __call__(self, scope: dict, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        try:
            if self.token and path not in OPEN_PATHS and not is_ui_path(path):  # the viewer's files hold no data
                self._authorise(scope)
            if scope.get("method") == "POST":
                body = await self._read_body(scope, receive)
                if path in IMAGE_PATHS:
                    ctype = _header(scope, b"content-type").decode("latin-1")
                    scope.setdefault("state", {})[STATE_KEY] = parse_image_request(body, ctype, path)
                else:
                    check_json_body(body)
                receive = _replay(body, receive)
        except RequestError as exc:
            log_client_error(scope.get("method", ""), path, exc)
            if self.on_reject is not None:
                self.on_reject(path, exc.status)
            resp = exc.response()
            if exc.status == 401:
                resp.headers["WWW-Authenticate"] = 'Bearer realm="cltvit"'
            await resp(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _authorise(self, scope: dict) -> None:
        scheme, _, given = _header(scope, b"authorization").partition(b" ")
        if scheme.lower() != b"bearer" or not given:
            raise RequestError(401, "missing bearer token: send 'Authorization: Bearer <token>'", "Authorization")
        if not hmac.compare_digest(given.strip(), self.token):
            raise RequestError(401, "invalid bearer token", "Authorization")

    async def _read_body(self, scope: dict, receive: Receive) -> bytes:
        limit = self.settings.max_body_bytes
        declared = _header(scope, b"content-length")
        if declared:
            try:
                n = int(declared)
            except ValueError:
                raise RequestError(400, "Content-Length is not a number") from None
            if n > limit:
                raise RequestError(413, f"request body is {n:,} bytes, over the limit of {limit:,} bytes "
                                        f"(images are limited to {self.settings.max_image_bytes:,} bytes)", "image")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise RequestError(400, "client disconnected before sending the whole body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise RequestError(413, f"request body is over the limit of {limit:,} bytes", "image")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _header(scope: dict, name: bytes) -> bytes:
    for key, value in scope.get("headers") or ():
        if key == name:
            return value
    return b""


def _replay(body: bytes, receive: Receive) -> Receive:
    """An ASGI receive that yields `body` once, then defers to the real receive (disconnects)."""
    sent = False

    async def inner() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return inner
