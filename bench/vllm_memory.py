"""Memory of four demo sizes under vLLM: one process holding the store and four store-backed engines
(what the gateway runs) vs four plain vLLM engines, each on its size's exported checkpoint. ONE run.

    .venv/bin/python bench/vllm_memory.py [--kv-cache-gb 0.1] [--out bench/results/vllm_memory.json]

Each side is measured alone (the other side's processes are gone), after every engine served one
greedy request of 16 tokens, as the total PSS (proportional set size: shared library pages split
among the processes that map them) of its processes. The orchestrating process imports neither torch
nor vLLM, so it shares no pages with either side. Plain engines use vLLM's most frugal setup here:
in-process engine core, eager, one process per size (``vllm serve`` would add a process per size).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROMPT = list(range(100, 164))  # 64 token ids
GIB = 2**30


def child(mode: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(Path(__file__)), mode, *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=HERE.parent)  # fmt: skip


def wait_line(proc: subprocess.Popen[str], prefix: str) -> str:
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith(prefix):
            return line[len(prefix) :].strip()
    raise RuntimeError(f"child exited before printing {prefix!r} (rc {proc.wait()})")


def pss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no Pss")


def tree_pss(pid: int) -> int:
    """PSS of a process and its descendants."""
    total = pss(pid)
    children = Path(f"/proc/{pid}/task/{pid}/children")
    for c in children.read_text().split() if children.exists() else []:
        total += tree_pss(int(c))
    return total


def finish(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.close()
    proc.wait(timeout=120)


# --- children -------------------------------------------------------------------------------------


def export_sizes(out_dir: str) -> None:
    from vllm_common import four_sizes, load_family

    from boomerang_core.assemble import export

    family, label = load_family()
    sizes = four_sizes(family)
    info = {"family": label, "store_bytes": family.store.resident_bytes(), "sizes": {}}
    for name in sizes:
        export(family.by_name(name).plan, family.store, Path(out_dir) / name)
        info["sizes"][name] = family.by_name(name).bytes
    print("INFO " + json.dumps(info), flush=True)


def shared(kv_cache_gb: str) -> None:
    from vllm_common import four_sizes, load_family

    from server.engines.base import GenerationRequest, SamplingParams
    from server.engines.vllm.replica import VllmReplica, VllmSettings
    from server.engines.vllm.stepper import VllmStepper
    from server.pool.tiers import TierPool, TierSpec

    family, _ = load_family()
    settings = VllmSettings(max_model_len=1024, max_num_seqs=16, kv_cache_gb=float(kv_cache_gb))
    stepper = VllmStepper()

    def spec(size: str) -> TierSpec:
        return TierSpec(size, "vllm", lambda: VllmReplica(family, size, settings, stepper), settings.replica_bytes)

    async def serve() -> None:
        pool = TierPool([spec(s) for s in four_sizes(family)], base_bytes=family.store.resident_bytes(),
                        budget_bytes=None, on_stop=[stepper.stop])  # fmt: skip
        await pool.start()
        for size in four_sizes(family):
            request = GenerationRequest(f"r-{size}", size, tuple(PROMPT), SamplingParams(max_tokens=16, temperature=0))
            async for _ in pool.generate(request):
                pass
        print("READY", flush=True)
        await asyncio.to_thread(sys.stdin.read)
        await pool.stop()

    asyncio.run(serve())


def plain(model_dir: str, kv_cache_gb: str) -> None:
    from vllm_common import plain_engine, run_greedy

    engine = plain_engine(model_dir, float(kv_cache_gb))
    run_greedy(engine, PROMPT, 16)
    print("READY", flush=True)
    sys.stdin.read()


# --- orchestration --------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kv-cache-gb", default="0.1")
    parser.add_argument("--out", default=str(HERE / "results" / "vllm_memory.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="boomerang-ckpt-") as tmp:
        exporter = child("export", tmp)
        info = json.loads(wait_line(exporter, "INFO "))
        finish(exporter)
        sizes = list(info["sizes"])
        print(f"family: {info['family']}; sizes {', '.join(sizes)}; kv cache {args.kv_cache_gb} GB per engine")

        started = time.perf_counter()
        proc = child("shared", args.kv_cache_gb)
        wait_line(proc, "READY")
        shared_pss = tree_pss(proc.pid)
        finish(proc)
        print(f"shared: 1 process, store + {len(sizes)} engines, PSS {shared_pss / GIB:.3f} GiB "
              f"({time.perf_counter() - started:.0f} s)")  # fmt: skip

        plain_procs = []
        for name in sizes:
            p = child("plain", str(Path(tmp) / name), args.kv_cache_gb)
            wait_line(p, "READY")
            plain_procs.append(p)
        plain_each = [tree_pss(p.pid) for p in plain_procs]
        for p in plain_procs:
            finish(p)
    plain_pss = sum(plain_each)
    weights = sum(info["sizes"].values())
    print(f"plain:  {len(sizes)} processes, PSS {plain_pss / GIB:.3f} GiB "
          f"({', '.join(f'{b / GIB:.2f}' for b in plain_each)})")  # fmt: skip
    store_gib = info["store_bytes"] / GIB
    print(f"weights: store {store_gib:.3f} GiB resident once; the four checkpoints {weights / GIB:.3f} GiB")
    print(f"RATIO plain / shared PSS = {plain_pss / shared_pss:.2f}x (saved {(plain_pss - shared_pss) / GIB:.3f} GiB)")
    result = {**info, "kv_cache_gb": float(args.kv_cache_gb), "shared_pss": shared_pss, "plain_pss": plain_pss,
              "plain_pss_each": plain_each, "ratio": plain_pss / shared_pss}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else ""
    if mode in ("export", "shared", "plain"):
        import os

        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        sys.path[:0] = [str(HERE), str(HERE.parent)]
        {"export": export_sizes, "shared": shared, "plain": plain}[mode](*sys.argv[2:])
    else:
        main()
