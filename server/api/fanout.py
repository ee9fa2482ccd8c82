"""One API request = n engine requests per prompt ("choices"), run concurrently and merged.

:class:`Fanout` waits for every choice's first event before the response starts, so admission
errors (queue full, dead engine) become a proper status; after that, errors become a stream event.
Closing a fanout aborts every choice still running: that is how a client that disconnects frees
its batch slots.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
from fastapi import Request
from fastapi.responses import StreamingResponse

from server.engines.base import Engine, GenerationRequest, TokenEvent, TokenLogprob
from server.errors import sse_error, to_api_error
from server.metrics import GatewayMetrics

T = TypeVar("T")
_END = object()


@dataclass
class Choice:
    """What one engine request has produced so far."""

    index: int
    request: GenerationRequest
    started: float
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    done: bool = False
    first_token_at: float | None = None
    last_token_at: float | None = None
    gaps: list[float] = field(default_factory=list)
    queue_s: float | None = None

    def add(self, event: TokenEvent, now: float) -> None:
        self.text.append(event.text)
        self.token_ids.extend(event.token_ids)
        self.logprobs.extend(event.logprobs)
        if event.prompt_logprobs is not None:
            self.prompt_logprobs = event.prompt_logprobs
        if event.queue_s is not None:
            self.queue_s = event.queue_s
        if event.token_ids:
            if self.last_token_at is None:
                self.first_token_at = now
            else:
                self.gaps.append(now - self.last_token_at)
            self.last_token_at = now
        if event.finish_reason is not None:
            self.finish_reason = event.finish_reason
            self.prompt_tokens = event.prompt_tokens
            self.completion_tokens = event.completion_tokens

    @property
    def output(self) -> str:
        return "".join(self.text)


class Fanout:
    def __init__(
        self,
        engine: Engine,
        requests: list[GenerationRequest],
        metrics: GatewayMetrics,
        on_done: Callable[[int, float], None] | None = None,
    ) -> None:
        """``on_done(completion_tokens, e2e_ms)`` is called as each choice completes."""
        self.engine = engine
        self.size = requests[0].size
        self.metrics = metrics
        self.on_done = on_done
        now = time.perf_counter()
        self.choices = [Choice(i, r, now) for i, r in enumerate(requests)]
        # (choice index, event | _END | exception, arrival time)
        self._queue: asyncio.Queue[tuple[int, Any, float]] = asyncio.Queue()
        self._buffer: list[tuple[int, Any, float]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False

    async def _pump(self, index: int) -> None:
        iterator: AsyncIterator[TokenEvent] | None = None
        try:  # an engine may refuse at the call (queue full) or at the first event
            iterator = self.engine.generate(self.choices[index].request)
            async for event in iterator:
                self._queue.put_nowait((index, event, time.perf_counter()))
            self._queue.put_nowait((index, _END, time.perf_counter()))
        except Exception as exc:
            self._queue.put_nowait((index, exc, time.perf_counter()))
        finally:
            aclose = getattr(iterator, "aclose", None) if iterator is not None else None
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()

    async def start(self) -> None:
        """Submit every choice and wait until each has answered once; raise the first failure."""
        self._tasks = [asyncio.create_task(self._pump(i)) for i in range(len(self.choices))]
        seen: set[int] = set()
        try:
            while len(seen) < len(self.choices):
                index, item, at = await self._queue.get()
                if isinstance(item, BaseException):
                    raise item
                seen.add(index)
                self._buffer.append((index, item, at))
        except BaseException:
            await self.close()
            raise

    async def events(self) -> AsyncIterator[tuple[Choice, TokenEvent]]:
        """Events of all choices as they come; each choice's events are in order."""
        pending = sum(not c.done for c in self.choices)
        while pending:
            index, item, at = self._buffer.pop(0) if self._buffer else await self._queue.get()
            choice = self.choices[index]
            if isinstance(item, BaseException):
                raise item
            if item is _END:
                choice.done = True
                pending -= 1
                self._record(choice)
                continue
            choice.add(item, at)
            yield choice, item

    async def collect(self) -> list[Choice]:
        async for _ in self.events():
            pass
        return self.choices

    def _record(self, c: Choice) -> None:
        end = c.last_token_at or time.perf_counter()
        self.metrics.choice_done(
            self.size,
            prompt_tokens=c.prompt_tokens,
            completion_tokens=c.completion_tokens,
            ttft_s=None if c.first_token_at is None else c.first_token_at - c.started,
            e2e_s=end - c.started,
            token_gaps_s=c.gaps,
            queue_s=c.queue_s,
        )
        if self.on_done is not None:
            self.on_done(c.completion_tokens, (end - c.started) * 1e3)

    async def close(self) -> None:
        """Abort what is still running. Safe to call twice; shielded from the caller's cancellation."""
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            for task in self._tasks:
                task.cancel()
            for task in self._tasks:
                with contextlib.suppress(BaseException):
                    await task
            for choice in self.choices:
                if not choice.done:
                    choice.done = True
                    choice.prompt_tokens = len(choice.request.prompt_ids)
                    choice.completion_tokens = len(choice.token_ids)
                    self._record(choice)  # what an aborted choice cost still counts
                    with contextlib.suppress(Exception):
                        await self.engine.abort(choice.request.request_id)


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def stream_response(
    fanout: Fanout,
    chunks: AsyncIterator[dict[str, Any]],
    headers: dict[str, str],
    on_finish: Callable[[int], None],
) -> StreamingResponse:
    """SSE: the chunks, an error event if generation fails midway, then ``data: [DONE]``."""

    async def body() -> AsyncIterator[str]:
        status = 499  # unless the stream runs to its end: the client went away
        try:
            try:
                async for chunk in chunks:
                    yield sse(chunk)
                status = 200
            except Exception as exc:
                status = to_api_error(exc).status
                yield sse_error(exc)
            yield "data: [DONE]\n\n"
        finally:
            with anyio.CancelScope(shield=True):
                await fanout.close()
                on_finish(status)

    return StreamingResponse(body(), media_type="text/event-stream", headers={**headers, "Cache-Control": "no-cache"})


async def until_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """Run ``work`` and cancel it if the client goes away first (then return ``None``)."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
    return task.result() if not task.cancelled() else None


async def collect_reply(request: Request, fanout: Fanout, on_finish: Callable[[int], None]) -> list[Choice] | None:
    """The whole-reply path of every endpoint: collect all choices, or ``None`` if the client left
    first (status 499); the fanout is closed either way and the outcome reported to ``on_finish``."""
    try:
        choices = await until_disconnected(request, fanout.collect())
    finally:
        await fanout.close()
    on_finish(200 if choices is not None else 499)
    return choices
