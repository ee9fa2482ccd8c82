"""Perplexity, baselines, dominance and the curve on tiny random families."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from boomerang_core.alignment import StudentSpec
from boomerang_core.assemble import build
from boomerang_core.family import Family, FamilySize, mark_dominated
from boomerang_core.plan import LayerRef, plan_for_patched, teacher_plan
from boomerang_core.quality.baselines import block_influence, shortgpt_dropped, shortgpt_plan, undistilled_plan
from boomerang_core.quality.curve import evaluate_family
from boomerang_core.quality.report import CurvePoint, CurveResult
from boomerang_core.quality.scoring import perplexities, perplexity
from boomerang_core.store import LayerStore
from tests.tiny import prune_copy, tiny_teacher


def test_perplexity_matches_hand_computation() -> None:
    model = tiny_teacher("llama", layers=2)
    blocks = torch.randint(3, 500, (5, 12), generator=torch.Generator().manual_seed(0))
    nll, count = 0.0, 0
    with torch.no_grad():
        for row in blocks:  # one block at a time, token by token, in float64
            logp = torch.log_softmax(model(row[None]).logits[0].double(), dim=-1)
            for t in range(len(row) - 1):
                nll -= float(logp[t, row[t + 1]])
                count += 1
    expected = math.exp(nll / count)
    assert count == 5 * 11
    assert math.isclose(perplexity(model, blocks, batch_size=2), expected, rel_tol=1e-5)
    assert math.isclose(perplexity(model, blocks, batch_size=5), expected, rel_tol=1e-5)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models gain nothing from threads, and on a shared machine spinning OpenMP threads make
    each forward far slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _store(layers: int = 8, noise: float = 0.05) -> LayerStore:
    teacher = tiny_teacher("llama", layers)
    spec = StudentSpec.from_pruning(layers)
    return LayerStore.from_models(teacher, prune_copy(teacher, spec, noise=noise), spec)


def _ids(n: int, seq: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 500, (n, seq), generator=torch.Generator().manual_seed(seed))


def test_undistilled_plan_is_the_pruned_student_and_the_teacher_at_k_s() -> None:
    store = _store()
    spec = store.spec
    assert spec is not None
    everything = plan_for_patched(spec, list(range(spec.num_student_layers)))
    full = undistilled_plan(everything, spec)
    teacher = teacher_plan(spec.num_teacher_layers)
    assert (full.layers, full.embed, full.norm, full.head) == (teacher.layers, "teacher", "teacher", "teacher")
    # k = 0: the pruned student itself, built independently by copying layers
    pruned = prune_copy(tiny_teacher("llama", 8), spec, noise=0.0)
    ids = _ids(2, 16, 0)
    with torch.no_grad():
        ours = build(undistilled_plan(plan_for_patched(spec, []), spec), store)(input_ids=ids).logits
        reference = pruned(input_ids=ids).logits
    assert torch.allclose(ours, reference, atol=1e-5)


def test_shortgpt_drops_the_lowest_influence_layers() -> None:
    assert shortgpt_dropped([0.5, 0.1, 0.3, 0.05, 0.2], 3) == (1, 3)
    assert shortgpt_dropped([0.5, 0.1, 0.3, 0.05, 0.2], 5) == ()
    assert shortgpt_plan([0.5, 0.1, 0.3, 0.05, 0.2], 2).layers == (LayerRef("teacher", 0), LayerRef("teacher", 2))

    store = _store()
    ids = _ids(3, 20, 1)
    influence = block_influence(store, ids, batch_size=2)
    # by hand, from a fresh copy of the teacher: hidden states around every layer
    teacher = tiny_teacher("llama", 8)
    teacher.config.tie_last_hidden_states = False  # the last entry is the last layer's raw output
    with torch.no_grad():
        hidden = teacher(input_ids=ids, output_hidden_states=True).hidden_states
    expected = [
        1 - float(torch.nn.functional.cosine_similarity(hidden[i], hidden[i + 1], dim=-1).mean()) for i in range(8)
    ]
    assert influence == pytest.approx(expected, abs=1e-5)
    lowest = sorted(range(8), key=lambda i: expected[i])[:3]
    assert set(shortgpt_dropped(influence, 5)) == set(lowest)


def _size(name: str, params: int, ppl: float | None, k: int) -> FamilySize:
    plan = teacher_plan(1)
    return FamilySize(
        name=name,
        plan=replace(plan, patched=tuple(range(k))),
        params=params,
        bytes=4 * params,
        label=name,
        perplexity=ppl,
    )


def test_mark_dominated() -> None:
    sizes = [
        _size("a", 100, 50.0, 0),
        _size("b", 100, 40.0, 1),  # same parameters, better: dominates a
        _size("c", 120, 45.0, 2),  # larger and worse than b
        _size("d", 150, 40.0, 3),  # larger and only as good as b
        _size("e", 200, 30.0, 4),
        _size("f", 250, None, 5),  # not evaluated: left alone
    ]
    marked = mark_dominated(sizes)
    assert [s.name for s in marked] == ["a", "b", "c", "d", "e", "f"]
    assert [s.dominated for s in marked] == [True, False, True, True, False, False]


def test_evaluate_family_writes_table_and_png(tmp_path: Path) -> None:
    store = _store(layers=6)
    family = Family.from_store("tiny", store, order="last")
    held, calib = _ids(3, 24, 2), _ids(2, 24, 3)
    result = evaluate_family(family, held, calib, batch_size=2, progress=False)
    n_sizes = store.spec.num_student_layers + 1 if store.spec else 0
    assert len(result.sizes) == n_sizes and set(result.orders) == {"last", "first", "klpatch"}
    assert result.klpatch is not None and sorted(result.klpatch.order) == list(range(n_sizes - 1))
    with torch.no_grad():
        teacher_ppl = perplexity(build(teacher_plan(6), store), held)
        student_ppl = perplexity(build(plan_for_patched(store.spec, []), store), held)  # type: ignore[arg-type]
    assert result.sizes[-1].perplexity == pytest.approx(teacher_ppl, rel=1e-6)
    assert result.sizes[0].perplexity == pytest.approx(student_ppl, rel=1e-6)
    assert result.shortgpt[6].perplexity == pytest.approx(teacher_ppl, rel=1e-6)
    assert result.undistilled[-1] == pytest.approx(teacher_ppl, rel=1e-6)
    assert [s.perplexity for s in family.sizes] == [p.perplexity for p in result.sizes]
    assert [s.dominated for s in family.sizes] == result.dominated
    assert [s.dominated for s in family.sizes] == [s.dominated for s in mark_dominated(family.sizes)]

    md = result.to_markdown()
    assert "**Monotone: " in md and "ShortGPT at every interpolated size" in md
    for p in result.sizes:
        assert f"| {p.name} | {p.k} | {p.num_layers} |" in md
    png = result.plot(tmp_path / "curve.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def _point(name: str, k: int, layers: int, ppl: float) -> CurvePoint:
    return CurvePoint(name=name, k=k, num_layers=layers, params=layers * 1000, perplexity=ppl)


def test_curve_verdicts() -> None:
    sizes = [_point("k0", 0, 3, 90.0), _point("k1", 1, 4, 95.0), _point("k2", 2, 5, 60.0), _point("k3", 3, 6, 20.0)]
    shortgpt = {n: _point(f"s{n}", 0, n, ppl) for n, ppl in [(3, 500.0), (4, 80.0), (5, 70.0), (6, 20.0)]}
    result = CurveResult(
        family="t",
        family_order="last",
        sizes=sizes,
        dominated=[False, True, False, False],
        undistilled=[1000.0, 900.0, 50.0, 20.0],
        shortgpt=shortgpt,
        shortgpt_dropped={n: () for n in shortgpt},
        block_influence=[],
        orders={"last": sizes, "first": [sizes[0], _point("k1", 1, 5, 30.0), _point("k2", 2, 5, 25.0), sizes[3]]},
        klpatch=None,
        heldout_tokens=10,
        calib_tokens=10,
        seconds=1.0,
    )
    assert not result.monotone and [(a.name, b.name) for a, b in result.rises()] == [("k0", "k1")]
    assert [(p.name, ref) for p, ref in result.losses_to("shortgpt")] == [("k1", 80.0)]
    assert [(p.name, ref) for p, ref in result.losses_to("undistilled")] == [("k2", 50.0)]
    assert result.best_order == "first"
    md = result.to_markdown()
    assert "**Monotone: no.**" in md and "k1 (4 layers): 95.0 vs 80.0 (+19%)" in md


def test_shared_prefix_perplexities_match_one_plan_at_a_time() -> None:
    store = _store()
    spec = store.spec
    assert spec is not None
    plans = [plan_for_patched(spec, patched) for patched in ([], [4], [4, 3], [0], [0, 1, 2, 3, 4], [2])]
    plans += [undistilled_plan(p, spec) for p in plans[:3]]
    plans += [teacher_plan(8, dropped) for dropped in ((7,), (6, 7), (5, 6, 7), (2,))]
    held = _ids(3, 20, 4)
    shared = perplexities(store, plans, held, batch_size=2)
    alone = [perplexity(build(p, store), held, batch_size=2) for p in plans]
    assert shared == pytest.approx(alone, rel=1e-5)


def test_known_perplexities_are_not_run_again() -> None:
    store = _store(layers=6)
    family = Family.from_store("tiny", store, order="last")
    teacher = teacher_plan(6).key
    result = evaluate_family(family, _ids(2, 16, 5), _ids(1, 16, 6), orders=("last",), known={teacher: 123.0})
    assert result.sizes[-1].perplexity == 123.0 and result.shortgpt[6].perplexity == 123.0
    assert family.sizes[-1].perplexity == 123.0
