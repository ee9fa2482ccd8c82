"""Prometheus metrics, on the gateway's own registry, prefix ``boomerang_``.

Every per-request series carries a ``size`` label (the size that served it, or ``none`` when the
request failed before a size was chosen). Gauges of live load are refreshed at scrape time from
the engines, so they can never drift from what the engines report.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from server.engines.base import Engine
from server.pool.metrics import PoolMetrics

NO_SIZE = "none"

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)
_TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384)


class GatewayMetrics:
    """The metric definitions and the few calls the API layer makes at request boundaries."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "boomerang_requests", "Finished requests by endpoint and HTTP status", ["size", "endpoint", "status"],
            registry=r,
        )  # fmt: skip
        self.prompt_tokens = Counter("boomerang_prompt_tokens", "Prompt tokens processed", ["size"], registry=r)
        self.generation_tokens = Counter("boomerang_generation_tokens", "Tokens generated", ["size"], registry=r)
        self.request_prompt_tokens = Histogram(
            "boomerang_request_prompt_tokens", "Prompt tokens per request", ["size"], buckets=_TOKEN_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.request_generation_tokens = Histogram(
            "boomerang_request_generation_tokens", "Generated tokens per request", ["size"], buckets=_TOKEN_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.ttft = Histogram(
            "boomerang_time_to_first_token_seconds", "Time from request to first token", ["size"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.itl = Histogram(
            "boomerang_inter_token_latency_seconds", "Time between consecutive tokens of one request", ["size"],
            buckets=_ITL_BUCKETS, registry=r,
        )  # fmt: skip
        self.e2e = Histogram(
            "boomerang_e2e_request_latency_seconds", "Time from request to last token", ["size"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_time = Histogram(
            "boomerang_queue_time_seconds", "Time a request waited in the engine queue before its prefill",
            ["size"], buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.running = Gauge("boomerang_running_requests", "Requests in the running batch", ["size"], registry=r)
        self.waiting = Gauge("boomerang_waiting_requests", "Requests waiting for a batch slot", ["size"], registry=r)
        self.router_decisions = Counter(
            "boomerang_router_decisions", "Size choices by reason", ["size", "reason"], registry=r
        )
        self.size_loaded = Gauge("boomerang_size_loaded", "1 when a size can be served now", ["size"], registry=r)
        self.sizes_loaded = Gauge("boomerang_sizes_loaded", "Number of sizes that can be served now", registry=r)
        self.resident_weight_bytes = Gauge(
            "boomerang_resident_weight_bytes", "Bytes of weights held once for every size", registry=r
        )
        self.size_weight_bytes = Gauge(
            "boomerang_size_weight_bytes", "Weight bytes a size would hold as its own checkpoint", ["size"], registry=r
        )
        self.build_stage = Gauge(
            "boomerang_family_build_stage", "1 for the stage the family's background build is in", ["stage"], registry=r
        )
        self.build_progress = Gauge(
            "boomerang_family_build_progress", "Fraction of the family's background build done", registry=r
        )
        self.build_eta = Gauge(
            "boomerang_family_build_eta_seconds", "Seconds the family's background build expects to need", registry=r
        )
        self.reloads = Counter(
            "boomerang_family_reloads", "Family loads after the first, by result (swapped or refused)", ["result"],
            registry=r,
        )  # fmt: skip
        self._pool: PoolMetrics | None = None

    @property
    def pool(self) -> PoolMetrics:
        """The tier pool's metrics on this registry, made once: every family the process loads reports
        to the same series."""
        if self._pool is None:
            self._pool = PoolMetrics(self.registry)
        return self._pool

    # --- request boundary ---------------------------------------------------------------------

    def finished(self, size: str | None, endpoint: str, status: int) -> None:
        self.requests.labels(size or NO_SIZE, endpoint, str(status)).inc()

    def choice_done(
        self,
        size: str,
        *,
        prompt_tokens: int,
        completion_tokens: int,
        ttft_s: float | None,
        e2e_s: float,
        token_gaps_s: list[float],
        queue_s: float | None,
    ) -> None:
        """One engine request (one choice) completed."""
        self.prompt_tokens.labels(size).inc(prompt_tokens)
        self.generation_tokens.labels(size).inc(completion_tokens)
        self.request_prompt_tokens.labels(size).observe(prompt_tokens)
        self.request_generation_tokens.labels(size).observe(completion_tokens)
        if ttft_s is not None:
            self.ttft.labels(size).observe(ttft_s)
        self.e2e.labels(size).observe(e2e_s)
        itl = self.itl.labels(size)
        for gap in token_gaps_s:
            itl.observe(gap)
        if queue_s is not None:
            self.queue_time.labels(size).observe(queue_s)

    def decision(self, size: str | None, reason: str) -> None:
        self.router_decisions.labels(size or NO_SIZE, reason).inc()

    # --- scrape -------------------------------------------------------------------------------

    def set_weights(self, resident_bytes: int, size_bytes: Mapping[str, int]) -> None:
        self.resident_weight_bytes.set(resident_bytes)
        for size, nbytes in size_bytes.items():
            self.size_weight_bytes.labels(size).set(nbytes)

    def build(self, stage: str, stages: list[str], progress: float, eta_s: float | None) -> None:
        for name in {*stages, "done", "failed", stage}:
            self.build_stage.labels(name).set(1 if name == stage else 0)
        self.build_progress.set(progress)
        self.build_eta.set(eta_s if eta_s is not None else float("nan"))

    def forget_sizes(self, sizes: list[str]) -> None:
        """Drop the live gauges of sizes a reload removed (their counters and histograms stay)."""
        for size in sizes:
            for gauge in (self.size_loaded, self.running, self.waiting, self.size_weight_bytes):
                with contextlib.suppress(KeyError):
                    gauge.remove(size)

    def refresh(self, engines: Mapping[str, Engine], all_sizes: list[str]) -> None:
        """Live gauges from the engines (``engines`` maps size name -> engine serving it)."""
        loaded = 0
        for size in all_sizes:
            engine = engines.get(size)
            up = engine is not None and engine.healthy() and size in engine.sizes
            self.size_loaded.labels(size).set(1 if up else 0)
            loaded += up
            if engine is not None:
                load = engine.load(size)
                self.running.labels(size).set(load.running)
                self.waiting.labels(size).set(load.waiting)
        self.sizes_loaded.set(loaded)

    def render(self) -> bytes:
        return generate_latest(self.registry)
