"""Tools on the in-process engine's chat endpoint: rendering (the tiny template has no tool support:
the default rendering), parsing with vLLM's Hermes parser (whole and streamed replies, through the
functions chat completions formats with), and on a live server with the openai client: ``required``
and a named function decode a valid call, the round trip with the tool's answer, an unknown name."""

from __future__ import annotations

import copy
import json
from typing import Any

import httpx
import jsonschema
import pytest

from server.api.chat import ChatCompletionRequest, ChatMessage, Delta, chat_prompt
from server.api.tools import ToolCalling, ToolStream
from server.errors import BadRequest
from tests.server.deploys import FAMILY
from tests.server.live import KEY, Server
from tests.tiny import tiny_tokenizer

pytest.importorskip("vllm")  # the parser is vLLM's

AUTH = {"Authorization": f"Bearer {KEY}"}
PARAMETERS = {  # every value from a short list, so that a random model's constrained call ends
    "type": "object",
    "properties": {"unit": {"enum": ["celsius", "fahrenheit"]}, "tomorrow": {"type": "boolean"}},
    "required": ["unit", "tomorrow"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "description": "the weather", "parameters": PARAMETERS},
}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
CALL = '{"name": "get_weather", "arguments": {"unit": "celsius", "tomorrow": true}}'
REPLY = f"Let me look. <tool_call>\n{CALL}\n</tool_call>"


def request(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": FAMILY, "messages": [{"role": "user", "content": "weather?"}], "tools": [WEATHER, CLOCK], **fields}
    )


def calling(**fields: Any) -> ToolCalling:
    tools = ToolCalling.of(request(**fields), tiny_tokenizer())
    assert tools is not None
    return tools


# --- rendering --------------------------------------------------------------------------------


def test_default_rendering_lists_the_tools_and_replays_calls() -> None:
    """The tiny template never names ``tools``: the functions go to a system block as JSON, and a
    replayed call is written into its assistant turn as Hermes ``<tool_call>`` text."""
    tokenizer = tiny_tokenizer()
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"unit": "celsius"}'}}
    messages = [
        ChatMessage(role="system", content="Be brief."),
        ChatMessage.model_validate({"role": "user", "content": "weather?"}),
        ChatMessage.model_validate({"role": "assistant", "content": None, "tool_calls": [call]}),
        ChatMessage(role="tool", tool_call_id="call_1", content="sunny"),
    ]
    text = tokenizer.decode(chat_prompt(tokenizer, messages, tools=[WEATHER]))
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n")
    assert json.dumps(WEATHER) in text and "<tool_call>" in text
    assert (
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"unit": "celsius"}}\n</tool_call>'
        in text
    )
    assert "<|im_start|>tool\nsunny<|im_end|>" in text
    plain = tokenizer.decode(chat_prompt(tokenizer, messages))
    assert "# Tools" not in plain and "<tool_call>" in plain  # the replayed call renders without tools too


def test_a_template_with_tool_support_gets_the_tools() -> None:
    tokenizer = copy.deepcopy(tiny_tokenizer())  # the cached one keeps its template
    tokenizer.chat_template = (
        "{% if tools %}TOOLS {% for t in tools %}{{ t.function.name }} {% endfor %}| {% endif %}"
        "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    )
    messages = [ChatMessage(role="user", content="weather?")]
    assert tokenizer.decode(chat_prompt(tokenizer, messages, tools=[WEATHER, CLOCK])) == (
        "TOOLS get_weather get_time | user: weather?\n"
    )


# --- parsing ----------------------------------------------------------------------------------


def test_a_hermes_reply_becomes_tool_calls() -> None:
    message, finish_reason = calling().message(REPLY, "stop")
    assert finish_reason == "tool_calls" and message["content"] == "Let me look. "
    [call] = message["tool_calls"]
    assert call["type"] == "function" and call["id"]
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"unit": "celsius", "tomorrow": True}
    plain, finish_reason = calling().message("no call here", "length")
    assert plain == {"role": "assistant", "content": "no call here"} and finish_reason == "length"


