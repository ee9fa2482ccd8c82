"""KLPatch: choose the order in which student blocks are patched by KL to the teacher.

Greedy (arXiv 2607.08170): starting from the student, at each step patch the block whose
patching, on top of those already patched, gives the lowest KL(teacher || size) on a small
calibration set. The order found gives one size per step, as ``last`` and ``first`` do.

What makes it cheap: the teacher's next-token distributions are computed once
(:func:`~boomerang_core.quality.scoring.teacher_pass`); sizes are built from the store without copying;
and a candidate only re-runs the layers from the patched block onward. Layers before a block are
the same in the current size and in every candidate that patches that block, so their hidden
states are kept once per step and fed to a size built from the remaining layers
(:func:`~boomerang_core.quality.scoring.advance`, as every plan scorer does). The winner's states
become the next step's. And since KL is never negative, a candidate whose KL summed over part of the calibration
set already exceeds the step's best total is dropped there. The result is exactly the order a
search with full forwards finds.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from boomerang_core.errors import StudentConfigError
from boomerang_core.plan import SizePlan, plan_for_patched
from boomerang_core.quality.scoring import TeacherPass, advance, teacher_pass
from boomerang_core.store import LayerStore


@dataclass(frozen=True)
class KLPatchResult:
    """``order``: every block, in patch order. ``kl[j]``: KL(teacher || size) in nats per token
    after patching ``order[: j + 1]`` (the last entry, the teacher itself, is 0).
    ``seconds``: wall time of the search, ``cpu_seconds`` its process CPU time (steadier on a
    shared machine). ``work``: fraction of the layer-token passes (the LM head counted as the
    layers it costs) that a naive search with one full forward per candidate would run."""

    order: list[int]
    kl: list[float]
    seconds: float
    cpu_seconds: float = 0.0
    work: float = 1.0


def klpatch_order(store: LayerStore, calib_ids: torch.Tensor, progress: bool = True, batch_size: int = 1) -> list[int]:
    """Every student block, in the order KLPatch patches them (see :func:`klpatch_search`)."""
    return klpatch_search(store, calib_ids, progress=progress, batch_size=batch_size).order


@torch.no_grad()
def klpatch_search(
    store: LayerStore, calib_ids: torch.Tensor, progress: bool = True, batch_size: int = 1
) -> KLPatchResult:
    """Greedy KL patch order on ``calib_ids`` (``(n, seq)`` token ids; a few thousand tokens).

    Exact (the same order a search with full forwards finds; ties go to the lower block index)
    and cheaper in two ways. A candidate runs only the layers from its block onward. And its KL
    is summed one batch of ``batch_size`` blocks at a time: KL is never negative, so once a
    candidate's partial sum exceeds the best total of the step it cannot win and is dropped.
    Candidates run in order of their KL at the previous step, so the bound is tight early.
    """
    spec = store.spec
    if spec is None:
        raise StudentConfigError("KLPatch needs a store with a student")
    if calib_ids.dim() != 2 or calib_ids.shape[1] < 2:
        raise ValueError(f"calib_ids must be (n, seq) token ids, got shape {tuple(calib_ids.shape)}")
    start, cpu_start = time.perf_counter(), time.process_time()
    teacher = teacher_pass(store, calib_ids, batch_size)
    n_tokens = teacher.num_positions
    n_blocks = spec.num_student_layers
    current = plan_for_patched(spec, [])
    stacks = _run(store, current, teacher, [[] for _ in teacher.batches], shared=-1).stacks

    # Work accounting in layer-batch passes; the LM head counts as the layers its weights equal.
    head_cost = _head_cost(store)
    naive_work = done_work = 0.0
    patched: list[int] = []
    kls: list[float] = []
    # Previous-step KL estimate per block; the first step tries the cheapest (latest) blocks first.
    estimate = {b: float(-b) for b in range(n_blocks)}
    total = sum(n_blocks - j for j in range(n_blocks - 1))
    with tqdm(total=total, desc="klpatch", unit="size", disable=not progress) as bar:
        while len(patched) < n_blocks - 1:
            best: tuple[float, int, SizePlan, list[list[torch.Tensor]]] | None = None
            for block in sorted((b for b in range(n_blocks) if b not in patched), key=lambda b: (estimate[b], b)):
                plan = plan_for_patched(spec, [*patched, block], origin="klpatch")
                shared = plan.shared_depth(current)  # the layers before the block; -1 when it is block 0
                bound = best[0] * n_tokens if best is not None else math.inf
                run = _run(store, plan, teacher, stacks, shared, bound=bound)
                naive_work += (plan.num_layers + head_cost) * len(teacher.batches)
                done_work += (plan.num_layers - max(shared, 0) + head_cost) * run.batches_run
                bar.update(1)
                if not run.complete:  # its partial KL already exceeds the best: it cannot win
                    estimate[block] = bound / n_tokens
                    continue
                kl = run.kl_sum / n_tokens
                estimate[block] = kl
                if best is None or kl < best[0] or (kl == best[0] and block < best[1]):
                    best = (kl, block, plan, run.stacks)
            assert best is not None
            kl, block, current, stacks = best
            patched.append(block)
            kls.append(kl)
            bar.set_postfix(step=len(patched), block=block, kl=f"{kl:.4f}")
    patched += [b for b in range(n_blocks) if b not in patched]
    kls.append(0.0)
    return KLPatchResult(
        order=patched,
        kl=kls,
        seconds=time.perf_counter() - start,
        cpu_seconds=time.process_time() - cpu_start,
        work=done_work / naive_work if naive_work else 1.0,
    )


@dataclass
class _Pass:
    """One candidate's run: per completed batch its hidden states (the stacks of
    :func:`~boomerang_core.quality.scoring.advance`), the KL summed over their tokens (nats), and
    whether every batch ran (False: stopped at the bound)."""

    stacks: list[list[torch.Tensor]]
    kl_sum: float
    complete: bool

    @property
    def batches_run(self) -> int:
        return len(self.stacks) + (0 if self.complete else 1)


def _run(
    store: LayerStore,
    plan: SizePlan,
    teacher: TeacherPass,
    stacks: Sequence[list[torch.Tensor]],
    shared: int,
    bound: float = math.inf,
) -> _Pass:
    """Run ``plan`` on every batch of ``teacher`` from the hidden states ``stacks`` of a plan that
    shares its first ``shared`` layers, stopping as soon as the summed KL exceeds ``bound``."""
    done: list[list[torch.Tensor]] = []
    kl_sum = 0.0
    for b, ids in enumerate(teacher.batches):
        stack = stacks[b][: shared + 1]  # a new list: the current plan's stack stays as it is
        kl_sum += teacher.kl_sum(b, advance(store, plan, stack, ids, shared))
        if kl_sum > bound:
            return _Pass(done, kl_sum, complete=False)
        done.append(stack)
    return _Pass(done, kl_sum, complete=True)


def _head_cost(store: LayerStore) -> float:
    """The LM head's multiply-adds per token, in units of one teacher layer's."""
    head = store.heads["teacher"]
    head_params = sum(p.numel() for p in head.parameters())
    layer_params = sum(p.numel() for p in store.layers["teacher"][0].parameters())
    return head_params / max(layer_params, 1)
