"""POST /v1/completions: protocol, route and serving.

``echo`` with ``logprobs`` returns the prompt's own token logprobs in the legacy OpenAI format
(``tokens``, ``token_logprobs`` with ``null`` first, ``top_logprobs``, ``text_offset``), which is
what lm-evaluation-harness's ``local-completions`` reads to score log-likelihoods.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from server.api.common import (
    FinishReason,
    GenerationFields,
    NullableBool,
    Routed,
    Usage,
    check_text,
    check_tokens,
    finite_logprob,
    predicted_tokens,
    sse_content,
    usage,
)
from server.api.fanout import Choice, Fanout
from server.api.serving import Generation, Prepared, serve
from server.engines.base import TokenLogprob
from server.errors import BadRequest, error_responses
from server.services import Live, ServicesDep

router = APIRouter()
ENDPOINT = "/v1/completions"
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for this endpoint

# --- protocol ---------------------------------------------------------------------------------


class CompletionRequest(GenerationFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: NullableBool = False
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None


class LegacyLogprobs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    index: int
    text: str
    logprobs: LegacyLogprobs | None
    finish_reason: FinishReason | None


class _CompletionBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: None
    choices: list[CompletionChoice]


class Completion(_CompletionBody):
    """The whole reply (documents the body; :class:`Formatter` builds it)."""

    usage: Usage


class CompletionChunk(_CompletionBody):
    """One streamed event (documents it; :meth:`Formatter.chunks` builds it)."""

    usage: Usage | None = None


class Prompt:
    """One prompt as token ids, with its text for ``echo``."""

    def __init__(self, ids: list[int], text: str) -> None:
        self.ids = ids
        self.text = text


def read_prompts(tokenizer: Any, prompt: str | list[str] | list[int] | list[list[int]]) -> list[Prompt]:
    """Strings are tokenized as the tokenizer does by default; token ids are taken as they are. Blocking."""
    items: Sequence[str | list[int]]
    if isinstance(prompt, str):
        items = [prompt]
    elif prompt and all(isinstance(x, int) for x in prompt):
        items = [prompt]  # type: ignore[list-item]
    else:
        items = prompt  # type: ignore[assignment]
    if not items:
        raise BadRequest("prompt is empty", param="prompt")
    vocab = len(tokenizer)
    out = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            text = check_text(item, "prompt" if isinstance(prompt, str) else f"prompt[{i}]")
            out.append(Prompt(list(tokenizer(text)["input_ids"]), text))
            continue
        bad = [t for t in item if not 0 <= t < vocab]
        if bad:
            raise BadRequest(f"token id {bad[0]} is out of range 0..{vocab - 1}", param=f"prompt[{i}]")
        out.append(Prompt(list(item), tokenizer.decode(item)))
    return out


# --- formatting -------------------------------------------------------------------------------


class LogprobsWriter:
    """The legacy logprobs object, built token by token, with character offsets into the text."""

    def __init__(self, start_offset: int) -> None:
        self.offset = start_offset

    def block(self, entries: Sequence[TokenLogprob | None], first_token: str | None = None) -> dict[str, list[Any]]:
        tokens: list[str] = []
        lps: list[float | None] = []
        tops: list[dict[str, float] | None] = []
        offsets: list[int] = []
        for lp in entries:
            token = lp.token if lp is not None else (first_token or "")
            tokens.append(token)
            lps.append(None if lp is None else finite_logprob(lp.logprob))
            if lp is None:
                tops.append(None)
            else:
                top = {t: finite_logprob(v) for _, t, v in lp.top}
                top.setdefault(lp.token, finite_logprob(lp.logprob))
                tops.append(top)
            offsets.append(self.offset)
            self.offset += len(token)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def _merge(a: dict[str, list[Any]], b: dict[str, list[Any]]) -> dict[str, list[Any]]:
    return {k: a[k] + b[k] for k in a}


class Formatter:
    def __init__(self, routed: Routed, body: CompletionRequest, prompts: list[Prompt], tokenizer: Any) -> None:
        self.routed, self.body, self.prompts, self.tokenizer = routed, body, prompts, tokenizer
        self.drop_output = body.max_tokens == 0  # echo-only scoring: the engine's one token is not shown

    def prompt_of(self, c: Choice) -> Prompt:
        return self.prompts[c.index // self.body.n]

    def echo_logprobs(self, c: Choice, writer: LogprobsWriter) -> dict[str, list[Any]]:
        prompt = self.prompt_of(c)
        entries = c.prompt_logprobs or (None,) * len(prompt.ids)
        return writer.block(entries, first_token=self.tokenizer.decode(prompt.ids[:1]))

    def choice(self, c: Choice) -> dict[str, Any]:
        prompt = self.prompt_of(c)
        text = "" if self.drop_output else c.output
        logprobs = None
        if self.body.logprobs is not None:
            writer = LogprobsWriter(0 if self.body.echo else len(prompt.text))
            logprobs = writer.block([]) if not self.body.echo else self.echo_logprobs(c, writer)
            if not self.drop_output:
                logprobs = _merge(logprobs, writer.block(c.logprobs))
        return {
            "index": c.index,
            "text": (prompt.text if self.body.echo else "") + text,
            "logprobs": logprobs,
            "finish_reason": "length" if self.drop_output else c.finish_reason,
        }

    def usage(self, choices: list[Choice]) -> dict[str, int]:
        completion = 0 if self.drop_output else sum(c.completion_tokens for c in choices)
        return usage(sum(len(p.ids) for p in self.prompts), completion)

    def response(self, choices: list[Choice]) -> dict[str, Any]:
        return {**self._head(), "choices": [self.choice(c) for c in choices], "usage": self.usage(choices)}

    def _head(self) -> dict[str, Any]:
        r = self.routed
        return {"id": r.request_id, "object": "text_completion", "created": r.created, "model": r.served_as,
                "system_fingerprint": None}  # fmt: skip

    async def chunks(self, fanout: Fanout) -> AsyncIterator[dict[str, Any]]:
        include_usage = self.body.include_usage
        want_logprobs = self.body.logprobs is not None
        writers: dict[int, LogprobsWriter] = {}

        def chunk(choice: dict[str, Any]) -> dict[str, Any]:
            return {**self._head(), "choices": [choice], **({"usage": None} if include_usage else {})}

        async for c, event in fanout.events():
            text, logprobs = ("", None) if self.drop_output else (event.text, None)
            if c.index not in writers:  # first event of this choice: the echoed prompt goes first
                prompt = self.prompt_of(c)
                writers[c.index] = writer = LogprobsWriter(0 if self.body.echo else len(prompt.text))
                if self.body.echo:
                    text = prompt.text + text
                    if want_logprobs:
                        logprobs = self.echo_logprobs(c, writer)
            if want_logprobs and not self.drop_output:
                block = writers[c.index].block(event.logprobs)
                logprobs = block if logprobs is None else _merge(logprobs, block)
            if not (text or logprobs or event.finish_reason):
                continue
            finish = ("length" if self.drop_output else event.finish_reason) if event.finish_reason else None
            yield chunk({"index": c.index, "text": text, "logprobs": logprobs, "finish_reason": finish})
        if include_usage:
            yield {**self._head(), "choices": [], "usage": self.usage(fanout.choices)}


# --- serving ----------------------------------------------------------------------------------


class CompletionGeneration(Generation):
    endpoint, id_prefix = ENDPOINT, "cmpl"
    body: CompletionRequest

    def __init__(self, body: CompletionRequest) -> None:
        super().__init__(body)
        self.prompts: list[Prompt] = []
        self.tokenizer: Any = None

    async def prepare(self, live: Live) -> Prepared:
        body = self.body
        self.tokenizer = live.tokenizer
        self.prompts = await asyncio.to_thread(read_prompts, live.tokenizer, body.prompt)
        if body.max_tokens == 0 and not body.echo:
            raise BadRequest("max_tokens must be at least 1 (0 is allowed only with echo)", param="max_tokens")
        ids = [p.ids for p in self.prompts]
        requested = None if body.max_tokens is None else max(body.max_tokens, 1)
        max_tokens = check_tokens(live, ids, requested, DEFAULT_MAX_TOKENS, "prompt")
        prompt_logprobs = body.logprobs if body.echo and body.logprobs is not None else None
        sampling = body.sampling(max_tokens, body.logprobs, len(live.tokenizer), prompt_logprobs)
        return Prepared(ids, predicted_tokens(live, requested, max_tokens), sampling)

    def response(self, routed: Routed, choices: list[Choice]) -> dict[str, Any]:
        return Formatter(routed, self.body, self.prompts, self.tokenizer).response(choices)

    def chunks(self, routed: Routed, fanout: Fanout) -> AsyncIterator[dict[str, Any]]:
        return Formatter(routed, self.body, self.prompts, self.tokenizer).chunks(fanout)


@router.post(
    ENDPOINT,
    response_model=None,
    responses={
        200: {"model": Completion, "content": sse_content(CompletionChunk)},
        **error_responses(400, 401, 404, 413, 429, 503),
    },
)
async def create_completion(body: CompletionRequest, request: Request, services: ServicesDep) -> Response:
    return await serve(request, services, CompletionGeneration(body))
