"""Training tokens/s of CPU distillation for a few recipe switches (the demo teacher).

    .venv/bin/python bench/distill_speed.py [--steps 4] [--variants fp32,frozen,...]

Each variant distils a few optimizer steps into a temporary directory; the first step (warm-up)
is not timed. Wall-clock tokens/s depend on what else runs on the machine; CPU seconds per 1K
tokens (this process's CPU time) much less so: on an idle machine with T cores, tokens/s is about
T * 1000 / (CPU s per 1K tokens).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from typing import Any

import torch
from transformers import TrainerCallback

from boomerang_core.data import load_corpus, token_blocks
from boomerang_core.demo import ensure_teacher
from boomerang_core.distill import DistillConfig, distill
from boomerang_core.loading import load_tokenizer

VARIANTS: dict[str, dict[str, Any]] = {
    "naive": dict(freeze_embeddings=False, bf16=False),
    "frozen": dict(freeze_embeddings=True, bf16=False),
    "frozen+top64": dict(freeze_embeddings=True, bf16=False, kl_top_k=64),
    "frozen+seq128": dict(freeze_embeddings=True, bf16=False, seq_len=128),
    "frozen+bf16": dict(freeze_embeddings=True, bf16=True),
}


class StepTimes(TrainerCallback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self.cpu: list[float] = []

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.times.append(time.perf_counter())
        self.cpu.append(time.process_time())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--variants", default="naive,frozen,frozen+top64,frozen+seq128")
    ap.add_argument("--first", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8, help="sequences of 256 tokens per step")
    a = ap.parse_args()
    teacher = ensure_teacher()
    tok = load_tokenizer(teacher)
    texts = load_corpus().train[:300]
    print(f"threads {torch.get_num_threads()}")
    print("| variant | seq x batch | s/step | tokens/s (wall) | CPU s per 1K tokens |")
    print("| --- | --- | --- | --- | --- |")
    for name in a.variants.split(","):
        cfg = DistillConfig(first_layers_to_keep=a.first, save_steps=10_000, logging_steps=10_000, **VARIANTS[name])
        cfg.batch_size = a.batch * 256 // cfg.seq_len  # the same tokens per step for every variant
        cfg.token_budget = cfg.tokens_per_step() * a.steps
        blocks = token_blocks(tok, texts, cfg.seq_len, max_blocks=cfg.batch_size * a.steps)
        timer = StepTimes()
        with tempfile.TemporaryDirectory() as tmp:
            distill(teacher, tmp, cfg, train_blocks=blocks, progress=False, callbacks=[timer])
        per_step = (timer.times[-1] - timer.times[0]) / (len(timer.times) - 1)
        cpu_per_k = (timer.cpu[-1] - timer.cpu[0]) / (len(timer.cpu) - 1) / cfg.tokens_per_step() * 1000
        tok_s = cfg.tokens_per_step() / per_step
        print(
            f"| {name} | {cfg.seq_len} x {cfg.batch_size} | {per_step:.1f} | {tok_s:.0f} | {cpu_per_k:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
