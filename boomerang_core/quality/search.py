"""Plan search: the best plan at every layer count, over everything the resident layers can express.

A plan is a path through the teacher's layer boundaries ``0..N``. From boundary ``i`` a path may
take teacher layer ``i`` (to ``i + 1``), skip teacher layer ``i`` (to ``i + 1``, no layer), or,
where a student block starts (``i = copied[j]``), take student layer ``j`` to the end of its block.
Teacher-only paths are ShortGPT-style dropped layers, paths without skips are the boomerang
patchings, and everything in between is a mixture; all run on the same store, at no extra memory.
Embeddings come from the source of the first layer and the final norm and head from the source
of the last (the rule of :func:`~boomerang_core.plan.plan_for_patched`), so a plan's parameters
are exactly those it runs.

How it searches (arXiv 2607.08170 casts the choice as a shortest path):

1. One teacher pass over the calibration blocks records the hidden state at every boundary and the
   teacher's next-token distributions (:func:`~boomerang_core.quality.scoring.teacher_pass`).
2. Every edge gets a local cost: the direction error ``1 - cos`` between what the edge makes of the
   teacher's state at its start and the teacher's state at its end, averaged over tokens. A teacher
   layer costs 0, a skip costs exactly ShortGPT's block influence, a student layer its alignment
   error. One layer pass per student layer; skips cost nothing to measure.
3. A dynamic program over ``(boundary, layer count)`` keeps the ``k_best`` cheapest paths per state
   (additive costs: a shortest path with a layer budget). With teacher edges alone its best paths
   are ShortGPT's plans.
4. A plan's quality is NOT additive over edges (errors compound), so the DP only proposes: the
   ``k_best`` paths per layer count, ShortGPT's plan and any seed plans (a fixed patch order) are
   scored on the calibration blocks, sharing every common layer prefix
   (:func:`~boomerang_core.quality.scoring.score_plans`): the true KL(teacher || plan) and the next-token
   NLL. ``select="nll"`` (the default) keeps the lowest NLL, ``select="kl"`` the lowest KL.

Why NLL decides by default: the promise is about perplexity (a size is never worse than dropping
teacher layers), and KL to the teacher is only a proxy for it. On the demo family, with 2,048
calibration tokens, the lowest-KL plan at 23 layers was 9.3% WORSE than ShortGPT's in held-out
perplexity (``bench/results/demo_front.md``), although its KL was lower. Because ShortGPT's plans
and the seeds are always scored, the chosen plan is never worse than them on the calibration
text; held-out text must confirm it (``bench/demo_front.py``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from boomerang_core.family import Family, dominated_flags
from boomerang_core.plan import LayerRef, SizePlan, Source
from boomerang_core.quality.baselines import shortgpt_plan
from boomerang_core.quality.scoring import TeacherPass, perplexities, run_layers, score_plans, teacher_pass
from boomerang_core.store import LayerStore

EdgeKind = Literal["teacher", "student", "skip"]
Edge = tuple[EdgeKind, int]  # ("teacher", i), ("student", j) or ("skip", i)
Path = tuple[Edge, ...]


@dataclass(frozen=True)
class EdgeCosts:
    """Local costs (dimensionless, ``1 - cos`` averaged over tokens): ``skip[i]`` for leaving out
    teacher layer ``i`` (ShortGPT's block influence), ``student[j]`` for student layer ``j`` in
    place of its teacher block. Teacher layers cost 0."""

    skip: list[float]
    student: list[float]


@dataclass(frozen=True)
class Candidate:
    """One scored plan: ``kl`` (nats per position) and ``nll`` (nats per predicted token) on the
    calibration blocks; ``proxy`` its
    summed edge cost; ``rank`` its place among the DP's paths of its layer count (0 = cheapest;
    ``None`` for a seed or ShortGPT plan that the DP did not propose)."""

    plan: SizePlan
    kl: float
    nll: float
    proxy: float | None
    rank: int | None


@dataclass
class SearchResult:
    """``plans``: the best plan at each layer count (by ``select``), ascending. ``seconds``: wall time per
    stage (teacher pass, edge costs, DP, scoring)."""

    plans: list[SizePlan]
    candidates: list[Candidate]
    costs: EdgeCosts
    seconds: dict[str, float] = field(default_factory=dict)
    select: str = "nll"

    def by_layers(self) -> dict[int, list[Candidate]]:
        out: dict[int, list[Candidate]] = {}
        for c in self.candidates:
            out.setdefault(c.plan.num_layers, []).append(c)
        return out


# --- edges and the dynamic program ------------------------------------------------------------


@torch.no_grad()
def edge_costs(store: LayerStore, teacher: TeacherPass) -> EdgeCosts:
    """Local cost of every skip and student edge from the teacher's boundary states."""
    n = store.num_teacher_layers
    cos_skip = torch.zeros(n, dtype=torch.float64)
    blocks = store.spec.blocks() if store.spec is not None else []
    cos_student = torch.zeros(len(blocks), dtype=torch.float64)
    n_tokens = teacher.num_positions
    probe = SizePlan(layers=(), embed="teacher", norm="teacher", head="teacher")
    for states in teacher.states:
        for i in range(n):
            cos_skip[i] += _cos_sum(states[i], states[i + 1])
        for j, block in enumerate(blocks):
            (out,) = run_layers(store, probe, [LayerRef("student", j)], states[block.start])
            cos_student[j] += _cos_sum(out, states[block.stop])
    return EdgeCosts(skip=(1 - cos_skip / n_tokens).tolist(), student=(1 - cos_student / n_tokens).tolist())


