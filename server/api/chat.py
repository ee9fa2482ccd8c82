"""POST /v1/chat/completions: protocol, route and serving."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from boomerang_core.family import Family
from server.api.common import (
    FinishReason,
    GenerationFields,
    Routed,
    Usage,
    check_text,
    check_tokens,
    sse_content,
    usage,
)
from server.api.fanout import Choice, Fanout
from server.api.serving import Generation, Prepared, serve
from server.engines.base import TokenLogprob
from server.errors import BadRequest, error_responses
from server.services import Services, ServicesDep

router = APIRouter()
ENDPOINT = "/v1/chat/completions"

# --- protocol ---------------------------------------------------------------------------------


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(GenerationFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None


class TopLogprob(BaseModel):
    model_config = ConfigDict(extra="forbid")
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprobEntry(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    content: list[TokenLogprobEntry]


class AssistantMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None
    finish_reason: FinishReason | None


class ChatCompletion(BaseModel):
    """The whole reply (documents the body; :func:`_response` builds it)."""

    model_config = ConfigDict(extra="forbid")
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: None
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    index: int
    delta: Delta
    logprobs: ChoiceLogprobs | None
    finish_reason: FinishReason | None


class ChatCompletionChunk(BaseModel):
    """One streamed event (documents it; :func:`_chunks` builds it). With ``include_usage`` every
    chunk has ``usage: null`` and a last one with no choices carries the counts."""

    model_config = ConfigDict(extra="forbid")
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    system_fingerprint: None
    choices: list[ChunkChoice]
    usage: Usage | None = None


def _text_of(message: ChatMessage, index: int) -> str:
    if message.content is None or isinstance(message.content, str):
        return check_text(message.content or "", f"messages[{index}].content")
    parts = []
    for j, part in enumerate(message.content):
        if part.type != "text" or part.text is None:
            raise BadRequest(
                f"content parts of type '{part.type}' are not supported: this model reads text only",
                param=f"messages[{index}].content[{j}]", code="unsupported_content",
            )  # fmt: skip
        parts.append(check_text(part.text, f"messages[{index}].content[{j}].text"))
    return "".join(parts)


def chat_prompt(tokenizer: Any, messages: list[ChatMessage]) -> list[int]:
    """The chat template applied to the messages, with the assistant turn opened. Blocking."""
    if not getattr(tokenizer, "chat_template", None):
        raise BadRequest("this model has no chat template: use /v1/completions", param="messages")
    turns = [{"role": m.role, "content": _text_of(m, i)} for i, m in enumerate(messages)]
    try:
        text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # a template that raises (e.g. roles out of order) is the client's message
        raise BadRequest(f"the chat template rejected the messages: {exc}", param="messages") from None
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


# --- formatting -------------------------------------------------------------------------------


def _logprob_entry(lp: TokenLogprob) -> dict[str, Any]:
    return {
        "token": lp.token,
        "logprob": lp.logprob,
        "bytes": list(lp.token.encode()),
        "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())} for _, t, v in lp.top],
    }


def _response(routed: Routed, choices: list[Choice], want_logprobs: bool) -> dict[str, Any]:
    return {
        "id": routed.request_id,
        "object": "chat.completion",
        "created": routed.created,
        "model": routed.served_as,
        "system_fingerprint": None,
        "choices": [
            {
                "index": c.index,
                "message": {"role": "assistant", "content": c.output},
                "logprobs": {"content": [_logprob_entry(lp) for lp in c.logprobs]} if want_logprobs else None,
                "finish_reason": c.finish_reason,
            }
            for c in choices
        ],
        "usage": usage(choices[0].prompt_tokens, sum(c.completion_tokens for c in choices)),
    }


async def _chunks(
    routed: Routed, fanout: Fanout, want_logprobs: bool, include_usage: bool
) -> AsyncIterator[dict[str, Any]]:
    def chunk(choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        body = {
            "id": routed.request_id,
            "object": "chat.completion.chunk",
            "created": routed.created,
            "model": routed.served_as,
            "system_fingerprint": None,
            "choices": choices,
        }
        if include_usage:
            body["usage"] = None
        return {**body, **extra}

    for c in fanout.choices:
        yield chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None}])  # fmt: skip
    async for c, event in fanout.events():
        if not (event.text or event.logprobs or event.finish_reason):
            continue
        logprobs = {"content": [_logprob_entry(lp) for lp in event.logprobs]} if want_logprobs else None
        delta = {"content": event.text} if event.text else {}
        yield chunk([{"index": c.index, "delta": delta, "logprobs": logprobs, "finish_reason": event.finish_reason}])
    if include_usage:
        choices = fanout.choices
        yield chunk([], usage=usage(choices[0].prompt_tokens, sum(c.completion_tokens for c in choices)))


# --- serving ----------------------------------------------------------------------------------


class ChatGeneration(Generation):
    endpoint, id_prefix = ENDPOINT, "chatcmpl"
    body: ChatCompletionRequest

    async def prepare(self, services: Services, family: Family) -> Prepared:
        body = self.body
        prompt = await asyncio.to_thread(chat_prompt, services.tokenizer, body.messages)
        requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if requested == 0:
            raise BadRequest("max_tokens must be at least 1", param="max_tokens")
        max_tokens = check_tokens(
            services, family, [prompt], requested, services.config.limits.default_max_tokens, "messages"
        )
        if body.top_logprobs is not None and not body.logprobs:
            raise BadRequest("top_logprobs needs logprobs: true", param="top_logprobs")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        return Prepared([prompt], max_tokens, body.sampling(max_tokens, logprobs))

    def response(self, routed: Routed, choices: list[Choice]) -> dict[str, Any]:
        return _response(routed, choices, self.body.logprobs)

    def chunks(self, routed: Routed, fanout: Fanout) -> AsyncIterator[dict[str, Any]]:
        return _chunks(routed, fanout, self.body.logprobs, self.body.include_usage)


@router.post(
    ENDPOINT,
    response_model=None,
    responses={
        200: {"model": ChatCompletion, "content": sse_content(ChatCompletionChunk)},
        **error_responses(400, 401, 404, 413, 429, 503),
    },
)
async def create_chat_completion(body: ChatCompletionRequest, request: Request, services: ServicesDep) -> Response:
    return await serve(request, services, ChatGeneration(body))
