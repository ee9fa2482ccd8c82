"""What chat and completions share: the OpenAI sampling fields, boomerang's size fields, refusal
of fields the server cannot honour, token limits, and routing a request to one size."""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from pydantic_core import PydanticUseDefault

from boomerang_core.family import Family, FamilySize
from server.engines.base import GenerationRequest, SamplingParams, StructuredSpec
from server.errors import BadRequest
from server.routing import Decision, Router, RouteRequest
from server.services import Live

# Known OpenAI fields this server cannot honour: a 400 naming the field, never a silent ignore.
UNSUPPORTED = {
    "tools", "tool_choice", "functions", "function_call", "parallel_tool_calls",
    "audio", "modalities", "prediction", "web_search_options", "reasoning_effort", "suffix", "best_of",
    "service_tier", "store", "metadata",
}  # fmt: skip
# Sent by some clients with a value that asks for nothing: accepted when the value is harmless.
_HARMLESS: dict[str, tuple[Any, ...]] = {
    "parallel_tool_calls": (True, False),
    "store": (False,),
    "metadata": ({},),
}
# vLLM reports a logprob it cannot represent (NaN, -inf) as this, so that JSON stays valid
LOGPROB_FLOOR = -9999.0


def _null_is_default(value: Any) -> Any:
    if value is None:
        raise PydanticUseDefault()
    return value


def finite_logprob(value: float) -> float:
    """``value`` where JSON can carry it, else vLLM's stand-in (NaN and infinities are not JSON)."""
    return value if math.isfinite(value) else LOGPROB_FLOOR


# OpenAI makes these nullable: ``null`` means the default (what the openai client sends for "not given")
NullableBool = Annotated[bool, BeforeValidator(_null_is_default, json_schema_input_type=bool | None)]
NullableN = Annotated[
    int, Field(ge=1), BeforeValidator(_null_is_default, json_schema_input_type=Annotated[int, Field(ge=1)] | None)
]


class PromptTokensDetails(BaseModel):
    model_config = ConfigDict(extra="forbid")
    cached_tokens: int


class Usage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


FinishReason = Literal["stop", "length"]


def sse_content(chunk: type[BaseModel]) -> dict[str, Any]:
    """The ``text/event-stream`` entry of a streaming route's 200 response: each event's ``data`` is
    a ``chunk`` as JSON, an error body as JSON (generation failed midway), or the final ``[DONE]``.
    ``chunk`` must be added to the schema's components (``server.app.openapi_schema`` does)."""
    as_json = [{"$ref": f"#/components/schemas/{chunk.__name__}"}, {"$ref": "#/components/schemas/ErrorBody"}]
    data = {
        "anyOf": [{"const": "[DONE]"}, {"contentMediaType": "application/json", "contentSchema": {"anyOf": as_json}}]
    }
    event = {"type": "object", "required": ["data"], "properties": {"data": {"type": "string", **data}}}
    return {"text/event-stream": {"itemSchema": event}}


# Below this, temperature means greedy (vLLM's _SAMPLING_EPS): logits / 1e-300 overflow float32 to inf
# and the sampler's probabilities to NaN.
MIN_SAMPLING_TEMPERATURE = 1e-5


