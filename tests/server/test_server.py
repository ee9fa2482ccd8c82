"""The real server in a subprocess, the real in-process engine, the real ``openai`` client.

Two servers start side by side once for the module: ``main`` (API key, 4 sizes, batch 16) and
``strict`` (batch 1, queue 1, no degrading) for the 429 paths.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
import torch

from boomerang_core.assemble import build
from boomerang_core.family import Family
from server.config import parse_config
from server.services import load_family
from tests.server.deploys import FAMILY, TinyFamilyDirs, deploy_dict, write_deploy
from tests.server.live import KEY, PROMPTS, Holders, Server, launch, serving

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def servers(tiny_dirs: TinyFamilyDirs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Server]]:
    tmp = tmp_path_factory.mktemp("servers")
    main = deploy_dict(
        tiny_dirs,
        engines={"local": {"max_batch_size": 16, "max_queue": 256}},
        limits={"max_body_bytes": 65536, "max_tokens": 400},
        auth={"api_key_env": "TINY_SERVER_KEY"},
    )
    strict = deploy_dict(
        tiny_dirs, engines={"local": {"max_batch_size": 1, "max_queue": 1}}, routing={"allow_degrade": False}
    )
    started = {
        "main": launch(write_deploy(tmp / "main.yaml", main), tmp / "main.log"),
        "strict": launch(write_deploy(tmp / "strict.yaml", strict), tmp / "strict.log"),
    }
    with serving(*started.values()):
        yield started


@pytest.fixture(scope="module")
def server(servers: dict[str, Server]) -> Server:
    return servers["main"]


@pytest.fixture(scope="module")
def family(tiny_dirs: TinyFamilyDirs) -> Family:
    return load_family(parse_config(deploy_dict(tiny_dirs)))


def ids_of(family: Family, text: str) -> list[int]:
    assert family.store.tokenizer is not None
    return list(family.store.tokenizer(text)["input_ids"])


# --- generation -------------------------------------------------------------------------------


@pytest.mark.parametrize("size", ["k0", "k3", "k4", "k5"])
def test_greedy_output_of_every_size_equals_generate_on_the_built_model(
    server: Server, family: Family, size: str
) -> None:
    model = build(family.by_name(size).plan, family.store)
    tokenizer = family.store.tokenizer
    assert tokenizer is not None
    prompts = [ids_of(family, text) for text in PROMPTS[:2]]
    reply = server.client().completions.create(model=f"{FAMILY}:{size}", prompt=prompts, max_tokens=8, temperature=0)
    assert reply.model == f"{FAMILY}:{size}"
    for choice, ids in zip(sorted(reply.choices, key=lambda c: c.index), prompts, strict=True):
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
        assert choice.text == tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True), (size, ids)


def test_chat_stream_with_usage_equals_the_whole_reply(server: Server) -> None:
    client = server.client()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a module?"}]
    whole = client.chat.completions.create(model=FAMILY, messages=messages, max_tokens=8, temperature=0)  # type: ignore[arg-type]
    stream = client.chat.completions.create(
        model=FAMILY, messages=messages, max_tokens=8, temperature=0, stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens  # type: ignore[union-attr]
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens  # type: ignore[union-attr]
    assert {c.model for c in chunks} == {whole.model}


def test_n2_and_seeded_determinism(server: Server) -> None:
    client = server.client()

    def sample(seed: int, n: int = 1) -> list[str]:
        reply = client.completions.create(model=FAMILY, prompt=PROMPTS[0], max_tokens=6, temperature=1.0,
                                          seed=seed, n=n)  # fmt: skip
        assert [c.index for c in reply.choices] == list(range(n))
        return [c.text for c in reply.choices]

    pair = sample(123, n=2)
    assert len(pair) == 2 and pair[0] != pair[1]
    assert sample(123, n=2) == pair
    assert sample(123) == pair[:1]  # choice i is seeded with seed + i
    assert len({sample(s)[0] for s in (1, 2, 3)}) > 1


def test_stop_strings(server: Server) -> None:
    client = server.client()
    full = client.completions.create(model=FAMILY, prompt=PROMPTS[2], max_tokens=16, temperature=0).choices[0]
    stop = full.text[6:9]
    assert len(stop) == 3, full.text
    cut = client.completions.create(model=FAMILY, prompt=PROMPTS[2], max_tokens=16, temperature=0, stop=["@@@", stop])
    assert cut.choices[0].text == full.text[: full.text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_chat_logprobs_are_the_models(server: Server, family: Family) -> None:
    reply = server.client().chat.completions.create(
        model=f"{FAMILY}:k3", messages=[{"role": "user", "content": "hi"}], max_tokens=6, temperature=0,
        logprobs=True, top_logprobs=3,
    )  # fmt: skip
    content = reply.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == reply.usage.completion_tokens  # type: ignore[union-attr]
    for entry in content:
        tops = entry.top_logprobs
        assert len(tops) == 3 and [t.logprob for t in tops] == sorted((t.logprob for t in tops), reverse=True)
        assert entry.token == tops[0].token and entry.logprob == pytest.approx(tops[0].logprob)


def test_echo_prompt_logprobs_match_the_model(server: Server, family: Family) -> None:
    """What lm-evaluation-harness's local-completions sends for a log-likelihood request."""
    prompts = [ids_of(family, PROMPTS[0]), ids_of(family, PROMPTS[3])]
    reply = server.client().completions.create(
        model=f"{FAMILY}:k4", prompt=prompts, max_tokens=1, temperature=0, logprobs=1, echo=True, seed=1234
    )
    model = build(family.by_name("k4").plan, family.store)
    for choice, ids in zip(sorted(reply.choices, key=lambda c: c.index), prompts, strict=True):
        lp = choice.logprobs
        assert lp is not None and lp.token_logprobs is not None and lp.top_logprobs is not None
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
        expected = [float(logp[t - 1, ids[t]]) for t in range(1, len(ids))]
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert lp.token_logprobs[1 : len(ids)] == pytest.approx(expected, abs=1e-4)
        for t in range(1, len(ids)):  # the top-1 alternative is the model's argmax
            best = max(lp.top_logprobs[t].values())
            assert best == pytest.approx(float(logp[t - 1].max()), abs=1e-4)
        assert "".join(lp.tokens or []) == choice.text and len(lp.tokens or []) == len(ids) + 1
    assert reply.usage is not None and reply.usage.prompt_tokens == sum(map(len, prompts))


