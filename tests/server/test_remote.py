"""The remote engine against a real second boomerang server on loopback (in a subprocess): health,
streamed greedy tokens equal to the in-memory build's, the worker's errors mapped, a worker that never
becomes healthy, the same worker behind a ``remote`` tier of the pool, and a gateway process that
forwards requests for that tier to the worker as the client sent them.

The worker serves its family under another name (``worker``) and takes shorter prompts than the
gateway, so that the public name in the gateway's answers and the worker's own 400 are both visible."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import torch

from boomerang_core.assemble import build, export
from boomerang_core.family import Family
from server.config import parse_config
from server.engines.base import EngineError, GenerationRequest, SamplingParams
from server.engines.factory import pool_engine
from server.engines.remote import RemoteEngine
from server.services import load_family
from tests.server.deploys import TinyFamilyDirs, deploy_dict, write_deploy
from tests.server.live import KEY, Server, free_port, launch, serving, spawn

pytestmark = pytest.mark.server
PROMPT = (5, 6, 7, 8, 9, 10)
WORKER_PROMPT_LIMIT = 16
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def worker(tiny_dirs: TinyFamilyDirs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A boomerang server serving k3 alone, as ``worker:k3``: what a remote tier points at."""
    tmp = tmp_path_factory.mktemp("worker")
    data = deploy_dict(tiny_dirs, family={"name": "worker"}, tiers=[{"name": "k3", "size": "k3"}],
                       limits={"max_prompt_tokens": WORKER_PROMPT_LIMIT})  # fmt: skip
    server = launch(write_deploy(tmp / "worker.yaml", data), tmp / "worker.log")
    with serving(server, stop_timeout=30):
        yield server.url


