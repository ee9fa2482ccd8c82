"""Training tokens/s of CPU distillation for a few recipe switches (the demo teacher).

    .venv/bin/python bench/distill_speed.py [--steps 4] [--variants fp32,frozen,...]

Each variant distils a few optimizer steps into a temporary directory; the first step (warm-up)
is not timed. Numbers depend on what else runs on the machine: compare variants from one run.
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
    "frozen+seq128": dict(freeze_embeddings=True, bf16=False, seq_len=128, batch_size=16),
    "frozen+bf16": dict(freeze_embeddings=True, bf16=True),
}


class StepTimes(TrainerCallback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.times.append(time.perf_counter())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--variants", default="naive,frozen,frozen+top64,frozen+seq128")
    ap.add_argument("--first", type=int, default=2)
    a = ap.parse_args()
    teacher = ensure_teacher()
    tok = load_tokenizer(teacher)
    texts = load_corpus().train
    print(f"threads {torch.get_num_threads()}")
    print("| variant | seq x batch | s/step | tokens/s |")
    print("| --- | --- | --- | --- |")
    for name in a.variants.split(","):
        cfg = DistillConfig(first_layers_to_keep=a.first, save_steps=10_000, logging_steps=10_000, **VARIANTS[name])
        cfg.token_budget = cfg.tokens_per_step() * a.steps
        blocks = token_blocks(tok, texts, cfg.seq_len, max_blocks=cfg.batch_size * a.steps)
        timer = StepTimes()
        with tempfile.TemporaryDirectory() as tmp:
            distill(teacher, tmp, cfg, train_blocks=blocks, progress=False, callbacks=[timer])
        per_step = (timer.times[-1] - timer.times[0]) / (len(timer.times) - 1)
        print(
            f"| {name} | {cfg.seq_len} x {cfg.batch_size} | {per_step:.1f} | {cfg.tokens_per_step() / per_step:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
