"""The engine contract every backend meets (in-process, vLLM pool, remote worker).

The gateway tokenises, routes and formats; an engine turns one prompt (token ids) of one size into
a stream of :class:`TokenEvent`. ``n > 1`` is n requests to the engine. Stop strings, penalties,
seeds and logprobs are the engine's job, so every backend honours them the same way.
"""

from __future__ import annotations

import abc
import json
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class StructuredSpec:
    """A constraint on the output, decoded with a grammar (vLLM's ``structured_outputs``).

    ``kind``: "json" (``value`` is a JSON schema, as JSON text), "json_object" (any JSON object;
    ``value`` unused), "regex" (``value`` is the pattern), "choice" (``value`` is a JSON list of the
    allowed strings) or "grammar" (``value`` is an EBNF grammar, xgrammar/GBNF syntax). ``param``:
    the request field it came from, named by the 400 when it does not compile."""

    kind: str
    value: str = ""
    param: str = "structured_outputs"

    def as_vllm(self) -> dict[str, Any]:
        """vLLM's ``structured_outputs`` fields for this spec (the kinds are its field names)."""
        if self.kind == "json_object":
            return {"json_object": True}
        return {self.kind: json.loads(self.value) if self.kind == "choice" else self.value}


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()  # besides the tokenizer's EOS
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # None: none; 0: the chosen token's; N: also the top N
    prompt_logprobs: int | None = None  # for completions `echo` (same meaning as logprobs)
    ignore_eos: bool = False
    # vLLM's extras: a seen token's logit (prompt or output) divided by this when positive, multiplied when negative
    repetition_penalty: float = 1.0
    min_p: float = 0.0  # tokens below min_p x the best token's probability are dropped (after temperature)
    min_tokens: int = 0  # EOS and stop_token_ids cannot end the output before this many tokens
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    include_stop_str_in_output: bool = False  # the stop string or stop token's text ends the output
    skip_special_tokens: bool = True  # in the output text
    structured: StructuredSpec | None = None  # the output follows this grammar; it ends ("stop") when complete


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    size: str  # a FamilySize name, e.g. "k3"
    prompt_ids: tuple[int, ...]
    sampling: SamplingParams = field(default_factory=SamplingParams)


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: tuple[tuple[int, str, float], ...] = ()  # (token id, token text, logprob), best first


@dataclass(frozen=True)
class TokenEvent:
    """One step of one request. ``text`` is the new detokenised text (may be empty while a
    multi-byte character or a possible stop string is held back). The last event of a request
    has ``finish_reason`` set ("stop" or "length") and carries the usage counts."""

    token_ids: tuple[int, ...] = ()
    text: str = ""
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None  # first event only, if asked
    queue_s: float | None = None  # first event only: seconds the request waited before its prefill began


@dataclass(frozen=True)
class SizeLoad:
    """Live load of one size, for routing and metrics."""

    running: int = 0
    waiting: int = 0
    prefill_tokens_per_s: float | None = None  # moving average
    decode_step_s: float | None = None  # moving average at the current batch size
    # seconds between tokens at the batch a new request is expected to decode in, newcomers' prefill
    # included (engines that forecast it: the local one)
    decode_step_expected_s: float | None = None
    # tokens each running request of the size has left at most (engines that know: the local one)
    remaining_tokens: tuple[int, ...] | None = None


class EngineError(Exception):
    """An engine could not serve a request (a dead replica, a worker that failed). The gateway
    answers 503; the subclasses below are the engine's other answers."""


class QueueFull(EngineError):
    """Admission refused: the queue is full. ``retry_after_s``: when a retry may find room."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RequestRejected(EngineError):
    """The engine refuses the request as it was sent (a shorter context on a replica or worker, a
    field it cannot serve): the client's error, kept with the ``param`` and ``code`` to blame, and
    never retried on another replica."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


class Engine(abc.ABC):
    """Async facade over a backend. Implementations never block the event loop."""

    @property
    @abc.abstractmethod
    def sizes(self) -> tuple[str, ...]:
        """Size names this engine can serve now."""

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    async def stop(self) -> None: ...

    @abc.abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        """Stream events for one request; raises QueueFull at admission, RequestRejected for a request
        it cannot serve as sent, EngineError on failure.
        Closing the iterator early (client gone) aborts the request."""

    @abc.abstractmethod
    async def abort(self, request_id: str) -> None: ...

    @abc.abstractmethod
    def healthy(self) -> bool: ...

    @abc.abstractmethod
    def load(self, size: str) -> SizeLoad: ...


@dataclass(frozen=True)
class Forwarded:
    """A worker's answer to a forwarded request: its status, its headers and its body as it comes
    (SSE bytes for a stream, the JSON body otherwise). Reading ``body`` raises :class:`EngineError`
    if the worker fails midway."""

    status: int
    headers: Mapping[str, str]
    body: AsyncIterator[bytes]


class Forwarding(abc.ABC):
    """An engine (or pool) whose sizes are served by OpenAI-compatible servers: the gateway forwards
    the client's request to one of them instead of running it through :meth:`Engine.generate`."""

    @abc.abstractmethod
    def forwards(self, size: str) -> bool:
        """True when requests for ``size`` are forwarded as the client sent them."""

    @abc.abstractmethod
    def forward(
        self, size: str, endpoint: str, body: dict[str, Any], headers: Mapping[str, str]
    ) -> AbstractAsyncContextManager[Forwarded]:
        """POST ``body`` (the client's fields; ``model`` is set to the worker's name here) to ``endpoint``
        (``/v1/chat/completions``, ``/v1/completions``) of a worker of ``size``; the answer is open while
        the context is. Raises :class:`QueueFull` (the workers are busy) or :class:`EngineError` (none
        answered) before any byte; a worker's answer to the request itself, a 4xx included, is returned."""
