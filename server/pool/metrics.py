"""Prometheus metrics of the tier pool, on the gateway's registry (prefix ``boomerang_``, ``size`` label)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class PoolMetrics:
    """Replicas per size, scale events, restarts, evictions and the memory reserved against the budget."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry or CollectorRegistry()
        self.registry = r
        self.replicas = Gauge("boomerang_replicas", "Running replicas of a size", ["size"], registry=r)
        self.replicas_starting = Gauge(
            "boomerang_replicas_starting", "Replicas of a size being started", ["size"], registry=r
        )
        self.scale_events = Counter(
            "boomerang_scale_events", "Replicas started or stopped, by direction and reason", ["size", "direction",
            "reason"], registry=r,
        )  # fmt: skip
        self.restarts = Counter("boomerang_replica_restarts", "Failed replicas replaced", ["size"], registry=r)
        self.evictions = Counter(
            "boomerang_evictions", "Idle replicas stopped to make room for another size", ["size"], registry=r
        )
        self.reserved_bytes = Gauge(
            "boomerang_pool_reserved_bytes", "Memory reserved by a size's replicas (KV cache + overhead)", ["size"],
            registry=r,
        )  # fmt: skip
        self.budget_bytes = Gauge(
            "boomerang_pool_memory_budget_bytes", "The pool's memory budget (0: none)", registry=r
        )

    def scaled(self, size: str, direction: str, reason: str) -> None:
        self.scale_events.labels(size, direction, reason).inc()

    def restarted(self, size: str) -> None:
        self.restarts.labels(size).inc()

    def evicted(self, size: str) -> None:
        self.evictions.labels(size).inc()

    def replicas_now(self, size: str, running: int, starting: int) -> None:
        self.replicas.labels(size).set(running)
        self.replicas_starting.labels(size).set(starting)

    def reserved(self, size: str, nbytes: int) -> None:
        self.reserved_bytes.labels(size).set(nbytes)

    def budget(self, nbytes: int | None) -> None:
        self.budget_bytes.set(nbytes or 0)