def check_text(text: str, param: str) -> str:
    """``text`` if it can be encoded (JSON allows lone surrogates such as ``"\\ud800"``; tokenizers do not)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BadRequest(f"not valid Unicode text: a lone surrogate at character {exc.start}", param=param) from None
    return text


def _effective_temperature(requested: float | None) -> float:
    if requested is None:
        return 1.0
    return requested if requested >= MIN_SAMPLING_TEMPERATURE else 0.0


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class JsonSchema(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema", description="the JSON schema the answer follows")
    strict: bool | None = None


class TextFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]


class JsonObjectFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["json_object"]


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["json_schema"]
    json_schema: JsonSchema


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")]


class StructuredOutputs(BaseModel):
    """vLLM's ``structured_outputs``: exactly one constraint on the answer."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    json_: dict[str, Any] | str | None = Field(default=None, alias="json", description="a JSON schema")
    regex: str | None = None
    choice: Annotated[list[str], Field(min_length=1)] | None = None
    grammar: str | None = Field(default=None, description="an EBNF grammar (xgrammar's syntax)")
    json_object: bool | None = None

    def spec(self) -> StructuredSpec:
        given = {
            "json": self.json_, "regex": self.regex, "choice": self.choice, "grammar": self.grammar,
            "json_object": self.json_object,
        }  # fmt: skip
        kinds = [k for k, v in given.items() if v is not None]
        if len(kinds) != 1:
            raise BadRequest("structured_outputs takes exactly one of json, regex, choice, grammar, json_object",
                             param="structured_outputs")  # fmt: skip
        kind = kinds[0]
        param = f"structured_outputs.{kind}"
        if kind == "json_object":
            return StructuredSpec("json_object", param=param)
        value = given[kind]
        if isinstance(value, list):  # choice
            text = json.dumps([check_text(c, f"{param}[{i}]") for i, c in enumerate(value)])
        elif isinstance(value, dict):
            text = json.dumps(value)
        else:
            text = check_text(str(value), param)
        return StructuredSpec(kind, text, param=param)


class GenerationFields(BaseModel):
    """OpenAI fields both endpoints take, vLLM's sampling extras, plus ``size``, ``max_latency_ms``,
    ``max_memory_gb``."""

    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: Annotated[int, Field(ge=0)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None
    n: NullableN = 1
    stop: str | list[str] | None = None
    seed: Annotated[int, Field(ge=-(2**63), lt=2**63)] | None = None  # int64, as OpenAI's
    stream: NullableBool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = Field(
        default=None, description="token id (as a string) -> bias added to its logit, -100 to 100"
    )
    user: str | None = None
    size: str | float | None = Field(default=None, description="auto, a tier, a size name, a label or a fraction")
    max_latency_ms: Annotated[float, Field(gt=0)] | None = None
    max_memory_gb: Annotated[float, Field(gt=0)] | None = None
    # vLLM's extra sampling fields
    ignore_eos: NullableBool = Field(default=False, description="keep generating past EOS (benchmarks)")
    repetition_penalty: Annotated[float, Field(gt=0, le=2**31)] | None = Field(
        default=None, description="divides a positive logit (multiplies a negative one) of every token already in "
        "the prompt or the output; 1 is off",
    )  # fmt: skip
    min_p: Annotated[float, Field(ge=0, le=1)] | None = Field(
        default=None, description="drop tokens less likely than min_p x the most likely one"
    )
    min_tokens: Annotated[int, Field(ge=0)] | None = Field(
        default=None, description="EOS and stop_token_ids cannot end the output before this many tokens"
    )
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(
        default=None, description="token ids that end the output, besides EOS"
    )
    include_stop_str_in_output: NullableBool = Field(default=False, description="the stop string ends the text")
    skip_special_tokens: NullableBool = Field(default=True, description="leave special tokens out of the output text")
    # structured outputs: the answer follows a JSON schema, any JSON object, or vLLM's constraints
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = Field(
        default=None, description="vLLM's constraints: one of json (a schema), regex, choice, grammar, json_object"
    )

    def reject_unsupported(self) -> None:
        for name, value in (self.model_extra or {}).items():
            if value is None or value in _HARMLESS.get(name, ()):
                continue
            if name in UNSUPPORTED:
                raise BadRequest(f"'{name}' is not supported by this server", param=name, code="unsupported_field")
            raise BadRequest(f"unrecognized request argument: '{name}'", param=name, code="unsupported_field")
        if self.stream_options is not None and not self.stream:
            raise BadRequest("stream_options is only allowed when stream is true", param="stream_options")
        if isinstance(self.stop, list) and len(self.stop) > 16:
            raise BadRequest("at most 16 stop strings", param="stop")
        for i, text in enumerate(self.stop_strings):
            check_text(text, "stop" if isinstance(self.stop, str) else f"stop[{i}]")

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def structured(self) -> StructuredSpec | None:
        """The constraint the answer is decoded under: ``structured_outputs``, or ``response_format``."""
        fmt = self.response_format
        if self.structured_outputs is not None:
            if fmt is not None and fmt.type != "text":
                raise BadRequest("use one of response_format and structured_outputs", param="structured_outputs")
            return self.structured_outputs.spec()
        if isinstance(fmt, JsonObjectFormat):
            return StructuredSpec("json_object", param="response_format")
        if isinstance(fmt, JsonSchemaFormat):
            schema = json.dumps(fmt.json_schema.schema_)
            return StructuredSpec("json", schema, param="response_format.json_schema.schema")
        return None

    def token_bias(self, vocab: int) -> tuple[tuple[int, float], ...]:
        """``logit_bias`` as (token id, bias); a key that is not a token id of this model is a 400."""
        out = []
        for key, bias in (self.logit_bias or {}).items():
            token = int(key) if key.strip().lstrip("-").isdigit() else None
            if token is None or not 0 <= token < vocab:
                raise BadRequest(f"logit_bias key '{key}' is not a token id in 0..{vocab - 1}", param="logit_bias")
            out.append((token, bias))
        return tuple(out)

    def sampling(
        self, max_tokens: int, logprobs: int | None, vocab: int, prompt_logprobs: int | None = None
    ) -> SamplingParams:
        bad = [t for t in self.stop_token_ids or () if t >= vocab]
        if bad:
            raise BadRequest(f"stop_token_ids has {bad[0]}, not a token id in 0..{vocab - 1}", param="stop_token_ids")
        if (self.min_tokens or 0) > max_tokens:
            raise BadRequest(f"min_tokens is {self.min_tokens}, more than max_tokens ({max_tokens})",
                             param="min_tokens")  # fmt: skip
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=_effective_temperature(self.temperature),
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=max(0, self.top_k or 0),
            seed=self.seed,
            stop=tuple(s for s in self.stop_strings if s),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            ignore_eos=self.ignore_eos,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            min_p=self.min_p or 0.0,
            min_tokens=self.min_tokens or 0,
            logit_bias=self.token_bias(vocab),
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens,
            structured=self.structured(),
        )


