"""POST /v1/chat/completions: protocol, route and serving."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field, model_validator

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
from server.api.tools import ToolCalling, ToolFields, default_rendering, rendered_tools, template_takes_tools
from server.engines.base import TokenLogprob
from server.errors import BadRequest, error_responses
from server.services import Live, ServicesDep

router = APIRouter()
ENDPOINT = "/v1/chat/completions"

# --- protocol ---------------------------------------------------------------------------------


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    arguments: str  # JSON text, as the model wrote it


class ToolCall(BaseModel):
    """A tool call of an earlier assistant turn, as clients send it back."""

    model_config = ConfigDict(extra="allow")
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    refusal: str | None = None
    # What a reply's message carries and the openai client sends back with it (vLLM's replies have all
    # of these): citations are ignored; the others name nothing this server can replay, so only null
    annotations: list[dict[str, Any]] | None = None
    audio: None = None
    function_call: None = None
    reasoning: None = None
    reasoning_content: None = None

    @model_validator(mode="after")
    def _tool_result_names_its_call(self) -> ChatMessage:
        if self.role == "tool" and not self.tool_call_id:  # OpenAI and vLLM require it
            raise ValueError("a message with role 'tool' needs the tool_call_id of the call it answers")
        return self


class ChatCompletionRequest(GenerationFields, ToolFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: NullableBool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    # vLLM's chat extras
    echo: NullableBool = Field(default=False, description="the reply starts with the last message's content "
                               "when that message is the assistant's")  # fmt: skip
    add_generation_prompt: NullableBool = Field(
        default=True, description="open the assistant's turn after the messages (the chat template's flag)"
    )
    continue_final_message: NullableBool = Field(
        default=False, description="leave the last message open for the model to continue (not with "
        "add_generation_prompt)",
    )  # fmt: skip
    chat_template_kwargs: dict[str, Any] | None = Field(
        default=None, description="extra variables for the chat template"
    )


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


ChatFinishReason = FinishReason | Literal["tool_calls"]


class AssistantMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["assistant"]
    content: str | None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None
    finish_reason: ChatFinishReason | None


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


class DeltaFunctionCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = None
    arguments: str | None = None  # the next piece of the JSON text


class DeltaToolCall(BaseModel):
    """A piece of a tool call: the first carries its id, type and name."""

    model_config = ConfigDict(extra="forbid")
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall | None = None


class Delta(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChunkChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    index: int
    delta: Delta
    logprobs: ChoiceLogprobs | None
    finish_reason: ChatFinishReason | None


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


def _turn(message: ChatMessage, index: int) -> dict[str, Any]:
    """One message as the chat template reads it: tool calls' arguments as objects (what the
    templates of tool-using models index into, as vLLM gives them), unset fields left out."""
    turn: dict[str, Any] = {"role": message.role, "content": _text_of(message, index)}
    if message.name is not None:
        turn["name"] = message.name
    if message.tool_call_id is not None:
        turn["tool_call_id"] = message.tool_call_id
    if message.tool_calls:
        calls = []
        for j, call in enumerate(message.tool_calls):
            try:
                arguments = json.loads(call.function.arguments)
            except json.JSONDecodeError:
                raise BadRequest(
                    "the arguments of a tool call are not JSON", param=f"messages[{index}].tool_calls[{j}]"
                ) from None
            calls.append({"id": call.id, "type": call.type, "function": {"name": call.function.name,
                                                                         "arguments": arguments}})  # fmt: skip
        turn["tool_calls"] = calls
    return turn


def chat_prompt(
    tokenizer: Any, messages: list[ChatMessage], *, add_generation_prompt: bool = True,
    continue_final_message: bool = False, template_kwargs: dict[str, Any] | None = None,
    add_special_tokens: bool = False, tools: list[dict[str, Any]] | None = None,
) -> list[int]:  # fmt: skip
    """The chat template applied to the messages, with the assistant turn opened (or the last
    message left open with ``continue_final_message``); ``add_special_tokens``: the tokenizer's
    own (BOS) on top of the template's; ``tools`` through the template, or rendered by
    :func:`server.api.tools.default_rendering` when the template has no tool support. Blocking."""
    if not getattr(tokenizer, "chat_template", None):
        raise BadRequest("this model has no chat template: use /v1/completions", param="messages")
    if continue_final_message and add_generation_prompt:
        raise BadRequest("continue_final_message and add_generation_prompt cannot both be true",
                         param="continue_final_message")  # fmt: skip
    turns = [_turn(m, i) for i, m in enumerate(messages)]
    if not template_takes_tools(tokenizer):
        turns, tools = default_rendering(turns, tools), None
    flags = {"add_generation_prompt": add_generation_prompt, "continue_final_message": continue_final_message}
    kwargs = {**(template_kwargs or {}), **flags, "tokenize": False, **({"tools": tools} if tools else {})}
    try:
        text = tokenizer.apply_chat_template(turns, **kwargs)
    except Exception as exc:  # a template that raises (e.g. roles out of order) is the client's message
        raise BadRequest(f"the chat template rejected the messages: {exc}", param="messages") from None
    if not isinstance(text, str):
        raise BadRequest("chat_template_kwargs asked the template for something other than text",
                         param="chat_template_kwargs")  # fmt: skip
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def echo_text(body: ChatCompletionRequest) -> str:
    """What ``echo`` puts before the reply: the last message's text when it is the assistant's (vLLM)."""
    last = body.messages[-1]
    if not body.echo or last.role != "assistant":
        return ""
    return _text_of(last, len(body.messages) - 1)


# --- formatting -------------------------------------------------------------------------------


def _logprob_entry(lp: TokenLogprob) -> dict[str, Any]:
    return {
        "token": lp.token,
        "logprob": finite_logprob(lp.logprob),
        "bytes": list(lp.token.encode()),
        "top_logprobs": [{"token": t, "logprob": finite_logprob(v), "bytes": list(t.encode())} for _, t, v in lp.top],
    }


def _message(c: Choice, echo: str, tools: ToolCalling | None) -> tuple[dict[str, Any], str | None]:
    """One choice's assistant message and finish reason; with tools, the calls parsed out of its text."""
    if tools is None:
        return {"role": "assistant", "content": echo + c.output}, c.finish_reason
    message, finish_reason = tools.message(c.output, c.finish_reason)
    if echo:
        message["content"] = echo + (message["content"] or "")
    return message, finish_reason


def _response(
    routed: Routed, choices: list[Choice], want_logprobs: bool, echo: str, tools: ToolCalling | None = None
) -> dict[str, Any]:
    messages = [_message(c, echo, tools) for c in choices]
    return {
        "id": routed.request_id,
        "object": "chat.completion",
        "created": routed.created,
        "model": routed.served_as,
        "system_fingerprint": None,
        "choices": [
            {
                "index": c.index,
                "message": message,
                "logprobs": {"content": [_logprob_entry(lp) for lp in c.logprobs]} if want_logprobs else None,
                "finish_reason": finish_reason,
            }
            for c, (message, finish_reason) in zip(choices, messages, strict=True)
        ],
        "usage": usage(choices[0].prompt_tokens, sum(c.completion_tokens for c in choices)),
    }


async def _chunks(
    routed: Routed, fanout: Fanout, want_logprobs: bool, include_usage: bool, echo: str,
    tools: ToolCalling | None = None,
) -> AsyncIterator[dict[str, Any]]:  # fmt: skip
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
        yield chunk([{"index": c.index, "delta": {"role": "assistant", "content": echo}, "logprobs": None,
                      "finish_reason": None}])  # fmt: skip
    streams = [tools.stream(c.request.prompt_ids) for c in fanout.choices] if tools is not None else None
    async for c, event in fanout.events():
        if not (event.text or event.logprobs or event.finish_reason):
            continue
        logprobs = {"content": [_logprob_entry(lp) for lp in event.logprobs]} if want_logprobs else None
        finish_reason = event.finish_reason
        if streams is None:
            delta = {"content": event.text} if event.text else {}
        else:  # the text through the choice's tool parser: content and tool call pieces
            stream = streams[c.index]
            delta = stream.delta(event.text, event.token_ids, finished=finish_reason is not None) or {}
            if not (delta or logprobs or finish_reason):
                continue
            finish_reason = stream.finish_reason(finish_reason)
        yield chunk([{"index": c.index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}])
    if include_usage:
        choices = fanout.choices
        yield chunk([], usage=usage(choices[0].prompt_tokens, sum(c.completion_tokens for c in choices)))


# --- serving ----------------------------------------------------------------------------------


class ChatGeneration(Generation):
    endpoint, id_prefix = ENDPOINT, "chatcmpl"
    body: ChatCompletionRequest
    tools: ToolCalling | None = None

    async def prepare(self, live: Live) -> Prepared:
        body = self.body
        self.tools = await asyncio.to_thread(ToolCalling.of, body, live.tokenizer)
        prompt = await asyncio.to_thread(
            chat_prompt, live.tokenizer, body.messages, add_generation_prompt=body.add_generation_prompt,
            continue_final_message=body.continue_final_message, template_kwargs=body.chat_template_kwargs,
            tools=rendered_tools(body),
        )  # fmt: skip
        requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if requested == 0:
            raise BadRequest("max_tokens must be at least 1", param="max_tokens")
        max_tokens = check_tokens(live, [prompt], requested, live.config.limits.default_max_tokens, "messages")
        if body.top_logprobs is not None and not body.logprobs:
            raise BadRequest("top_logprobs needs logprobs: true", param="top_logprobs")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        sampling = body.sampling(max_tokens, logprobs, len(live.tokenizer))
        if self.tools is not None:  # a call the model must make overrides response_format, as in vLLM
            structured = self.tools.structured or sampling.structured
            skip = sampling.skip_special_tokens and self.tools.skip_special_tokens  # <tool_call> may be special
            sampling = replace(sampling, structured=structured, skip_special_tokens=skip)
        return Prepared([prompt], predicted_tokens(live, requested, max_tokens), sampling)

    def response(self, routed: Routed, choices: list[Choice]) -> dict[str, Any]:
        return _response(routed, choices, self.body.logprobs, echo_text(self.body), self.tools)

    def chunks(self, routed: Routed, fanout: Fanout) -> AsyncIterator[dict[str, Any]]:
        return _chunks(routed, fanout, self.body.logprobs, self.body.include_usage, echo_text(self.body), self.tools)


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
