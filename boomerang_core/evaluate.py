"""Held-out perplexity of every size of a family, with the baselines that say whether it is good.

A size is worth serving only if it beats what is cheaper to get: the same plan on the pruned
student before distillation, and the teacher with whole layers dropped (ShortGPT). The curve is
also computed for several patch orders, so the family can default to the best one, and sizes that
a smaller size beats are marked dominated (the router never picks them).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from boomerang_core.baselines import block_influence, shortgpt_plan, undistilled_plan
from boomerang_core.errors import StudentConfigError
from boomerang_core.family import Family, mark_dominated
from boomerang_core.klpatch import KLPatchResult, klpatch_search
from boomerang_core.plan import PATCH_ORDERS, SizePlan, enumerate_plans, patch_order
from boomerang_core.plan_eval import perplexities


@torch.no_grad()
def perplexity(
    model: nn.Module, blocks: torch.Tensor, batch_size: int = 4, progress: bool = False, desc: str = "perplexity"
) -> float:
    """Token-level perplexity of ``model`` on ``blocks`` (``(n, seq)`` token ids).

    Every block is scored on its own: each of its ``seq - 1`` next-token predictions counts once,
    and the result is ``exp(total NLL / total predicted tokens)`` (nats per token, exponentiated).
    The loss is computed in float32 whatever the model's dtype, so bf16 sizes are comparable.
    """
    if blocks.dim() != 2 or blocks.shape[1] < 2:
        raise ValueError(f"blocks must be (n, seq) token ids with seq >= 2, got shape {tuple(blocks.shape)}")
    device = _device_of(model)
    total_nll, total_tokens = 0.0, 0
    starts = range(0, blocks.shape[0], batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", disable=not progress, leave=False):
        ids = blocks[start : start + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits  # (batch, seq, vocab)
        nll = nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
        total_nll += float(nll)
        total_tokens += ids[:, 1:].numel()
    return math.exp(total_nll / total_tokens)


def _device_of(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


# --- a family's curve -------------------------------------------------------------------------


@dataclass(frozen=True)
class CurvePoint:
    """One size on one curve: ``perplexity`` is held-out token-level perplexity."""

    name: str
    k: int
    num_layers: int
    params: int
    perplexity: float


@dataclass
class CurveResult:
    """A family's held-out curve with its baselines.

    ``sizes``: the family's own sizes (its order ``family_order``), smallest first.
    ``undistilled[i]``: perplexity of ``sizes[i]``'s plan on the pruned, not distilled student.
    ``shortgpt``: layer count -> the teacher cut to that many layers by lowest block influence.
    ``orders``: each compared patch order's curve, k = 0 (student) .. S (teacher).
    """

    family: str
    family_order: str
    sizes: list[CurvePoint]
    dominated: list[bool]
    undistilled: list[float]
    shortgpt: dict[int, CurvePoint]
    shortgpt_dropped: dict[int, tuple[int, ...]]
    block_influence: list[float]
    orders: dict[str, list[CurvePoint]]
    klpatch: KLPatchResult | None
    heldout_tokens: int
    calib_tokens: int
    seconds: float
    scores: dict[str, float] = field(default_factory=dict)  # SizePlan.key -> perplexity, every plan run

    # --- verdicts -----------------------------------------------------------------------------

    def rises(self) -> list[tuple[CurvePoint, CurvePoint]]:
        """Consecutive family sizes (by parameters) where perplexity does not fall."""
        pts = sorted(self.sizes, key=lambda p: (p.params, p.k))
        return [(a, b) for a, b in itertools.pairwise(pts) if b.perplexity >= a.perplexity]

    @property
    def monotone(self) -> bool:
        """True when perplexity falls strictly at every step from the student to the teacher."""
        return not self.rises()

    def interpolated(self) -> list[int]:
        """Indices of the family sizes strictly between the pure student and the pure teacher."""
        s_max = max(p.k for p in self.sizes)
        return [i for i, p in enumerate(self.sizes) if 0 < p.k < s_max]

    def losses_to(self, baseline: str) -> list[tuple[CurvePoint, float]]:
        """Interpolated sizes no better than ``baseline`` (``"undistilled"`` or ``"shortgpt"``),
        with the baseline's perplexity."""
        out = []
        for i in self.interpolated():
            point = self.sizes[i]
            ref = self._baseline(baseline, i)
            if ref is not None and point.perplexity >= ref:
                out.append((point, ref))
        return out

    def _baseline(self, baseline: str, i: int) -> float | None:
        if baseline == "undistilled":
            return self.undistilled[i]
        sg = self.shortgpt.get(self.sizes[i].num_layers)
        return sg.perplexity if sg is not None else None

    def order_scores(self) -> dict[str, float]:
        """Per patch order: exp of the mean log-perplexity over the parameter range from student
        to teacher (trapezoids in parameters). Every order spans the same range, so this compares
        whole curves whose sizes sit at different parameter counts. Lower is better."""
        scores = {}
        for order, pts in self.orders.items():
            pts = sorted(pts, key=lambda p: p.params)
            span = pts[-1].params - pts[0].params
            if span <= 0:
                scores[order] = pts[0].perplexity
                continue
            area = sum(
                (b.params - a.params) * (math.log(a.perplexity) + math.log(b.perplexity)) / 2
                for a, b in itertools.pairwise(pts)
            )
            scores[order] = math.exp(area / span)
        return scores

    @property
    def best_order(self) -> str:
        scores = self.order_scores()
        return min(scores, key=lambda o: scores[o])

    # --- reports ------------------------------------------------------------------------------

    def to_markdown(self) -> str:
        from boomerang_core.curve_report import curve_markdown

        return curve_markdown(self)

    def plot(self, path: str | Path) -> Path:
        """Parameters vs held-out perplexity (log scale) as a PNG."""
        from boomerang_core.curve_report import curve_plot

        return curve_plot(self, Path(path))


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
    perplexities and the dominated marks into ``family.sizes``. ``known`` maps
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

    family.sizes = mark_dominated([replace(s, perplexity=scores[s.plan.key], dominated=False) for s in family.sizes])
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
    family: Family, out_dir: Path, max_tokens: int = 8192, seq_len: int = 256, calib_blocks: int = 4
) -> str:
    """``boomerang eval``: score a family on the held-out split of the built-in corpus and write
    ``curve.md`` and ``curve.png`` into ``out_dir``. Returns a short summary for the terminal."""
    from boomerang_core.data import corpus_texts, token_blocks

    tokenizer = family.store.tokenizer
    if tokenizer is None:
        raise StudentConfigError("evaluation needs the family's tokenizer")
    _, heldout, calib = corpus_texts(None)
    heldout_ids = token_blocks(tokenizer, heldout, seq_len, max_blocks=max(1, max_tokens // seq_len))
    calib_ids = token_blocks(tokenizer, calib, seq_len, max_blocks=calib_blocks)
    result = evaluate_family(family, heldout_ids, calib_ids)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "curve.md").write_text(result.to_markdown())
    result.plot(out_dir / "curve.png")
    return family.table() + f"\n\nwrote {out_dir / 'curve.md'} and {out_dir / 'curve.png'}"