# --- routing ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "size", "expected"),
    [
        (FAMILY, "k3", "k3"),
        (FAMILY, "small", "k0"),
        (FAMILY, "378K", "k4"),
        (FAMILY, 0.8, "k3"),
        (FAMILY, "auto", "k5"),
        (f"{FAMILY}:k4", None, "k4"),
        (f"{FAMILY}:large", None, "k5"),
        (f"{FAMILY}:0.7", None, "k0"),
        (FAMILY, None, "k5"),
    ],
)
def test_each_size_form_reaches_the_size_it_names(server: Server, model: str, size: Any, expected: str) -> None:
    extra = {} if size is None else {"size": size}
    raw = server.client().completions.with_raw_response.create(model=model, prompt="a", max_tokens=1, extra_body=extra)
    assert raw.headers["x-boomerang-size"] == expected
    assert raw.parse().model == f"{FAMILY}:{expected}"


def test_memory_budget_picks_the_largest_size_that_fits(server: Server, family: Family) -> None:
    k3, k4 = family.by_name("k3"), family.by_name("k4")
    budget = (k3.bytes + k4.bytes) / 2 / 1e9
    raw = server.client().completions.with_raw_response.create(
        model=FAMILY, prompt="a", max_tokens=1, extra_body={"max_memory_gb": budget}
    )
    assert raw.headers["x-boomerang-size"] == "k3" and raw.headers["x-boomerang-route-reason"] == "budget"