def streamed(stream: ToolStream, text: str, piece: int) -> tuple[str, list[dict[str, Any]], list[dict[str, Any]]]:
    """The deltas of ``text`` fed in pieces of ``piece`` characters, assembled as the openai client
    does: (content, calls, deltas)."""
    content, calls, deltas = "", [], []
    for start in range(0, len(text), piece):
        delta = stream.delta(text[start : start + piece], (), finished=start + piece >= len(text))
        if delta is None:
            continue
        Delta.model_validate(delta)  # the chunk's documented shape
        deltas.append(delta)
        content += delta.get("content", "")
        for part in delta.get("tool_calls", []):
            if part["index"] == len(calls):
                calls.append({"id": part["id"], "name": part["function"]["name"], "arguments": ""})
            calls[part["index"]]["arguments"] += part["function"].get("arguments", "")
    return content, calls, deltas


@pytest.mark.parametrize("piece", [1, 5, 1000])
def test_a_streamed_hermes_reply_becomes_tool_call_deltas(piece: int) -> None:
    stream = calling().stream((1, 2, 3))
    content, calls, _ = streamed(stream, REPLY, piece)
    assert content == "Let me look. " and stream.finish_reason("stop") == "tool_calls"
    [call] = calls
    assert call["id"] and call["name"] == "get_weather"
    assert json.loads(call["arguments"]) == {"unit": "celsius", "tomorrow": True}
    plain = calling().stream((1,))
    assert streamed(plain, "no call here", 4)[0] == "no call here" and plain.finish_reason("stop") == "stop"