@dataclass
class Routed:
    """A request bound to one size: what the serving code needs to run and label it."""

    family: Family
    decision: Decision
    served_as: str  # "family:size", the body's `model`
    request_id: str
    created: int
    router: Router | None = None

    def observe(self, completion_tokens: int, e2e_ms: float) -> None:
        """A choice finished: the router learns how far its prediction was off on this engine."""
        if self.router is not None:
            self.router.observe(self.decision, completion_tokens, e2e_ms)

    @property
    def size(self) -> FamilySize:
        return self.decision.size

    def headers(self) -> dict[str, str]:
        return {
            "x-boomerang-size": self.size.name,
            "x-boomerang-route-reason": self.decision.reason,
            "x-boomerang-predicted-ms": f"{self.decision.prediction.latency_ms:.1f}",
            "x-request-id": self.request_id,
        }

    def requests(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams, n: int) -> list[GenerationRequest]:
        """``n`` engine requests per prompt, in choice order (prompt-major). Choice ``i`` of a
        seeded request uses ``seed + i``, so the choices differ and the request is reproducible."""
        out = []
        for p, prompt in enumerate(prompts):
            for i in range(n):
                seed = None if sampling.seed is None else sampling.seed + i
                params = sampling if seed == sampling.seed else replace(sampling, seed=seed)
                out.append(GenerationRequest(f"{self.request_id}-{p}-{i}", self.size.name, tuple(prompt), params))
        return out


