"""The tier pool: replicas per size inside a memory budget, started on demand, scaled and restarted.

Memory is reserved BEFORE a replica starts: the store's resident bytes once, plus each replica's
own cost (KV cache + engine overhead; a remote replica costs nothing here), and the total never
passes the budget. When a size needs a replica and there is no room, the least recently used idle
size gives one back (never below its ``min_replicas``), like Ollama's keep-alive. A scaler task adds
replicas while a size's queue per replica passes the target (or its time to first token passes the
SLO) and removes them after an idle timeout. A replica that fails is replaced; a request that got no
token yet is retried on another replica, one that did ends with an error. A tier whose replicas are
OpenAI servers (``forwards``) also takes requests as the client sent them (:meth:`TierPool.forward`),
retried on another replica while the worker has answered nothing (unreachable, failed, or busy).
Runs on the event loop; replicas do their blocking work on their own threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

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
)
from server.pool.metrics import PoolMetrics

log = logging.getLogger(__name__)
_GB = 1e9


class PoolBudgetError(EngineError):
    """The memory budget cannot hold what the configuration asks for."""


@dataclass(frozen=True)
class TierSpec:
    """How the pool runs one size: ``make`` builds an unstarted replica that costs ``replica_bytes``.
    ``forwards``: the replicas are OpenAI servers (:class:`Forwarding`), and requests are forwarded to
    them as the client sent them."""

    size: str
    kind: str
    make: Callable[[], Engine]
    replica_bytes: int
    min_replicas: int = 1
    max_replicas: int = 1
    forwards: bool = False


@dataclass(eq=False)
class _Tier:
    spec: TierSpec
    replicas: list[Engine] = field(default_factory=list)
    starting: int = 0
    waiting: int = 0  # requests in the pool waiting for a replica
    last_used: float = field(default_factory=time.monotonic)
    ttft_s: float | None = None  # moving average of time to first token, seconds
    start_failures: int = 0  # replica starts that failed, ever
    start_error: str | None = None  # why the last one failed

    def in_flight(self) -> int:
        return self.waiting + sum(_busy(r, self.spec.size) for r in self.replicas)

    def queued(self) -> int:
        return self.waiting + sum(r.load(self.spec.size).waiting for r in self.replicas)


def _busy(replica: Engine, size: str) -> int:
    load = replica.load(size)
    return load.running + load.waiting


class TierPool(Engine, Forwarding):
    """Meets the :class:`Engine` contract for every size it holds; ``base_bytes`` is the store's
    resident bytes (counted once), ``budget_bytes`` the limit (``None``: none)."""

    def __init__(
        self,
        tiers: Sequence[TierSpec],
        *,
        base_bytes: int,
        budget_bytes: int | None,
        queue_depth_target: int = 4,
        idle_timeout_s: float = 300.0,
        scale_interval_s: float = 1.0,
        slo_s: float | None = None,
        start_timeout_s: float = 600.0,
        metrics: PoolMetrics | None = None,
        local: Engine | None = None,
        local_sizes: Sequence[str] = (),
        on_stop: Sequence[Callable[[], None]] = (),
    ) -> None:
        self._tiers = {t.size: _Tier(t) for t in tiers}
        self.local = local  # the in-process engine for ``local`` tiers: one engine, no replicas
        self.local_sizes = tuple(local_sizes)
        self._on_stop = tuple(on_stop)
        self.base_bytes = base_bytes
        self.budget_bytes = budget_bytes
        self.queue_depth_target = queue_depth_target
        self.idle_timeout_s = idle_timeout_s
        self.scale_interval_s = scale_interval_s
        self.slo_s = slo_s
        self.start_timeout_s = start_timeout_s
        self.metrics = metrics or PoolMetrics()
        self._changed = asyncio.Condition()
        self._scaler: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._running = False

    # --- budget -------------------------------------------------------------------------------

    def reserved_bytes(self) -> int:
        return self.base_bytes + sum(
            (len(t.replicas) + t.starting) * t.spec.replica_bytes for t in self._tiers.values()
        )

    def _fits(self, extra: int) -> bool:
        return self.budget_bytes is None or self.reserved_bytes() + extra <= self.budget_bytes

    def check_budget(self) -> None:
        """Refuse at start-up a budget that cannot hold the minimum replicas, or any replica at all."""
        if self.budget_bytes is None:
            return
        need = sum(t.spec.min_replicas * t.spec.replica_bytes for t in self._tiers.values())
        smallest = min((t.spec.replica_bytes for t in self._tiers.values()), default=0)
        budget, base = self.budget_bytes / _GB, self.base_bytes / _GB
        if self.base_bytes + max(need, smallest) > self.budget_bytes:
            parts = ", ".join(
                f"{t.spec.size}: {t.spec.min_replicas} x {t.spec.replica_bytes / _GB:.3f} GB"
                for t in self._tiers.values()
            )
            raise PoolBudgetError(
                f"pool.memory_budget_gb={budget:.3f} is too small: the layer store needs {base:.3f} GB, the "
                f"minimum replicas {need / _GB:.3f} GB ({parts}) and the smallest replica "
                f"{smallest / _GB:.3f} GB; at least {(self.base_bytes + max(need, smallest)) / _GB:.3f} GB is needed"
            )

    # --- lifecycle ----------------------------------------------------------------------------

    @property
    def sizes(self) -> tuple[str, ...]:
        local = self.local.sizes if self.local is not None else ()
        return (*local, *self._tiers) if self._running else ()

    async def start(self) -> None:
        self.check_budget()
        self.metrics.budget(self.budget_bytes)
        self._running = True
        try:
            if self.local is not None:
                await self.local.start()
            for tier in self._tiers.values():
                for _ in range(tier.spec.min_replicas):
                    await self._start_replica(tier, reason="min")
        except BaseException:
            await self.stop()
            raise
        self._scaler = asyncio.create_task(self._scale_loop())

    async def stop(self) -> None:
        self._running = False
        tasks = [t for t in (self._scaler, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for tier in self._tiers.values():
            replicas, tier.replicas = tier.replicas, []
            for replica in replicas:
                with contextlib.suppress(Exception):
                    await replica.stop()
            self._publish(tier)
        if self.local is not None:
            with contextlib.suppress(Exception):
                await self.local.stop()
        for callback in self._on_stop:
            with contextlib.suppress(Exception):
                callback()

    def healthy(self) -> bool:
        return self._running and (self.local is None or self.local.healthy())

    def load(self, size: str) -> SizeLoad:
        tier = self._tiers.get(size)
        if tier is None:
            return self.local.load(size) if self.local is not None and size in self.local_sizes else SizeLoad()
        running = sum(r.load(size).running for r in tier.replicas)
        return SizeLoad(running=running, waiting=tier.queued())

    def replicas(self, size: str) -> list[Engine]:
        return list(self._tiers[size].replicas)

    async def abort(self, request_id: str) -> None:
        if self.local is not None:
            await self.local.abort(request_id)
        for tier in self._tiers.values():
            for replica in tier.replicas:
                await replica.abort(request_id)

    # --- requests -----------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:  # type: ignore[override]
        tier = self._tiers.get(request.size)
        if tier is None and self.local is not None and request.size in self.local_sizes:
            async for event in self.local.generate(request):
                yield event
            return
        if tier is None:
            raise EngineError(f"the pool does not hold size {request.size}")
        arrived = time.perf_counter()
        for attempt in range(3):
            replica = await self._acquire(tier)
            got_token = False
            try:
                async for event in replica.generate(request):
                    if not got_token:
                        got_token = True
                        self._observe_ttft(tier, time.perf_counter() - arrived)
                    yield event
                return
            except (QueueFull, RequestRejected):  # busy, or the request itself is wrong: no other replica helps
                raise
            except EngineError:
                if got_token or attempt == 2:
                    raise
                log.warning("replica of %s failed before its first token; retrying", request.size)
                self._replace_soon(tier, replica)
            finally:
                tier.last_used = time.monotonic()

    def forwards(self, size: str) -> bool:
        tier = self._tiers.get(size)
        return tier is not None and tier.spec.forwards

    @contextlib.asynccontextmanager
    async def forward(
        self, size: str, endpoint: str, body: dict[str, Any], headers: Mapping[str, str]
    ) -> AsyncIterator[Forwarded]:
        """The answer of a replica of ``size``; one that cannot be reached, fails, or is busy before it
        answers is passed over for another (a failed one is replaced, as in :meth:`generate`)."""
        tier = self._tiers.get(size)
        if tier is None or not tier.spec.forwards:
            raise EngineError(f"the pool does not forward size {size}")
        arrived = time.perf_counter()
        for attempt in range(3):
            replica = await self._acquire(tier)
            assert isinstance(replica, Forwarding), f"a replica of {size} cannot forward"
            try:
                async with contextlib.AsyncExitStack() as stack:
                    try:
                        answer = await stack.enter_async_context(replica.forward(size, endpoint, body, headers))
                    except QueueFull:
                        if attempt == 2 or not any(r is not replica and r.healthy() for r in tier.replicas):
                            raise
                        continue
                    except EngineError:
                        if attempt == 2:
                            raise
                        log.warning("replica of %s failed before answering; retrying", size)
                        self._replace_soon(tier, replica)
                        continue
                    yield Forwarded(answer.status, answer.headers, self._timed(tier, arrived, answer.body))
                    return
            finally:
                tier.last_used = time.monotonic()

    async def _timed(self, tier: _Tier, arrived: float, body: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """``body``, observing the time to its first bytes as the tier's time to first token."""
        first = True
        async for chunk in body:
            if first:
                first = False
                self._observe_ttft(tier, time.perf_counter() - arrived)
            yield chunk

    def _observe_ttft(self, tier: _Tier, seconds: float) -> None:
        tier.ttft_s = seconds if tier.ttft_s is None else 0.8 * tier.ttft_s + 0.2 * seconds

    async def _acquire(self, tier: _Tier) -> Engine:
        """A healthy replica of the tier (least busy), starting one on demand; waits meanwhile."""
        deadline = time.monotonic() + self.start_timeout_s
        failures = tier.start_failures
        tier.waiting += 1
        tier.last_used = time.monotonic()
        try:
            while True:
                healthy = [r for r in tier.replicas if r.healthy()]
                if healthy:
                    return min(healthy, key=lambda r: _busy(r, tier.spec.size))
                if tier.start_failures > failures:  # a start we waited on failed: say so, do not wait on
                    raise EngineError(f"no replica of size {tier.spec.size} could start: {tier.start_error}")
                if tier.starting == 0:
                    if not await self._make_room(tier):
                        raise QueueFull(self._no_room_text(tier), retry_after_s=max(1.0, self.scale_interval_s))
                    self._spawn(self._start_replica(tier, reason="demand"))
                left = deadline - time.monotonic()
                if left <= 0:
                    raise EngineError(f"no replica of size {tier.spec.size} became ready in {self.start_timeout_s:g} s")
                async with self._changed:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._changed.wait(), timeout=min(left, 1.0))
        finally:
            tier.waiting -= 1

    def _no_room_text(self, tier: _Tier) -> str:
        budget = (self.budget_bytes or 0) / _GB
        return (
            f"size {tier.spec.size} needs {tier.spec.replica_bytes / _GB:.3f} GB for a replica, but "
            f"{self.reserved_bytes() / _GB:.3f} GB of the {budget:.3f} GB memory budget are held by sizes in use"
        )

    # --- replicas -----------------------------------------------------------------------------

    async def _start_replica(self, tier: _Tier, reason: str) -> None:
        if not self._fits(tier.spec.replica_bytes):
            raise PoolBudgetError(self._no_room_text(tier))
        tier.starting += 1
        replica = tier.spec.make()
        try:
            await replica.start()
        except BaseException as exc:
            tier.starting -= 1
            if not isinstance(exc, asyncio.CancelledError):
                tier.start_failures += 1
                tier.start_error = f"{type(exc).__name__}: {exc}"
            await self._notify(tier)
            raise
        tier.starting -= 1
        tier.start_error = None
        tier.replicas.append(replica)
        self.metrics.scaled(tier.spec.size, "up", reason)
        log.info("size %s: replica started (%s), %d running", tier.spec.size, reason, len(tier.replicas))
        await self._notify(tier)

    async def _stop_replica(self, tier: _Tier, replica: Engine, reason: str) -> None:
        if replica in tier.replicas:
            tier.replicas.remove(replica)
            self.metrics.scaled(tier.spec.size, "down", reason)
        await self._notify(tier)
        try:
            await replica.stop()
        except Exception:
            log.exception("stopping a replica of %s failed", tier.spec.size)

    async def _notify(self, tier: _Tier) -> None:
        self._publish(tier)
        async with self._changed:
            self._changed.notify_all()

    def _publish(self, tier: _Tier) -> None:
        self.metrics.replicas_now(tier.spec.size, len(tier.replicas), tier.starting)
        self.metrics.reserved(tier.spec.size, (len(tier.replicas) + tier.starting) * tier.spec.replica_bytes)

    def _replace_soon(self, tier: _Tier, replica: Engine) -> None:
        if replica in tier.replicas:
            tier.replicas.remove(replica)
            self._spawn(self._replace(tier, replica))

    async def _replace(self, tier: _Tier, dead: Engine) -> None:
        """Stop a failed replica and start another in its place (same reservation), unless the tier
        already has its minimum (at least one) running or starting: the scaler adds more under load."""
        self.metrics.restarted(tier.spec.size)
        with contextlib.suppress(Exception):
            await dead.stop()
        await self._notify(tier)
        if len(tier.replicas) + tier.starting >= max(1, tier.spec.min_replicas):
            return  # a request waiting for the tier already started one
        try:
            await self._start_replica(tier, reason="restart")
        except Exception:
            log.exception("restarting a replica of %s failed", tier.spec.size)

    def _spawn(self, coro: object) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _make_room(self, tier: _Tier) -> bool:
        """Free memory for one replica of ``tier`` by stopping least recently used idle replicas."""
        need = tier.spec.replica_bytes
        while not self._fits(need):
            victims = [
                t for t in self._tiers.values()
                if t is not tier and len(t.replicas) > t.spec.min_replicas and t.in_flight() == 0 and t.starting == 0
            ]  # fmt: skip
            if not victims:
                return False
            victim = min(victims, key=lambda t: t.last_used)
            self.metrics.evicted(victim.spec.size)
            log.info("evicting an idle replica of %s to make room for %s", victim.spec.size, tier.spec.size)
            await self._stop_replica(victim, victim.replicas[-1], reason="evict")
        return True

    # --- scaling ------------------------------------------------------------------------------

    async def _scale_loop(self) -> None:
        while self._running:
            await asyncio.sleep(self.scale_interval_s)
            try:
                await self.scale_once()
            except Exception:
                log.exception("scaling pass failed")

    async def scale_once(self) -> None:
        """One pass: replace dead replicas, scale up queued sizes, scale down idle ones."""
        now = time.monotonic()
        for tier in self._tiers.values():
            for replica in [r for r in tier.replicas if not r.healthy()]:
                self._replace_soon(tier, replica)
            count = len(tier.replicas) + tier.starting
            per_replica = tier.queued() / max(1, count)
            slow = self.slo_s is not None and tier.ttft_s is not None and tier.ttft_s > self.slo_s and tier.waiting > 0
            wants_more = count and count < tier.spec.max_replicas and (per_replica > self.queue_depth_target or slow)
            if wants_more and await self._make_room(tier):
                self._spawn(self._start_replica(tier, reason="load"))
                continue
            idle = tier.in_flight() == 0 and now - tier.last_used > self.idle_timeout_s
            if idle and len(tier.replicas) > tier.spec.min_replicas and tier.starting == 0:
                await self._stop_replica(tier, tier.replicas[-1], reason="idle")
                tier.last_used = now  # one replica per idle timeout
