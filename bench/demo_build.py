"""Build the demo family under a wall-clock limit (for a busy machine), then score a few sizes.

    .venv/bin/python bench/demo_build.py --steps 30 --batch 4 --lr 2e-4 --train-minutes 60

Same pipeline as ``boomerang_core.demo.ensure_demo`` (teacher conversion, distillation, family
in the cache), but with the recipe given here, a training time limit (if it is reached, the latest
checkpoint becomes the student), and a fallback to the ``last`` patch order when the KLPatch
search would not finish in time. Prints held-out perplexities.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

from transformers.trainer_utils import get_last_checkpoint

from boomerang_core import demo
from boomerang_core.assemble import build
from boomerang_core.data import corpus_texts, token_blocks
from boomerang_core.distill import CHECKPOINTS, distill
from boomerang_core.family import Family
from boomerang_core.plan import teacher_plan
from boomerang_core.quality.scoring import perplexity
from boomerang_core.store import LayerStore

STUDENT_FILES = (
    "model.safetensors",
    "config.json",
    "generation_config.json",
    "student_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--train-minutes", type=float, default=60)
    ap.add_argument("--klpatch-deadline", type=float, default=0, help="unix time after which klpatch is skipped")
    ap.add_argument("--cache", default=None)
    ap.add_argument("--eval-tokens", type=int, default=2048)
    a = ap.parse_args()
    t0 = time.time()
    teacher = demo.ensure_teacher(a.cache)
    student = demo.demo_dir(a.cache) / "student"
    recipe = replace(
        demo.DEMO_RECIPE,
        batch_size=a.batch,
        seq_len=a.seq_len,
        learning_rate=a.lr,
        save_steps=5,
        token_budget=a.batch * a.seq_len * a.steps,
    )
    distill(teacher, student, recipe, time_limit_s=a.train_minutes * 60)
    steps_done = a.steps
    if not (student / "model.safetensors").is_file():
        last = get_last_checkpoint(str(student / CHECKPOINTS))
        assert last is not None
        steps_done = int(Path(last).name.split("-")[1])
        for name in STUDENT_FILES:
            if (Path(last) / name).is_file():
                shutil.copy2(Path(last) / name, student / name)
        print(f"time limit: student = {Path(last).name} of {a.steps} steps", flush=True)
    t_train = time.time() - t0
    print(f"distillation done in {t_train / 60:.1f} min", flush=True)
    store = LayerStore.load(teacher, student)
    family = Family.from_store(demo.DEMO_NAME, store, order="last")
    info = {"recipe": recipe.to_dict(), "steps_trained": steps_done, "train_minutes": round(t_train / 60, 1)}
    family.info.update(info)
    family.save(student)
    print("family (last) saved", flush=True)
    if a.klpatch_deadline == 0 or time.time() < a.klpatch_deadline:
        t1 = time.time()
        family = demo.demo_family_from_store(store)
        family.info.update(info)
        family.save(student)
        print(f"family (klpatch {family.info['patch_order']}) saved in {(time.time() - t1) / 60:.1f} min", flush=True)
    _, heldout, _ = corpus_texts()
    assert store.tokenizer is not None
    blocks = token_blocks(store.tokenizer, heldout, 256, max_blocks=a.eval_tokens // 256)
    rows = {"teacher": perplexity(build(teacher_plan(30), store), blocks)}
    for size in family.sizes[:: max(1, len(family.sizes) // 4)]:
        rows[f"{size.name} ({size.num_layers} layers)"] = perplexity(build(size.plan, store), blocks)
    print(json.dumps(rows, indent=1), flush=True)
    print(f"total {(time.time() - t0) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
