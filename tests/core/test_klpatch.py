"""KLPatch on tiny families: a permutation of every block, and each greedy step is the brute-force
argmin of KL(teacher || size) over full forwards of every candidate."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from boomerang_core.alignment import StudentSpec
from boomerang_core.assemble import build
from boomerang_core.errors import StudentConfigError
from boomerang_core.plan import plan_for_patched, teacher_plan
from boomerang_core.quality.klpatch import klpatch_order, klpatch_search
from boomerang_core.store import LayerStore
from tests.tiny import prune_copy, tiny_teacher


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models gain nothing from threads, and on a shared machine two spinning OpenMP threads
    make each forward ~40x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _store(arch: str, layers: int, spec: StudentSpec) -> LayerStore:
    teacher = tiny_teacher(arch, layers)
    return LayerStore.from_models(teacher, prune_copy(teacher, spec, noise=0.05), spec)


def _full_kl(store: LayerStore, patched: list[int], ids: torch.Tensor, teacher_logp: torch.Tensor) -> float:
    """KL(teacher || size) in nats per token, from one full forward of the whole size."""
    assert store.spec is not None
    logits = build(plan_for_patched(store.spec, patched), store)(input_ids=ids).logits
    logp = torch.log_softmax(logits.double(), dim=-1)
    return float((teacher_logp.exp() * (teacher_logp - logp)).sum() / ids.numel())


@pytest.mark.parametrize(
    ("arch", "spec"),
    [
        ("llama", StudentSpec.from_pruning(8)),  # blocks of 1 and 2 layers, first and last blocks single
        ("gpt_neox", StudentSpec.from_pruning(9, first_layers_to_keep=1, every_n=3, last_layers_to_keep=1)),
    ],
)
def test_klpatch_is_the_brute_force_greedy_order(arch: str, spec: StudentSpec) -> None:
    store = _store(arch, spec.num_teacher_layers, spec)
    ids = torch.randint(3, 500, (3, 24), generator=torch.Generator().manual_seed(0))
    result = klpatch_search(store, ids, progress=False, batch_size=1)
    n_blocks = spec.num_student_layers
    assert sorted(result.order) == list(range(n_blocks))
    assert len(result.kl) == n_blocks and result.kl[-1] == 0.0

    with torch.no_grad():
        teacher = build(teacher_plan(spec.num_teacher_layers), store)
        teacher_logp = torch.log_softmax(teacher(input_ids=ids).logits.double(), dim=-1)
        for step in range(n_blocks - 1):
            done = result.order[:step]
            kls = {b: _full_kl(store, [*done, b], ids, teacher_logp) for b in range(n_blocks) if b not in done}
            best = min(kls, key=lambda b: kls[b])
            assert result.order[step] == best, f"step {step}: picked {result.order[step]}, brute force {kls}"
            assert result.kl[step] == pytest.approx(kls[best], rel=1e-4, abs=1e-6)
            if step == 0:  # the candidates really differ, so picking the argmin is a real check
                assert sorted(kls.values())[1] > kls[best] * 1.01


def test_klpatch_order_wraps_the_search_and_needs_a_student() -> None:
    spec = StudentSpec.from_pruning(6)
    store = _store("llama", 6, spec)
    ids = torch.randint(3, 500, (2, 16), generator=torch.Generator().manual_seed(1))
    assert klpatch_order(store, ids, progress=False) == klpatch_search(store, ids, progress=False).order
    teacher_only = LayerStore.from_models(tiny_teacher("llama", 6))
    with pytest.raises(StudentConfigError):
        klpatch_order(teacher_only, ids, progress=False)
