"""Token choice for a batch of requests, each with its own sampling parameters and random stream.

Every request owns a ``torch.Generator`` seeded from its ``seed`` (or from fresh entropy), and each
row is sampled with its own generator, so a seeded request gives the same tokens whatever else
shares its batch. Logprobs are those of the model's raw distribution (log_softmax of the logits,
before penalties, temperature, top-k and top-p), as vLLM and OpenAI report them.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from server.engines.base import SamplingParams, TokenLogprob
from server.engines.local.grammar import Constraint, mask_rows


class RequestSampler:
    """Per-request sampling state: parameters, random stream, counts of generated tokens (OpenAI
    penalties count only the completion), and for vLLM's extras the tokens seen in prompt and output
    (``repetition_penalty``), the ids ``min_tokens`` holds back and the ``logit_bias``; for structured
    outputs, the request's grammar ``constraint``."""

    def __init__(
        self,
        params: SamplingParams,
        vocab_size: int,
        prompt: Sequence[int] = (),
        stop_ids: Iterable[int] = (),
        constraint: Constraint | None = None,
    ) -> None:
        self.params = params
        self.constraint = constraint
        seed = params.seed if params.seed is not None else random.SystemRandom().randrange(2**63)
        self.generator = torch.Generator().manual_seed(seed)
        self.generated = 0
        self.counts: Tensor | None = None
        if params.presence_penalty or params.frequency_penalty:
            self.counts = torch.zeros(vocab_size, dtype=torch.float32)
        self.seen: Tensor | None = None
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool)
            self.seen[[t for t in prompt if 0 <= t < vocab_size]] = True
        self.held_back = [t for t in stop_ids if 0 <= t < vocab_size] if params.min_tokens > 0 else []
        self.bias: tuple[Tensor, Tensor] | None = None
        if params.logit_bias:
            ids, values = zip(*((t, b) for t, b in params.logit_bias if 0 <= t < vocab_size), strict=True)
            self.bias = torch.tensor(ids, dtype=torch.long), torch.tensor(values, dtype=torch.float32)

    @property
    def greedy(self) -> bool:
        return self.params.temperature <= 0.0

    @property
    def adjusts(self) -> bool:
        """Whether this request changes its logits before the choice."""
        return (
            self.counts is not None
            or self.seen is not None
            or self.bias is not None
            or (bool(self.held_back) and self.generated < self.params.min_tokens)
        )

    def adjust(self, logits: Tensor) -> None:
        """In place, on one row (vocab,), in vLLM's order: logit bias, ``min_tokens``, then penalties."""
        p = self.params
        if self.bias is not None:
            logits[self.bias[0]] += self.bias[1]
        if self.held_back and self.generated < p.min_tokens:
            logits[self.held_back] = float("-inf")
        if self.seen is not None:
            penalised = torch.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty)
            logits[self.seen] = penalised[self.seen]
        if self.counts is not None:
            logits -= p.frequency_penalty * self.counts + p.presence_penalty * (self.counts > 0).float()

    def observe(self, token_id: int) -> None:
        self.generated += 1
        if self.constraint is not None:
            self.constraint.accept(token_id)
        if self.counts is not None and 0 <= token_id < self.counts.numel():
            self.counts[token_id] += 1
        if self.seen is not None and 0 <= token_id < self.seen.numel():
            self.seen[token_id] = True


@dataclass(frozen=True)
class Choice:
    token_id: int
    logprob: TokenLogprob | None


