"""Live estimates of one engine's speed, for the router's latency predictions.

All sizes share each step, so a step's time is split between sizes by their share of its work
(tokens x parameters, i.e. FLOPs). Decode step time is kept per batch-size bucket (powers of two)
from steps that ran no prompt tokens; the token gap (every step with decode rows, newcomers' prompt
tokens included) is what a running request waits per token under the current arrival rate.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Sequence

ALPHA = 0.2  # weight of the newest sample in each exponential moving average
GAP_ALPHA = 0.05  # ... of the token gap, which swings from step to step with newcomers' prompts
PEAK_WINDOW_S = 30.0  # how far back the batch a new request will decode in is forecast from


def _ema(old: float | None, new: float, alpha: float = ALPHA) -> float:
    return new if old is None else (1 - alpha) * old + alpha * new


class LoadEstimates:
    def __init__(self, params: Sequence[int]) -> None:
        self.params = list(params)
        self._prefill: list[float | None] = [None] * len(self.params)  # tokens/s per size
        self._decode: dict[int, float] = {}  # batch bucket -> seconds per step
        self._gap: dict[int, float] = {}  # batch bucket -> seconds per step with decode rows, prefill or not
        self.steps = 0
        self._batches: deque[tuple[float, int]] = deque()  # (time, rows running) after each admission round
        self._batches_lock = threading.Lock()  # written by the engine thread, read by the router

    def record(self, sizes: Sequence[int], prefill: Sequence[int], decode: Sequence[int], seconds: float) -> None:
        """One step: per participating size, its prompt tokens and decode rows; ``seconds`` of wall time."""
        self.steps += 1
        if seconds <= 0:
            return
        work = [(p + d) * self.params[s] for s, p, d in zip(sizes, prefill, decode, strict=True)]
        total = sum(work) or 1
        for s, p, w in zip(sizes, prefill, work, strict=True):
            if p > 0 and w > 0:
                self._prefill[s] = _ema(self._prefill[s], p / (seconds * w / total))
        if any(decode):
            bucket = _bucket(sum(decode))
            self._gap[bucket] = _ema(self._gap.get(bucket), seconds, GAP_ALPHA)
            if not any(prefill):
                self._decode[bucket] = _ema(self._decode.get(bucket), seconds)

    def prefill_tokens_per_s(self, size: int) -> float | None:
        return self._prefill[size]

    def decode_step_s(self, batch: int) -> float | None:
        """Seconds per decode step at ``batch`` running requests (nearest measured bucket, scaled
        linearly in batch above it: a lower bound's guess, not a measurement)."""
        return _at(self._decode, batch)

    def token_gap_s(self, batch: int) -> float | None:
        """Seconds between a decoding request's tokens at ``batch`` running requests, counting the
        steps that also prefill newcomers' prompts (as many as the recent arrival rate brought)."""
        return _at(self._gap, batch)

    def note_batch(self, rows: int, now: float | None = None) -> None:
        """The engine runs ``rows`` requests now (after admitting what it could)."""
        now = time.monotonic() if now is None else now
        with self._batches_lock:
            if not self._batches or self._batches[-1][1] != rows:
                self._batches.append((now, rows))
            self._forget(now)

    def recent_peak_batch(self, now: float | None = None) -> int:
        """The most requests the engine ran at once in the last ``PEAK_WINDOW_S`` seconds."""
        now = time.monotonic() if now is None else now
        with self._batches_lock:
            self._forget(now)
            return max((rows for _, rows in self._batches), default=0)

    def _forget(self, now: float) -> None:
        # keep the newest entry older than the window: it is the batch that ran at the window's start
        while len(self._batches) > 1 and self._batches[1][0] < now - PEAK_WINDOW_S:
            self._batches.popleft()


def _at(table: dict[int, float], batch: int) -> float | None:
    """The value at ``batch``'s bucket (nearest measured one, scaled linearly in batch above it)."""
    if not table:
        return None
    b = _bucket(batch)
    if b in table:
        return table[b]
    nearest = min(table, key=lambda k: abs(math.log2(k) - math.log2(b)))
    return table[nearest] * max(1.0, b / nearest)


def _bucket(batch: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(batch, 1))))
