"""The pure-ASGI guards in front of the routes: they answer some requests themselves, with the
same OpenAI-shaped errors as the routes, before anything parses them.

:class:`DrainGuard` (outermost) counts the requests in flight for the process's
:class:`~server.lifecycle.Drain` and answers for the app while it drains or when a connection is
above ``server.max_connections``; :class:`RequestGuard` checks the API key and the body size.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac

import anyio
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.config import DeployConfig
from server.errors import BodyTooLarge, NotReady, Unauthorized, error_response, sse_error
from server.lifecycle import CUT_FLUSH_S, OVER_CONNECTION_LIMIT, Drain, InFlight
from server.metrics import GatewayMetrics

RETRY_AFTER_S = 5


class ShuttingDown(NotReady):
    """A request that arrives while the server drains, or one cut by the grace limit."""

    default_code = "shutting_down"


class TooManyConnections(NotReady):
    """A request on a connection above ``server.max_connections``."""

    default_code = "too_many_connections"


class DrainGuard:
    """Pure ASGI, outermost: counts requests in flight and answers for the app while draining."""

    def __init__(self, app: ASGIApp, *, drain: Drain) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope.get(OVER_CONNECTION_LIMIT):
            too_many = TooManyConnections("the server has too many open connections; retry shortly")
            await _refused(too_many)(scope, receive, send)
            return
        if self.drain.draining:
            path: str = scope["path"]
            if path == "/health":
                body = {"status": "draining", "problems": ["the server is shutting down"]}
                headers = {"Retry-After": str(RETRY_AFTER_S), "Connection": "close"}
                await JSONResponse(body, status_code=503, headers=headers)(scope, receive, send)
                return
            if path.startswith("/v1/"):
                error = ShuttingDown("the server is shutting down; retry on another replica")
                await _refused(error)(scope, receive, send)
                return
        request = InFlight(anyio.CancelScope())
        self.drain.requests.add(request)

        async def tracked_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                request.started = True
                headers = message.get("headers", [])
                request.streaming = any(
                    k.lower() == b"content-type" and v.startswith(b"text/event-stream") for k, v in headers
                )
                if self.drain.draining:  # do not keep a connection alive into a server that is going away
                    message = {**message, "headers": [*headers, (b"connection", b"close")]}
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                request.ended = True
            await send(message)

        try:
            with request.cancel:
                await self.app(scope, receive, tracked_send)
            if request.cancel.cancelled_caught and not request.ended:
                await _finish_cut(request, scope, receive, send)
        finally:
            self.drain.requests.discard(request)
            if self.drain.draining and not request.cancel.cancel_called:
                self.drain.finished += 1


def _refused(error: NotReady) -> JSONResponse:
    """The OpenAI-shaped 503 of a request the server will not take now; the connection is closed."""
    response = error_response(error)
    response.headers["Retry-After"] = str(RETRY_AFTER_S)
    response.headers["Connection"] = "close"
    return response


async def _finish_cut(request: InFlight, scope: Scope, receive: Receive, send: Send) -> None:
    """A request cut by the grace limit: an error event ends its stream, or a 503 if nothing was sent."""
    error = ShuttingDown("the server shut down before this request finished (shutdown grace period exceeded)")
    with anyio.move_on_after(CUT_FLUSH_S), contextlib.suppress(Exception):
        if not request.started:
            await _refused(error)(scope, receive, send)
        elif request.streaming:
            body = (sse_error(error) + "data: [DONE]\n\n").encode()
            await send({"type": "http.response.body", "body": body, "more_body": False})
        else:
            await send({"type": "http.response.body", "body": b"", "more_body": False})


class RequestGuard:
    """Pure ASGI: checks the API key and refuses bodies above the limit before anything parses them
    (the body is read here, counted, and replayed to the app).

    With a key configured, every path needs it except the API description and, unless their
    ``auth.protect_*`` switch is on, ``/health`` and ``/metrics``: deny by default, so a new route
    cannot be left open by mistake."""

    def __init__(self, app: ASGIApp, *, config: DeployConfig, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics
        api_key = config.auth.resolved_key()
        self.api_key = _digest(api_key.encode()) if api_key else None
        self.max_body = config.limits.max_body_bytes
        auth = config.auth
        self.open_paths = set(_DOC_PATHS)
        self.open_paths |= set() if auth.protect_health else {"/health"}
        self.open_paths |= set() if auth.protect_metrics else {"/metrics"}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        error: Exception | None = None
        if self.api_key is not None and path not in self.open_paths and not self._authorized(scope):
            error = Unauthorized("invalid or missing API key: send 'Authorization: Bearer <key>'")
        elif scope["method"] in ("POST", "PUT", "PATCH"):
            body, too_large = await self._read_body(scope, receive)
            if too_large:
                error = BodyTooLarge(f"the request body is larger than the limit of {self.max_body} bytes")
            else:
                receive = replay(body, receive)
        if error is not None:
            self.metrics.finished(None, "guard", getattr(error, "status", 400))
            await error_response(error)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        assert self.api_key is not None
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        # digests of equal length, compared in time independent of where they differ: neither the
        # key's bytes nor its length can be timed
        return hmac.compare_digest(_digest(token.strip()), self.api_key) and scheme.lower() == b"bearer"

    async def _read_body(self, scope: Scope, receive: Receive) -> tuple[bytes, bool]:
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return b"", True
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return b"", True
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks), False


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


_DOC_PATHS = ("/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc")


def replay(body: bytes, receive: Receive) -> Receive:
    """``receive`` that hands the app ``body``, already read, and then what the client sends next."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
