"""The one error mapper: every error the gateway can meet becomes exactly one status and an
OpenAI-shaped body ``{"error": {"message", "type", "param", "code"}}``; in a stream, the same body
as an SSE event followed by ``data: [DONE]``. Messages are for the client: no stack traces.

Engines, the pool, the router and the services raise their own (domain) errors and know nothing of
HTTP; :func:`to_api_error` is the one place that gives each of them its status. The :class:`ApiError`
classes below are for the HTTP layer (``server/api/``) only."""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from boomerang_core.errors import BoomerangError, ModelNotFound, SizeOutOfRange
from server.engines.base import EngineError, QueueFull, RequestRejected
from server.routing import BudgetUnmeetable, RoutingError, SizeConflict, UnknownModel, UnknownSize
from server.services import NotServing, ReloadRefused

log = logging.getLogger("boomerang.server")


class ApiError(Exception):
    status = 500
    type = "server_error"
    default_code: str | None = None

    def __init__(
        self, message: str, *, param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class BadRequest(ApiError):
    status, type = 400, "invalid_request_error"


class Unauthorized(ApiError):
    status, type, default_code = 401, "authentication_error", "invalid_api_key"


class NotFound(ApiError):
    status, type, default_code = 404, "invalid_request_error", "model_not_found"


class Forbidden(ApiError):
    status, type, default_code = 403, "permission_error", "forbidden"


class Conflict(ApiError):
    status, type, default_code = 409, "invalid_request_error", "conflict"


class BodyTooLarge(ApiError):
    status, type, default_code = 413, "invalid_request_error", "request_too_large"


class TooManyRequests(ApiError):
    status, type, default_code = 429, "rate_limit_error", "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after_s: float = 1.0, param: str | None = None, code: str | None = None):
        super().__init__(message, param=param, code=code, headers={"Retry-After": str(max(1, round(retry_after_s)))})


class NotReady(ApiError):
    status, type, default_code = 503, "server_error", "not_ready"


class InternalError(ApiError):
    status, type, default_code = 500, "server_error", "internal_error"


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="forbid")
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    """The body of every error, for the OpenAPI schema (bodies are built by :meth:`ApiError.body`)."""

    model_config = ConfigDict(extra="forbid")
    error: ErrorDetail


