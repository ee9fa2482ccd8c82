"""A scripted engine for the gateway's unit tests: formatting, errors and routing without a model.

Choice text is predictable: token ``t`` of the output is ``(last prompt id + 1 + t + seed) % vocab``,
with logprob ``-0.5`` and the token itself as the best alternative, so the tests can check every
field the gateway writes. The real engine is exercised by the subprocess tests.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

from boomerang_core.family import Family
from server.engines.base import (
    Engine,
    EngineError,
    GenerationRequest,
    QueueFull,
    SizeLoad,
    TokenEvent,
    TokenLogprob,
)


class ScriptedEngine(Engine):
    def __init__(self, family: Family, sizes: Sequence[str], *, max_queue: int = 64) -> None:
        self.family = family
        self.tokenizer: Any = family.store.tokenizer
        self._sizes = tuple(sizes)
        self.max_queue = max_queue
        self.running: dict[str, set[str]] = {s: set() for s in sizes}
        self.loads: dict[str, SizeLoad] = {}  # tests set these to steer the router
        self.requests: list[GenerationRequest] = []
        self.aborted: list[str] = []
        self.gate = asyncio.Event()  # generation waits on it when `hold` is set
        self.hold = False
        self.fail_after: int | None = None  # raise EngineError after this many tokens
        self.alive = True
        self.started = False

    @property
    def sizes(self) -> tuple[str, ...]:
        return self._sizes

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.started = False

    def healthy(self) -> bool:
        return self.alive

    def load(self, size: str) -> SizeLoad:
        base = self.loads.get(size, SizeLoad(prefill_tokens_per_s=1e6, decode_step_s=0.001))
        return SizeLoad(
            running=base.running + len(self.running.get(size, ())),
            waiting=base.waiting,
            prefill_tokens_per_s=base.prefill_tokens_per_s,
            decode_step_s=base.decode_step_s,
            decode_step_expected_s=base.decode_step_expected_s,
            remaining_tokens=base.remaining_tokens,
        )

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def token_text(self, token_id: int) -> str:
        return str(self.tokenizer.decode([token_id]))

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        """Refuses at the call, as the local engine does (the gateway also handles a refusal at the first event)."""
        if sum(len(r) for r in self.running.values()) >= self.max_queue:
            raise QueueFull("the queue is full (scripted)", retry_after_s=2.0)
        return self._generate(request)

    async def _generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        self.requests.append(request)
        active = self.running[request.size]
        active.add(request.request_id)
        sp = request.sampling
        vocab = len(self.tokenizer)
        try:
            prompt_lps = None
            if sp.prompt_logprobs is not None:
                prompt_lps = (None, *(self._lp(t) for t in request.prompt_ids[1:]))
            out = ""
            for t in range(sp.max_tokens):
                if self.hold:
                    await self.gate.wait()
                if self.fail_after is not None and t >= self.fail_after:
                    raise EngineError("scripted engine failure")
                token = (request.prompt_ids[-1] + 1 + t + (sp.seed or 0)) % vocab
                text = self.token_text(token)
                out += text
                stop = next((s for s in sp.stop if s in out), None)
                last = t == sp.max_tokens - 1 or stop is not None
                if stop is not None:
                    text = text[: len(text) - (len(out) - out.index(stop))]
                await asyncio.sleep(0)
                yield TokenEvent(
                    token_ids=(token,),
                    text=text,
                    logprobs=(self._lp(token, sp.logprobs),) if sp.logprobs is not None else (),
                    finish_reason=("stop" if stop is not None else "length") if last else None,
                    prompt_tokens=len(request.prompt_ids),
                    completion_tokens=t + 1,
                    prompt_logprobs=prompt_lps if t == 0 else None,
                    queue_s=0.0 if t == 0 else None,
                )
                if last:
                    return
        finally:
            active.discard(request.request_id)

    def _lp(self, token: int, top: int | None = 1) -> TokenLogprob:
        text = self.token_text(token)
        alternatives = ((token, text, -0.5),) if top else ()
        return TokenLogprob(token_id=token, token=text, logprob=-0.5, top=alternatives)
