"""Plan search and the Pareto front on a tiny family: brute force agrees, scores match the built
model, the front reloads, and every front plan is the model that copying its layers gives."""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Iterator
from dataclasses import replace

import pytest
import torch
from transformers import PreTrainedModel

from boomerang_core.alignment import StudentSpec
from boomerang_core.assemble import build
from boomerang_core.family import Family, dominated_flags
from boomerang_core.plan import SizePlan, plan_for_patched, teacher_plan
from boomerang_core.quality.scoring import perplexity, score_plans, teacher_pass
from boomerang_core.quality.search import Path, front_family, k_best_paths, path_plan, search
from boomerang_core.store import LayerStore
from tests.tiny import copied_model, noisy_pair

LAYERS = 6


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Hundreds of tiny forwards: one thread avoids OpenMP spin-waits on a busy machine (5x here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pair() -> tuple[PreTrainedModel, PreTrainedModel, StudentSpec]:
    return noisy_pair(LAYERS)  # blocks [0, 1], [2, 3], [4], [5]


@pytest.fixture(scope="module")
def store(pair: tuple[PreTrainedModel, PreTrainedModel, StudentSpec]) -> LayerStore:
    teacher, student, spec = pair
    return LayerStore.from_models(copy.deepcopy(teacher), copy.deepcopy(student), spec)


def calib(seed: int = 0, n: int = 4, seq: int = 16) -> torch.Tensor:
    return torch.randint(3, 500, (n, seq), generator=torch.Generator().manual_seed(seed))


def all_paths(spec: StudentSpec, b: int = 0) -> Iterator[Path]:
    """Every path from boundary ``b`` to the end, enumerated independently of the DP."""
    n = spec.num_teacher_layers
    if b == n:
        yield ()
        return
    for rest in all_paths(spec, b + 1):
        yield (("teacher", b), *rest)
        yield (("skip", b), *rest)
    for j, block in enumerate(spec.blocks()):
        if block.start == b:
            for rest in all_paths(spec, block.stop):
                yield (("student", j), *rest)


@torch.no_grad()
def kl_by_build(plan: SizePlan, store: LayerStore, ids: torch.Tensor, t: torch.Tensor | None = None) -> float:
    """KL(teacher || plan) in nats per position, from full forwards of built models (``t``: the
    teacher's log-probabilities, if already computed)."""
    if t is None:
        t = torch.log_softmax(build(teacher_plan(LAYERS), store)(ids).logits.float(), -1)
    q = torch.log_softmax(build(plan, store)(ids).logits.float(), -1)
    return float((t.exp() * (t - q)).sum() / ids.numel())


def test_dominated_plan_is_dropped(store: LayerStore) -> None:
    assert dominated_flags([10, 20, 30, 30], [5.0, 6.0, 4.0, 4.0]) == [False, True, False, True]
    assert dominated_flags([10, 20], [5.0, 5.0]) == [False, True]  # larger and no better
    plans = [plan_for_patched(store.spec, b) for b in ([], [1], [0, 1])]  # type: ignore[arg-type]
    family = Family.from_plans("tiny", store, plans)
    flags = dominated_flags([s.params for s in family.sizes], [9.0, 11.0, 3.0])
    family.sizes = [replace(s, dominated=d) for s, d in zip(family.sizes, flags, strict=True)]
    assert [s.plan for s in family.servable] == [plans[0], plans[2]]


def test_scores_match_built_models(store: LayerStore) -> None:
    ids = calib()
    plans = [path_plan(p) for p in list(all_paths(store.spec))[::17]]  # type: ignore[arg-type]
    assert any(p.embed == "student" for p in plans) and any(p.head == "student" for p in plans)
    scores = score_plans(store, plans, teacher=teacher_pass(store, ids, batch_size=3), progress=False)
    for plan, score in zip(plans, scores, strict=True):
        assert math.isclose(math.exp(score.nll), perplexity(build(plan, store), ids), rel_tol=1e-4)
        assert score.kl is not None and math.isclose(
            score.kl, kl_by_build(plan, store, ids), rel_tol=1e-3, abs_tol=1e-6
        )


def test_dp_enumerates_every_path(store: LayerStore) -> None:
    spec = store.spec
    assert spec is not None
    every = {p for p in all_paths(spec) if any(kind != "skip" for kind, _ in p)}
    costs = replace_costs(spec)
    found = k_best_paths(LAYERS, spec.blocks(), costs, k=10**6, min_layers=1, max_layers=LAYERS)
    assert {p for paths in found.values() for _, p in paths} == every
    for count, paths in found.items():
        assert all(sum(kind != "skip" for kind, _ in p) == count for _, p in paths)
        assert [c for c, _ in paths] == sorted(c for c, _ in paths)


def replace_costs(spec: StudentSpec):  # type: ignore[no-untyped-def]
    from boomerang_core.quality.search import EdgeCosts

    return EdgeCosts(skip=[0.1 * (i + 1) for i in range(LAYERS)], student=[0.05] * spec.num_student_layers)


def test_search_finds_the_brute_force_best(store: LayerStore) -> None:
    ids = calib(1, n=2, seq=12)
    paths = [p for p in all_paths(store.spec) if any(kind != "skip" for kind, _ in p)]  # type: ignore[arg-type]
    with torch.no_grad():
        t = torch.log_softmax(build(teacher_plan(LAYERS), store)(ids).logits.float(), -1)
    best: dict[int, float] = {}
    for path in paths:
        plan = path_plan(path)
        best[plan.num_layers] = min(best.get(plan.num_layers, math.inf), kl_by_build(plan, store, ids, t))
    result = search(store, ids, min_layers=1, k_best=10**6, select="kl", progress=False)
    assert len(result.candidates) == len(paths)  # exhaustive: ShortGPT's plans are among the paths
    assert [p.num_layers for p in result.plans] == list(range(1, LAYERS + 1))
    for plan in result.plans:
        assert kl_by_build(plan, store, ids, t) <= best[plan.num_layers] * (1 + 1e-3) + 1e-6, plan.describe()
    assert result.plans[-1].layers == teacher_plan(LAYERS).layers
    # the default choice: the lowest next-token NLL at each count, among the very same candidates
    by_nll = search(store, ids, min_layers=1, k_best=10**6, progress=False)
    lowest = {n: min(c.nll for c in cands) for n, cands in by_nll.by_layers().items()}
    assert {p.num_layers: p.meta["calib_nll"] for p in by_nll.plans} == lowest
    for plan in by_nll.plans:
        assert math.exp(plan.meta["calib_nll"]) == pytest.approx(perplexity(build(plan, store), ids), rel=1e-4)


def test_front_plans_match_copied_layers_and_reload(
    pair: tuple[PreTrainedModel, PreTrainedModel, StudentSpec], store: LayerStore, tmp_path
) -> None:
    teacher, student, _ = pair
    before = store.resident_bytes()
    family = front_family("tiny", store, calib(2), calib(3, n=3), min_layers=2, k_best=3, progress=False)
    assert [s.num_layers for s in family.sizes] == list(range(2, LAYERS + 1))
    # the front's plans, and mixtures that start and end with student layers and skip teacher layers
    mixtures = [
        path_plan((("student", 0), ("skip", 2), ("teacher", 3), ("teacher", 4), ("student", 3))),
        path_plan((("skip", 0), ("skip", 1), ("student", 1), ("skip", 4), ("teacher", 5))),
    ]
    assert mixtures[0].embed == mixtures[0].head == "student" and mixtures[1].embed == "student"
    ids = calib(4, n=2, seq=10)
    with torch.no_grad():
        for plan in [s.plan for s in family.sizes] + mixtures:
            built, ref = build(plan, store), copied_model(plan, teacher, student)
            assert built.config.num_hidden_layers == plan.num_layers
            assert (built(ids).logits - ref(ids).logits).abs().max() <= 1e-5, plan.describe()
    built_all = [build(s.plan, store) for s in family.sizes]
    assert store.resident_bytes() == before and len(built_all) == len(family.sizes)
    servable = family.servable
    # the largest size is the teacher, served whatever its perplexity; below it, each size is better
    assert servable[-1].plan.key == teacher_plan(LAYERS).key and servable[-1].name == f"l{LAYERS}"
    assert all(a.perplexity > b.perplexity for a, b in itertools.pairwise(servable[:-1]))  # type: ignore[operator]

    family.save(tmp_path)
    loaded = Family.load(tmp_path, store)
    assert [s.plan.key for s in loaded.sizes] == [s.plan.key for s in family.sizes]
    assert [(s.name, s.dominated, s.perplexity, s.params) for s in loaded.sizes] == [
        (s.name, s.dominated, s.perplexity, s.params) for s in family.sizes
    ]
    assert [s.plan.meta["calib_kl"] for s in loaded.sizes] == [s.plan.meta["calib_kl"] for s in family.sizes]
    assert loaded.info["search"]["plans_scored"] == family.info["search"]["plans_scored"]