def sample(logits: Tensor, samplers: Sequence[RequestSampler], token_text: Callable[[int], str]) -> list[Choice]:
    """Choose one token per row of ``logits`` (rows, vocab; float32) for the matching sampler. A
    constrained row chooses among the tokens its grammar allows next (after the other adjustments)."""
    logits = logits.float().cpu()
    raw = logits
    want_logprobs = any(s.params.logprobs is not None for s in samplers)
    adjusted = [i for i, s in enumerate(samplers) if s.adjusts]
    constrained = [(i, s.constraint) for i, s in enumerate(samplers) if s.constraint is not None]
    if adjusted or constrained:
        logits = logits.clone()
    if adjusted:
        for i in adjusted:
            samplers[i].adjust(logits[i])
        logits = _finite(logits)
    if constrained:
        mask_rows(logits, [i for i, _ in constrained], [c for _, c in constrained])
    chosen = logits.argmax(dim=-1)
    sampled = [i for i, s in enumerate(samplers) if not s.greedy]
    if sampled:
        picked = _sample_rows(logits[sampled], [samplers[i] for i in sampled])
        chosen[sampled] = picked
    log_probs = torch.log_softmax(raw, dim=-1) if want_logprobs else None
    out = []
    for i, s in enumerate(samplers):
        token = int(chosen[i])
        s.observe(token)
        lp = None
        if log_probs is not None and s.params.logprobs is not None:
            lp = token_logprob(log_probs[i], token, s.params.logprobs, token_text)
        out.append(Choice(token, lp))
    return out


def _sample_rows(logits: Tensor, samplers: Sequence[RequestSampler]) -> Tensor:
    """Temperature, then min-p, top-k and top-p, then one draw per row from that row's generator."""
    temps = torch.tensor([s.params.temperature for s in samplers], dtype=torch.float32)[:, None]
    scaled = _finite(logits / temps)
    min_p = torch.tensor([s.params.min_p for s in samplers], dtype=torch.float32)[:, None]
    if bool((min_p > 0).any()):  # vLLM: below min_p x the best token's probability is out
        probs = torch.softmax(scaled, dim=-1)
        scaled = scaled.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), float("-inf"))
    top_k = [s.params.top_k for s in samplers]
    top_p = [s.params.top_p for s in samplers]
    vocab = scaled.shape[-1]
    if all(k <= 0 or k >= vocab for k in top_k) and all(p >= 1.0 for p in top_p):
        probs = torch.softmax(scaled, dim=-1)
        return torch.stack([torch.multinomial(probs[r], 1, generator=s.generator)[0] for r, s in enumerate(samplers)])
    values, indices = torch.sort(scaled, dim=-1, descending=True)
    ranks = torch.arange(vocab)[None, :]
    k = torch.tensor([kk if 0 < kk < vocab else vocab for kk in top_k])[:, None]
    values = values.masked_fill(ranks >= k, float("-inf"))
    probs = torch.softmax(values, dim=-1)
    p = torch.tensor(top_p, dtype=torch.float32)[:, None]
    before = torch.cumsum(probs, dim=-1) - probs  # mass of the better tokens
    probs = probs.masked_fill((before >= p) & (ranks > 0), 0.0)
    picks = [torch.multinomial(probs[r], 1, generator=s.generator)[0] for r, s in enumerate(samplers)]
    return indices.gather(1, torch.stack(picks)[:, None])[:, 0]


def _finite(logits: Tensor) -> Tensor:
    """Logits a softmax can take: a penalty or temperature that overflows a logit to +inf (a
    repetition_penalty of 1e-300) makes it the largest float instead of a NaN that fails the batch."""
    return torch.nan_to_num(logits, nan=float("-inf"), posinf=torch.finfo(logits.dtype).max, neginf=float("-inf"))


def token_logprob(log_probs: Tensor, token: int, top_n: int, token_text: Callable[[int], str]) -> TokenLogprob:
    """The logprob of ``token`` and the ``top_n`` best alternatives (best first) from one row of log-probs."""
    top: tuple[tuple[int, str, float], ...] = ()
    if top_n > 0:
        values, ids = torch.topk(log_probs, min(top_n, log_probs.numel()))
        top = tuple((int(t), token_text(int(t)), float(v)) for v, t in zip(values, ids, strict=True))
    return TokenLogprob(token_id=token, token=token_text(token), logprob=float(log_probs[token]), top=top)