def test_latency_budget_chooses_a_smaller_size_under_load(server: Server) -> None:
    client = server.client()

    def ask(budget_ms: float, out: list[tuple[str, str, float]]) -> None:
        raw = client.completions.with_raw_response.create(
            model=FAMILY, prompt=PROMPTS[0], max_tokens=4, extra_body={"max_latency_ms": budget_ms}
        )
        h = raw.headers
        out.append((h["x-boomerang-size"], h["x-boomerang-route-reason"], float(h["x-boomerang-predicted-ms"])))

    idle: list[tuple[str, str, float]] = []
    for _ in range(4):  # the last one with the engine's estimates warm
        ask(1e9, idle)
    assert idle[-1][0] == "k5"
    budget = max(3 * idle[-1][2], idle[-1][2] + 50)
    ask(budget, idle)
    assert idle[-1][:2] == ("k5", "budget")

    def smaller_decisions() -> float:
        return sum(server.metric("boomerang_router_decisions_total", size=s, reason=r)
                   for s in ("k0", "k3", "k4") for r in ("budget", "degraded"))  # fmt: skip

    holders = Holders(server, "k5", 20)  # 16 running, 4 waiting
    loaded: list[tuple[str, str, float]] = []
    try:
        deadline = time.monotonic() + 90
        while server.metric("boomerang_waiting_requests", size="k5") < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.metric("boomerang_waiting_requests", size="k5") >= 1, "the holders never filled the batch"
        before = smaller_decisions()
        asker = threading.Thread(target=ask, args=(budget, loaded))
        asker.start()
        while smaller_decisions() == before and asker.is_alive() and time.monotonic() < deadline + 30:
            time.sleep(0.05)  # decided; it may still be waiting for a batch slot
    finally:
        holders.release()
    asker.join(60)
    size, reason, predicted = loaded[0]
    assert size != "k5" and reason in ("budget", "degraded"), (size, reason, predicted, budget)


# --- streams and slots ------------------------------------------------------------------------


def test_client_disconnect_frees_its_slot(server: Server) -> None:
    before = server.metric("boomerang_generation_tokens_total", size="k4")
    body = {"model": FAMILY, "prompt": PROMPTS[0], "max_tokens": 380, "stream": True, "size": "k4", "ignore_eos": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as response:  # fmt: skip
        lines = response.iter_lines()
        for _ in range(3):
            next(lines)
        assert server.metric("boomerang_running_requests", size="k4") == 1
    deadline = time.monotonic() + 5
    while server.metric("boomerang_running_requests", size="k4") > 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.metric("boomerang_running_requests", size="k4") == 0
    time.sleep(0.3)
    assert server.metric("boomerang_generation_tokens_total", size="k4") - before < 300  # cut long before 380
    assert server.metric("boomerang_requests_total", size="k4", status="499") >= 1

    body["stream"] = False  # a whole-reply request whose client gives up is aborted too
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=body, timeout=0.3, headers={"Authorization": f"Bearer {KEY}"})
    deadline = time.monotonic() + 10
    while server.metric("boomerang_running_requests", size="k4") > 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.metric("boomerang_running_requests", size="k4") == 0
    assert server.metric("boomerang_requests_total", size="k4", status="499") >= 2


