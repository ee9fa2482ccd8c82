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
   NLL. ``select="nll"`` (the default) keeps the lowest NLL, ``select="kl"`` the lowest KL, and
   ``select="chat_kl"`` the lowest KL(teacher || plan) per response token on a calibration set of
   the teacher's conversations (:mod:`~boomerang_core.quality.chat`), scored the same way.

A family chooses its selecting metric by name (:data:`METRICS`): ``ppl``, the calibration
perplexity (``select="nll"``, the default, and the only one a family without a chat template can
use), or ``chat_kl``. Whatever the metric, a family's largest size is the teacher itself
(:func:`family_from_search`).

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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from boomerang_core.errors import BoomerangError
from boomerang_core.family import Family, dominated_flags
from boomerang_core.plan import LayerRef, SizePlan, Source, teacher_plan
from boomerang_core.quality.baselines import shortgpt_plan
from boomerang_core.quality.chat import ChatSet, chat_scores
from boomerang_core.quality.scoring import TeacherPass, perplexities, run_layers, score_plans, teacher_pass
from boomerang_core.store import LayerStore

EdgeKind = Literal["teacher", "student", "skip"]
Edge = tuple[EdgeKind, int]  # ("teacher", i), ("student", j) or ("skip", i)
Path = tuple[Edge, ...]
Select = Literal["nll", "kl", "chat_kl"]
# A family's selecting metric -> the search's ``select``.
METRICS: dict[str, Select] = {"ppl": "nll", "chat_kl": "chat_kl"}


def select_for_metric(metric: str) -> Select:
    """The search's ``select`` for a family's metric name (``ppl`` or ``chat_kl``)."""
    try:
        return METRICS[metric]
    except KeyError:
        raise BoomerangError(f"unknown search metric {metric!r}: use one of {', '.join(METRICS)}") from None


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
    calibration blocks; ``chat_kl`` (nats per response token) on the calibration conversations,
    when the search had them; ``proxy`` its summed edge cost; ``rank`` its place among the DP's
    paths of its layer count (0 = cheapest; ``None`` for a seed or ShortGPT plan that the DP did
    not propose)."""

    plan: SizePlan
    kl: float
    nll: float
    proxy: float | None
    rank: int | None
    chat_kl: float | None = None

    def quality(self, select: str) -> float:
        """The score ``select`` ranks by (lower is better)."""
        if select == "chat_kl":
            if self.chat_kl is None:
                raise ValueError("this candidate was not scored on conversations")
            return self.chat_kl
        return self.nll if select == "nll" else self.kl


@dataclass
class SearchResult:
    """``plans``: the best plan at each layer count (by ``select``), ascending. ``seconds``: wall time per
    stage (teacher pass, edge costs, DP, scoring)."""

    plans: list[SizePlan]
    candidates: list[Candidate]
    costs: EdgeCosts
    seconds: dict[str, float] = field(default_factory=dict)
    select: str = "nll"
    chat_tokens: int = 0  # response tokens of the calibration conversations (chat_kl)

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
    n_tokens = sum(ids.numel() for ids in teacher.batches)  # every token, masked or not
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
    select: Select = "nll",
    chat: ChatSet | None = None,
    progress: bool = True,
) -> SearchResult:
    """Search every layer count from ``min_layers`` (default: the student's, or half the teacher's
    without a student) to ``max_layers`` (default: the teacher's) on ``calib_blocks`` (``(n, seq)``
    token ids, drawn apart from any evaluation text). See the module docstring for the method.
    ``chat``: calibration conversations (needed by ``select="chat_kl"``; apart from any evaluation
    conversations): every scored plan also gets its KL per response token on them.

    Cost: one teacher pass, one layer pass per student layer, then for every distinct scored plan
    the layers after its longest prefix shared with the previous one plus one LM head pass; with
    ``chat``, the same again on the conversations (their teacher pass keeps no hidden states).
    """
    if select not in ("nll", "kl", "chat_kl"):
        raise ValueError(f"select must be nll, kl or chat_kl, got {select!r}")
    if select == "chat_kl" and chat is None:
        raise ValueError("select='chat_kl' needs calibration conversations (chat=)")
    n = store.num_teacher_layers
    blocks = store.spec.blocks() if store.spec is not None else []
    lo = min_layers if min_layers is not None else (len(blocks) if blocks else math.ceil(n / 2))
    hi = max_layers if max_layers is not None else n
    if not 1 <= lo <= hi <= n:
        raise ValueError(f"layer counts must satisfy 1 <= min_layers <= max_layers <= {n}, got {lo}..{hi}")
    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    with tqdm(total=4 + (chat is not None), desc="plan search", unit="stage", disable=not progress) as bar:
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
        chat_kl: list[float | None] = [None] * len(entries)
        if chat is not None:
            del teacher  # its distributions and states: the conversations' pass needs the memory
            bar.set_postfix(stage=f"chat KL of {len(entries)} plans")
            chat_kl = [s.kl for s in chat_scores(store, [e[0] for e in entries], chat, progress=progress)]
            seconds["chat_scoring"], clock = _lap(clock)
            bar.update(1)
    candidates = [
        Candidate(plan=plan, kl=float(s.kl or 0.0), nll=s.nll, proxy=proxy, rank=rank, chat_kl=ckl)
        for (plan, proxy, rank), s, ckl in zip(entries, scores, chat_kl, strict=True)
    ]
    best: dict[int, Candidate] = {}
    for c in candidates:
        count = c.plan.num_layers
        if count not in best or (c.quality(select), store.plan_params(c.plan)) < (
            best[count].quality(select),
            store.plan_params(best[count].plan),
        ):
            best[count] = c
    plans = [_with_scores(best[c]) for c in sorted(best)]
    return SearchResult(
        plans=plans,
        candidates=candidates,
        costs=costs,
        seconds=seconds,
        select=select,
        chat_tokens=chat.response_tokens if chat is not None else 0,
    )


def _with_scores(c: Candidate, **fields: Any) -> SizePlan:
    """The candidate's plan with its calibration scores in ``meta`` (and ``fields`` replaced)."""
    meta = {**c.plan.meta, "calib_kl": c.kl, "calib_nll": c.nll, "dp_rank": c.rank}
    if c.chat_kl is not None:
        meta["calib_chat_kl"] = c.chat_kl
    return replace(c.plan, meta=meta, **fields)


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
    """Search, then :func:`family_from_search` with the held-out perplexity of every front plan and
    of the teacher (when ``heldout_blocks``, ``(n, seq)`` token ids apart from the calibration ones,
    are given)."""
    result = search(store, calib_blocks, progress=progress, **search_kwargs)
    ppl = None
    if heldout_blocks is not None:
        scored = [*result.plans, teacher_plan(store.num_teacher_layers)]
        values = perplexities(store, scored, heldout_blocks, progress=progress)
        ppl = {p.key: v for p, v in zip(scored, values, strict=True)}
    tokens = {
        "calib": int(calib_blocks.numel()),
        "heldout": int(heldout_blocks.numel()) if heldout_blocks is not None else 0,
    }
    return family_from_search(name, store, result, ppl, k_best=search_kwargs.get("k_best", 4), tokens=tokens)


def family_from_search(
    name: str,
    store: LayerStore,
    result: SearchResult,
    perplexities: Sequence[float] | Mapping[str, float] | None = None,
    **info: Any,
) -> Family:
    """A family whose sizes are the searched plans, one per layer count, named ``l<layers>``.

    The largest size, ``l<N>`` for a search that reached the teacher's ``N`` layers, is the teacher
    itself (:func:`~boomerang_core.plan.teacher_plan`: its layers, embeddings, norm and head), never
    dominated: asking for the full size gives the original model. When the search's best plan with
    ``N`` layers is another one that is strictly better than the teacher on the selecting metric
    (a mixture can beat the teacher on one calibration text), it is kept beside it as ``m<N>``.

    Each size carries its held-out perplexity (``perplexities``: one per ``result.plans``, or by
    :attr:`SizePlan.key`) and its plan the calibration scores (``plan.meta["calib_kl"]``,
    ``["calib_nll"]``, and ``["calib_chat_kl"]`` when the search had conversations). A size that is
    larger and no better than another is marked dominated, so the router never picks it: by
    held-out perplexity when given, else by the selecting metric on calibration (perplexity, or
    chat KL). ``Family.save`` writes it all to ``family.json``: serving never repeats the search.
    ``info`` goes into ``family.info["search"]``; ``family.info["metric"]`` names the metric.
    """
    plans = list(result.plans)
    if perplexities is None:
        ppl_by_key: Mapping[str, float] = {}
    elif isinstance(perplexities, Mapping):
        ppl_by_key = perplexities
    else:
        if len(perplexities) != len(plans):
            raise ValueError(f"{len(perplexities)} perplexities for {len(plans)} plans")
        ppl_by_key = {p.key: v for p, v in zip(plans, perplexities, strict=True)}
    names = [f"l{plan.num_layers}" for plan in plans]
    n = store.num_teacher_layers
    rival: str | None = None
    if plans and plans[-1].num_layers == n:
        plans[-1], kept = _teacher_at_top(result, n)
        if kept is not None:
            plans.insert(-1, kept)
            rival = f"m{n}"
            names.insert(-1, rival)
    metric = next((m for m, sel in METRICS.items() if sel == result.select), result.select)
    search_info = {
        "method": f"k-best DP on 1-cos edge costs, reranked by calibration {result.select.upper()}",
        "select": result.select,
        "plans_scored": len(result.candidates),
        "seconds": {k: round(v, 1) for k, v in result.seconds.items()},
        "largest": f"l{n} is the teacher" + (f"; {rival} is the searched plan that beat it" if rival else ""),
        **info,
    }
    if result.chat_tokens:
        search_info["chat_tokens"] = result.chat_tokens
    family = Family.from_plans(name, store, plans, order="search", search=search_info)
    family.info["metric"] = metric
    ppl = [ppl_by_key.get(plan.key) for plan in plans]
    if perplexities is not None and all(p is not None for p in ppl):
        quality = [float(p) for p in ppl if p is not None]
    else:
        quality = [_calib_quality(plan, result.select) for plan in plans]
    flags = dominated_flags([s.params for s in family.sizes], quality)
    teacher_key = teacher_plan(n).key
    flags = [f and plan.key != teacher_key for f, plan in zip(flags, plans, strict=True)]
    if len(set(names)) < len(names):
        names = [s.name for s in family.sizes]
    family.sizes = [
        replace(s, name=nm, perplexity=p, dominated=d)
        for s, nm, p, d in zip(family.sizes, names, ppl, flags, strict=True)
    ]
    return family


def _teacher_at_top(result: SearchResult, n: int) -> tuple[SizePlan, SizePlan | None]:
    """The teacher's plan (with its calibration scores, when the search scored it), and the
    search's best ``n``-layer plan when that is another plan strictly better on the metric."""
    teacher = teacher_plan(n)
    by_key = {c.plan.key: c for c in result.candidates}
    scored = by_key.get(teacher.key)
    top = result.plans[-1]
    best = by_key.get(top.key)
    if scored is None:  # not scored (a search always scores it): nothing says another plan beat it
        return teacher, None
    teacher = _with_scores(replace(scored, plan=teacher))
    if best is None or top.key == teacher.key or not best.quality(result.select) < scored.quality(result.select):
        return teacher, None
    return teacher, top


def _calib_quality(plan: SizePlan, select: str = "nll") -> float:
    """The plan's calibration score by ``select``: perplexity for ``nll`` (where the plan has it,
    else its calibration KL, as in older family files), chat KL for ``chat_kl``."""
    if select == "chat_kl" and "calib_chat_kl" in plan.meta:
        return float(plan.meta["calib_chat_kl"])
    nll = plan.meta.get("calib_nll")
    return math.exp(float(nll)) if nll is not None else float(plan.meta["calib_kl"])
