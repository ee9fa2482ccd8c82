"""Inter-token latency of a small and a large size, alone and mixed, per engine, ONE run.

    .venv/bin/python bench/vllm_mix_bench.py [--arms local,workers,stepper] [--streams 4] [--tokens 64]
                                             [--out bench/results/vllm_mix_bench.md]

One gateway per arm serves two tiers, the family's smallest size and its largest (the teacher's
plan), on:

- ``local``: the in-process engine (``engine: local``; one batch holds both sizes' requests);
- ``workers``: ``engine: vllm`` tiers as vLLM worker processes over the shared store (``mode: process``);
- ``stepper``: the same tiers on in-process vLLM engines stepped in turn by one thread (``mode: in_process``).

Per arm, three phases: ``--streams`` greedy streams of the small size alone, of the large size alone,
then of both at once (``--streams`` of each). A stream's inter-token latency (ITL) is the time from
its first token to its last over the tokens in between (chunks that arrive together count by
their tokens); a phase reports the mean over its streams per size, and its output tokens/s (all
streams' tokens over the phase's wall time). The mixed phase's small/large ITL ratio is the
issue's target (at most 0.8: the small size should keep its speed in a mix). Every vLLM engine gets
the same KV cache, batch and context limits. Family: the demo family when it is built, else the
demo teacher with a pruned (undistilled) stand-in student (``vllm_serve_bench.family_dirs``).
Timings depend on the machine's other load: compare arms only within one run (the load average is
sampled while each arm is measured). The in-process arms use the gateway's intra-op threads (torch's
default: every core; ``OMP_NUM_THREADS`` sets it); each worker binds its own (``CpuCores``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(HERE), str(REPO)]

from vllm_serve_bench import family_dirs, gateway_config  # noqa: E402

from tests.server import live  # noqa: E402

FAMILY = "bench"
MAX_MODEL_LEN, MAX_NUM_SEQS, KV_GB = 2048, 16, 0.5
PROMPT = "The module defines a function that returns the value of"
TIERS = ("small", "large")
PHASES = ("small alone", "large alone", "mixed")


def two_sizes(teacher: Path, student: Path) -> dict[str, tuple[str, int]]:
    """{tier: (size, layers)}: the servable size with fewest layers, and the largest."""
    from boomerang_core.family import Family

    family = Family.open(str(teacher), str(student), name=FAMILY)
    small = min(family.servable, key=lambda s: (s.plan.num_layers, s.name))
    large = family.largest
    return {"small": (small.name, small.plan.num_layers), "large": (large.name, large.plan.num_layers)}


def stream(url: str, tier: str, tokens: int, start: threading.Barrier, out: list[dict[str, Any]]) -> None:
    """One greedy completion stream; appends {tier, tokens, first, last, error} (times: perf_counter)."""
    body = {"model": f"{FAMILY}:{tier}", "prompt": PROMPT, "max_tokens": tokens, "temperature": 0,
            "stream": True, "ignore_eos": True}  # fmt: skip
    got, first, last, error = 0, None, None, None
    start.wait()
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as response:
            if response.status_code != 200:
                response.read()
                raise RuntimeError(f"{response.status_code}: {response.text[:300]}")
            for line in response.iter_lines():
                if not line.startswith("data:") or line.strip() == "data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                n = sum(len(c.get("token_ids") or ()) or bool(c.get("text")) for c in chunk.get("choices", []))
                if n:
                    now = time.perf_counter()
                    if first is None:
                        first, got = now, n
                    else:
                        got += n
                    last = now
    except Exception as exc:  # reported in the row, never hidden
        error = f"{type(exc).__name__}: {exc}"
    out.append({"tier": tier, "tokens": got, "first": first, "last": last, "error": error})


def phase(url: str, counts: dict[str, int], tokens: int) -> dict[str, Any]:
    """``counts[tier]`` streams of each tier started together; per tier mean ITL (ms), and tokens/s."""
    out: list[dict[str, Any]] = []
    jobs = [tier for tier, n in counts.items() for _ in range(n)]
    start = threading.Barrier(len(jobs) + 1)
    threads = [threading.Thread(target=stream, args=(url, tier, tokens, start, out)) for tier in jobs]
    for t in threads:
        t.start()
    start.wait()
    began = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - began
    result: dict[str, Any] = {"wall_s": wall, "tokens_per_s": sum(r["tokens"] for r in out) / wall, "itl_ms": {}}
    result["errors"] = [r["error"] for r in out if r["error"]]
    for tier in counts:
        itls = [(r["last"] - r["first"]) / (r["tokens"] - 1) * 1e3 for r in out
                if r["tier"] == tier and not r["error"] and r["tokens"] > 1]  # fmt: skip
        result["itl_ms"][tier] = statistics.mean(itls) if itls else None
    return result


class LoadSampler:
    """The 1-minute load average every ``every_s`` seconds in the background, while in the block."""

    def __init__(self, every_s: float = 5.0) -> None:
        self.every_s, self.samples = every_s, [os.getloadavg()[0]]
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._done.wait(self.every_s):
            self.samples.append(os.getloadavg()[0])

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    def summary(self) -> dict[str, float]:
        return {"min": min(self.samples), "mean": statistics.mean(self.samples), "max": max(self.samples)}


def run_arm(arm: str, work: Path, teacher: Path, student: Path, sizes: dict[str, tuple[str, int]],
            args: argparse.Namespace) -> dict[str, Any]:  # fmt: skip
    config = gateway_config(work, teacher, student, {t: size for t, (size, _) in sizes.items()}, arm, KV_GB)
    port = live.free_port()
    env = {k: v for k, v in os.environ.items() if k != "BENCH_NO_KEY"}
    argv = [sys.executable, "-m", "server.run", str(config), "--port", str(port)]
    server = live.spawn(argv, port, work / f"{arm}.log", {**env, "PYTHONPATH": str(REPO)})
    started = time.monotonic()
    with live.serving(server, timeout=900, stop_timeout=60):
        print(f"{arm}: ready in {time.monotonic() - started:.0f} s", flush=True)
        phase(server.url, {"small": 1, "large": 1}, 8)  # warm-up: both sizes, every engine compiled
        with LoadSampler() as load:
            result = {
                "small alone": phase(server.url, {"small": args.streams}, args.tokens),
                "large alone": phase(server.url, {"large": args.streams}, args.tokens),
                "mixed": phase(server.url, {"small": args.streams, "large": args.streams}, args.tokens),
            }
        result["load"] = load.summary()
    for name, r in result.items():
        print(f"{arm} {name}: {json.dumps(r)}", flush=True)
    return result


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def table(results: dict[str, dict[str, Any]], sizes: dict[str, tuple[str, int]]) -> list[str]:
    small, large = (f"{sizes[t][0]} ({sizes[t][1]} layers)" for t in TIERS)
    lines = [
        f"| arm | ITL {small} alone | ITL {large} alone | ITL {small} mixed | ITL {large} mixed "
        "| mixed small / large | tok/s small alone | tok/s large alone | tok/s mixed | errors "
        "| load avg mean (min-max) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, r in results.items():
        s_alone, l_alone = r["small alone"]["itl_ms"]["small"], r["large alone"]["itl_ms"]["large"]
        s_mix, l_mix = r["mixed"]["itl_ms"]["small"], r["mixed"]["itl_ms"]["large"]
        ratio = f"{s_mix / l_mix:.2f}" if s_mix and l_mix else "-"
        errors = sum(len(r[p]["errors"]) for p in PHASES)
        load = r["load"]
        lines.append(
            f"| {arm} | {ms(s_alone)} | {ms(l_alone)} | {ms(s_mix)} | {ms(l_mix)} | {ratio} "
            f"| {r['small alone']['tokens_per_s']:.1f} | {r['large alone']['tokens_per_s']:.1f} "
            f"| {r['mixed']['tokens_per_s']:.1f} | {errors} "
            f"| {load['mean']:.1f} ({load['min']:.1f}-{load['max']:.1f}) |"
        )
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arms", default="local,workers,stepper")
    ap.add_argument("--streams", type=int, default=4, help="streams per size in each phase")
    ap.add_argument("--tokens", type=int, default=64, help="output tokens per stream (EOS ignored)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "vllm_mix_bench.md")
    args = ap.parse_args()
    results: dict[str, dict[str, Any]] = {}
    loads = []
    with tempfile.TemporaryDirectory(prefix="vllm-mix-bench-") as tmp:
        work = Path(tmp)
        teacher, student = family_dirs(work)
        sizes = two_sizes(teacher, student)
        for arm in args.arms.split(","):
            loads.append(os.getloadavg()[0])
            results[arm] = run_arm(arm, work, teacher, student, sizes, args)
    loads.append(os.getloadavg()[0])
    lines = [
        "# Inter-token latency of two sizes, alone and mixed, per engine, same run",
        "",
        f"`{' '.join(sys.argv)}`: {args.streams} greedy streams per size, {args.tokens} output tokens each (EOS "
        f"ignored); phases: small alone, large alone, both at once ({args.streams} + {args.streams}). ITL: mean over "
        f"streams of (last token - first token) / (tokens - 1), ms. tok/s: all output tokens over the phase's wall "
        f"time. vLLM: float32, eager, KV cache {KV_GB} GB per engine, {MAX_NUM_SEQS} sequences. "
        f"{os.cpu_count()} cores; load average (1 min) at each arm's start and at the end: "
        f"{', '.join(f'{x:.1f}' for x in loads)}; per arm, sampled every 5 s while it was measured, in the table.",
        "",
        *table(results, sizes),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps({"sizes": sizes, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
