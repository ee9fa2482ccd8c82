"""Held-out perplexity of every size of a family, with the baselines that say whether it is good.

A size is worth serving only if it beats what is cheaper to get: the same plan on the pruned
student before distillation, and the teacher with whole layers dropped (ShortGPT). The curve is
also computed for several patch orders, so the family can default to the best one, and sizes that
a smaller size beats are marked dominated (the router never picks them).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from boomerang_core.errors import StudentConfigError
from boomerang_core.family import Family, mark_dominated
from boomerang_core.plan import PATCH_ORDERS, SizePlan, enumerate_plans, patch_order, teacher_plan
from boomerang_core.quality.baselines import block_influence, shortgpt_plan, undistilled_plan
from boomerang_core.quality.klpatch import KLPatchResult, klpatch_search
from boomerang_core.quality.report import CurvePoint, CurveResult
from boomerang_core.quality.scoring import perplexities


def evaluate_family(
    family: Family,
    heldout_blocks: torch.Tensor,
    calib_blocks: torch.Tensor,
    orders: Sequence[str] = PATCH_ORDERS,
    batch_size: int = 4,
    progress: bool = True,
    klpatch_result: KLPatchResult | None = None,
    known: Mapping[str, float] | None = None,
) -> CurveResult:
    """Perplexity of every size of ``family`` on ``heldout_blocks`` (``(n, seq)`` token ids),
    with both baselines at every size and the curves of the patch ``orders``.

    Calibration blocks (disjoint from the held-out ones) drive the KLPatch search (unless
    ``klpatch_result`` is given) and ShortGPT's block influence. Each distinct plan is scored
    once, so the student, the teacher and sizes shared by orders cost one pass each. Records the
    perplexities into ``family.sizes``, and the dominated marks by them unless the family was chosen by
    another metric (``family.info["metric"]``, e.g. ``chat_kl``); the teacher is never dominated. ``known`` maps
    :attr:`SizePlan.key` to perplexities already measured on the same held-out blocks (e.g. the
    teacher-only baselines, computed before the student existed); those plans are not run again.
    """
    store = family.store
    spec = store.spec
    if spec is None:
        raise StudentConfigError("evaluating a family needs a store with a student")
    start = time.perf_counter()
    order_plans: dict[str, list[SizePlan]] = {}
    for order in orders:
        if order == "klpatch":
            if klpatch_result is None:
                klpatch_result = klpatch_search(store, calib_blocks, progress=progress)
            blocks = klpatch_result.order
        else:
            blocks = patch_order(spec, order)
        order_plans[order] = enumerate_plans(spec, blocks, origin=order)
    influence = block_influence(store, calib_blocks, batch_size=batch_size, progress=progress)
    n_teacher = store.num_teacher_layers
    family_plans = [s.plan for s in family.sizes]
    undistilled_plans = [undistilled_plan(p, spec) for p in family_plans]
    layer_counts = sorted({p.num_layers for plans in [family_plans, *order_plans.values()] for p in plans})
    shortgpt_plans = {n: shortgpt_plan(influence, n) for n in layer_counts if n <= n_teacher}

    every = [*family_plans, *undistilled_plans, *shortgpt_plans.values()]
    every += [p for plans in order_plans.values() for p in plans]
    known = known or {}
    scores = {p.key: known[p.key] for p in every if p.key in known}
    todo = [p for p in every if p.key not in scores]
    values = perplexities(store, todo, heldout_blocks, batch_size=batch_size, progress=progress)
    scores.update({p.key: v for p, v in zip(todo, values, strict=True)})

    def point(plan: SizePlan, name: str) -> CurvePoint:
        return CurvePoint(name, plan.k, plan.num_layers, store.plan_params(plan), scores[plan.key])

    sized = [replace(s, perplexity=scores[s.plan.key]) for s in family.sizes]
    if family.info.get("metric", "ppl") == "ppl":  # a family chosen by another metric keeps its dominance
        sized = mark_dominated([replace(s, dominated=False) for s in sized], never={teacher_plan(n_teacher).key})
    family.sizes = sized
    result = CurveResult(
        family=family.name,
        family_order=family.order,
        sizes=[point(s.plan, s.name) for s in family.sizes],
        dominated=[s.dominated for s in family.sizes],
        undistilled=[scores[p.key] for p in undistilled_plans],
        shortgpt={n: point(p, f"shortgpt-{n}") for n, p in shortgpt_plans.items()},
        shortgpt_dropped={n: p.dropped for n, p in shortgpt_plans.items()},
        block_influence=influence,
        orders={o: [point(p, f"k{p.k}") for p in plans] for o, plans in order_plans.items()},
        klpatch=klpatch_result,
        heldout_tokens=heldout_blocks.numel(),
        calib_tokens=calib_blocks.numel(),
        seconds=time.perf_counter() - start,
        scores={p.key: scores[p.key] for p in every},
    )
    family.info["evaluation"] = {
        "heldout_tokens": result.heldout_tokens,
        "monotone": result.monotone,
        "best_order": result.best_order if result.orders else None,
        "klpatch_order": klpatch_result.order if klpatch_result is not None else None,
    }
    return result


def evaluate_cli(
    family: Family,
    out_dir: Path,
    max_tokens: int = 8192,
    seq_len: int = 256,
    calib_blocks: int = 4,
    *,
    conversations: Sequence[Mapping[str, Any]] | None = None,
    questions: int | None = None,
    general: bool = True,
) -> str:
    """``boomerang eval``: score a family on the held-out split of the built-in corpus and write
    ``curve.md`` and ``curve.png`` into ``out_dir``. Returns a short summary for the terminal.

    Beside the curve, for the family's sizes, ShortGPT at their layer counts and the teacher
    (:mod:`.chateval`): chat KL on the held-out ``conversations`` (teacher conversations, as
    :func:`boomerang_core.synth.teacher_conversations` writes them), accuracy on the first
    ``questions`` of the shipped question set (all by default; 0 for none; a tokenizer without a
    chat template answers none), and perplexity on ``max_tokens`` of the general text."""
    from boomerang_core.data import corpus_texts, token_blocks
    from boomerang_core.quality.chat import chat_set, general_blocks
    from boomerang_core.quality.chateval import accuracy_summary, evaluate_chat
    from boomerang_core.quality.qa import load_qa

    tokenizer = family.store.tokenizer
    if tokenizer is None:
        raise StudentConfigError("evaluation needs the family's tokenizer")
    _, heldout, calib = corpus_texts(None)
    heldout_ids = token_blocks(tokenizer, heldout, seq_len, max_blocks=max(1, max_tokens // seq_len))
    calib_ids = token_blocks(tokenizer, calib, seq_len, max_blocks=calib_blocks)
    result = evaluate_family(family, heldout_ids, calib_ids)
    has_template = bool(getattr(tokenizer, "chat_template", None))
    items = list(load_qa())[:questions] if has_template else []
    chat = chat_set(tokenizer, conversations) if conversations and has_template else None
    general_ids = general_blocks(tokenizer, seq_len, max_blocks=max(1, max_tokens // seq_len)) if general else None
    result.chat = evaluate_chat(
        family.store,
        [(s.name, s.plan, s.dominated) for s in family.sizes],
        influence=result.block_influence,
        chat=chat,
        questions=items,
        pydoc_blocks=heldout_ids,
        general_blocks=general_ids,
        known_pydoc=result.scores,
        family=family.name,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "curve.md").write_text(result.to_markdown())
    result.plot(out_dir / "curve.png")
    return (
        family.table()
        + "\n\n"
        + accuracy_summary(result.chat)
        + f"\n\nwrote {out_dir / 'curve.md'} and {out_dir / 'curve.png'}"
    )