@pytest.fixture(scope="module")
def gateway(worker: str, tiny_dirs: TinyFamilyDirs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A gateway serving k0 itself and forwarding k3 to the worker."""
    tmp = tmp_path_factory.mktemp("gateway")
    tiers = [{"name": "small", "size": "k0"}, {"name": "k3", "size": "k3", "engine": "remote", "url": worker}]
    server = launch(write_deploy(tmp / "gateway.yaml", deploy_dict(tiny_dirs, tiers=tiers)), tmp / "gateway.log")
    with serving(server, stop_timeout=30):
        yield server


@pytest.fixture(scope="module")
def family(tiny_dirs: TinyFamilyDirs) -> Family:
    return load_family(parse_config(deploy_dict(tiny_dirs)))


def _expected(family: Family, size: str, n: int) -> str:
    model = build(family.by_name(size).plan, family.store)
    out = model.generate(torch.tensor([PROMPT]), max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)
    return str(family.store.tokenizer.decode(out[0, len(PROMPT) :], skip_special_tokens=True))


async def _text(engine: RemoteEngine | object, request: GenerationRequest) -> tuple[str, list[str | None]]:
    text, finishes = "", []
    async for event in engine.generate(request):  # type: ignore[attr-defined]
        text += event.text
        finishes.append(event.finish_reason)
    return text, finishes


def test_streams_the_greedy_text_of_the_build_and_maps_errors(worker: str, family: Family) -> None:
    async def scenario() -> None:
        engine = RemoteEngine(worker, "k3", start_timeout_s=30)
        await engine.start()
        assert engine.healthy() and engine.sizes == ("k3",)
        sampling = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=False)
        text, finishes = await _text(engine, GenerationRequest("r1", "k3", PROMPT, sampling))
        assert text == _expected(family, "k3", 12)
        assert finishes[-1] == "length" and len(finishes) > 2  # streamed in pieces
        with pytest.raises(EngineError, match="out of range"):
            await _text(engine, GenerationRequest("r2", "k3", (99_999,), sampling))
        await engine.stop()

    asyncio.run(scenario())


def test_a_worker_that_never_becomes_healthy_is_a_clear_error(worker: str) -> None:
    async def scenario() -> None:
        dead = RemoteEngine(f"http://127.0.0.1:{free_port()}", "k3", start_timeout_s=1.5)
        started = time.monotonic()
        with pytest.raises(EngineError, match=r"did not become healthy within 1.5 s: ConnectError"):
            await dead.start()
        assert time.monotonic() - started < 10
        wrong = RemoteEngine(worker, "k4", start_timeout_s=1.0)
        with pytest.raises(EngineError, match="does not serve size k4"):
            await wrong.start()

    asyncio.run(scenario())


def test_a_remote_tier_of_the_pool_serves_through_the_worker(worker: str, family: Family, tiny_dirs: TinyFamilyDirs):
    tiers = [{"name": "small", "size": "k0"}, {"name": "k3", "size": "k3", "engine": "remote", "url": worker}]
    config = parse_config(deploy_dict(tiny_dirs, tiers=tiers))

    async def scenario() -> None:
        pool = pool_engine(family, ["k0", "k3"], config)
        await pool.start()
        try:
            assert set(pool.sizes) == {"k0", "k3"}
            sampling = SamplingParams(max_tokens=8, temperature=0.0)
            remote_text, _ = await _text(pool, GenerationRequest("p1", "k3", PROMPT, sampling))
            local_text, _ = await _text(pool, GenerationRequest("p2", "k0", PROMPT, sampling))
            assert remote_text == _expected(family, "k3", 8)
            assert local_text == _expected(family, "k0", 8)
        finally:
            await pool.stop()

    asyncio.run(scenario())


@pytest.mark.vllm
def test_the_gateway_serves_local_vllm_and_remote_tiers_side_by_side(
    worker: str, family: Family, tiny_dirs: TinyFamilyDirs, tmp_path: Path
) -> None:
    """A real gateway process whose deploy file mixes all three engine kinds, through the openai client."""
    tiers = [
        {"name": "small", "size": "k0"},
        {"name": "k3", "size": "k3", "engine": "remote", "url": worker},
        {"name": "k4", "size": "k4", "engine": "vllm", "min_replicas": 1, "max_replicas": 2},
    ]
    data = deploy_dict(tiny_dirs, tiers=tiers, engines={"vllm": {"max_model_len": 256, "kv_cache_gb": 0.02}},
                       pool={"memory_budget_gb": 4})  # fmt: skip
    gateway = launch(write_deploy(tmp_path / "gateway.yaml", data), tmp_path / "gateway.log")
    with serving(gateway, timeout=300, stop_timeout=30):
        client = gateway.client()
        for size in ("k0", "k3", "k4"):
            stream = client.completions.create(
                model=f"tiny:{size}", prompt=list(PROMPT), max_tokens=8, temperature=0, stream=True
            )
            text = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
            assert text == _expected(family, size, 8), size
        metrics = httpx.get(f"{gateway.url}/metrics").text
        assert 'boomerang_replicas{size="k4"} 1.0' in metrics
        assert 'boomerang_scale_events_total{direction="up",reason="min",size="k4"} 1.0' in metrics


def _post(url: str, path: str, body: dict[str, object]) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, headers=AUTH, timeout=120)


def test_the_gateway_forwards_fields_it_does_not_serve_itself(gateway: Server, worker: str) -> None:
    """Echo with prompt logprobs, which the token-id path of a remote tier refuses, reaches the worker:
    the gateway's answer is the worker's, under the size's public name and with the gateway's headers."""
    body = {"prompt": list(PROMPT), "max_tokens": 4, "temperature": 0, "echo": True, "logprobs": 2}
    through = _post(gateway.url, "/v1/completions", {**body, "model": "tiny", "size": "k3"})
    direct = _post(worker, "/v1/completions", {**body, "model": "worker:k3"})
    assert through.status_code == direct.status_code == 200, through.text
    assert through.headers["x-boomerang-size"] == "k3" and through.headers["x-request-id"].startswith("cmpl-")
    answer, expected = through.json(), direct.json()
    assert answer["model"] == "tiny:k3" and expected["model"] == "worker:k3"
    assert answer["choices"] == expected["choices"] and answer["usage"] == expected["usage"]
    assert answer["choices"][0]["logprobs"]["token_logprobs"][0] is None  # the prompt's first token: echoed


def test_a_forwarded_stream_equals_the_whole_reply_under_the_public_name(
    gateway: Server, worker: str, family: Family
) -> None:
    client = gateway.client()
    tokens_before = gateway.metric("boomerang_generation_tokens_total", size="k3")
    whole = client.completions.create(model="tiny:k3", prompt=list(PROMPT), max_tokens=12, temperature=0)
    chunks = list(client.completions.create(model="tiny:k3", prompt=list(PROMPT), max_tokens=12, temperature=0,
                                            stream=True))  # fmt: skip
    direct = openai.OpenAI(base_url=f"{worker}/v1", api_key=KEY, max_retries=0).completions.create(
        model="worker:k3", prompt=list(PROMPT), max_tokens=12, temperature=0, stream=True
    )
    assert whole.model == "tiny:k3" and whole.choices[0].text == _expected(family, "k3", 12)
    assert [c.choices[0].text for c in chunks] == [c.choices[0].text for c in direct]  # the worker's pieces
    assert len(chunks) >= 2 and all(c.model == "tiny:k3" for c in chunks)
    assert all(c.choices and c.usage is None for c in chunks)  # the usage the gateway asked for is not shown
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason == "length"
    with_usage = list(client.completions.create(model="tiny:k3", prompt=list(PROMPT), max_tokens=12, temperature=0,
                                                stream=True, stream_options={"include_usage": True}))  # fmt: skip
    assert with_usage[-1].usage is not None and with_usage[-1].usage.completion_tokens == 12
    assert with_usage[-1].model == "tiny:k3"
    # every forwarded request counted under its size, its tokens from the worker's usage
    assert gateway.metric("boomerang_generation_tokens_total", size="k3") - tokens_before == 36
    assert gateway.metric("boomerang_requests_total", size="k3", endpoint="/v1/completions", status="200") >= 3


def test_a_worker_400_comes_back_as_it_is(gateway: Server, worker: str) -> None:
    """A prompt over the worker's own limit: the worker's status and body, not the gateway's."""
    body = {"prompt": list(range(5, 5 + WORKER_PROMPT_LIMIT + 4)), "max_tokens": 4}
    through = _post(gateway.url, "/v1/completions", {**body, "model": "tiny:k3"})
    direct = _post(worker, "/v1/completions", {**body, "model": "worker:k3"})
    assert through.status_code == direct.status_code == 400
    assert through.json() == direct.json()
    assert through.json()["error"]["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="more than the limit of 16"):
        gateway.client().completions.create(model="tiny:k3", prompt=body["prompt"], max_tokens=4, stream=True)
    local = _post(gateway.url, "/v1/completions", {**body, "model": "tiny:k0"})  # the gateway's own size takes it
    assert local.status_code == 200, local.text


def test_the_gateway_still_reads_its_own_fields_for_forwarded_sizes(gateway: Server) -> None:
    """A bad size is the gateway's 404; a field only the worker knows is left to the worker."""
    bad = _post(gateway.url, "/v1/completions", {"model": "tiny", "size": "k99", "prompt": "x", "max_tokens": 2})
    assert bad.status_code == 404 and bad.json()["error"]["param"] == "size"
    budget = _post(gateway.url, "/v1/completions", {"model": "tiny", "size": "k3", "max_latency_ms": -1, "prompt": "x"})
    assert budget.status_code == 400 and budget.json()["error"]["param"] == "max_latency_ms"
    unknown = _post(gateway.url, "/v1/completions", {"model": "tiny:k3", "prompt": "x", "max_tokens": 2, "frob": 1})
    assert unknown.status_code == 400 and unknown.json()["error"]["message"] == "unrecognized request argument: 'frob'"
    assert unknown.headers["x-boomerang-size"] == "k3"  # answered by the worker, after routing


@pytest.mark.vllm
def test_vllm_fields_reach_a_vllm_worker_through_the_gateway(
    family: Family, tiny_dirs: TinyFamilyDirs, tmp_path: Path
) -> None:
    """A stock vLLM OpenAI server on k3 exported is the worker: vLLM's sampling fields and structured
    output, which the gateway never reads, give through the gateway what they give at vLLM itself."""
    checkpoint = str(export(family.by_name("k3").plan, family.store, tmp_path / "k3"))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", checkpoint, "--port", str(port),
            "--dtype", "float32", "--enforce-eager", "--max-model-len", "256", "--max-num-seqs", "4",
            "--kv-cache-memory-bytes", str(20_000_000), "--generation-config", "vllm"]  # fmt: skip
    vllm = spawn(argv, port, tmp_path / "vllm.log", env)
    with serving(vllm, timeout=600, stop_timeout=60):
        tiers = [{"name": "small", "size": "k0"}, {"name": "k3", "size": "k3", "engine": "remote", "url": vllm.url}]
        gateway = launch(write_deploy(tmp_path / "gateway.yaml", deploy_dict(tiny_dirs, tiers=tiers)),
                         tmp_path / "gateway.log")  # fmt: skip
        with serving(gateway, stop_timeout=30):
            direct = openai.OpenAI(base_url=f"{vllm.url}/v1", api_key="none", max_retries=0, timeout=120)
            through = gateway.client()
            ask = {"prompt": list(PROMPT), "max_tokens": 32, "temperature": 0}
            plain = direct.completions.create(model=checkpoint, **ask).choices[0].text
            extra = {"repetition_penalty": 2.0, "min_p": 0.1}
            penalised = direct.completions.create(model=checkpoint, **ask, extra_body=extra).choices[0].text
            assert penalised != plain  # the fields change vLLM's answer, so the gateway's shows they reached it
            answer = through.completions.create(model="tiny:k3", **ask, extra_body=extra)
            assert answer.model == "tiny:k3" and answer.choices[0].text == penalised
            chat = {"messages": [{"role": "user", "content": "Give me a JSON object"}], "max_tokens": 16,
                    "temperature": 0, "response_format": {"type": "json_object"}}  # fmt: skip
            expected = direct.chat.completions.create(model=checkpoint, **chat)  # type: ignore[call-overload]
            whole = through.chat.completions.create(model="tiny:k3", **chat)  # type: ignore[call-overload]
            assert whole.model == "tiny:k3" and whole.choices[0].message.content == expected.choices[0].message.content
            chunks = list(through.chat.completions.create(model="tiny:k3", stream=True, **chat))  # type: ignore[call-overload]
            assert chunks and all(c.model == "tiny:k3" for c in chunks)
            assert (
                "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
                == expected.choices[0].message.content
            )
