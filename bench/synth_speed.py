"""Conversations per minute of the teacher-conversation synthesiser (boomerang_core.synth) on each
engine, same settings, same run, each into a fresh cache (start-up included), on the demo teacher.

    .venv/bin/python bench/synth_speed.py [--count 64] [--batch-size 32] [--engines transformers,vllm,vllm-auto]

``vllm-auto`` is vLLM with its own automatic thread binding (it keeps one core back for a scheduler
process that this in-process engine does not have); ``vllm`` binds every core. Prints the rate of each
arm against the transformers arm, the load average, five sample conversations, and what a
chat_fraction x token_budget demo recipe needs. Writes ``bench/results/synth_speed.md``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from boomerang_core import demo, synth
from boomerang_core.loading import load_tokenizer

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--engines", default="transformers,vllm")
    ap.add_argument("--budget", type=int, default=150_000, help="token budget of the recipe to estimate for")
    ap.add_argument("--chat-fraction", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads of the transformers arm (0: torch's default)")
    ap.add_argument("--out", type=Path, default=RESULTS / "synth_speed.md")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    teacher = demo.ensure_teacher()
    tokenizer = load_tokenizer(teacher)
    settings = synth.SynthSettings()
    rows = []
    samples: list[dict] = []
    for arm in a.engines.split(","):
        engine = "vllm" if arm.startswith("vllm") else arm
        if arm == "vllm-auto":
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "auto"
        load = os.getloadavg()[0]
        clock = time.perf_counter()
        with tempfile.TemporaryDirectory() as cache:
            convs = synth.teacher_conversations(
                teacher, a.count, cache_dir=cache, batch_size=a.batch_size, engine=engine, settings=settings
            )
            # the last batch is drawn whole: everything it kept counts (the cache holds it)
            kept, drawn = synth.SplitCache(synth.cache_dir_for(teacher, settings, cache) / "train.jsonl").read()
        wall = time.perf_counter() - clock
        os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
        tokens = len(synth.conversation_ids(tokenizer, kept))
        rows.append(
            {
                "arm": arm,
                "conversations": len(kept),
                "drawn": drawn,
                "finished": sum(c["finished"] for c in kept),
                "wall_s": wall,
                "per_min": len(kept) / wall * 60,
                "tokens_per_conv": tokens / len(kept),
                "load": (load + os.getloadavg()[0]) / 2,
            }
        )
        samples = samples or convs[:5]
        print(rows[-1], flush=True)
    base = rows[0]["per_min"]
    need_tokens = a.budget * a.chat_fraction
    lines = [
        "# Teacher-conversation synthesis: conversations per minute by engine",
        "",
        f"Demo teacher (SmolLM2-135M-Instruct, float32), at least {a.count} conversations per arm "
        f"(whole batches), batch {a.batch_size}, "
        f"settings {settings}; wall time includes loading the model (and vLLM's start-up) and the filters. "
        f"transformers on {torch.get_num_threads()} torch thread(s), vLLM bound to every core. "
        "One run, arms one after the other on a shared 2-core machine (load average column).",
        "",
        "| engine | kept | drawn | finished answers | wall s | conv/min | vs first | tokens/conv | load avg | "
        f"min for {a.chat_fraction:g} x {a.budget:,} tokens |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        need = need_tokens / r["tokens_per_conv"]
        lines.append(
            f"| {r['arm']} | {r['conversations']} | {r['drawn']} | {r['finished']} | {r['wall_s']:.0f} "
            f"| {r['per_min']:.1f} | {r['per_min'] / base:.2f}x | {r['tokens_per_conv']:.0f} | {r['load']:.1f} "
            f"| {need / r['per_min']:.0f} ({need:.0f} conv) |"
        )
    lines += ["", "Five sample conversations (first arm):", ""]
    for c in samples:
        user, answer = c["messages"]
        lines += [
            f"- **user:** {user['content']!r}",
            f"  **assistant** ({'finished' if c['finished'] else 'cut'}): {answer['content']!r}",
        ]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
