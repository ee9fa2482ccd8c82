"""The request surface of vLLM's OpenAI server on the in-process engine: vLLM's sampling extras,
``null`` for OpenAI's nullable fields, messages clients send back, limits and defaults as vLLM's
(the rest of the context, 20 prompts in one request), /tokenize and /detokenize, X-Request-Id.
A real server in a subprocess, the real ``openai`` client and plain HTTP for what it cannot send."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import torch

from boomerang_core.assemble import build
from boomerang_core.family import Family
from server.api.common import LOGPROB_FLOOR, finite_logprob
from tests.server.deploys import FAMILY
from tests.server.live import KEY, PROMPTS, Server

pytestmark = pytest.mark.server

AUTH = {"Authorization": f"Bearer {KEY}"}
EOS = 2  # the tiny tokenizer's <|im_end|>
CONTEXT = 512  # the tiny models' max_position_embeddings


@pytest.fixture(scope="module")
def server(tiny_server: Server) -> Server:
    return tiny_server


def post(server: Server, path: str, body: dict[str, Any], **headers: str) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, headers={**AUTH, **headers}, timeout=120)


def complete(server: Server, prompt: str | list[int], **fields: Any) -> dict[str, Any]:
    body = {"model": f"{FAMILY}:k5", "prompt": prompt, "temperature": 0, **fields}
    response = post(server, "/v1/completions", body)
    assert response.status_code == 200, response.text
    return dict(response.json())


def token_id(family: Family, text: str) -> int:
    assert family.store.tokenizer is not None
    ids = family.store.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1, ids
    return int(ids[0])


# --- vLLM's sampling extras -------------------------------------------------------------------


def test_repetition_penalty_is_vllms_and_transformers(server: Server, family: Family) -> None:
    """1.0 changes nothing; 1.5 gives the greedy tokens of transformers' own repetition penalty
    (same rule as vLLM's: prompt and output tokens, positive logits divided, negative multiplied)."""
    prompt = family.store.tokenizer(PROMPTS[0])["input_ids"]  # type: ignore[misc]
    plain = complete(server, prompt, max_tokens=16, ignore_eos=True)["choices"][0]["text"]
    assert (
        complete(server, prompt, max_tokens=16, ignore_eos=True, repetition_penalty=1.0)["choices"][0]["text"] == plain
    )
    penalised = complete(server, prompt, max_tokens=16, ignore_eos=True, repetition_penalty=1.5)["choices"][0]["text"]
    model = build(family.by_name("k5").plan, family.store)
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=16, min_new_tokens=16, do_sample=False, repetition_penalty=1.5
        )
    assert penalised == family.store.tokenizer.decode(out[0, len(prompt) :], skip_special_tokens=True)  # type: ignore[union-attr]
    assert penalised != plain  # the tiny model repeats itself; the penalty shows


def test_min_p_one_keeps_only_the_best_token(server: Server) -> None:
    greedy = complete(server, PROMPTS[1], max_tokens=12, ignore_eos=True)["choices"][0]["text"]
    sampled = [complete(server, PROMPTS[1], max_tokens=12, ignore_eos=True, temperature=1.5, seed=s)
               for s in range(3)]  # fmt: skip
    assert any(r["choices"][0]["text"] != greedy for r in sampled)  # sampling differs from greedy ...
    kept = complete(server, PROMPTS[1], max_tokens=12, ignore_eos=True, temperature=1.5, seed=0, min_p=1.0)
    assert kept["choices"][0]["text"] == greedy  # ... unless min_p leaves only the best token


def test_logit_bias_forces_a_token(server: Server, family: Family) -> None:
    forced = token_id(family, " value")
    reply = complete(server, PROMPTS[2], max_tokens=5, logit_bias={str(forced): 100})
    assert reply["choices"][0]["text"] == " value" * 5
    error = post(server, "/v1/completions", {"model": FAMILY, "prompt": "x", "logit_bias": {"word": 5}})
    assert error.status_code == 400 and error.json()["error"]["param"] == "logit_bias"


def test_min_tokens_holds_eos_back(server: Server) -> None:
    eos_first = {"logit_bias": {str(EOS): 100}, "max_tokens": 20}
    early = complete(server, PROMPTS[0], **eos_first)
    assert early["choices"][0]["finish_reason"] == "stop" and early["usage"]["completion_tokens"] == 1
    held = complete(server, PROMPTS[0], min_tokens=6, **eos_first)
    assert held["choices"][0]["finish_reason"] == "stop" and held["usage"]["completion_tokens"] == 7
    assert held["choices"][0]["text"]


