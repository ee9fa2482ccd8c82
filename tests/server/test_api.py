"""The gateway in-process, over a scripted engine: response formats, streaming, every error status,
health and metrics. The real engine and a real server process are in test_server.py."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

import openai
import pytest
from fastapi.testclient import TestClient

from boomerang_core.family import Family
from server.app import create_app
from server.config import DeployConfig, parse_config
from server.engines.base import Engine, SizeLoad
from server.services import load_family
from tests.server.deploys import FAMILY, TinyFamilyDirs, deploy_dict
from tests.server.fakes import ScriptedEngine


class Harness:
    def __init__(self, client: TestClient, engine: ScriptedEngine) -> None:
        self.http = client
        self.engine = engine
        self.openai = openai.OpenAI(
            base_url="http://testserver/v1", api_key="unused", http_client=client, max_retries=0
        )


@pytest.fixture(scope="module")
def family(tiny_dirs: TinyFamilyDirs) -> Family:
    return load_family(parse_config(deploy_dict(tiny_dirs)))


def start(family: Family, config: DeployConfig) -> Iterator[Harness]:
    engines: list[ScriptedEngine] = []

    def make_engine(fam: Family, sizes: Sequence[str], cfg: DeployConfig) -> Engine:
        engines.append(ScriptedEngine(fam, sizes, max_queue=cfg.engines.local.max_queue))
        return engines[-1]

    app = create_app(config, family_loader=lambda cfg: family, engine_factory=make_engine)
    with TestClient(app) as client:
        for _ in range(200):
            if client.get("/health").status_code == 200:
                break
            import time

            time.sleep(0.02)
        yield Harness(client, engines[0])


@pytest.fixture
def api(family: Family, tiny_dirs: TinyFamilyDirs) -> Iterator[Harness]:
    yield from start(family, parse_config(deploy_dict(tiny_dirs)))


def error_of(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in body["error"]["message"]
    return dict(body["error"])


# --- formats ----------------------------------------------------------------------------------


def test_chat_reports_the_size_in_body_and_header(api: Harness) -> None:
    raw = api.openai.chat.completions.with_raw_response.create(
        model=f"{FAMILY}:k3", messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0
    )
    reply = raw.parse()
    assert raw.headers["x-boomerang-size"] == "k3" and reply.model == f"{FAMILY}:k3"
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 4
    request = api.engine.requests[-1]
    assert request.size == "k3" and request.sampling.temperature == 0 and request.sampling.max_tokens == 4
    expected = "".join(api.engine.token_text((request.prompt_ids[-1] + 1 + t) % 512) for t in range(4))
    assert reply.choices[0].message.content == expected
    assert reply.usage.prompt_tokens == len(request.prompt_ids)


def test_sampling_fields_reach_the_engine(api: Harness) -> None:
    api.openai.chat.completions.create(
        model=FAMILY,
        messages=[{"role": "user", "content": "hi"}],
        max_completion_tokens=3,
        temperature=0.7,
        top_p=0.9,
        stop=["x", "yz"],
        seed=11,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        user="u",
        extra_body={"top_k": 5, "size": "k4", "ignore_eos": True},
    )
    sp = api.engine.requests[-1].sampling
    assert (sp.max_tokens, sp.temperature, sp.top_p, sp.top_k, sp.seed) == (3, 0.7, 0.9, 5, 11)
    assert (sp.stop, sp.presence_penalty, sp.frequency_penalty) == (("x", "yz"), 0.5, -0.5)
    assert sp.ignore_eos


def test_chat_stream_with_usage_and_n2(api: Harness) -> None:
    stream = api.openai.chat.completions.create(
        model=FAMILY,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=5,
        n=2,
        seed=3,
        stream=True,
        stream_options={"include_usage": True},
        logprobs=True,
        top_logprobs=1,
        extra_body={"size": "small"},
    )
    texts, finish, usage, lps = {0: "", 1: ""}, {}, None, {0: 0, 1: 0}
    for chunk in stream:
        assert chunk.model == f"{FAMILY}:k0"
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            lps[c.index] += len(c.logprobs.content) if c.logprobs else 0
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert finish == {0: "length", 1: "length"} and lps == {0: 5, 1: 5}
    assert texts[0] != texts[1]  # seeds 3 and 4
    assert usage is not None and usage.completion_tokens == 10
    seeds = sorted(r.sampling.seed for r in api.engine.requests[-2:])
    assert seeds == [3, 4]


def test_completions_echo_prompt_logprobs_in_the_legacy_format(api: Harness) -> None:
    ids = [[10, 20, 30, 40], [7, 8]]
    reply = api.openai.completions.create(model=FAMILY, prompt=ids, max_tokens=1, logprobs=1, echo=True, temperature=0)
    assert [c.index for c in reply.choices] == [0, 1]
    for choice, prompt in zip(reply.choices, ids, strict=True):
        lp = choice.logprobs
        assert lp is not None and len(lp.tokens) == len(prompt) + 1
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert lp.token_logprobs[1:] == [-0.5] * len(prompt)
        assert all(max(top.values()) == v for top, v in zip(lp.top_logprobs[1:], lp.token_logprobs[1:], strict=True))
        assert lp.text_offset[0] == 0 and choice.text.startswith(api.engine.tokenizer.decode(prompt))
        assert "".join(lp.tokens) == choice.text
    assert reply.usage.prompt_tokens == 6 and reply.usage.completion_tokens == 2


def test_completions_echo_with_zero_max_tokens_scores_only_the_prompt(api: Harness) -> None:
    reply = api.openai.completions.create(model=FAMILY, prompt="def f(x):", max_tokens=0, logprobs=0, echo=True)
    choice = reply.choices[0]
    assert choice.text == "def f(x):" and choice.logprobs is not None
    assert len(choice.logprobs.tokens) == reply.usage.prompt_tokens and reply.usage.completion_tokens == 0


def test_completions_stream_echo_and_stop(api: Harness) -> None:
    prompt = [5, 6, 7]
    first = api.engine.token_text(8)
    stream = api.openai.completions.create(
        model=FAMILY,
        prompt=prompt,
        max_tokens=6,
        echo=True,
        stream=True,
        stop=[api.engine.token_text(9)],
        temperature=0,
    )
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == api.engine.tokenizer.decode(prompt) + first
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_models_lists_every_size(api: Harness) -> None:
    cards = {m.id: m.model_dump() for m in api.openai.models.list().data}
    assert set(cards) == {FAMILY, *(f"{FAMILY}:k{i}" for i in range(6))}
    k1, k3 = cards[f"{FAMILY}:k1"], cards[f"{FAMILY}:k3"]
    assert k1["dominated"] and not k1["loaded"] and k3["loaded"] and not k3["dominated"]
    assert k3["num_layers"] == 6 and k3["params"] > cards[f"{FAMILY}:k0"]["params"]
    assert cards[f"{FAMILY}:k0"]["tiers"] == ["small"]
    assert api.openai.models.retrieve(f"{FAMILY}:k4").num_layers == 7  # type: ignore[attr-defined]


def test_metrics_carry_the_size_label(api: Harness) -> None:
    api.openai.completions.create(model=FAMILY, prompt="a", max_tokens=2, extra_body={"size": "k4"})
    text = api.http.get("/metrics").text
    for line in (
        'boomerang_requests_total{endpoint="/v1/completions",size="k4",status="200"} 1.0',
        'boomerang_generation_tokens_total{size="k4"} 2.0',
        'boomerang_time_to_first_token_seconds_count{size="k4"} 1.0',
        'boomerang_router_decisions_total{reason="named",size="k4"} 1.0',
        'boomerang_size_loaded{size="k1"} 0.0',
        "boomerang_sizes_loaded 4.0",
    ):
        assert line in text, line
    assert 'boomerang_running_requests{size="k4"} 0.0' in text
    assert "boomerang_resident_weight_bytes" in text and 'boomerang_queue_time_seconds_count{size="k4"} 1.0' in text


# --- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio", "not supported"),
        ({"tools": [{"type": "function"}]}, "tools[0].function", "Field required"),
        ({"frobnicate": 1}, "frobnicate", "unrecognized"),
        ({"temperature": 7}, "temperature", "less than or equal to 2"),
        ({"messages": []}, "messages", "at least 1"),
        ({"max_tokens": 10_000}, "max_tokens", "at most"),
        ({"messages": [{"role": "user", "content": "x " * 600}]}, "messages", "limit"),
        ({"top_logprobs": 2}, "top_logprobs", "logprobs"),
    ],
)
def test_bad_fields_are_400_naming_the_field(api: Harness, body: dict[str, Any], param: str, words: str) -> None:
    payload = {"model": FAMILY, "messages": [{"role": "user", "content": "hi"}], **body}
    error = error_of(api.http.post("/v1/chat/completions", json=payload), 400)
    assert error["param"] == param and words in error["message"], error


def test_body_that_is_not_json_is_400(api: Harness) -> None:
    error = error_of(
        api.http.post("/v1/completions", content=b"{nope", headers={"content-type": "application/json"}), 400
    )
    assert "JSON" in error["message"]


def test_unknown_model_and_size_are_404_listing_valid_ones(api: Harness) -> None:
    error = error_of(api.http.post("/v1/completions", json={"model": "gpt-4", "prompt": "a"}), 404)
    assert error["param"] == "model" and f"{FAMILY}:k3" in error["message"]
    error = error_of(api.http.post("/v1/completions", json={"model": FAMILY, "prompt": "a", "size": "k9"}), 404)
    assert error["param"] == "size" and "k3" in error["message"]
    error = error_of(api.http.post("/v1/completions", json={"model": f"{FAMILY}:k1", "prompt": "a"}), 404)
    assert "dominated" in error["message"]


def test_queue_full_is_429_with_retry_after(api: Harness) -> None:
    api.engine.max_queue = 0
    response = api.http.post("/v1/completions", json={"model": FAMILY, "prompt": "a", "stream": True})
    error_of(response, 429)
    assert response.headers["retry-after"] == "2"


def test_engine_failure_midstream_is_an_error_event_then_done(api: Harness) -> None:
    api.engine.fail_after = 2
    with api.http.stream(
        "POST", "/v1/completions", json={"model": FAMILY, "prompt": "a", "max_tokens": 8, "stream": True}
    ) as response:
        assert response.status_code == 200
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert set(error) == {"message", "type", "param", "code"} and "failure" in error["message"]
    assert len(events) == 4  # two tokens, the error, [DONE]


def test_dead_engine_makes_health_and_requests_503(api: Harness) -> None:
    assert api.http.get("/health").json()["status"] == "ok"
    api.engine.alive = False
    assert api.http.get("/health").status_code == 503
    error_of(api.http.post("/v1/completions", json={"model": FAMILY, "prompt": "a"}), 503)


def test_not_ready_while_loading(family: Family, tiny_dirs: TinyFamilyDirs) -> None:
    import threading

    release = threading.Event()

    def slow_loader(config: DeployConfig) -> Family:
        release.wait(10)
        return family

    app = create_app(
        parse_config(deploy_dict(tiny_dirs)),
        family_loader=slow_loader,
        engine_factory=lambda f, s, c: ScriptedEngine(f, s),
    )
    with TestClient(app) as client:
        health = client.get("/health")
        assert health.status_code == 503 and "loading" in health.json()["problems"][0]
        error_of(client.post("/v1/completions", json={"model": FAMILY, "prompt": "a"}), 503)
        release.set()


def test_api_key_and_body_limit(family: Family, tiny_dirs: TinyFamilyDirs, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TINY_KEY", "s3cret")
    config = parse_config(deploy_dict(tiny_dirs, auth={"api_key_env": "TINY_KEY"}, limits={"max_body_bytes": 2048}))
    for api in start(family, config):
        for key in ("wrong", ""):
            client = openai.OpenAI(
                base_url="http://testserver/v1", api_key=key or "x", http_client=api.http, max_retries=0
            )
            with pytest.raises(openai.AuthenticationError) as info:
                client.models.list()
            assert info.value.status_code == 401
        assert api.http.get("/health").status_code == 200  # probes need no key
        good = openai.OpenAI(base_url="http://testserver/v1", api_key="s3cret", http_client=api.http, max_retries=0)
        assert good.completions.create(model=FAMILY, prompt="a", max_tokens=1).choices
        with pytest.raises(openai.APIStatusError) as too_big:
            good.completions.create(model=FAMILY, prompt="a" * 4000, max_tokens=1)
        assert too_big.value.status_code == 413
        assert too_big.value.body["code"] == "request_too_large"  # type: ignore[index]


def test_budget_unmeetable_is_429_saying_why(family: Family, tiny_dirs: TinyFamilyDirs) -> None:
    config = parse_config(deploy_dict(tiny_dirs, routing={"allow_degrade": False}))
    for api in start(family, config):
        api.engine.loads = {s: SizeLoad(prefill_tokens_per_s=1000, decode_step_s=0.05) for s in api.engine.sizes}
        body = {"model": FAMILY, "prompt": "a", "max_tokens": 10, "max_latency_ms": 100}
        error = error_of(api.http.post("/v1/completions", json=body), 429)
        assert "max_latency_ms=100" in error["message"] and "predicted" in error["message"]
        assert error["code"] == "budget_unmeetable"
        body["max_latency_ms"] = 600
        reply = api.http.post("/v1/completions", json=body)
        assert reply.status_code == 200 and reply.headers["x-boomerang-route-reason"] == "budget"
