"""``engine: remote``: a size served by an OpenAI-compatible worker at a URL.

The worker is another boomerang process serving one size, or a vLLM server; in a cluster, a
Kubernetes Service in front of its replicas. The gateway forwards a client's request as it was sent
(:meth:`RemoteEngine.forward`, the :class:`Forwarding` contract): the worker's model name is set and
the worker's answer, a 4xx included, is handed back as it comes. :meth:`RemoteEngine.generate` (the
:class:`Engine` contract) sends ``/v1/completions`` with the prompt as token ids and turns the SSE
stream into :class:`TokenEvent`. On either path HTTP 429 becomes :class:`QueueFull` and a worker that
cannot be reached or fails :class:`EngineError`; on ``generate``, a 400 (the worker's own limits) is
:class:`RequestRejected` with its param and code. ``/health`` is polled so that a dead worker shows as
an unhealthy engine instead of failing requests one by one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

import httpx

from server.engines.base import (
    Engine,
    EngineError,
    Forwarded,
    Forwarding,
    GenerationRequest,
    QueueFull,
    RequestRejected,
    SizeLoad,
    TokenEvent,
    TokenLogprob,
)

log = logging.getLogger(__name__)


class RemoteEngine(Engine, Forwarding):
    """One size at ``url``. ``start_timeout_s``: how long :meth:`start` waits for a healthy worker;
    ``health_interval_s``: seconds between health checks, ``health_timeout_s``: how long one waits for
    its answer; ``timeout_s``: per-read timeout of a stream."""

    def __init__(
        self,
        url: str,
        size: str,
        *,
        start_timeout_s: float = 60.0,
        health_interval_s: float = 5.0,
        health_timeout_s: float = 5.0,
        timeout_s: float = 300.0,
        api_key: str | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.size = size
        self.start_timeout_s = start_timeout_s
        self.health_interval_s = health_interval_s
        self.health_timeout_s = health_timeout_s
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(base_url=self.url, timeout=httpx.Timeout(timeout_s, connect=5.0),
                                         headers=headers)  # fmt: skip
        self._healthy = False
        self._model: str | None = None
        self._is_vllm = False
        self._in_flight = 0
        self._monitor: asyncio.Task[None] | None = None
        self._last_error = "not started"

    @property
    def sizes(self) -> tuple[str, ...]:
        return (self.size,) if self._healthy else ()

    async def start(self) -> None:
        deadline = asyncio.get_running_loop().time() + self.start_timeout_s
        while not await self._check():
            if asyncio.get_running_loop().time() >= deadline:
                await self._client.aclose()
                raise EngineError(
                    f"the worker for size {self.size} at {self.url} did not become healthy within "
                    f"{self.start_timeout_s:g} s: {self._last_error}"
                )
            await asyncio.sleep(0.5)
        self._monitor = asyncio.create_task(self._watch())

    async def stop(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
        self._healthy = False
        await self._client.aclose()

    def healthy(self) -> bool:
        return self._healthy

    def load(self, size: str) -> SizeLoad:
        return SizeLoad(running=self._in_flight)

    async def abort(self, request_id: str) -> None:
        return None  # closing the stream (generate's finally) is what stops the worker

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval_s)
            was = self._healthy
            await self._check()
            if was and not self._healthy:
                log.warning("worker for %s at %s is unhealthy: %s", self.size, self.url, self._last_error)

    async def _check(self) -> bool:
        """Health and, the first time, the worker's model name (``family:size`` or vLLM's served name)."""
        try:
            health = await self._client.get("/health", timeout=self.health_timeout_s)
            if health.status_code != 200:
                raise EngineError(f"/health answered {health.status_code}")
            if self._model is None:
                models = (await self._client.get("/v1/models", timeout=self.health_timeout_s)).json()["data"]
                ids = [m["id"] for m in models if m.get("loaded", True)]  # a boomerang worker lists every size
                named = [i for i in ids if i.lower().endswith(f":{self.size.lower()}")]
                self._is_vllm = any(m.get("owned_by") == "vllm" for m in models)
                if not named and not (self._is_vllm or len(ids) == 1):
                    raise EngineError(f"it does not serve size {self.size} (it serves {', '.join(ids)})")
                self._model = (named or ids)[0]
            self._healthy = True
        except (httpx.HTTPError, EngineError, KeyError, IndexError, ValueError) as exc:
            self._last_error = f"{type(exc).__name__}: {exc}"
            self._healthy = False
        return self._healthy

    def body(self, request: GenerationRequest) -> dict[str, Any]:
        """The completions request: standard OpenAI fields, vLLM's extras only for a vLLM worker."""
        p = request.sampling
        body: dict[str, Any] = {
            "model": self._model,
            "prompt": list(request.prompt_ids),
            "max_tokens": p.max_tokens,
            "temperature": p.temperature,
            "top_p": p.top_p,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        optional: dict[str, Any] = {
            "top_k": p.top_k or None,
            "seed": p.seed,
            "stop": list(p.stop) or None,
            "presence_penalty": p.presence_penalty or None,
            "frequency_penalty": p.frequency_penalty or None,
            "logprobs": p.logprobs,
            "ignore_eos": p.ignore_eos or None,  # vLLM's extra field, which a boomerang worker takes too
        }
        if self._is_vllm:
            optional |= {"return_token_ids": True, "stop_token_ids": list(p.stop_token_ids) or None}
        elif p.stop_token_ids:
            raise RequestRejected("stop_token_ids need a vLLM worker", param="stop_token_ids")
        if p.prompt_logprobs is not None:
            raise RequestRejected("prompt logprobs (echo) are not served through a remote worker", param="echo")
        if p.structured is not None:
            if not self._is_vllm:
                raise RequestRejected("structured outputs need a vLLM worker", param=p.structured.param)
            body["structured_outputs"] = p.structured.as_vllm()
        body.update({k: v for k, v in optional.items() if v is not None})
        return body

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:  # type: ignore[override]
        if not self._healthy:
            raise EngineError(f"the worker for size {self.size} at {self.url} is not healthy: {self._last_error}")
        body = self.body(request)
        self._in_flight += 1
        try:
            async with self._client.stream("POST", "/v1/completions", json=body) as response:
                if response.status_code != 200:
                    await response.aread()
                    raise _http_error(response)
                async for event in self._events(response, len(request.prompt_ids)):
                    yield event
        except httpx.HTTPError as exc:
            raise self._failed(exc) from exc
        finally:
            self._in_flight -= 1

    def forwards(self, size: str) -> bool:
        return size == self.size

    @contextlib.asynccontextmanager
    async def forward(
        self, size: str, endpoint: str, body: dict[str, Any], headers: Mapping[str, str]
    ) -> AsyncIterator[Forwarded]:
        if not self._healthy:
            raise EngineError(f"the worker for size {self.size} at {self.url} is not healthy: {self._last_error}")
        request = self._client.build_request("POST", endpoint, json={**body, "model": self._model}, headers=headers)
        self._in_flight += 1
        try:
            try:
                response = await self._client.send(request, stream=True)
            except httpx.HTTPError as exc:
                raise self._failed(exc) from exc
            try:
                if response.status_code in _WORKER_FAULTS or response.status_code >= 500:
                    await response.aread()
                    raise _http_error(response)
                media = response.headers.get("content-type", "application/json")
                yield Forwarded(response.status_code, {"content-type": media}, self._bytes(response))
            finally:
                await response.aclose()
        finally:
            self._in_flight -= 1

    async def _bytes(self, response: httpx.Response) -> AsyncIterator[bytes]:
        try:
            async for chunk in response.aiter_bytes():
                yield chunk
        except httpx.HTTPError as exc:
            raise self._failed(exc) from exc

    def _failed(self, exc: httpx.HTTPError) -> EngineError:
        return EngineError(f"the worker for size {self.size} at {self.url} failed: {type(exc).__name__}")

    async def _events(self, response: httpx.Response, prompt_tokens: int) -> AsyncIterator[TokenEvent]:
        finish: str | None = None
        completion = 0
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise EngineError(f"the worker reported: {_message(chunk)}")
            if chunk.get("usage"):
                completion = int(chunk["usage"].get("completion_tokens", completion))
            for choice in chunk.get("choices", []):
                ids = tuple(int(t) for t in choice.get("token_ids") or ())
                finish = choice.get("finish_reason") or finish
                event = TokenEvent(token_ids=ids, text=choice.get("text", ""), logprobs=_logprobs(choice))
                if event.text or event.token_ids or event.logprobs:
                    yield event
        if finish is None:
            raise EngineError(f"the worker for size {self.size} ended the stream without finishing")
        yield TokenEvent(finish_reason=finish, prompt_tokens=prompt_tokens, completion_tokens=completion)


# Answers that are the worker's or the deployment's fault, not the request's: never handed to the client
# as they are (a key the gateway holds for the worker, a busy worker; and every 5xx).
_WORKER_FAULTS = (401, 403, 429)


def _logprobs(choice: dict[str, Any]) -> tuple[TokenLogprob, ...]:
    """Legacy completions logprobs (tokens as strings, no ids: token_id is -1)."""
    block = choice.get("logprobs")
    if not block:
        return ()
    out = []
    for token, lp, top in zip(block["tokens"], block["token_logprobs"], block.get("top_logprobs") or [], strict=False):
        alternatives = tuple((-1, t, float(v)) for t, v in sorted((top or {}).items(), key=lambda kv: -kv[1]))
        out.append(TokenLogprob(token_id=-1, token=token, logprob=float(lp), top=alternatives))
    return tuple(out)


def _message(payload: Any) -> str:
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        return str(payload["error"].get("message", payload["error"]))
    return str(payload)[:500]


def _error_fields(response: httpx.Response) -> dict[str, Any]:
    with contextlib.suppress(ValueError):
        body = response.json()
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            return body["error"]
    return {}


def _http_error(response: httpx.Response) -> EngineError:
    try:
        message = _message(response.json())
    except ValueError:
        message = response.text[:500]
    if response.status_code == 400:  # the worker's own limits (a shorter context): the client's error, kept
        error = _error_fields(response)
        return RequestRejected(message, param=error.get("param"), code=error.get("code"))
    if response.status_code == 429:
        retry = response.headers.get("retry-after", "1")
        return QueueFull(f"the worker is busy: {message}", retry_after_s=float(retry) if retry.isdigit() else 1.0)
    return EngineError(f"the worker answered {response.status_code}: {message}")