def test_stop_token_ids_stop_and_include_stop_str_shows_them(server: Server, family: Family) -> None:
    token = token_id(family, " value")
    fields = {"logit_bias": {str(token): 100}, "stop_token_ids": [token], "max_tokens": 8}
    stopped = complete(server, PROMPTS[0], **fields)
    assert stopped["choices"][0] | {"logprobs": None} == {"index": 0, "text": "", "logprobs": None,
                                                           "finish_reason": "stop"}  # fmt: skip
    assert stopped["usage"]["completion_tokens"] == 1
    shown = complete(server, PROMPTS[0], include_stop_str_in_output=True, **fields)
    assert shown["choices"][0]["text"] == " value" and shown["choices"][0]["finish_reason"] == "stop"


def test_include_stop_str_in_output_keeps_the_stop_string(server: Server) -> None:
    text = complete(server, PROMPTS[3], max_tokens=16, ignore_eos=True)["choices"][0]["text"]
    at = next(i for i in range(1, len(text) - 3) if text.find(text[i : i + 3]) == i)  # a first occurrence
    stop = text[at : at + 3]
    assert complete(server, PROMPTS[3], max_tokens=16, ignore_eos=True, stop=stop)["choices"][0]["text"] == text[:at]
    kept = complete(server, PROMPTS[3], max_tokens=16, ignore_eos=True, stop=stop, include_stop_str_in_output=True)
    assert kept["choices"][0]["text"] == text[: at + 3]


def test_skip_special_tokens_false_shows_them(server: Server) -> None:
    fields = {"logit_bias": {str(EOS): 100}, "ignore_eos": True, "max_tokens": 2}
    assert complete(server, PROMPTS[0], **fields)["choices"][0]["text"] == ""
    assert complete(server, PROMPTS[0], skip_special_tokens=False, **fields)["choices"][0]["text"] == "<|im_end|>" * 2


# --- the openai client and what clients send --------------------------------------------------


def test_vllm_extras_through_the_openai_client(server: Server) -> None:
    """What ``vllm bench serve`` and Open WebUI send: repetition_penalty 1.0, min_p, top_k."""
    reply = server.client().chat.completions.create(
        model=FAMILY, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
        extra_body={"repetition_penalty": 1.0, "min_p": 0.05, "top_k": -1, "min_tokens": 1},
    )  # fmt: skip
    assert reply.choices[0].message.content and reply.usage is not None
    assert reply.usage.prompt_tokens_details is not None and reply.usage.prompt_tokens_details.cached_tokens == 0


def test_null_means_the_default(server: Server) -> None:
    nulls = {"stream": None, "n": None, "stop": None, "logprobs": None, "top_logprobs": None, "seed": None,
             "temperature": None, "max_tokens": 3, "echo": None, "ignore_eos": None, "logit_bias": None,
             "stream_options": None, "presence_penalty": None, "min_p": None, "skip_special_tokens": None}  # fmt: skip
    chat = post(server, "/v1/chat/completions",
                {"model": FAMILY, "messages": [{"role": "user", "content": "hi"}], **nulls})  # fmt: skip
    assert chat.status_code == 200, chat.text
    assert chat.json()["object"] == "chat.completion" and len(chat.json()["choices"]) == 1
    completion = post(server, "/v1/completions", {"model": FAMILY, "prompt": "hi", **nulls})
    assert completion.status_code == 200, completion.text
    assert completion.json()["choices"][0]["logprobs"] is None


def test_replayed_assistant_and_tool_turns(server: Server) -> None:
    """An assistant turn as the openai client serialises it back (``tool_calls: null``,
    ``refusal: null``), and a tool call with its ``tool`` answer, rendered through the template."""
    call = {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": '{"q": "x"}'}}
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello", "tool_calls": None, "refusal": None, "name": None},
        {"role": "user", "content": "look it up"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "found it"},
    ]
    reply = server.client().chat.completions.create(model=FAMILY, messages=messages, max_tokens=3)  # type: ignore[arg-type]
    assert reply.choices[0].message.content is not None
    tokens = post(server, "/tokenize", {"model": FAMILY, "messages": messages}).json()
    text = post(server, "/detokenize", {"tokens": tokens["tokens"]}).json()["prompt"]
    assert "<|im_start|>tool\nfound it<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
    assert tokens["count"] == reply.usage.prompt_tokens  # type: ignore[union-attr]


