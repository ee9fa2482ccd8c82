"""One request's life inside LocalEngine: its sampler, detokeniser and stop strings, and how each
sampled token becomes a :class:`TokenEvent` (the last one with finish reason and usage)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from server.engines.base import GenerationRequest, TokenEvent, TokenLogprob
from server.engines.local.detokenize import IncrementalDetokenizer, StopStrings
from server.engines.local.sampling import RequestSampler, token_logprob


@dataclass(eq=False)
class ActiveRequest:
    """One request inside the engine. ``computed`` tokens of prompt + output have K/V in the cache."""

    request: GenerationRequest
    size: int
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[TokenEvent | BaseException]
    sampler: RequestSampler
    detok: IncrementalDetokenizer
    stops: StopStrings
    stop_ids: frozenset[int]
    arrived: float
    admitted: float | None = None  # perf_counter when the request left the waiting queue
    output: list[int] = field(default_factory=list)
    computed: int = 0
    row: int = -1
    prompt_logprobs: list[TokenLogprob | None] | None = None
    done: bool = False

    @property
    def prompt(self) -> tuple[int, ...]:
        return self.request.prompt_ids

    @property
    def prefilling(self) -> bool:
        return self.computed < len(self.prompt)

    def add_prompt_logprobs(self, logits: Tensor, start: int, n: int, token_text: Callable[[int], str]) -> None:
        """Logprobs of prompt tokens start+1 .. start+n, from the logits of chunk tokens start .. start+n-1."""
        assert self.prompt_logprobs is not None
        top = self.request.sampling.prompt_logprobs or 0
        log_probs = torch.log_softmax(logits.float(), dim=-1).cpu()
        for j in range(n):
            target = start + j + 1
            if target < len(self.prompt):
                self.prompt_logprobs.append(token_logprob(log_probs[j], self.prompt[target], top, token_text))

    def event_for(self, token: int | None, logprob: TokenLogprob | None, max_context: int) -> TokenEvent:
        """Record one sampled token (None: a prompt-only request) and return its event. The request
        ends on a stop token (whose text is emitted only with ``include_stop_str_in_output``), a stop
        string, the end of its grammar, ``max_tokens`` or a full context."""
        p = self.request.sampling
        finish: str | None = None
        text = ""
        if token is not None:
            self.output.append(token)
        grammar_ended = self.sampler.constraint is not None and self.sampler.constraint.ended
        if token is not None and (token in self.stop_ids or grammar_ended):
            # a stop token's text is emitted only when asked; a token that ends a grammar is not text
            shown = self.detok.push(token) if token in self.stop_ids and p.include_stop_str_in_output else ""
            text, hit = self.stops.push(shown + self.detok.flush())
            finish = "stop"
            text += "" if hit else self.stops.flush()
        else:
            if token is not None:
                text, hit = self.stops.push(self.detok.push(token))
                finish = "stop" if hit else None
            total = len(self.prompt) + len(self.output)
            if finish is None and (len(self.output) >= p.max_tokens or total >= max_context):
                tail, hit = self.stops.push(self.detok.flush())
                text += tail
                finish = "stop" if hit else "length"
                text += "" if hit else self.stops.flush()
        first = len(self.output) <= 1
        return TokenEvent(
            token_ids=(token,) if token is not None else (),
            text=text,
            logprobs=(logprob,) if logprob is not None else (),
            finish_reason=finish,
            prompt_tokens=len(self.prompt) if finish else 0,
            completion_tokens=len(self.output) if finish else 0,
            prompt_logprobs=tuple(self.prompt_logprobs) if first and self.prompt_logprobs is not None else None,
            queue_s=(self.admitted - self.arrived) if first and self.admitted is not None else None,
        )