_ERROR_MEANINGS = {
    400: "invalid request: a field the server cannot honour, a limit exceeded, malformed JSON",
    401: "missing or wrong API key",
    403: "an admin endpoint on a server without an API key",
    404: "no such model or size",
    409: "a reload refused: the new family failed to load or its checks; the current one keeps serving",
    413: "request body above limits.max_body_bytes",
    429: "queue full, or no size meets the latency and memory budgets",
    503: "still loading, shutting down, or the engine serving the size has failed",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route: each status with the OpenAI error body, for the OpenAPI schema."""
    return {status: {"model": ErrorBody, "description": _ERROR_MEANINGS[status]} for status in statuses}


_BY_STATUS: dict[int, type[ApiError]] = {400: BadRequest, 401: Unauthorized, 404: NotFound, 413: BodyTooLarge,
                                          429: TooManyRequests, 503: NotReady}  # fmt: skip


def worker_error_body(status: int, body: Any) -> dict[str, Any]:
    """A worker's error reply in this gateway's OpenAI shape: its message and param kept, the type
    of its status, and a string code (vLLM's server writes the HTTP status there; a context
    overflow, which vLLM and OpenAI both word "maximum context length", is ``context_length_exceeded``)."""
    error = body.get("error") if isinstance(body, dict) else None
    fields = error if isinstance(error, dict) else {}
    message = str(fields.get("message") or (body if isinstance(body, str) else f"the worker answered {status}"))
    kind = _BY_STATUS.get(status, BadRequest if 400 <= status < 500 else InternalError)
    code = fields.get("code")
    if not isinstance(code, str):
        code = "context_length_exceeded" if "maximum context length" in message else kind.default_code
    param = fields.get("param")
    return {"error": {"message": message, "type": kind.type, "param": param if isinstance(param, str) else None,
                      "code": code}}  # fmt: skip


def to_api_error(exc: BaseException) -> ApiError:
    """The single mapping from any exception to the error the client sees."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, RequestValidationError):
        return _validation_error(exc)
    if isinstance(exc, QueueFull):
        return TooManyRequests(str(exc), retry_after_s=exc.retry_after_s, code="queue_full")
    if isinstance(exc, RequestRejected):
        return BadRequest(str(exc), param=exc.param, code=exc.code)
    if isinstance(exc, EngineError):
        return NotReady(f"the engine could not serve this request: {exc}", code="engine_error")
    if isinstance(exc, NotServing):
        return NotReady(str(exc), code=exc.code)
    if isinstance(exc, ReloadRefused):
        return Conflict(f"the reload was refused and the current family keeps serving: {exc}", code="reload_refused")
    if isinstance(exc, UnknownModel):
        return NotFound(str(exc), param=exc.param)
    if isinstance(exc, UnknownSize):
        return NotFound(str(exc), param=exc.param, code="size_not_found")
    if isinstance(exc, SizeConflict):
        return BadRequest(str(exc), param=exc.param)
    if isinstance(exc, BudgetUnmeetable):
        return TooManyRequests(str(exc), retry_after_s=exc.retry_after_s, param=exc.param, code="budget_unmeetable")
    if isinstance(exc, SizeOutOfRange | ModelNotFound):
        return NotFound(str(exc), param="size", code="size_not_found")
    if isinstance(exc, BoomerangError):
        return BadRequest(str(exc))
    if isinstance(exc, StarletteHTTPException):
        mapped = {401: Unauthorized, 404: NotFound, 413: BodyTooLarge, 429: TooManyRequests, 503: NotReady}
        if exc.status_code in mapped:
            error = mapped[exc.status_code](str(exc.detail), code="http_error")
        elif exc.status_code < 500:
            error = BadRequest(str(exc.detail), code="http_error")
            error.status = exc.status_code
        else:
            error = InternalError("error")
            error.status = exc.status_code
        error.headers = {**error.headers, **(exc.headers or {})}  # e.g. 405's Allow
        return error
    log.error("unhandled error", exc_info=exc)
    return InternalError("the server failed to handle this request; see the server log")


def _validation_error(exc: RequestValidationError) -> BadRequest:
    """Pydantic's errors, rephrased: ``messages[0].content: Field required``."""
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    loc = [p for p in first.get("loc", ()) if p != "body"]
    param = ""
    for part in loc:
        param += f"[{part}]" if isinstance(part, int) else (f".{part}" if param else str(part))
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if first.get("type") == "json_invalid":
        message, param = "the request body is not valid JSON", ""
    elif first.get("type") in ("model_attributes_type", "model_type", "dict_type"):
        message = "must be a JSON object" if param else "the request body must be a JSON object"
    more = len(exc.errors()) - 1
    text = f"{param}: {message}" if param else message
    if more:
        text += f" (and {more} more problem{'s' if more > 1 else ''})"
    return BadRequest(text, param=param or None, code="invalid_value")


class ErrorJSONResponse(JSONResponse):
    """ASCII JSON: a message that quotes the request (a model name with a lone surrogate) always encodes."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode()


def error_response(exc: BaseException) -> JSONResponse:
    error = to_api_error(exc)
    return ErrorJSONResponse(error.body(), status_code=error.status, headers=error.headers)


def sse_error(exc: BaseException) -> str:
    """The error as a stream event; the caller sends ``data: [DONE]`` after it."""
    return f"data: {json.dumps(to_api_error(exc).body())}\n\n"


def install_error_handlers(app: FastAPI) -> None:
    """Errors of the routes other than generation, and of request validation, which runs before any
    route (the generation endpoints answer and count their own errors: ``server.api.serving``)."""

    async def handle(request: Request, exc: Exception) -> JSONResponse:
        response = error_response(exc)
        services = getattr(request.app.state, "services", None)
        if services is not None:  # counted under the route's template, never the raw path; no size chosen yet
            endpoint = getattr(request.scope.get("route"), "path", "other")
            services.metrics.finished(None, endpoint, response.status_code)
        return response

    handled = (ApiError, RequestValidationError, StarletteHTTPException, EngineError, RoutingError, NotServing,
               BoomerangError, Exception)  # fmt: skip
    for exc_type in handled:
        app.add_exception_handler(exc_type, handle)