def test_chat_echo_and_continue_final_message(server: Server) -> None:
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "The module"}]
    fields = {"model": FAMILY, "messages": messages, "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    plain = post(server, "/v1/chat/completions", {**fields, "continue_final_message": True,
                                                  "add_generation_prompt": False})  # fmt: skip
    echoed = post(server, "/v1/chat/completions", {**fields, "continue_final_message": True,
                                                   "add_generation_prompt": False, "echo": True})  # fmt: skip
    assert plain.status_code == echoed.status_code == 200, plain.text + echoed.text
    continued = plain.json()["choices"][0]["message"]["content"]
    assert echoed.json()["choices"][0]["message"]["content"] == "The module" + continued
    open_turn = post(server, "/tokenize", {"messages": messages, "continue_final_message": True,
                                          "add_generation_prompt": False}).json()  # fmt: skip
    assert plain.json()["usage"]["prompt_tokens"] == open_turn["count"]
    both = post(server, "/v1/chat/completions", {**fields, "continue_final_message": True})
    assert both.status_code == 400 and both.json()["error"]["param"] == "continue_final_message"


# --- limits and defaults ----------------------------------------------------------------------


def test_chat_without_max_tokens_runs_to_the_end_of_the_context(server: Server) -> None:
    reply = server.client().chat.completions.create(
        model=f"{FAMILY}:small", messages=[{"role": "user", "content": "hi"}], extra_body={"ignore_eos": True}
    )
    assert reply.usage is not None and reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == CONTEXT - reply.usage.prompt_tokens > 256


def test_twenty_prompts_in_one_completions_request(server: Server) -> None:
    prompts = [f"{PROMPTS[i % 4]} {i}" for i in range(20)]
    reply = server.client().completions.create(model=FAMILY, prompt=prompts, max_tokens=2)
    assert sorted(c.index for c in reply.choices) == list(range(20))


def test_lone_surrogate_in_stop_is_400(server: Server) -> None:
    raw = json.dumps({"model": FAMILY, "prompt": "hi", "max_tokens": 2, "stop": ["ok", "\ud800"]})
    response = httpx.post(f"{server.url}/v1/completions", content=raw, timeout=30,
                          headers={**AUTH, "Content-Type": "application/json"})  # fmt: skip
    assert response.status_code == 400 and response.json()["error"]["param"] == "stop[1]", response.text


def test_x_request_id_is_honoured_on_every_response(server: Server) -> None:
    ok = post(
        server, "/v1/completions", {"model": FAMILY, "prompt": "hi", "max_tokens": 2}, **{"X-Request-Id": "abc-1"}
    )
    assert ok.status_code == 200 and ok.headers["x-request-id"] == "abc-1"
    bad = post(server, "/v1/completions", {"model": FAMILY, "prompt": "hi", "n": 0}, **{"X-Request-Id": "abc-2"})
    assert bad.status_code == 400 and bad.headers["x-request-id"] == "abc-2"
    unauthorized = httpx.get(f"{server.url}/v1/models", headers={"X-Request-Id": "abc-3"}, timeout=30)
    assert unauthorized.status_code == 401 and unauthorized.headers["x-request-id"] == "abc-3"
    stream = post(server, "/v1/completions", {"model": FAMILY, "prompt": "hi", "max_tokens": 2, "stream": True},
                  **{"X-Request-Id": "abc-4"})  # fmt: skip
    assert stream.status_code == 200 and stream.headers["x-request-id"] == "abc-4"
    own = post(server, "/v1/completions", {"model": FAMILY, "prompt": "hi", "max_tokens": 2})
    assert own.headers["x-request-id"] == own.json()["id"]
    assert httpx.get(f"{server.url}/health", timeout=30).headers["x-request-id"]


def test_tokenize_and_detokenize_round_trip(server: Server, family: Family) -> None:
    tokenized = post(server, "/tokenize", {"model": FAMILY, "prompt": PROMPTS[0], "return_token_strs": True})
    assert tokenized.status_code == 200, tokenized.text
    body = tokenized.json()
    assert body["tokens"] == family.store.tokenizer(PROMPTS[0])["input_ids"]  # type: ignore[misc]
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == CONTEXT
    assert len(body["token_strs"]) == body["count"]
    assert post(server, "/detokenize", {"model": f"{FAMILY}:k3", "tokens": body["tokens"]}).json() == {
        "prompt": PROMPTS[0]
    }
    assert post(server, "/detokenize", {"tokens": [10**6]}).status_code == 400
    assert post(server, "/tokenize", {"model": "nope", "prompt": "x"}).status_code == 404


def test_an_overflowing_penalty_fails_no_request(server: Server) -> None:
    """A repetition_penalty that overflows the logits (found by the fuzzer) gives tokens, not NaN
    probabilities that fail the step of every request in the batch."""
    for temperature in (0, 1):
        reply = complete(server, PROMPTS[0], max_tokens=4, repetition_penalty=5e-324, temperature=temperature)
        assert reply["usage"]["completion_tokens"] >= 1


def test_logprobs_json_cannot_carry_are_vllms_floor() -> None:
    assert [finite_logprob(v) for v in (float("nan"), float("-inf"), float("inf"), -1.5)] == [LOGPROB_FLOOR] * 3 + [
        -1.5
    ]