def _cos_sum(a: torch.Tensor, b: torch.Tensor) -> float:
    """Sum over tokens of cos(a, b) along the hidden dimension; ``a``, ``b``: (batch, seq, hidden)."""
    return float(torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).double().sum())


def k_best_paths(
    num_teacher_layers: int,
    blocks: Sequence[range],
    costs: EdgeCosts,
    k: int,
    min_layers: int,
    max_layers: int,
) -> dict[int, list[tuple[float, Path]]]:
    """The ``k`` cheapest paths from boundary 0 to ``N`` for every layer count in
    ``min_layers..max_layers``, by summed edge cost (ties: lexicographic path order)."""
    n = num_teacher_layers
    starts = {block.start: (j, block.stop) for j, block in enumerate(blocks) if len(block) > 0}
    # frontier[b][count]: the k cheapest partial paths reaching boundary b with count layers.
    frontier: list[dict[int, list[tuple[float, Path]]]] = [{} for _ in range(n + 1)]
    frontier[0][0] = [(0.0, ())]
    for b in range(n):
        for count, paths in frontier[b].items():
            paths.sort()
            del paths[k:]
            moves: list[tuple[int, int, float, Edge]] = [
                (b + 1, count + 1, 0.0, ("teacher", b)),
                (b + 1, count, costs.skip[b], ("skip", b)),
            ]
            if b in starts:
                j, stop = starts[b]
                moves.append((stop, count + 1, costs.student[j], ("student", j)))
            for to, c, cost, edge in moves:
                if c > max_layers or c + (n - to) < min_layers:
                    continue
                frontier[to].setdefault(c, []).extend((p_cost + cost, (*path, edge)) for p_cost, path in paths)
    out = {}
    for count in range(max(min_layers, 1), max_layers + 1):
        paths = sorted(frontier[n].get(count, []))[:k]
        if paths:
            out[count] = paths
    return out


def path_plan(path: Path, origin: str = "search") -> SizePlan:
    """The plan a path runs: embeddings from its first layer's source, final norm and head from
    its last layer's source; ``dropped`` lists its skipped teacher layers."""
    layers = tuple(LayerRef("teacher" if kind == "teacher" else "student", i) for kind, i in path if kind != "skip")
    if not layers:
        raise ValueError("a plan needs at least one layer")
    first: Source = layers[0].source
    last: Source = layers[-1].source
    dropped = tuple(i for kind, i in path if kind == "skip")
    return SizePlan(layers=layers, embed=first, norm=last, head=last, dropped=dropped, origin=origin)


# --- the search -------------------------------------------------------------------------------


def search(
    store: LayerStore,
    calib_blocks: torch.Tensor,
    *,
    min_layers: int | None = None,
    max_layers: int | None = None,
    k_best: int = 4,
    seeds: Sequence[SizePlan] = (),
    batch_size: int = 4,
    select: Literal["nll", "kl"] = "nll",
    progress: bool = True,
) -> SearchResult:
    """Search every layer count from ``min_layers`` (default: the student's, or half the teacher's
    without a student) to ``max_layers`` (default: the teacher's) on ``calib_blocks`` (``(n, seq)``
    token ids, drawn apart from any evaluation text). See the module docstring for the method.

    Cost: one teacher pass, one layer pass per student layer, then for every distinct scored plan
    the layers after its longest prefix shared with the previous one plus one LM head pass.
    """
    n = store.num_teacher_layers
    blocks = store.spec.blocks() if store.spec is not None else []
    lo = min_layers if min_layers is not None else (len(blocks) if blocks else math.ceil(n / 2))
    hi = max_layers if max_layers is not None else n
    if not 1 <= lo <= hi <= n:
        raise ValueError(f"layer counts must satisfy 1 <= min_layers <= max_layers <= {n}, got {lo}..{hi}")
    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    with tqdm(total=4, desc="plan search", unit="stage", disable=not progress) as bar:
        bar.set_postfix(stage="teacher pass")
        teacher = teacher_pass(store, calib_blocks, batch_size)
        seconds["teacher_pass"], clock = _lap(clock)
        bar.update(1)
        bar.set_postfix(stage="edge costs")
        costs = edge_costs(store, teacher)
        seconds["edge_costs"], clock = _lap(clock)
        bar.update(1)
        paths = k_best_paths(n, blocks, costs, k_best, lo, hi)
        seconds["dp"], clock = _lap(clock)
        bar.update(1)
        proposals: dict[str, tuple[SizePlan, float | None, int | None]] = {}
        for ranked in paths.values():
            for rank, (proxy, path) in enumerate(ranked):
                plan = path_plan(path)
                proposals.setdefault(plan.key, (plan, proxy, rank))
        for plan in [*(shortgpt_plan(costs.skip, c) for c in range(lo, hi + 1)), *seeds]:
            if lo <= plan.num_layers <= hi:
                proposals.setdefault(plan.key, (plan, None, None))
        bar.set_postfix(stage=f"scoring {len(proposals)} plans")
        entries = list(proposals.values())
        scores = score_plans(store, [e[0] for e in entries], teacher=teacher, progress=progress, desc="KL")
        seconds["scoring"], clock = _lap(clock)
        bar.update(1)
    candidates = [
        Candidate(plan=plan, kl=float(s.kl or 0.0), nll=s.nll, proxy=proxy, rank=rank)
        for (plan, proxy, rank), s in zip(entries, scores, strict=True)
    ]

    def quality(c: Candidate) -> float:
        return c.nll if select == "nll" else c.kl

    best: dict[int, Candidate] = {}
    for c in candidates:
        count = c.plan.num_layers
        if count not in best or (quality(c), store.plan_params(c.plan)) < (
            quality(best[count]),
            store.plan_params(best[count].plan),
        ):
            best[count] = c
    plans = [
        replace(
            best[c].plan,
            meta={**best[c].plan.meta, "calib_kl": best[c].kl, "calib_nll": best[c].nll, "dp_rank": best[c].rank},
        )
        for c in sorted(best)
    ]
    return SearchResult(plans=plans, candidates=candidates, costs=costs, seconds=seconds, select=select)


def search_front(store: LayerStore, calib_blocks: torch.Tensor, **kwargs: Any) -> list[SizePlan]:
    """The best plan found at each layer count, by ``select`` (see :func:`search` for the arguments).
    Each plan's ``meta`` holds ``calib_kl`` (KL to the teacher, nats per position) and ``calib_nll``."""
    return search(store, calib_blocks, **kwargs).plans


def _lap(start: float) -> tuple[float, float]:
    now = time.perf_counter()
    return now - start, now


# --- the Pareto front -------------------------------------------------------------------------


def front_family(
    name: str,
    store: LayerStore,
    calib_blocks: torch.Tensor,
    heldout_blocks: torch.Tensor | None = None,
    *,
    progress: bool = True,
    **search_kwargs: Any,
) -> Family:
    """Search, then :func:`family_from_search` with the held-out perplexity of every front plan
    (when ``heldout_blocks``, ``(n, seq)`` token ids apart from the calibration ones, are given)."""
    result = search(store, calib_blocks, progress=progress, **search_kwargs)
    ppl = None
    if heldout_blocks is not None:
        ppl = perplexities(store, result.plans, heldout_blocks, progress=progress)
    tokens = {
        "calib": int(calib_blocks.numel()),
        "heldout": int(heldout_blocks.numel()) if heldout_blocks is not None else 0,
    }
    return family_from_search(name, store, result, ppl, k_best=search_kwargs.get("k_best", 4), tokens=tokens)


def family_from_search(
    name: str,
    store: LayerStore,
    result: SearchResult,
    perplexities: Sequence[float] | None = None,
    **info: Any,
) -> Family:
    """A family whose sizes are the searched plans, one per layer count, named ``l<layers>``.

    Each size carries its held-out perplexity (``perplexities``, one per ``result.plans``) and its
    plan the calibration KL and NLL (``plan.meta["calib_kl"]``, ``["calib_nll"]``). A size that is larger
    and no better than another (by held-out perplexity, else calibration perplexity) is marked dominated,
    so the router never picks it. ``Family.save`` writes it all to ``family.json``: serving never
    repeats the search. ``info`` goes into ``family.info["search"]``.
    """
    plans = result.plans
    ppl: list[float | None] = list(perplexities) if perplexities is not None else [None] * len(plans)
    if len(ppl) != len(plans):
        raise ValueError(f"{len(ppl)} perplexities for {len(plans)} plans")
    search_info = {
        "method": f"k-best DP on 1-cos edge costs, reranked by calibration {result.select.upper()}",
        "plans_scored": len(result.candidates),
        "seconds": {k: round(v, 1) for k, v in result.seconds.items()},
        **info,
    }
    family = Family.from_plans(name, store, plans, order="search", search=search_info)
    quality = [p if p is not None else _calib_quality(plan) for p, plan in zip(ppl, plans, strict=True)]
    flags = dominated_flags([s.params for s in family.sizes], quality)
    names = [f"l{plan.num_layers}" for plan in plans]
    if len(set(names)) < len(names):
        names = [s.name for s in family.sizes]
    family.sizes = [
        replace(s, name=nm, perplexity=p, dominated=d)
        for s, nm, p, d in zip(family.sizes, names, ppl, flags, strict=True)
    ]
    return family


def _calib_quality(plan: SizePlan) -> float:
    """Calibration perplexity where the plan has it, else its calibration KL (older family files)."""
    nll = plan.meta.get("calib_nll")
    return math.exp(float(nll)) if nll is not None else float(plan.meta["calib_kl"])
