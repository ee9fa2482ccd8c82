"""The two baselines every size is compared with, both expressed as plans over the same store.

- *Pruned only*: the same plan on the student as it was before distillation. A prune-initialised
  student layer ``i`` IS teacher layer ``copied[i]``, and its embeddings, norm and head are the
  teacher's, so the baseline is the plan with every student reference mapped to the teacher:
  no second store, no extra memory.
- *ShortGPT* (Men et al., 2024): the teacher with whole layers dropped, lowest block influence
  first, no training. Block influence BI = 1 - cos(layer input, layer output), averaged over the
  calibration tokens: a layer that barely turns the residual stream is cheap to drop.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from boomerang_core.alignment import StudentSpec
from boomerang_core.assemble import build
from boomerang_core.plan import LayerRef, SizePlan, teacher_plan
from boomerang_core.store import LayerStore


def undistilled_plan(plan: SizePlan, spec: StudentSpec) -> SizePlan:
    """``plan`` built from the pruned, not distilled student: every student layer replaced by the
    teacher layer it was copied from, and the teacher's embeddings, final norm and head."""
    layers = tuple(
        ref if ref.source == "teacher" else LayerRef("teacher", spec.copied_teacher_layers[ref.index])
        for ref in plan.layers
    )
    return replace(
        plan, layers=layers, embed="teacher", norm="teacher", head="teacher", origin=f"undistilled-{plan.origin}"
    )


@torch.no_grad()
def block_influence(
    store: LayerStore, calib_ids: torch.Tensor, batch_size: int = 4, progress: bool = False
) -> list[float]:
    """ShortGPT block influence of every teacher layer: ``1 - cos(input, output)`` of its hidden
    states, averaged over every calibration token (dimensionless, 0 = the layer changes nothing)."""
    model = build(teacher_plan(store.num_teacher_layers), store)
    layers = store.adapter.get_layers(model)
    cos_sum = torch.zeros(len(layers), dtype=torch.float64)
    n_tokens = 0
    batches = calib_ids.split(batch_size)
    with _layer_cosines(layers, cos_sum):
        for ids in tqdm(batches, desc="block influence", unit="batch", disable=not progress, leave=False):
            model(input_ids=ids.to(store.device), use_cache=False)
            n_tokens += ids.numel()
    return (1.0 - cos_sum / n_tokens).tolist()


def shortgpt_dropped(influence: Sequence[float], num_layers: int) -> tuple[int, ...]:
    """Teacher layers ShortGPT drops to keep ``num_layers``: the lowest-influence ones (ties: the
    later layer first, as deeper layers are the usual candidates)."""
    n = len(influence)
    if not 0 < num_layers <= n:
        raise ValueError(f"num_layers must be in 1..{n}, got {num_layers}")
    ranked = sorted(range(n), key=lambda i: (influence[i], -i))
    return tuple(sorted(ranked[: n - num_layers]))


def shortgpt_plan(influence: Sequence[float], num_layers: int) -> SizePlan:
    """The teacher pruned to ``num_layers`` layers by lowest block influence."""
    return teacher_plan(len(influence), shortgpt_dropped(influence, num_layers), origin="shortgpt")


@contextmanager
def _layer_cosines(layers: nn.ModuleList, cos_sum: torch.Tensor) -> Iterator[None]:
    """Add, per depth, the sum over tokens of cos(layer input, layer output) into ``cos_sum``.
    Hooks go on the size's own per-depth wrappers, never on the shared store layers."""

    def make_hook(depth: int) -> Any:
        def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = output[0] if isinstance(output, tuple) else output
            cos = nn.functional.cosine_similarity(h_in.float(), h_out.float(), dim=-1)  # (batch, seq)
            cos_sum[depth] += cos.double().sum().cpu()

        return hook

    handles = [layer.register_forward_hook(make_hook(d), with_kwargs=True) for d, layer in enumerate(layers)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
