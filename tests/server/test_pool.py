"""Tier pool logic over fake replicas (fast): the start-up budget check, retry before the first token,
an error after it, on-demand start with requests waiting, no room -> 429, and the config schema.
The same paths under real vLLM engines are in test_vllm_pool.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from server.config import ConfigError, parse_config
from server.engines.base import Engine, EngineError, GenerationRequest, QueueFull, SizeLoad, TokenEvent
from server.pool.tiers import PoolBudgetError, TierPool, TierSpec

GB = 10**9


class FakeReplica(Engine):
    """Emits ``tokens`` events; ``fail_at`` raises EngineError before event number ``fail_at``."""

    def __init__(self, size: str, *, tokens: int = 3, fail_at: int | None = None, start_s: float = 0.0) -> None:
        self.size, self.tokens, self.fail_at, self.start_s = size, tokens, fail_at, start_s
        self.alive = False
        self.served = 0

    @property
    def sizes(self) -> tuple[str, ...]:
        return (self.size,)

    async def start(self) -> None:
        await asyncio.sleep(self.start_s)
        self.alive = True

    async def stop(self) -> None:
        self.alive = False

    def healthy(self) -> bool:
        return self.alive

    def load(self, size: str) -> SizeLoad:
        return SizeLoad()

    async def abort(self, request_id: str) -> None:
        return None

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:  # type: ignore[override]
        self.served += 1
        for i in range(self.tokens):
            if self.fail_at == i:
                self.alive = False
                raise EngineError("replica died")
            yield TokenEvent(token_ids=(i,), finish_reason="length" if i == self.tokens - 1 else None)


def _pool(makers: dict[str, list[FakeReplica]], budget: int | None, lo: int = 1, hi: int = 2, **kw: object) -> TierPool:
    specs = [TierSpec(size, "fake", queue.pop, GB, lo, hi) for size, queue in makers.items()]
    return TierPool(specs, base_bytes=2 * GB, budget_bytes=budget, **kw)  # type: ignore[arg-type]


async def _collect(pool: TierPool, size: str) -> list[int]:
    return [t for e in [e async for e in pool.generate(GenerationRequest("r", size, (1,)))] for t in e.token_ids]


def test_a_budget_too_small_for_any_replica_is_a_start_up_error_naming_the_numbers() -> None:
    pool = _pool({"k1": [FakeReplica("k1")]}, budget=int(2.5 * GB), lo=0)
    with pytest.raises(PoolBudgetError) as err:
        asyncio.run(pool.start())
    text = str(err.value)
    assert "pool.memory_budget_gb=2.500 is too small" in text
    assert "layer store needs 2.000 GB" in text and "smallest replica 1.000 GB" in text and "3.000 GB is needed" in text


def test_the_minimum_replicas_must_fit_the_budget() -> None:
    pool = _pool({"k1": [FakeReplica("k1")] * 3, "k2": [FakeReplica("k2")] * 3}, budget=int(4.5 * GB), lo=2, hi=3)
    with pytest.raises(PoolBudgetError, match=r"minimum replicas 4.000 GB \(k1: 2 x 1.000 GB, k2: 2 x 1.000 GB\)"):
        asyncio.run(pool.start())


def test_a_failure_before_the_first_token_is_retried_on_a_fresh_replica_after_it_errors() -> None:
    async def scenario() -> None:
        first, second = FakeReplica("k1", fail_at=0), FakeReplica("k1")
        pool = _pool({"k1": [second, first]}, budget=None, lo=1, hi=1, scale_interval_s=0.05)
        await pool.start()
        assert await _collect(pool, "k1") == [0, 1, 2]  # first died silently, second served
        assert pool.metrics.restarts.labels("k1")._value.get() == 1
        second.fail_at = 1
        with pytest.raises(EngineError, match="replica died"):  # dies after a token: no retry
            await _collect(pool, "k1")
        await pool.stop()

    asyncio.run(scenario())


def test_on_demand_start_keeps_requests_waiting_and_no_room_is_429() -> None:
    async def scenario() -> None:
        replicas = {"k1": [FakeReplica("k1", start_s=0.3)], "k2": [FakeReplica("k2")]}
        pool = _pool(replicas, budget=3 * GB, lo=0, hi=1)
        await pool.start()
        assert pool.replicas("k1") == []
        results = await asyncio.gather(_collect(pool, "k1"), _collect(pool, "k1"))
        assert results == [[0, 1, 2]] * 2 and len(pool.replicas("k1")) == 1  # one start served both
        pool._tiers["k1"].waiting = 1  # busy: cannot be evicted
        with pytest.raises(QueueFull, match="needs 1.000 GB for a replica, but 3.000 GB of the 3.000 GB"):
            await _collect(pool, "k2")
        await pool.stop()

    asyncio.run(scenario())


def test_pool_config_errors_name_their_path() -> None:
    tiers = [
        {"name": "a", "size": "k0"},
        {"name": "b", "size": "k1", "engine": "remote"},
        {"name": "c", "size": "k2", "engine": "vllm", "min_replicas": 3, "max_replicas": 2},
        {"name": "d", "size": "k3", "engine": "local", "max_replicas": 2},
    ]
    with pytest.raises(ConfigError) as err:
        parse_config({"tiers": tiers, "pool": {"memory_budget_gb": 0}})
    problems = err.value.problems
    assert "tiers[1].url: a remote tier needs the worker's base URL, e.g. http://worker:8000" in problems
    assert "tiers[2].max_replicas: must be >= min_replicas" in problems
    assert any(p.startswith("tiers[3].max_replicas: local tiers have one engine") for p in problems)
    assert any(p.startswith("pool.memory_budget_gb:") for p in problems)
    ok = parse_config({"tiers": [{"name": "c", "size": "k2", "engine": "vllm", "min_replicas": 0, "max_replicas": 4}],
                       "engines": {"vllm": {"kv_cache_gb": 0.5, "max_num_seqs": 8}},
                       "pool": {"memory_budget_gb": 8, "queue_depth_target": 2, "idle_timeout_s": 60}})  # fmt: skip
    assert ok.tiers[0].max_replicas == 4 and ok.engines.vllm.kv_cache_gb == 0.5 and ok.pool.memory_budget_gb == 8


def test_workers_tool_call_parser_is_hermes_unless_set() -> None:
    """engines.vllm.tool_call_parser reaches the workers' settings (their --tool-call-parser); null: none."""
    from server.engines.factory import vllm_settings

    assert vllm_settings(parse_config({})).tool_call_parser == "hermes"
    for name in ("llama3_json", None):
        assert vllm_settings(parse_config({"engines": {"vllm": {"tool_call_parser": name}}})).tool_call_parser == name
    with pytest.raises(ConfigError) as err:
        parse_config({"engines": {"vllm": {"tool_call_parser": "hermes --trust-remote-code"}}})
    assert any(p.startswith("engines.vllm.tool_call_parser:") for p in err.value.problems)
