"""What moves the demo family's curve: the demo recipe at a reduced token budget, then one change
at a time (learning rate, loss weights, teacher layers kept, tokens, the data mix), each distilled
from scratch and scored on held-out text.

    .venv/bin/python bench/demo_recipe.py [--tokens 20480] [--only base,lr3e-4] [--served MINUTES]

Each variant is distilled into ``$BOOMERANG_CACHE/recipes/<variant>-<recipe hash>`` (resumable; a
finished student of the very same recipe is reused, so a rerun only scores). The score of a variant is the held-out
perplexity (token level, the corpus's held-out split, ``--heldout-blocks`` x 256 tokens) of:

- the student alone;
- every size of the ``last`` patch order, one per layer count (the lowest k reaching it), summed
  up as the geometric mean over the counts: the curve a user of the family would see;
- the middle of the curve (the count halfway between the student's and the teacher's);
- the same curve on the teacher's own held-out conversations (``--chat-blocks`` x 256 tokens of
  :func:`boomerang_core.synth.teacher_conversations`, split ``heldout``, rendered by the chat
  template): what the data mix (``chat_fraction``, the share of training tokens that are the
  teacher's ``train`` conversations) is for.

``--served MINUTES`` also scores the demo cache's own student (``DEMO_RECIPE`` at its full budget,
as ``make serve`` distils it) as the row ``served``; MINUTES is how long that distillation took.

Writes ``bench/results/demo_recipe_table.md`` and ``.json``. Wall times are training only, on
this machine, with whatever else ran beside it (the note says how busy it was).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from boomerang_core import demo
from boomerang_core.data import chat_stream, corpus_texts, token_blocks
from boomerang_core.distill import DistillConfig, distill
from boomerang_core.family import Family
from boomerang_core.plan import SizePlan
from boomerang_core.quality.scoring import score_plans
from boomerang_core.store import LayerStore

RESULTS = Path(__file__).parent / "results"


@dataclass(frozen=True)
class Variant:
    name: str
    change: str
    overrides: dict[str, Any]
    token_factor: float = 1.0


VARIANTS = (
    Variant("base", "the earlier demo recipe (first 2 / every 2 / last 2, lr 1e-4, CE 1 + KL 0.1 + cos 2)", {}),
    Variant("lr3e-4", "learning rate 1e-4 -> 3e-4", {"learning_rate": 3e-4}),
    Variant("lr1e-3", "learning rate 1e-4 -> 1e-3", {"learning_rate": 1e-3}),
    Variant("kl1", "KL weight 0.1 -> 1.0", {"kl_weight": 1.0}),
    Variant("cos0", "cosine (layer-alignment) weight 2.0 -> 0", {"cosine_weight": 0.0}),
    Variant("first4", "keep the first 4 teacher layers, not 2 (18 student layers)", {"first_layers_to_keep": 4}),
    Variant("tokens3x", "three times the tokens", {}, token_factor=3.0),
    Variant(
        "chat0.5",
        "half the tokens from the teacher's own conversations (chat_fraction 0 -> 0.5)",
        {"chat_fraction": 0.5},
    ),
    # the two changes that helped, together (not a one-change row: it checks that they add up)
    Variant(
        "first4-lr3e-4",
        "first4 and lr3e-4 together",
        {"first_layers_to_keep": 4, "learning_rate": 3e-4},
    ),
    # the data mix on top of the demo recipe's changes: compare with first4-lr3e-4
    Variant(
        "first4-lr3e-4-chat0.5",
        "first4-lr3e-4 with half the tokens from the teacher's own conversations",
        {"first_layers_to_keep": 4, "learning_rate": 3e-4, "chat_fraction": 0.5},
    ),
    # the learning rate again, on the data mix (lr1e-3 beat lr3e-4 on the earlier recipe): the demo recipe
    Variant(
        "first4-lr1e-3-chat0.5",
        "first4-lr3e-4-chat0.5 with learning rate 1e-3",
        {"first_layers_to_keep": 4, "learning_rate": 1e-3, "chat_fraction": 0.5},
    ),
)


# The table's baseline: the demo recipe as it was before this table (first 2 / every 2 / last 2, lr
# 1e-4, Python's documentation only). The demo now uses first4-lr1e-3-chat0.5 at its full budget.
BASE_RECIPE = replace(demo.DEMO_RECIPE, first_layers_to_keep=2, learning_rate=1e-4, chat_fraction=0.0)


def recipe_for(variant: Variant, tokens: int) -> DistillConfig:
    budget = int(tokens * variant.token_factor)
    return replace(BASE_RECIPE, token_budget=budget, save_steps=1000, **variant.overrides)


def curve_plans(family: Family) -> list[SizePlan]:
    """One plan per layer count: the lowest k of the ``last`` order that reaches it."""
    by_count: dict[int, SizePlan] = {}
    for size in family.sizes:
        by_count.setdefault(size.num_layers, size.plan)
    return [by_count[c] for c in sorted(by_count)]


def score(teacher: Path, student: Path, heldout: torch.Tensor, chat: torch.Tensor | None = None) -> dict[str, Any]:
    store = LayerStore.load(teacher, student)
    assert store.spec is not None
    family = Family.from_store("recipe", store, order="last")
    plans = curve_plans(family)
    ppl = [math.exp(s.nll) for s in score_plans(store, plans, heldout)]
    counts = [p.num_layers for p in plans]
    middle = counts[len(counts) // 2]
    chat_scores: dict[str, Any] = {}
    if chat is not None:
        chat_ppl = [math.exp(s.nll) for s in score_plans(store, plans, chat)]
        chat_scores = {
            "chat_student_ppl": chat_ppl[0],
            "chat_curve_geomean_ppl": math.exp(sum(math.log(p) for p in chat_ppl) / len(chat_ppl)),
            "chat_middle_ppl": chat_ppl[counts.index(middle)],
            "chat_curve": dict(zip(counts, chat_ppl, strict=True)),
        }
    return {
        **chat_scores,
        "student_layers": store.spec.num_student_layers,
        "student_ppl": ppl[0],
        "curve_geomean_ppl": math.exp(sum(math.log(p) for p in ppl) / len(ppl)),
        "middle_layers": middle,
        "middle_ppl": ppl[counts.index(middle)],
        "curve": dict(zip(counts, ppl, strict=True)),
        "plans_scored": len(plans),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=20_480, help="training tokens of every variant (x its factor)")
    ap.add_argument("--heldout-blocks", type=int, default=4, help="held-out blocks of 256 tokens")
    ap.add_argument("--only", default="", help="comma-separated variant names (default: all)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument(
        "--chat-blocks", type=int, default=4, help="held-out teacher-conversation blocks of 256 tokens (0: none)"
    )
    ap.add_argument("--out", type=Path, default=RESULTS / "demo_recipe_table")
    ap.add_argument(
        "--served",
        type=float,
        metavar="MINUTES",
        help="also score the demo cache's served student; MINUTES: how long its distillation took",
    )
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    teacher = demo.ensure_teacher()
    work = demo.cache_root() / "recipes"
    names = [n for n in a.only.split(",") if n]
    variants = [v for v in VARIANTS if not names or v.name in names]
    results_file = a.out.with_suffix(".json")
    results: dict[str, Any] = json.loads(results_file.read_text()) if results_file.is_file() else {}
    heldout: torch.Tensor | None = None
    chat = chat_heldout_blocks(teacher, a.chat_blocks) if a.chat_blocks else None
    for variant in variants:
        recipe = recipe_for(variant, a.tokens)
        digest = hashlib.sha256(json.dumps(recipe.to_dict(), sort_keys=True).encode()).hexdigest()[:10]
        out = work / f"{variant.name}-{digest}"  # a student is reused only for the very same recipe
        clock = time.perf_counter()
        trained_now = not (out / "model.safetensors").is_file()
        if trained_now:
            distill(teacher, out, recipe, progress=False)
        train_s = time.perf_counter() - clock
        if heldout is None:
            heldout = heldout_blocks(teacher, a.heldout_blocks)
        clock = time.perf_counter()
        row = score(teacher, out, heldout, chat)
        row.update(
            change=variant.change,
            tokens=recipe.token_budget,
            train_min=round(train_s / 60, 2) if trained_now else results.get(variant.name, {}).get("train_min"),
            score_min=round((time.perf_counter() - clock) / 60, 2),
            load_avg=round(os.getloadavg()[0], 1),
            recipe=recipe.to_dict(),
        )
        results[variant.name] = row
        print(
            f"{variant.name:10s} student {row['student_ppl']:8.1f}  curve {row['curve_geomean_ppl']:7.1f}  "
            f"middle({row['middle_layers']}) {row['middle_ppl']:7.1f}  train {row['train_min']} min",
            flush=True,
        )
        results_file.parent.mkdir(parents=True, exist_ok=True)
        results_file.write_text(json.dumps(results, indent=1, default=str) + "\n")
    if a.served is not None:
        if heldout is None:
            heldout = heldout_blocks(teacher, a.heldout_blocks)
        row = score(teacher, demo.ensure_demo(), heldout, chat)
        row.update(
            change="the demo recipe (first4-lr1e-3-chat0.5) at its full budget: the served student",
            tokens=demo.DEMO_RECIPE.token_budget,
            train_min=a.served,
            load_avg=round(os.getloadavg()[0], 1),
            recipe=demo.DEMO_RECIPE.to_dict(),
        )
        results["served"] = row
        results_file.write_text(json.dumps(results, indent=1, default=str) + "\n")
    write_table(results, a, a.out.with_suffix(".md"))


def heldout_blocks(teacher: Path, blocks: int) -> torch.Tensor:
    tokenizer = LayerStore.load(teacher).tokenizer
    assert tokenizer is not None
    _, texts, _ = corpus_texts(DistillConfig().corpus)
    return token_blocks(tokenizer, texts, 256, max_blocks=blocks)


def chat_heldout_blocks(teacher: Path, blocks: int) -> torch.Tensor:
    """The teacher's held-out conversations (never trained on: another split than ``train``), in
    blocks of 256 tokens."""
    tokenizer = LayerStore.load(teacher).tokenizer
    assert tokenizer is not None
    stream = chat_stream(teacher, tokenizer, blocks * 256, split="heldout")
    return torch.tensor(stream[: blocks * 256], dtype=torch.long).view(blocks, 256)


def write_table(results: dict[str, Any], a: argparse.Namespace, path: Path) -> None:
    base = results.get("base")
    lines = [
        "# Demo recipe: one change at a time",
        "",
        f"Every variant is the earlier demo recipe (`base`) at {a.tokens:,} training tokens with ONE change, "
        "distilled from scratch on the built-in corpus. Held-out perplexity on "
        f"{a.heldout_blocks * 256:,} tokens of the held-out split. **curve**: geometric mean over one `last`-order "
        "size per layer count, student to teacher (a student with more layers starts its curve higher up: compare "
        "the middle column, the same layer count for every variant, too). Lower is better; the deltas are against "
        "`base`. **chat** columns: the same curve on "
        f"{a.chat_blocks * 256:,} tokens of the teacher's own held-out conversations (a split the `chat_fraction` rows "
        "never train on; `-`: the row was scored before this column existed). "
        "Train minutes depend on how busy the shared machine was (load average column).",
        "",
        "`boomerang_core.demo.DEMO_RECIPE` is the row `first4-lr1e-3-chat0.5` at its full budget "
        f"({demo.DEMO_RECIPE.token_budget:,} tokens): the row "
        "`served`, when present, is that student as the demo cache holds it (distilled by `make serve`'s first "
        "start). Which rows beat the served recipe here at a tenth of its tokens is a lead, not a result: the "
        "full-budget check is in `demo_chat.md`.",
        "",
        "| variant | change | tokens | chat fraction | student layers | student ppl | curve ppl | middle ppl "
        "| vs base (curve) | chat curve ppl | chat middle ppl | train min | load avg |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    order = [v.name for v in VARIANTS] + ["served"]  # the variants' order; rows of dropped variants go
    for name, r in ((n, results[n]) for n in order if n in results):
        delta = f"{r['curve_geomean_ppl'] / base['curve_geomean_ppl'] - 1:+.1%}" if base else ""
        chat_curve = f"{r['chat_curve_geomean_ppl']:.1f}" if "chat_curve_geomean_ppl" in r else "-"
        chat_middle = f"{r['chat_middle_ppl']:.1f}" if "chat_middle_ppl" in r else "-"
        fraction = r.get("recipe", {}).get("chat_fraction", 0.0)
        lines.append(
            f"| {name} | {r['change']} | {r['tokens']:,} | {fraction:g} | {r['student_layers']} "
            f"| {r['student_ppl']:.1f} | {r['curve_geomean_ppl']:.1f} | {r['middle_ppl']:.1f} ({r['middle_layers']}) "
            f"| {delta} | {chat_curve} | {chat_middle} | {r['train_min']} | {r['load_avg']} |"
        )
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