def test_required_and_named_read_the_constrained_json() -> None:
    """``required`` decodes a JSON list of {name, parameters}; a named function its arguments object."""
    required = calling(tool_choice="required")
    assert required.structured is not None and json.loads(required.structured.value)["type"] == "array"
    message, finish_reason = required.message('[{"name": "get_time", "parameters": {}}]', "stop")
    assert finish_reason == "tool_calls" and message["content"] is None
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]] == [("get_time", "{}")]
    named = calling(tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert named.structured is not None and json.loads(named.structured.value) == PARAMETERS
    message, finish_reason = named.message('{"unit": "fahrenheit", "tomorrow": false}', "stop")
    assert finish_reason == "stop"  # vLLM's and OpenAI's answer for a named function
    assert message["tool_calls"][0]["function"]["name"] == "get_weather"
    content, calls, _ = streamed(named.stream((1,)), '{"unit": "fahrenheit", "tomorrow": false}', 3)
    assert not content and calls[0]["name"] == "get_weather"
    assert json.loads(calls[0]["arguments"]) == {"unit": "fahrenheit", "tomorrow": False}
    assert ToolCalling.of(request(tool_choice="none"), tiny_tokenizer()) is None  # plain chat


def test_tools_a_tokenizer_cannot_encode_are_a_400() -> None:
    broken = {"type": "function", "function": {"name": "f", "description": "\ud800"}}
    with pytest.raises(BadRequest) as raised:
        ToolCalling.of(request(tools=[broken]), tiny_tokenizer())
    assert raised.value.param == "tools"


# --- a live server ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tiny_server: Server) -> Server:
    return tiny_server


def post(server: Server, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, headers=AUTH, timeout=300)


MESSAGES = [{"role": "user", "content": "What is the weather?"}]


def compact() -> dict[str, int]:
    """A logit_bias that keeps the random model from spending its few tokens (the tools block fills
    most of the 512-token context) on the whitespace JSON allows between tokens."""
    tokenizer = tiny_tokenizer()
    return {str(i): -100 for i in range(len(tokenizer)) if tokenizer.decode([i]) and not tokenizer.decode([i]).strip()}


NAMED = {"type": "function", "function": {"name": "get_weather"}}


def check_call(name: str, arguments: str) -> None:
    assert name == "get_weather"
    jsonschema.validate(json.loads(arguments), PARAMETERS)


@pytest.mark.server
def test_tokenize_renders_the_tools(server: Server) -> None:
    with_tools = post(server, "/tokenize", {"model": FAMILY, "messages": MESSAGES, "tools": [WEATHER]}).json()
    text = post(server, "/detokenize", {"tokens": with_tools["tokens"]}).json()["prompt"]
    assert text.startswith("<|im_start|>system\n# Tools") and '"name": "get_weather"' in text
    reply = post(server, "/v1/chat/completions", {"model": FAMILY, "messages": MESSAGES, "tools": [WEATHER],
                                                  "tool_choice": "none", "max_tokens": 2})  # fmt: skip
    assert reply.status_code == 200, reply.text
    plain = post(server, "/tokenize", {"model": FAMILY, "messages": MESSAGES}).json()
    assert reply.json()["usage"]["prompt_tokens"] == plain["count"] < with_tools["count"]  # none renders no tools


@pytest.mark.server
@pytest.mark.parametrize("tool_choice", ["required", NAMED])
def test_a_forced_call_is_valid(server: Server, tool_choice: Any) -> None:
    """The random model under the call's JSON schema: a call to get_weather whose arguments follow
    its parameters, whole and streamed; finish_reason tool_calls for required (stop when named)."""
    client = server.client()
    fields: dict[str, Any] = {"model": FAMILY, "messages": MESSAGES, "tools": [WEATHER], "tool_choice": tool_choice,
                              "parallel_tool_calls": False, "temperature": 0, "max_tokens": 80,
                              "logit_bias": compact()}  # fmt: skip
    finish = "tool_calls" if tool_choice == "required" else "stop"
    reply = client.chat.completions.create(**fields)
    choice = reply.choices[0]
    assert choice.finish_reason == finish, choice
    [call] = choice.message.tool_calls or []
    assert call.id and call.type == "function"
    check_call(call.function.name, call.function.arguments)
    chunks = list(client.chat.completions.create(**fields, stream=True))
    pieces = [tc for chunk in chunks if chunk.choices for tc in chunk.choices[0].delta.tool_calls or []]
    assert pieces[0].id and pieces[0].function and pieces[0].function.name == "get_weather"
    arguments = "".join(p.function.arguments or "" for p in pieces if p.function)
    check_call(pieces[0].function.name, arguments)
    assert json.loads(arguments) == json.loads(call.function.arguments)  # greedy: the same call
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == finish


@pytest.mark.server
def test_round_trip_with_the_openai_client(server: Server) -> None:
    """The call, its answer sent back as a ``tool`` message with the assistant's turn as the client
    returns it, and the model's next reply (a small tool: the whole exchange fits the context)."""
    clock = {"type": "function", "function": {"name": "now", "parameters": {
        "type": "object", "properties": {"utc": {"type": "boolean"}}, "required": ["utc"],
        "additionalProperties": False,
    }}}  # fmt: skip
    client = server.client()
    first = client.chat.completions.create(model=FAMILY, messages=MESSAGES, tools=[clock], tool_choice="required",  # type: ignore[arg-type, list-item]
                                           parallel_tool_calls=False, temperature=0, max_tokens=60,
                                           logit_bias=compact())  # fmt: skip
    message = first.choices[0].message
    assert first.choices[0].finish_reason == "tool_calls" and message.tool_calls
    call = message.tool_calls[0]
    assert call.function.name == "now" and isinstance(json.loads(call.function.arguments)["utc"], bool)
    answer = {"role": "tool", "tool_call_id": call.id, "content": "12:00"}
    messages = [*MESSAGES, message.model_dump(exclude_none=True), answer]
    second = client.chat.completions.create(model=FAMILY, messages=messages, tools=[clock], max_tokens=5)  # type: ignore[arg-type, list-item]
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")
    tokens = post(server, "/tokenize", {"model": FAMILY, "messages": messages, "tools": [clock]}).json()
    text = post(server, "/detokenize", {"tokens": tokens["tokens"]}).json()["prompt"]
    assert f"<tool_call>\n{json.dumps({'name': 'now', 'arguments': json.loads(call.function.arguments)})}" in text
    assert "<|im_start|>tool\n12:00<|im_end|>" in text
    assert second.usage is not None and second.usage.prompt_tokens == tokens["count"]


@pytest.mark.server
def test_unknown_function_is_a_400(server: Server) -> None:
    named = {"type": "function", "function": {"name": "launch_rocket"}}
    reply = post(server, "/v1/chat/completions", {"model": FAMILY, "messages": MESSAGES, "tools": [WEATHER],
                                                  "tool_choice": named})  # fmt: skip
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "tool_choice"
    no_tools = post(server, "/v1/chat/completions", {"model": FAMILY, "messages": MESSAGES, "tool_choice": "required"})
    assert no_tools.status_code == 400 and no_tools.json()["error"]["param"] == "tool_choice"
