"""The gateway as a router: a request for a size served by OpenAI-compatible workers is forwarded.

:class:`Forwarder` sits in front of the generation endpoints (inside the guards: the key and the
body size are checked first). It reads only what it decides on: ``model``, ``size``, the budgets
``max_latency_ms`` and ``max_memory_gb``, ``stream``, ``n`` and ``max_tokens`` (with the gateway's
limits on them), and the prompt's length as an estimate (characters / 4, or the token ids counted)
for the latency prediction. When the chosen size is forwarded (:class:`Forwarding`), the client's
JSON body goes to a worker of that size with every field it sent except the gateway's own
(:data:`GATEWAY_FIELDS`), and the worker's answer comes back as it is, a 4xx included, with ``model``
set to the size's public name (``family:size``) in the body and in every chunk and the gateway's
headers added. Fields the worker owns are never checked here: a new worker parameter works through
the gateway the day the worker takes it.

A size the engines run themselves takes the endpoint's own path (pydantic models, the engine's
token events) with the decision made here (:data:`server.api.serving.DECIDED`); a request the
forwarder cannot read (not a JSON object, the gateway's fields invalid) or one that arrives before
the gateway is ready goes there too, and is answered as without a forwarder.

Metrics per size come from what passes through: completion and prompt tokens from the worker's
``usage``. A stream asks the worker for its usage chunk (``stream_options.include_usage``) and, if
the client did not, drops that chunk and the chunks' ``usage`` key; where a worker sends no usage, a
stream's chunks with choices are counted as tokens. Time to first token and the gaps between chunks
(per choice) are observed on streams; a whole reply has its end-to-end latency only.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.types import ASGIApp, Receive, Scope, Send

from server.api import chat, completions
from server.api.common import Routed, choice_limit, routed_as
from server.api.fanout import until_disconnected
from server.api.guards import replay
from server.api.serving import DECIDED
from server.engines.base import EngineError, Forwarded, Forwarding
from server.errors import BadRequest, error_response, sse_error, to_api_error, worker_error_body
from server.routing import Decision, RouteRequest
from server.services import Live, Services

GATEWAY_FIELDS = ("size", "max_latency_ms", "max_memory_gb")  # the gateway's own: never sent to a worker
CHARS_PER_TOKEN = 4  # the prompt-length estimate for the latency prediction
_ID_PREFIX = {chat.ENDPOINT: "chatcmpl", completions.ENDPOINT: "cmpl"}


class RouteFields(BaseModel):
    """The fields the gateway decides on, with the constraints the endpoints' own models give them;
    every other field is the worker's."""

    model_config = ConfigDict(extra="allow")

    model: str
    size: str | float | None = None
    max_latency_ms: Annotated[float, Field(gt=0)] | None = None
    max_memory_gb: Annotated[float, Field(gt=0)] | None = None
    max_tokens: Annotated[int, Field(ge=0)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    n: Annotated[int, Field(ge=1)] = 1
    stream: bool = False


class Forwarder:
    """Pure ASGI: forwards requests for forwarded sizes; everything else goes on to ``app``."""

    def __init__(self, app: ASGIApp, *, services: Services) -> None:
        self.app = app
        self.services = services

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = scope["path"] if scope["type"] == "http" and scope["method"] == "POST" else None
        if endpoint not in _ID_PREFIX or not self._forwards_some_size():
            await self.app(scope, receive, send)
            return
        payload, receive = await _read_json(receive)
        fields = _route_fields(payload)
        if payload is None or fields is None or self.services.problems():
            await self.app(scope, receive, send)  # answered as without a forwarder
            return
        live = self.services.ready()  # the family this request uses to its end, even across a reload
        try:
            decision = self._decide(live, payload, fields, endpoint)
        except Exception as exc:
            response = error_response(exc)
            self.services.metrics.finished(None, endpoint, response.status_code)
            await response(scope, receive, send)
            return
        engine = live.engines.get(decision.size.name)
        if not (isinstance(engine, Forwarding) and engine.forwards(decision.size.name)):
            scope[DECIDED] = (live, decision)
            await self.app(scope, receive, send)
            return
        routed = routed_as(live, decision, _ID_PREFIX[endpoint])
        relay = Relay(self.services, routed, endpoint, payload, fields.stream)
        leave = live.enter()
        try:
            await relay.run(engine, scope, receive, send)
        finally:
            leave()

    def _forwards_some_size(self) -> bool:
        return any(isinstance(e, Forwarding) and e.forwards(size) for size, e in self.services.engines.items())

    def _decide(self, live: Live, payload: dict[str, Any], fields: RouteFields, endpoint: str) -> Decision:
        """The size, from the gateway's fields and the gateway's limits on ``n`` and ``max_tokens``."""
        router = live.router
        limits = live.config.limits
        longest, prompts = prompt_estimate(payload)
        requested = fields.max_completion_tokens if fields.max_completion_tokens is not None else fields.max_tokens
        if requested is not None and limits.max_tokens is not None and requested > limits.max_tokens:
            raise BadRequest(f"max_tokens is {requested}; this server allows at most {limits.max_tokens}",
                             param="max_tokens")  # fmt: skip
        if not requested:  # the prediction's guess: the endpoint's default, else the router's typical length
            default = completions.DEFAULT_MAX_TOKENS if endpoint == completions.ENDPOINT else limits.default_max_tokens
            requested = default or router.typical_tokens
        size_text = router.size_text(fields.model, None if fields.size is None else str(fields.size))
        request = RouteRequest(
            size=size_text,
            max_latency_ms=fields.max_latency_ms,
            max_memory_gb=fields.max_memory_gb,
            prompt_tokens=longest,
            max_tokens=requested,
            n=fields.n * prompts,
        )
        decision = router.choose(request)
        engine = live.engines.get(decision.size.name)
        forwarded = isinstance(engine, Forwarding) and engine.forwards(decision.size.name)
        # a worker holds its own choices: only the configured limit; the gateway's engines, what they hold
        limit = limits.max_n if forwarded else choice_limit(live)
        if limit is not None and fields.n * prompts > limit:
            raise BadRequest(f"n x prompts is {fields.n * prompts}; at most {limit}", param="n")
        return decision


async def _read_json(receive: Receive) -> tuple[dict[str, Any] | None, Receive]:
    """The request's JSON object (``None`` if it is not one) and a ``receive`` that replays the body."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    body = b"".join(chunks)
    try:
        payload = json.loads(body)
    except ValueError:
        payload = None
    return (payload if isinstance(payload, dict) else None), replay(body, receive)


def _route_fields(payload: dict[str, Any] | None) -> RouteFields | None:
    if payload is None:
        return None
    try:
        return RouteFields.model_validate(payload)
    except ValidationError:
        return None


def prompt_estimate(payload: dict[str, Any]) -> tuple[int, int]:
    """(tokens of the longest prompt, number of prompts), estimated without the tokenizer: token ids
    are counted, text is its characters / :data:`CHARS_PER_TOKEN`."""

    def tokens(value: Any) -> int:
        if isinstance(value, str):
            return len(value) // CHARS_PER_TOKEN + 1
        if isinstance(value, list) and all(isinstance(v, int) for v in value):
            return len(value)
        return len(json.dumps(value)) // CHARS_PER_TOKEN + 1

    if "messages" in payload:
        messages = payload["messages"] if isinstance(payload["messages"], list) else []
        return sum(tokens(m.get("content") if isinstance(m, dict) else m) + 4 for m in messages), 1
    prompt = payload.get("prompt", "")
    if isinstance(prompt, list) and prompt and all(isinstance(p, str | list) for p in prompt):
        return max(tokens(p) for p in prompt), len(prompt)
    return tokens(prompt), 1


class Relay:
    """One forwarded request: its body for the worker, the worker's answer rewritten for the client,
    and what it is counted as."""

    def __init__(
        self, services: Services, routed: Routed, endpoint: str, payload: dict[str, Any], stream: bool
    ) -> None:
        self.services, self.routed, self.endpoint, self.stream = services, routed, endpoint, stream
        self.body = {k: v for k, v in payload.items() if k not in GATEWAY_FIELDS}
        options = payload.get("stream_options")
        self.client_usage = isinstance(options, dict) and bool(options.get("include_usage"))
        if stream and (options is None or isinstance(options, dict)):
            self.body["stream_options"] = {**(options or {}), "include_usage": True}
        self.started = time.perf_counter()
        self.status = 499  # unless the answer runs to its end: the client went away
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.chunks_with_choices = 0
        self.first_at: float | None = None
        self.last_at: dict[int, float] = {}  # choice index -> when its last chunk came
        self.gaps: list[float] = []

    async def run(self, engine: Forwarding, scope: Scope, receive: Receive, send: Send) -> None:
        size = self.routed.size.name
        worker_id = self.routed.request_id.partition("-")[2]  # vLLM names its answer "<prefix>-<x-request-id>"
        try:
            async with contextlib.AsyncExitStack() as stack:
                try:
                    answer = await stack.enter_async_context(
                        engine.forward(size, self.endpoint, self.body, {"x-request-id": worker_id})
                    )
                except Exception as exc:  # no worker answered: the gateway's error
                    response = error_response(exc)
                    self.status = response.status_code
                    await response(scope, receive, send)
                    return
                await self._respond(answer, scope, receive, send)
        finally:
            self._count()

    async def _respond(self, answer: Forwarded, scope: Scope, receive: Receive, send: Send) -> None:
        headers = {**answer.headers, **self.routed.headers()}
        if self.stream and answer.status == 200:
            headers["Cache-Control"] = "no-cache"
            response: Response = StreamingResponse(self._events(answer.body), headers=headers)
            await response(scope, receive, send)
            return
        try:
            content = await until_disconnected(Request(scope, receive), _read(answer.body))
        except EngineError as exc:  # the worker failed before its answer was whole: nothing was sent yet
            response = error_response(exc)
            self.status = response.status_code
            await response(scope, receive, send)
            return
        if content is None:
            return
        self.status = answer.status
        if answer.status == 200:
            content = self._whole(content)
        else:
            content = _worker_error(answer.status, content)
            headers["content-type"] = "application/json"
        await Response(content, status_code=answer.status, headers=headers)(scope, receive, send)

    def _whole(self, content: bytes) -> bytes:
        try:
            reply = json.loads(content)
        except ValueError:
            return content
        if not isinstance(reply, dict):
            return content
        self._usage(reply)
        reply["model"] = self.routed.served_as
        return json.dumps(reply, ensure_ascii=False).encode()

    async def _events(self, body: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """The worker's SSE events with ``model`` rewritten; an error event if the worker fails or
        stops before ``[DONE]``."""
        try:
            async for data in sse_data(body):
                if data == b"[DONE]":
                    self.status = 200 if self.status == 499 else self.status
                    yield b"data: [DONE]\n\n"
                    return
                chunk = self._chunk(data)
                if chunk is not None:
                    yield b"data: " + chunk + b"\n\n"
            raise EngineError(f"the worker for size {self.routed.size.name} ended the stream before [DONE]")
        except Exception as exc:
            self.status = to_api_error(exc).status
            yield (sse_error(exc) + "data: [DONE]\n\n").encode()

    def _chunk(self, data: bytes) -> bytes | None:
        """One event's data for the client (``None``: dropped), counted."""
        try:
            chunk = json.loads(data)
        except ValueError:
            return data
        if not isinstance(chunk, dict):
            return data
        if isinstance(chunk.get("error"), dict):  # the worker's own error event
            code = chunk["error"].get("code")
            self.status = code if isinstance(code, int) and 400 <= code < 600 else 500
            return data
        now = time.perf_counter()
        for choice in chunk.get("choices") or ():
            index = choice.get("index", 0) if isinstance(choice, dict) else 0
            self.chunks_with_choices += 1
            self.first_at = self.first_at or now
            if index in self.last_at:
                self.gaps.append(now - self.last_at[index])
            self.last_at[index] = now
        usage = self._usage(chunk)
        if not self.client_usage:
            if usage and not chunk.get("choices"):
                return None  # the usage chunk the gateway asked for
            chunk.pop("usage", None)
        if "model" in chunk:
            chunk["model"] = self.routed.served_as
        return json.dumps(chunk, ensure_ascii=False).encode()

    def _usage(self, reply: dict[str, Any]) -> dict[str, Any] | None:
        usage = reply.get("usage")
        if not isinstance(usage, dict):
            return None
        self.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        self.completion_tokens = int(usage.get("completion_tokens") or 0)
        return usage

    def _count(self) -> None:
        metrics, size = self.services.metrics, self.routed.size.name
        metrics.finished(size, self.endpoint, self.status)
        if self.status != 200:
            return
        end = max(self.last_at.values(), default=time.perf_counter())
        completion = self.completion_tokens if self.completion_tokens is not None else self.chunks_with_choices
        metrics.choice_done(
            size,
            prompt_tokens=self.prompt_tokens or 0,
            completion_tokens=completion,
            ttft_s=None if self.first_at is None else self.first_at - self.started,
            e2e_s=end - self.started,
            token_gaps_s=self.gaps,
            queue_s=None,
        )
        self.routed.observe(completion, (end - self.started) * 1e3)


async def _read(body: AsyncIterator[bytes]) -> bytes:
    return b"".join([chunk async for chunk in body])


async def sse_data(body: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The ``data`` of each server-sent event in ``body`` (events end with a blank line)."""
    buffer = b""
    async for chunk in body:
        buffer = (buffer + chunk).replace(b"\r\n", b"\n")
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            lines = [line[5:].lstrip() for line in event.split(b"\n") if line.startswith(b"data:")]
            if lines:
                yield b"\n".join(lines)


def _worker_error(status: int, content: bytes) -> bytes:
    """A worker's error reply, its message kept, in the gateway's OpenAI shape."""
    try:
        body = json.loads(content)
    except ValueError:
        body = content.decode("utf-8", "replace")[:500]
    return json.dumps(worker_error_body(status, body), ensure_ascii=False).encode()
