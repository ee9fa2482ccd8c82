"""KLPatch: choose the order in which student blocks are patched by KL to the teacher.

Greedy (arXiv 2607.08170): starting from the student, at each step patch the block whose
patching, on top of those already patched, gives the lowest KL(teacher || size) on a small
calibration set. The order found gives one size per step, as ``last`` and ``first`` do.

What makes it cheap: the teacher's next-token distributions are computed once; sizes are built
from the store without copying; and a candidate only re-runs the layers from the patched block
onward. Layers before a block are the same in the current size and in every candidate that
patches that block, so their hidden states are recorded once per step and fed to a size built
from the remaining layers (``inputs_embeds``). The winner's recorded states become the next
step's. And since KL is never negative, a candidate whose KL summed over part of the calibration
set already exceeds the step's best total is dropped there. The result is exactly the order a
search with full forwards finds.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from boomerang_core.arch import adapter_for
from boomerang_core.assemble import build
from boomerang_core.errors import StudentConfigError
from boomerang_core.plan import SizePlan, plan_for_patched, teacher_plan
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


@dataclass
class _Target:
    """The teacher's next-token distribution on one calibration batch."""

    probs: torch.Tensor  # (batch, seq, vocab), float32
    neg_entropy: torch.Tensor  # () sum over tokens of sum_v p log p


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
    batches = [b.to(store.device) for b in calib_ids.split(batch_size)]
    n_tokens = calib_ids.numel()
    n_blocks = spec.num_student_layers
    blocks = spec.blocks()

    teacher = build(teacher_plan(store.num_teacher_layers), store)
    targets = [_target(teacher(input_ids=ids, use_cache=False).logits) for ids in batches]
    states = _run(build(plan_for_patched(spec, []), store), batches, targets).states

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
            best: tuple[float, int, list[list[torch.Tensor]]] | None = None
            for block in sorted((b for b in range(n_blocks) if b not in patched), key=lambda b: (estimate[b], b)):
                plan = plan_for_patched(spec, [*patched, block], origin="klpatch")
                depth = _block_depth(blocks, patched, block)
                bound = best[0] * n_tokens if best is not None else math.inf
                if depth == 0:
                    run = _run(build(plan, store), batches, targets, bound=bound)
                else:
                    suffix = replace(plan, layers=plan.layers[depth:])
                    inputs = [s[depth] for s in states]
                    run = _run(build(suffix, store), batches, targets, inputs, bound=bound)
                naive_work += (plan.num_layers + head_cost) * len(batches)
                done_work += (plan.num_layers - depth + head_cost) * run.batches_run
                bar.update(1)
                if not run.complete:  # its partial KL already exceeds the best: it cannot win
                    estimate[block] = bound / n_tokens
                    continue
                kl = run.kl_sum / n_tokens
                estimate[block] = kl
                if best is None or kl < best[0] or (kl == best[0] and block < best[1]):
                    best = (kl, block, [s[:depth] + t for s, t in zip(states, run.states, strict=True)])
            assert best is not None
            kl, block, states = best
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


def _block_depth(blocks: Sequence[range], patched: Sequence[int], block: int) -> int:
    """Depth at which ``block``'s first layer runs once the blocks in ``patched`` are patched."""
    done = set(patched)
    return sum(len(blocks[i]) if i in done else 1 for i in range(block))


def _target(logits: torch.Tensor) -> _Target:
    logp = torch.log_softmax(logits.float(), dim=-1)  # (batch, seq, vocab)
    probs = logp.exp()
    return _Target(probs=probs, neg_entropy=(probs * logp).sum())


@dataclass
class _Pass:
    """One candidate's run: per completed batch the input of every layer, the KL summed over
    their tokens (nats), and whether every batch ran (False: stopped at the bound)."""

    states: list[list[torch.Tensor]]
    kl_sum: float
    complete: bool

    @property
    def batches_run(self) -> int:
        return len(self.states) + (0 if self.complete else 1)


def _run(
    model: nn.Module,
    batches: Sequence[torch.Tensor],
    targets: Sequence[_Target],
    inputs: Sequence[torch.Tensor] | None = None,
    bound: float = math.inf,
) -> _Pass:
    """Run ``model`` on every batch (from token ids, or from hidden states ``inputs`` fed to its
    first layer), stopping as soon as the summed KL exceeds ``bound``."""
    states: list[list[torch.Tensor]] = []
    kl_sum = 0.0
    for i, (ids, target) in enumerate(zip(batches, targets, strict=True)):
        with record_layer_inputs(model) as recorded:
            if inputs is None:
                logits = model(input_ids=ids, use_cache=False).logits
            else:
                logits = model(inputs_embeds=inputs[i], use_cache=False).logits
        logp = torch.log_softmax(logits.float(), dim=-1)  # (batch, seq, vocab)
        kl_sum += float(target.neg_entropy - (target.probs * logp).sum())
        if kl_sum > bound:
            return _Pass(states, kl_sum, complete=False)
        states.append(recorded)
    return _Pass(states, kl_sum, complete=True)


def _head_cost(store: LayerStore) -> float:
    """The LM head's multiply-adds per token, in units of one teacher layer's."""
    head = store.heads["teacher"]
    head_params = sum(p.numel() for p in head.parameters())
    layer_params = sum(p.numel() for p in store.layers["teacher"][0].parameters())
    return head_params / max(layer_params, 1)


@contextmanager
def record_layer_inputs(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Record the hidden state entering each decoder layer of a built size, in depth order.

    Hooks go on the size's own per-depth layers, never on the shared store layers (and
    ``output_hidden_states`` is not used: transformers installs its capture hooks permanently on
    the layer modules, which every size shares).
    """
    plan: SizePlan = model.boomerang_plan  # type: ignore[assignment]
    layers = _layer_list(model)
    if len(layers) != plan.num_layers:
        raise RuntimeError(f"built size has {len(layers)} layers, its plan {plan.num_layers}")
    recorded: list[torch.Tensor] = []

    def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        recorded.append(args[0] if args else kwargs["hidden_states"])

    handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in layers]
    try:
        yield recorded
    finally:
        for handle in handles:
            handle.remove()


def _layer_list(model: nn.Module) -> nn.ModuleList:
    return adapter_for(model.config).get_layers(model)
