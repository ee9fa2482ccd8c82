"""The remote engine against a real second boomerang server on loopback (in a subprocess): health,
streamed greedy tokens equal to the in-memory build's, the worker's errors mapped, a worker that never
becomes healthy, and the same worker behind a ``remote`` tier of the pool."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from boomerang_core.assemble import build
from boomerang_core.family import Family
from server.config import parse_config
from server.engines.base import EngineError, GenerationRequest, SamplingParams
from server.engines.factory import pool_engine
from server.engines.remote import RemoteEngine
from server.services import load_family
from tests.server.deploys import TinyFamilyDirs, deploy_dict, write_deploy
from tests.server.live import free_port, launch, serving

pytestmark = pytest.mark.server
PROMPT = (5, 6, 7, 8, 9, 10)


@pytest.fixture(scope="module")
def worker(tiny_dirs: TinyFamilyDirs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A boomerang server serving k3 alone: what a remote tier points at."""
    tmp = tmp_path_factory.mktemp("worker")
    config = write_deploy(tmp / "worker.yaml", deploy_dict(tiny_dirs, tiers=[{"name": "k3", "size": "k3"}]))
    server = launch(config, tmp / "worker.log")
    with serving(server, stop_timeout=30):
        yield server.url


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