def context_length(family: Family) -> int:
    config = family.store.configs["teacher"]
    length = getattr(config, "max_position_embeddings", None) or getattr(config, "max_seq_len", None)
    return int(length) if length else 2048


def check_tokens(
    live: Live, prompts: Sequence[Sequence[int]], max_tokens: int | None, default: int | None, prompt_param: str
) -> int:
    """Validate prompt lengths against the limits; return the max_tokens to use: the request's, or
    ``default``, or (None) the rest of the context, capped by ``limits.max_tokens``."""
    limits = live.config.limits
    context = context_length(live.family)
    prompt_limit = min(limits.max_prompt_tokens or context, context)
    longest = max(len(p) for p in prompts)
    if any(len(p) == 0 for p in prompts):
        raise BadRequest("the prompt is empty", param=prompt_param)
    if longest > prompt_limit:
        raise BadRequest(
            f"the prompt has {longest} tokens, more than the limit of {prompt_limit}", param=prompt_param,
            code="context_length_exceeded",
        )  # fmt: skip
    if max_tokens is not None and limits.max_tokens is not None and max_tokens > limits.max_tokens:
        raise BadRequest(f"max_tokens is {max_tokens}; this server allows at most {limits.max_tokens}",
                         param="max_tokens")  # fmt: skip
    room = context - longest
    if max_tokens is None:
        max_tokens = min(default or room, limits.max_tokens or room, room)
        if max_tokens < 1:
            raise BadRequest(f"the prompt fills the context of {context} tokens", param=prompt_param,
                             code="context_length_exceeded")  # fmt: skip
    elif max_tokens > room:
        raise BadRequest(
            f"this model's maximum context length is {context} tokens: the prompt has {longest}, so "
            f"max_tokens can be at most {room}, not {max_tokens}", param="max_tokens", code="context_length_exceeded",
        )  # fmt: skip
    return max_tokens


def predicted_tokens(live: Live, requested: int | None, max_tokens: int) -> int:
    """The tokens the router predicts a request at: its own ``max_tokens``, or when it set none (and
    may run to the end of the context) ``routing.typical_tokens``."""
    return max_tokens if requested is not None else min(max_tokens, live.config.routing.typical_tokens)


def choice_limit(live: Live) -> int:
    """The most choices (n x prompts) one request may start: ``limits.max_n``, or what the local engine
    holds at once (every choice is admitted before the reply starts)."""
    local = live.config.engines.local
    return live.config.limits.max_n or local.max_batch_size + local.max_queue


def route(live: Live, body: GenerationFields, prompts: Sequence[Sequence[int]], max_tokens: int, prefix: str) -> Routed:
    """Bind the request to the size the router chooses."""
    router = live.router
    limit = choice_limit(live)
    if body.n * len(prompts) > limit:
        raise BadRequest(f"n x prompts is {body.n * len(prompts)}; at most {limit}", param="n")
    size_text = router.size_text(body.model, None if body.size is None else str(body.size))
    decision = router.choose(
        RouteRequest(
            size=size_text,
            max_latency_ms=body.max_latency_ms,
            max_memory_gb=body.max_memory_gb,
            prompt_tokens=max(len(p) for p in prompts),
            max_tokens=max_tokens,
            n=body.n * len(prompts),
        )
    )
    return routed_as(live, decision, prefix)


def routed_as(live: Live, decision: Decision, prefix: str) -> Routed:
    """A request bound to the size ``decision`` chose, with a new id that starts with ``prefix``."""
    return Routed(
        family=live.family,
        decision=decision,
        served_as=live.served_name(decision.size),
        request_id=f"{prefix}-{uuid.uuid4().hex}",
        created=int(time.time()),
        router=live.router,
    )


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """OpenAI's usage object; ``cached_tokens``: prompt tokens whose K/V was reused (none here yet)."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }
