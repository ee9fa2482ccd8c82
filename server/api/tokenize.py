"""POST /tokenize and /detokenize, with the request and response shapes of vLLM's server: a prompt
or chat messages to token ids (through the chat template, as chat completions renders them), and
token ids back to text."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from server.api.chat import ChatMessage, chat_prompt
from server.api.common import NullableBool, check_text, context_length
from server.api.tools import ChatTool, tool_dicts
from server.errors import BadRequest, error_responses
from server.services import Live, Services, ServicesDep

router = APIRouter()


class TokenizeCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # JSON types only: "1" is no token id
    model: str | None = None
    prompt: str
    add_special_tokens: NullableBool = Field(default=True, description="add the tokenizer's special tokens (BOS)")
    return_token_strs: NullableBool = Field(default=False, description="also return each token's string")


class TokenizeChatRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # JSON types only: "1" is no token id
    model: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    add_generation_prompt: NullableBool = True
    continue_final_message: NullableBool = False
    add_special_tokens: NullableBool = Field(default=False, description="special tokens beyond the template's")
    return_token_strs: NullableBool = False
    chat_template_kwargs: dict[str, object] | None = None
    tools: list[ChatTool] | None = Field(default=None, description="rendered as chat completions renders them")


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # JSON types only: "1" is no token id
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0, lt=2**63)]]


class DetokenizeResponse(BaseModel):
    prompt: str


def _checked(services: Services, model: str | None) -> Live:
    """The family served now; ``model`` must be its name, with or without a size tag (one tokenizer
    serves every size)."""
    live = services.ready()
    if model is not None:
        live.router.size_text(model, None)
    return live


def tokenize(tokenizer: Any, body: TokenizeCompletionRequest | TokenizeChatRequest) -> list[int]:
    """Blocking."""
    if isinstance(body, TokenizeCompletionRequest):
        text = check_text(body.prompt, "prompt")
        return list(tokenizer(text, add_special_tokens=body.add_special_tokens)["input_ids"])
    return chat_prompt(
        tokenizer, body.messages, add_generation_prompt=body.add_generation_prompt,
        continue_final_message=body.continue_final_message, template_kwargs=dict(body.chat_template_kwargs or {}),
        add_special_tokens=body.add_special_tokens,
        tools=tool_dicts(body.tools) if body.tools else None,
    )  # fmt: skip


@router.post("/tokenize", responses=error_responses(400, 401, 404, 503))
async def create_tokenize(
    body: TokenizeCompletionRequest | TokenizeChatRequest, services: ServicesDep
) -> TokenizeResponse:
    live = _checked(services, body.model)
    ids = await asyncio.to_thread(tokenize, live.tokenizer, body)
    strs = live.tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
    return TokenizeResponse(count=len(ids), max_model_len=context_length(live.family), tokens=ids, token_strs=strs)


@router.post("/detokenize", responses=error_responses(400, 401, 404, 503))
async def create_detokenize(body: DetokenizeRequest, services: ServicesDep) -> DetokenizeResponse:
    tokenizer = _checked(services, body.model).tokenizer
    vocab = len(tokenizer)
    bad = [t for t in body.tokens if t >= vocab]
    if bad:
        raise BadRequest(f"token id {bad[0]} is out of range 0..{vocab - 1}", param="tokens")
    text = await asyncio.to_thread(tokenizer.decode, body.tokens)
    return DetokenizeResponse(prompt=text)
