"""Live estimates of one engine's speed, for the router's latency predictions.

All sizes share each step, so a step's time is split between sizes by their share of its work
(tokens x parameters, i.e. FLOPs). Decode step time is kept per batch-size bucket (powers of two)
from steps that ran no prompt tokens, as the router predicts ``max_tokens`` such steps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

ALPHA = 0.2  # weight of the newest sample in each exponential moving average


def _ema(old: float | None, new: float) -> float:
    return new if old is None else (1 - ALPHA) * old + ALPHA * new


class LoadEstimates:
    def __init__(self, params: Sequence[int]) -> None:
        self.params = list(params)
        self._prefill: list[float | None] = [None] * len(self.params)  # tokens/s per size
        self._decode: dict[int, float] = {}  # batch bucket -> seconds per step
        self.steps = 0

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
        if not any(prefill):
            bucket = _bucket(sum(decode))
            self._decode[bucket] = _ema(self._decode.get(bucket), seconds)

    def prefill_tokens_per_s(self, size: int) -> float | None:
        return self._prefill[size]

    def decode_step_s(self, batch: int) -> float | None:
        """Seconds per decode step at ``batch`` running requests (nearest measured bucket, scaled
        linearly in batch above it: a lower bound's guess, not a measurement)."""
        if not self._decode:
            return None
        b = _bucket(batch)
        if b in self._decode:
            return self._decode[b]
        nearest = min(self._decode, key=lambda k: abs(math.log2(k) - math.log2(b)))
        return self._decode[nearest] * max(1.0, b / nearest)


def _bucket(batch: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(batch, 1))))
