"""The one serving path of the generation endpoints: check, route, fan out, answer, finish metrics.

:func:`serve` runs every request of ``/v1/chat/completions`` and ``/v1/completions`` through the
same steps, once each: refuse unsupported fields, check readiness, let the endpoint build its
prompts and sampling (:meth:`Generation.prepare`), choose a size, start the choices on its engine,
then answer with the whole reply or a stream, and count the request in the metrics exactly once
(its status, and its size once routed). An endpoint supplies only what differs: its prompts and
the shape of its bodies and chunks.

Where some size is served by OpenAI-compatible workers, :class:`server.api.forward.Forwarder` has
chosen the size before the request reaches the endpoint; a size it does not forward comes here with
that decision (:data:`DECIDED` in the ASGI scope), so that the request is routed once.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request, Response
from fastapi.responses import JSONResponse

from server.api.common import GenerationFields, Routed, route, routed_as
from server.api.fanout import Choice, Fanout, collect_reply, stream_response
from server.engines.base import SamplingParams
from server.errors import error_response
from server.routing import Decision
from server.services import Live, Services

# ASGI scope key: the family and size the forwarder chose for a request it did not forward
DECIDED = "boomerang.decision"


@dataclass(frozen=True)
class Prepared:
    """A request ready to route: its prompts as token ids, its checked ``max_tokens``, its sampling."""

    prompts: list[list[int]]
    max_tokens: int
    sampling: SamplingParams


class Generation(abc.ABC):
    """What one generation endpoint supplies to :func:`serve` for one request."""

    endpoint: str  # the route's path, the metrics' endpoint label
    id_prefix: str  # of the response id: "chatcmpl", "cmpl"

    def __init__(self, body: GenerationFields) -> None:
        self.body = body

    @abc.abstractmethod
    async def prepare(self, live: Live) -> Prepared:
        """Tokenise and check the request (blocking work off the event loop)."""

    @abc.abstractmethod
    def response(self, routed: Routed, choices: list[Choice]) -> dict[str, Any]:
        """The whole reply's body."""

    @abc.abstractmethod
    def chunks(self, routed: Routed, fanout: Fanout) -> AsyncIterator[dict[str, Any]]:
        """The stream's events, from the fanout's events."""


async def serve(request: Request, services: Services, generation: Generation) -> Response:
    body = generation.body
    size: str | None = None  # the label the request is counted under, once routed
    holds: list[Callable[[], None]] = []  # counts the request out of the family it started on

    def leave() -> None:
        while holds:
            holds.pop()()

    def finish(status: int) -> None:
        leave()
        services.metrics.finished(size, generation.endpoint, status)

    try:
        body.reject_unsupported()
        decided: tuple[Live, Decision] | None = request.scope.get(DECIDED)
        # the family this request uses to its end, even across a reload
        live = services.ready() if decided is None else decided[0]
        holds.append(live.enter())
        prepared = await generation.prepare(live)
        if decided is None:
            routed = route(live, body, prepared.prompts, prepared.max_tokens, generation.id_prefix)
        else:
            routed = routed_as(live, decided[1], generation.id_prefix)
        size = routed.size.name
        engine = live.engine_for(routed.size)
        requests = routed.requests(prepared.prompts, prepared.sampling, body.n)
        fanout = Fanout(engine, requests, services.metrics, routed.observe)
        await fanout.start()
    except Exception as exc:  # answered here, so that the error handler does not count it again
        response = error_response(exc)
        finish(response.status_code)
        return response
    if body.stream:
        return stream_response(fanout, generation.chunks(routed, fanout), routed.headers(), finish)
    try:
        choices = await collect_reply(request, fanout, finish)
    finally:
        leave()
    if choices is None:
        return Response(status_code=499)
    return JSONResponse(generation.response(routed, choices), headers=routed.headers())
