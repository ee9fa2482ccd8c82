"""Choose the size that serves a request: by name (``size`` / ``model: "family:tag"``), by the
request's latency and memory budgets, or automatically against the configured SLO.

Latency is predicted for THIS request from the engine's live per-size estimates::

    queue wait + prefill(prompt tokens) + max_tokens * decode step at the batch it will join

(the batch it will join: today's plus the request or, where the engine forecasts it (the in-process
one), the batch it ran in the last half minute if that was larger, since the arrivals that filled
it fill it again while the request runs)

with priors from the parameter count until the engine has measured a size, scaled by a quantile of
how far the engine's finished requests overran their predictions (``Router.observe``). Dominated sizes are
never chosen by budget or SLO; a client may still name one that the config loads.
"""

from __future__ import annotations

import heapq
import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from boomerang_core.errors import SizeOutOfRange
from boomerang_core.family import Family, FamilySize
from server.config import RoutingConfig
from server.engines.base import Engine, SizeLoad

AUTO = "auto"


class RoutingError(Exception):
    """The router cannot place the request as it was asked; ``param`` is the request field to blame."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class UnknownModel(RoutingError):
    """``model`` names another family."""


class UnknownSize(RoutingError):
    """No loaded size answers to the name, label or fraction (or none is loaded at all)."""


class SizeConflict(RoutingError):
    """The ``model`` tag and the ``size`` field name different sizes."""


class BudgetUnmeetable(RoutingError):
    """No served size meets the request's budgets and the server does not degrade; ``retry_after_s``:
    when the queue in front of the smallest size is predicted to have drained."""

    def __init__(self, message: str, *, param: str | None = None, retry_after_s: float = 1.0) -> None:
        super().__init__(message, param=param)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class RouteRequest:
    size: str | None  # the `size` field or the model tag, as sent
    max_latency_ms: float | None
    max_memory_gb: float | None
    prompt_tokens: int
    max_tokens: int
    n: int = 1


@dataclass(frozen=True)
class Prediction:
    size: FamilySize
    queue_ms: float
    prefill_ms: float
    decode_ms: float
    memory_gb: float  # weights of the size, 1 GB = 1e9 bytes
    load: SizeLoad
    correction: float = 1.0  # the engine's measured actual / predicted, already applied to the times above
    max_tokens: int = 0

    @property
    def latency_ms(self) -> float:
        return self.queue_ms + self.prefill_ms + self.decode_ms

    def explain(self) -> str:
        return (
            f"{self.size.name} ({self.size.label} params, {self.memory_gb:.3g} GB) is predicted at "
            f"{self.latency_ms:.0f} ms (queue {self.queue_ms:.0f} + prefill {self.prefill_ms:.0f} + "
            f"decode {self.decode_ms:.0f}) with {self.load.running} running and {self.load.waiting} waiting "
            "on its engine"
        )


@dataclass(frozen=True)
class Decision:
    size: FamilySize
    reason: str  # named | default | budget | slo | degraded
    prediction: Prediction


def slot_wait_steps(remaining: list[int], waiting: int, n: int, max_batch: int, typical_tokens: int) -> float:
    """Decode steps until ``n`` more requests all hold a batch slot: running requests free theirs
    after their remaining tokens, each of the ``waiting`` ones (first in, first served) takes the
    next free slot for ``typical_tokens`` steps."""
    frees = sorted(max(t, 0) for t in remaining) + [0] * max(max_batch - len(remaining), 0)
    heapq.heapify(frees)
    for _ in range(waiting):
        heapq.heappush(frees, heapq.heappop(frees) + typical_tokens)
    return float(max(heapq.heappop(frees) for _ in range(min(n, len(frees)))))


class Router:
    """Reads live load through ``engines`` (size name -> engine serving it). Its only state is, per
    engine, how far the model's predictions were off on the last requests it served."""

    CORRECTION_RANGE = (0.5, 4.0)

    def __init__(
        self,
        family: Family,
        tiers: Mapping[str, str],
        engines: Mapping[str, Engine],
        config: RoutingConfig,
        *,
        max_batch_size: int,
        typical_tokens: int,
        on_decision: Callable[[str | None, str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        absent: Callable[[], Mapping[str, tuple[int, str]]] | None = None,
    ) -> None:
        self.family = family
        self.tiers = {name.lower(): size for name, size in tiers.items()}
        self.engines = engines
        self.config = config
        self.max_batch_size = max_batch_size
        self.typical_tokens = typical_tokens
        self.on_decision = on_decision or (lambda size, reason: None)
        self.clock = clock
        # size names the family does not serve now -> (their layers, why): still building, or removed by a reload
        self.absent = absent or dict
        # id(engine) -> (finish time, actual / predicted) of its last requests
        self._ratios: dict[int, deque[tuple[float, float]]] = {}

    # --- names --------------------------------------------------------------------------------

    def loaded(self) -> list[FamilySize]:
        """Sizes an engine can serve now, ascending parameters."""
        up = [s for s in self.family.sizes if (e := self.engines.get(s.name)) is not None and s.name in e.sizes]
        return sorted(up, key=lambda s: (s.params, s.k))

    def size_text(self, model: str, size: str | None) -> str | None:
        """The size the client named through ``size`` or the ``model`` tag (``None``: not named)."""
        family = self.family.name
        name, _, tag = model.partition(":")
        if name.lower() != family.lower():
            served = ", ".join([family, *(f"{family}:{s.name}" for s in self.loaded())])
            raise UnknownModel(f"the model '{model}' does not exist; this server serves {served}", param="model")
        if tag and size is not None and tag.strip().lower() != str(size).strip().lower():
            raise SizeConflict(f"the model tag '{tag}' and size '{size}' disagree; send one of them", param="size")
        text = size if size is not None else (tag or None)
        return None if text is None else str(text).strip()

    def resolve(self, text: str) -> FamilySize:
        """A loaded size from a tier name, size name, parameter label or fraction."""
        key = text.lower()
        loaded = self.loaded()
        if key in self.tiers:
            return self.family.by_name(self.tiers[key])
        try:
            wanted = self.family.resolve(key)
        except SizeOutOfRange as exc:
            missing = self.absent().get(key)
            if missing is None:
                raise UnknownSize(f"{exc}. {self._served_text(loaded)}", param="size") from None
            layers, why = missing
            if self.config.missing_size == "error" or not loaded:
                raise UnknownSize(f"size {key} is not served now: {why}. {self._served_text(loaded)}",
                                  param="size") from None  # fmt: skip
            return self.nearest(layers)
        if wanted in loaded:
            return wanted
        if key == wanted.name:
            why = "is dominated (larger and no better than a smaller size)" if wanted.dominated else "is not loaded"
            message = f"size {wanted.name} {why}. {self._served_text(loaded)}"
            raise UnknownSize(message, param="size")
        below = [s for s in loaded if not s.dominated and s.params <= wanted.params]
        if not below:
            raise UnknownSize(f"no loaded size is at most '{text}'. {self._served_text(loaded)}", param="size")
        return below[-1]

    def nearest(self, layers: int) -> FamilySize:
        """The served size whose layer count is nearest ``layers`` (the smaller one on a tie)."""
        served = [s for s in self.loaded() if not s.dominated] or self.loaded()
        return min(served, key=lambda s: (abs(s.num_layers - layers), s.num_layers))

    def _served_text(self, loaded: list[FamilySize]) -> str:
        names = ", ".join(f"{s.name} ({s.label})" for s in loaded) or "none"
        tiers = ", ".join(sorted(self.tiers)) or "none"
        return f"Served sizes: {names}; tier names: {tiers}; or 'auto', a parameter label, or a fraction in (0, 1]"

    # --- prediction ---------------------------------------------------------------------------

    def predict(self, size: FamilySize, prompt_tokens: int, max_tokens: int, n: int = 1) -> Prediction:
        """Sizes served by one engine share its batch: the queue is counted over all of them, and
        the decode step is the engine's current step grown by this request's share of the work
        (rows x parameters), so a larger size costs more to add to a busy batch."""
        engine = self.engines.get(size.name)
        peers = [(s, engine.load(s.name)) for s in self.family.sizes if engine is not None
                 and self.engines.get(s.name) is engine]  # fmt: skip
        load = next((p for s, p in peers if s.name == size.name), SizeLoad())
        running = sum(p.running for _, p in peers)
        waiting = sum(p.waiting for _, p in peers)
        work = sum(p.running * s.params for s, p in peers)
        cfg = self.config
        step = load.decode_step_s
        if step is None:
            step = size.bytes / cfg.prior_bytes_per_s + cfg.prior_step_overhead_ms / 1e3
        step_after = step * (work + n * size.params) / work if work else step
        if load.decode_step_expected_s is not None:  # the batch will be as full as it recently was
            step_after = max(step_after, load.decode_step_expected_s)
            step = max(step, load.decode_step_expected_s)  # ... and so are the steps that free a slot
        prefill_tps = load.prefill_tokens_per_s or cfg.prior_flops_per_s / (2 * size.params)
        queue_s = waiting * prompt_tokens / prefill_tps  # prompts queued before ours, about as long
        over = running + waiting + n - self.max_batch_size
        reported = [p.remaining_tokens for _, p in peers]
        remaining = [t for r in reported for t in (r or ())]
        if over > 0 and None not in reported and len(remaining) == running:
            # the engine says how long each running request may still take: the slots free in that
            # order (a batch filled in one burst frees nothing until its requests end together)
            queue_s += slot_wait_steps(remaining, waiting, n, self.max_batch_size, self.typical_tokens) * step
        elif over > 0:
            # A full batch frees a slot every typical_tokens / max_batch_size steps (its requests are
            # staggered over their lengths, and each admitted one holds its slot for a whole length),
            # so the over-th slot to free comes after (over - 1/2) of those intervals.
            queue_s += self.typical_tokens * (over - 0.5) / self.max_batch_size * step
        # an idle engine is never refused for what load did to earlier requests: nothing runs beside
        # this one, and the request it serves measures the engine again (with every request refused,
        # the correction could otherwise never come down)
        c = self.correction(engine) if running + waiting else 1.0
        return Prediction(
            size=size,
            queue_ms=queue_s * 1e3 * c,
            prefill_ms=n * prompt_tokens / prefill_tps * 1e3 * c,
            decode_ms=max_tokens * step_after * 1e3 * c,
            memory_gb=size.bytes / 1e9,
            load=replace(load, running=running, waiting=waiting),
            correction=c,
            max_tokens=max_tokens,
        )

    def correction(self, engine: Engine | None) -> float:
        """The ``latency_quantile`` of actual / predicted latency over the last ``correction_window``
        requests this engine finished in the last ``correction_window_s`` (1 without any)."""
        window = self._ratios.get(id(engine)) if engine is not None else None
        if not window:
            return 1.0
        horizon = self.clock() - self.config.correction_window_s
        while window and window[0][0] < horizon:
            window.popleft()
        if not window:
            return 1.0
        ranked = sorted(r for _, r in window)  # nearest rank: latency_quantile of the window is at or below it
        return ranked[max(math.ceil(self.config.latency_quantile * len(ranked)) - 1, 0)]

    def observe(self, decision: Decision, completion_tokens: int, actual_ms: float) -> None:
        """A request routed by ``decision`` finished in ``actual_ms`` with ``completion_tokens`` tokens.

        The model's queue and decode terms leave out what it cannot see (prefill of requests admitted
        later, engine overhead per step, a busy machine); this closes the loop on the engine's own
        record. A budget is a promise about the tail, not the median: requests admitted later grow the
        batch of one already running, so the same prediction comes true for some requests and runs
        30% over for others. The correction is therefore a high quantile (``latency_quantile``) of
        actual / predicted over the engine's last ``correction_window`` requests, so that a request
        predicted at its budget meets it that often. The prediction is taken for the tokens really
        generated (a reply that ended early is not counted as a fast one)."""
        engine = self.engines.get(decision.size.name)
        p = decision.prediction
        if engine is None or actual_ms <= 0:
            return
        per_token = p.decode_ms / p.max_tokens if p.max_tokens else 0.0
        predicted = (p.queue_ms + p.prefill_ms + per_token * completion_tokens) / p.correction
        if predicted <= 0:
            return
        lo, hi = self.CORRECTION_RANGE
        window = self._ratios.setdefault(id(engine), deque(maxlen=self.config.correction_window))
        window.append((self.clock(), min(max(actual_ms / predicted, lo), hi)))

    # --- choice -------------------------------------------------------------------------------

    def choose(self, request: RouteRequest) -> Decision:
        try:
            decision = self._choose(request)
        except BudgetUnmeetable:
            self.on_decision(None, "rejected")
            raise
        self.on_decision(decision.size.name, decision.reason)
        return decision

    def _choose(self, req: RouteRequest) -> Decision:
        loaded = self.loaded()
        if not loaded:
            raise UnknownSize("no size is loaded", param="size")

        def predict(s: FamilySize) -> Prediction:
            return self.predict(s, req.prompt_tokens, req.max_tokens, req.n)

        text = req.size if req.size is not None else self.config.default_size
        reason = "named" if req.size is not None else "default"
        budgets = req.max_latency_ms is not None or req.max_memory_gb is not None
        if text.lower() != AUTO:
            named = self.resolve(text)
            if text.lower() in self.absent() and text.lower() not in self.tiers:
                reason = "nearest"  # the size named is not served now (building, or removed by a reload)
            first = predict(named)
            if not budgets or self._fits(first, req.max_latency_ms, req.max_memory_gb):
                return Decision(named, reason, first)
            smaller = [s for s in loaded if not s.dominated and s.params < named.params]
            return self._largest_fitting(smaller, req, predict, "budget", first)
        latency = req.max_latency_ms if req.max_latency_ms is not None else self.config.slo_ms
        candidates = [s for s in loaded if not s.dominated] or loaded
        for size in reversed(candidates):
            p = predict(size)
            if self._fits(p, latency, req.max_memory_gb):
                return Decision(size, "budget" if budgets else "slo", p)
        if not budgets:  # only the server's own SLO is missed: serve the smallest, never refuse
            return Decision(candidates[0], "degraded", predict(candidates[0]))
        return self._largest_fitting([], req, predict, "budget", predict(candidates[-1]), candidates[0])

    def _largest_fitting(
        self,
        sizes: list[FamilySize],
        req: RouteRequest,
        predict: Callable[[FamilySize], Prediction],
        reason: str,
        best_missed: Prediction,
        smallest: FamilySize | None = None,
    ) -> Decision:
        for size in reversed(sizes):
            p = predict(size)
            if self._fits(p, req.max_latency_ms, req.max_memory_gb):
                return Decision(size, reason, p)
        loaded = [s for s in self.loaded() if not s.dominated] or self.loaded()
        smallest = smallest or loaded[0]
        fallback = predict(smallest)
        if self.config.allow_degrade:
            return Decision(smallest, "degraded", fallback)
        raise BudgetUnmeetable(
            f"no served size meets {self._budget_text(req)}: even the smallest, {fallback.explain()}; "
            f"the largest candidate, {best_missed.explain()}. This server does not degrade "
            "(routing.allow_degrade is false): relax the budgets or retry when the load is lower",
            param="max_latency_ms" if req.max_latency_ms is not None else "max_memory_gb",
            retry_after_s=max(1.0, fallback.queue_ms / 1e3),
        )

    @staticmethod
    def _fits(p: Prediction, max_latency_ms: float | None, max_memory_gb: float | None) -> bool:
        if max_latency_ms is not None and p.latency_ms > max_latency_ms:
            return False
        return max_memory_gb is None or p.memory_gb <= max_memory_gb

    @staticmethod
    def _budget_text(req: RouteRequest) -> str:
        parts = []
        if req.max_latency_ms is not None:
            parts.append(f"max_latency_ms={req.max_latency_ms:g}")
        if req.max_memory_gb is not None:
            parts.append(f"max_memory_gb={req.max_memory_gb:g}")
        return " and ".join(parts)