def test_64_concurrent_streams_lose_duplicate_and_mix_nothing(server: Server) -> None:
    sizes = ["k0", "k3", "k4", "k5"]
    jobs = [(PROMPTS[i % 4], sizes[(i // 4) % 4]) for i in range(64)]  # 16 distinct, each 4 times
    pairs = sorted(set(jobs))

    async def whole() -> list[str]:
        aclient = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)
        replies = await asyncio.gather(
            *(
                aclient.completions.create(model=f"{FAMILY}:{s}", prompt=p, max_tokens=6, temperature=0)
                for p, s in pairs
            )
        )
        await aclient.close()
        return [r.choices[0].text for r in replies]

    expected = dict(zip(pairs, asyncio.run(whole()), strict=True))

    async def one(prompt: str, size: str) -> tuple[str, list[str], int, set[str]]:
        aclient = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)
        stream = await aclient.completions.create(
            model=f"{FAMILY}:{size}", prompt=prompt, max_tokens=6, temperature=0, stream=True, logprobs=0,
            stream_options={"include_usage": True},
        )  # fmt: skip
        text, tokens, usage, ids = "", [], -1, set()
        async for chunk in stream:
            ids.add(chunk.id)
            if chunk.usage is not None:
                usage = chunk.usage.completion_tokens
            for c in chunk.choices:
                text += c.text
                tokens += (c.logprobs.tokens or []) if c.logprobs else []
        await aclient.close()
        return text, tokens, usage, ids

    async def run() -> list[tuple[str, list[str], int, set[str]]]:
        return await asyncio.gather(*(one(p, s) for p, s in jobs))

    results = asyncio.run(run())
    stream_ids = set()
    for (prompt, size), (text, tokens, usage, ids) in zip(jobs, results, strict=True):
        assert text == expected[(prompt, size)], (prompt, size)
        assert usage == len(tokens) and len(ids) == 1
        stream_ids |= ids
    assert len(stream_ids) == 64


# --- errors -----------------------------------------------------------------------------------


def _error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in response.text
    return dict(body["error"])


def test_every_error_status_is_openai_shaped(servers: dict[str, Server]) -> None:
    main, strict = servers["main"], servers["strict"]
    http = httpx.Client(timeout=60)
    auth = {"Authorization": f"Bearer {KEY}"}
    url = f"{main.url}/v1/chat/completions"
    chat = {"model": FAMILY, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert _error(http.post(url, json={**chat, "tools": []}, headers=auth), 400)["param"] == "tools"
    _error(http.post(url, json=chat), 401)
    _error(http.post(url, json=chat, headers={"Authorization": "Bearer nope"}), 401)
    assert "k3" in _error(http.post(url, json={**chat, "model": "llama"}, headers=auth), 404)["message"]
    _error(http.post(url, content=b"x" * 70_000, headers={**auth, "content-type": "application/json"}), 413)
    with pytest.raises(openai.BadRequestError, match="context length"):
        main.client().completions.create(model=FAMILY, prompt=list(range(3, 500)), max_tokens=100)

    # strict: one running, one waiting, the next is refused; budgets that cannot be met are refused
    holders: list[Holders] = []
    try:
        for gauge in ("boomerang_running_requests", "boomerang_waiting_requests"):  # one at a time: no race
            holders.append(Holders(strict, "k5", 1))
            deadline = time.monotonic() + 60
            while strict.metric(gauge, size="k5") < 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert strict.metric(gauge, size="k5") == 1, f"the holders never filled {gauge}"
        response = http.post(f"{strict.url}/v1/completions", json={"model": FAMILY, "prompt": "a", "max_tokens": 1})
    finally:
        for h in holders:
            h.release()
    assert _error(response, 429)["code"] == "queue_full" and int(response.headers["retry-after"]) >= 1
    budget = {"model": FAMILY, "prompt": "a", "max_tokens": 1, "max_memory_gb": 1e-6}
    error = _error(http.post(f"{strict.url}/v1/completions", json=budget), 429)
    assert error["code"] == "budget_unmeetable" and "max_memory_gb" in error["message"]


def test_models_and_health(server: Server) -> None:
    cards = {m.id: m.model_dump() for m in server.client().models.list().data}
    assert [cards[f"{FAMILY}:k{i}"]["loaded"] for i in range(6)] == [True, False, False, True, True, True]
    assert cards[f"{FAMILY}:k1"]["dominated"] and cards[f"{FAMILY}:k5"]["num_layers"] == 8
    health = httpx.get(f"{server.url}/health", timeout=30).json()
    assert health["status"] == "ok" and health["sizes"] == ["k0", "k3", "k4", "k5"]
    assert json.dumps(health)
