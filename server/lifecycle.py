"""The gateway process's life: a real drain on SIGTERM, a deadline for request headers, and exit codes.

On the first SIGTERM or SIGINT the gateway drains: ``/health`` answers 503 (load balancers stop
sending), new ``/v1`` requests get an OpenAI-shaped 503 with ``Retry-After`` and ``Connection: close``,
and requests in flight (streams included) run to their end. When none is left, or after
``server.shutdown_grace_s``, the server shuts down and the process exits 0; a stream cut by the grace
limit ends with an error event and ``data: [DONE]``, never silence. A second signal exits at once.

:class:`Drain` is what the process knows about draining; the HTTP side of it, the pure-ASGI guard
that counts requests in flight and answers for the app while it drains, is
:class:`server.api.guards.DrainGuard`. :class:`GatewayServer` is uvicorn's server with that drain, and it also ends the
process (exit 1) when bring-up fails instead of staying up half-configured. :func:`protocol_class` is
uvicorn's HTTP protocol plus a header deadline: a connection that has not sent complete request
headers within ``server.header_timeout_s`` is closed (uvicorn has no such timer; slowloris clients
would otherwise hold connections forever).
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import anyio
import uvicorn

log = logging.getLogger("boomerang.server")
CUT_FLUSH_S = 2.0  # how long cut requests get to send their error event before the server closes
FORCED_EXIT_S = 1.0  # after a second signal: how long the server gets to close sockets before a hard exit

# set in a request's ASGI scope by the HTTP protocol when the request arrived above the connection limit
OVER_CONNECTION_LIMIT = "boomerang.over_connection_limit"


@dataclass(eq=False)
class InFlight:
    """One request the :class:`~server.api.guards.DrainGuard` let in, until its response has ended."""

    cancel: anyio.CancelScope
    started: bool = False  # http.response.start sent
    streaming: bool = False  # text/event-stream
    ended: bool = False  # the last body chunk sent


@dataclass(eq=False)
class Drain:
    """What the process knows about draining; shared by :class:`~server.api.guards.DrainGuard` and
    :class:`GatewayServer`."""

    grace_s: float = 30.0
    draining: bool = False
    started_at: float | None = None  # monotonic seconds
    requests: set[InFlight] = field(default_factory=set)
    finished: int = 0  # requests that ran to their end while draining
    cut: int = 0  # requests cut by the grace limit

    def begin(self) -> None:
        if not self.draining:
            self.draining, self.started_at = True, time.monotonic()

    @property
    def in_flight(self) -> int:
        return len(self.requests)

    def overdue(self) -> bool:
        return self.started_at is not None and time.monotonic() - self.started_at >= self.grace_s

    async def cut_all(self) -> None:
        """Cancel every request still in flight; each ends its stream with an error event."""
        for request in list(self.requests):
            self.cut += 1
            request.cancel.cancel()
        with anyio.move_on_after(CUT_FLUSH_S):
            while self.requests:
                await asyncio.sleep(0.02)


class GatewayServer(uvicorn.Server):
    """uvicorn's server with the drain, and an exit code: 0 after a drain, 1 when bring-up failed,
    128 + signal after a second signal."""

    def __init__(self, config: uvicorn.Config, drain: Drain, bring_up_failed: Callable[[], bool]) -> None:
        super().__init__(config)
        self.drain = drain
        self.bring_up_failed = bring_up_failed
        self.exit_code = 0
        self._announced = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # A signal handler: set flags only; on_tick (on the loop) logs and acts. Unlike uvicorn's own
        # handler this does not re-raise the signal after shutdown, so a drained process exits 0.
        if self.drain.draining or self.should_exit:
            self.exit_code = 128 + sig
            self.force_exit = self.should_exit = True
            threading.Timer(FORCED_EXIT_S, _hard_exit, args=(self.exit_code,)).start()
            return
        self.drain.begin()

    async def on_tick(self, counter: int) -> bool:
        if not self.should_exit:
            if self.bring_up_failed():  # bring-up logged why, on one line
                self.exit_code = 1
                self.should_exit = True
            elif self.drain.draining:
                self._drain_step()
                if self.drain.overdue() and self.drain.in_flight:
                    await self.drain.cut_all()
                    self._drain_step()
                    self.should_exit = True  # what could not even take its error event is left to uvicorn
        return await super().on_tick(counter)

    def _drain_step(self) -> None:
        d = self.drain
        if not self._announced:
            self._announced = True
            log.info("draining: %d request(s) in flight get up to %g s; new requests get 503", d.in_flight, d.grace_s)
        if d.in_flight == 0:
            waited = time.monotonic() - (d.started_at or time.monotonic())
            log.info("drained in %.1f s: %d request(s) finished, %d cut", waited, d.finished, d.cut)
            self.should_exit = True


def _hard_exit(code: int) -> None:
    logging.shutdown()
    os._exit(code)


def protocol_class(header_timeout_s: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol (httptools when installed, as uvicorn's ``auto`` picks, else h11) with
    a deadline for request headers: from the connection's start, and from the first byte of each later
    request on a kept-alive connection. A connection still without complete headers is closed.

    With httptools, a request above uvicorn's ``limit_concurrency`` (``server.max_connections``) is
    marked in its scope and goes to the app, whose :class:`~server.api.guards.DrainGuard` answers an OpenAI-shaped 503,
    instead of uvicorn's plain-text one (h11 keeps uvicorn's own answer)."""
    base: type[Any]
    httptools = importlib.util.find_spec("httptools") is not None
    if httptools:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as base
    else:
        from uvicorn.protocols.http.h11_impl import H11Protocol as base

    class HeaderDeadlineProtocol(base):  # type: ignore[misc,valid-type]
        # uvicorn makes ``self.cycle`` (a new object) when a request's headers are complete; the
        # timer only has to see whether the cycle it started under was replaced.
        _header_timer: asyncio.TimerHandle | None = None
        _cycle_at_arm: Any = None

        def __init__(self, config: uvicorn.Config, *args: Any, **kwargs: Any) -> None:
            super().__init__(config, *args, **kwargs)
            self._max_connections: int | None = config.limit_concurrency
            if httptools:
                self.limit_concurrency = None  # checked below, answered by the app

        def on_headers_complete(self) -> None:  # httptools only
            limit = self._max_connections
            if limit is not None and (len(self.connections) >= limit or len(self.tasks) >= limit):
                log.warning("refused a request above max_connections (%d)", limit)
                self.scope[OVER_CONNECTION_LIMIT] = True
            super().on_headers_complete()

        def connection_made(self, transport: asyncio.Transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            between_requests = self.cycle is None or self.cycle.response_complete
            if between_requests and (self._header_timer is None or self._cycle_at_arm is not self.cycle):
                self._arm()  # the first bytes of a next request on a kept-alive connection
            super().data_received(data)

        def connection_lost(self, exc: Exception | None) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            self._cycle_at_arm = self.cycle
            self._header_timer = self.loop.call_later(header_timeout_s, self._headers_late)

        def _headers_late(self) -> None:
            self._header_timer = None
            upgraded = self.transport.get_protocol() is not self  # a WebSocket took the connection over
            if self.cycle is self._cycle_at_arm and not upgraded and not self.transport.is_closing():
                log.debug("closing a connection that sent no complete request headers in %g s", header_timeout_s)
                self.transport.close()

    return HeaderDeadlineProtocol
