"""The one thread that owns every vLLM engine of this process.

vLLM keeps a module-global forward context: two engines stepped from two threads at once corrupt
each other's forward pass. So all vLLM work (building an engine, adding and aborting requests,
stepping) runs on this thread, fed by a command queue; engines with unfinished requests are stepped
in turn. The event loop only submits commands and awaits their futures.

In-process engines were chosen over one process per engine by measurement (DESIGN.md section 6,
2 cores): bring-up 1-6 s vs 22-27 s, decode ~175-189 vs ~117 tok/s at 16 concurrent requests, and
the store is shared by plain pointers, with no shared-memory file to manage.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Protocol, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


class Steppable(Protocol):
    """One engine as the stepper sees it (a replica of :mod:`server.engines.vllm.replica`)."""

    def busy(self) -> bool:
        """True while the engine has unfinished requests."""

    def step_once(self) -> None:
        """One vLLM step and delivery of its outputs; raising marks the engine failed."""

    def step_failed(self, error: BaseException) -> None: ...


class VllmStepper:
    """Runs commands and steps engines on one daemon thread; ``idle_wait_s`` bounds how long the
    thread sleeps on an empty command queue when no engine is busy (seconds)."""

    def __init__(self, idle_wait_s: float = 0.05) -> None:
        self.idle_wait_s = idle_wait_s
        self._commands: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]] | None] = queue.SimpleQueue()
        self._engines: list[Steppable] = []
        self._thread: threading.Thread | None = None
        self._stopping = False

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="vllm-stepper", daemon=True)
            self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stopping = True
        self._commands.put(None)
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def on_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def submit(self, fn: Callable[[], T]) -> Future[T]:
        """Run ``fn`` on the stepper thread between steps."""
        if not self.alive:
            raise RuntimeError("the vLLM stepper thread is not running")
        future: Future[T] = Future()
        self._commands.put((fn, future))
        return future

    async def call(self, fn: Callable[[], T]) -> T:
        return await asyncio.wrap_future(self.submit(fn))

    def attach(self, engine: Steppable) -> None:
        """Call on the stepper thread: ``engine`` is stepped from now on."""
        self._engines.append(engine)

    def detach(self, engine: Steppable) -> None:
        if engine in self._engines:
            self._engines.remove(engine)

    def _run(self) -> None:
        while not self._stopping:
            busy = [e for e in self._engines if e.busy()]
            self._drain(block=not busy)
            for engine in busy:
                if engine not in self._engines:
                    continue
                try:
                    engine.step_once()
                except Exception as exc:  # one engine failing never stops the others
                    log.exception("vLLM engine step failed")
                    self.detach(engine)
                    engine.step_failed(exc)

    def _drain(self, block: bool) -> None:
        try:
            item = self._commands.get(timeout=self.idle_wait_s) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while item is not None:
            fn, future = item
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as exc:
                    future.set_exception(exc)
            try:
                item = self._commands.get_nowait()
            except queue.Empty:
                return
