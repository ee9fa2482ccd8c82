"""Fused projections in the store: ``qkv_proj = cat(q, k, v)`` and ``gate_up_proj = cat(gate, up)``.

vLLM runs attention and MLP input projections as one matmul over a fused weight. To serve a size
from the store's bytes, the store must hold that fused tensor; :func:`fuse_store` re-packs every
layer's q/k/v and gate/up ONCE into fused tensors and makes the store's own (transformers) modules
hold row-slice views into them, so ``build(plan)`` and every vLLM engine read the same memory.

Opt-in: a store that is never served by vLLM is left as loaded. Pure torch, no vLLM import.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from boomerang_core.store import LayerStore

# submodule of a decoder layer -> (fused name in vLLM, its parts in transformers), in cat order
FUSED_GROUPS: dict[str, tuple[str, tuple[str, ...]]] = {
    "self_attn": ("qkv_proj", ("q_proj", "k_proj", "v_proj")),
    "mlp": ("gate_up_proj", ("gate_proj", "up_proj")),
}
_FUSED_ATTR = "_boomerang_fused"  # on a submodule: {"qkv_proj.weight": fused tensor, ...}
_STORE_FLAG = "_boomerang_fused_report"


@dataclass(frozen=True)
class FuseReport:
    """What fusing did. ``copied_bytes`` is memory that stopped being shared: parts that were
    shared between two layers one by one (not as a whole group) now live in two fused tensors."""

    fused_tensors: int
    fused_bytes: int
    copied_bytes: int


def fuse_store(store: LayerStore) -> FuseReport:
    """Re-pack q/k/v and gate/up of every store layer into fused tensors; idempotent.

    Layers that shared the very same part tensors (a student layer equal to its teacher layer)
    share the fused tensor too. While fusing, every original tensor is kept alive so that no new
    allocation can reuse an address that still names an unfused part.
    """
    done_report = getattr(store, _STORE_FLAG, None)
    if isinstance(done_report, FuseReport):
        return done_report
    fused_by_parts: dict[tuple[tuple[int, int], ...], tuple[torch.Tensor, list[torch.Tensor]]] = {}
    part_owner: dict[tuple[int, int], tuple[tuple[int, int], ...]] = {}
    copied = 0
    for layers in store.layers.values():
        for layer in layers:
            for sub_name, (fused_name, parts) in FUSED_GROUPS.items():
                sub = getattr(layer, sub_name, None)
                if sub is None or not all(isinstance(getattr(sub, p, None), nn.Module) for p in parts):
                    continue
                fused_here: dict[str, torch.Tensor] = {}
                for kind in ("weight", "bias"):
                    members = [getattr(getattr(sub, p), kind, None) for p in parts]
                    if all(m is None for m in members):
                        continue
                    if any(m is None for m in members):
                        raise ValueError(f"{sub_name}: some of {parts} have a {kind} and some do not")
                    tensors = [m for m in members if m is not None]
                    key = tuple((t.data_ptr(), t.numel()) for t in tensors)
                    if key not in fused_by_parts:
                        for part_key in key:
                            owner = part_owner.setdefault(part_key, key)
                            if owner != key:  # shared alone, not as part of the same group
                                copied += tensors[key.index(part_key)].nbytes
                        fused = torch.cat([t.detach() for t in tensors], dim=0)  # (sum of rows, in)
                        fused_by_parts[key] = (fused, tensors)
                    fused = fused_by_parts[key][0]
                    start = 0
                    for part, t in zip(parts, tensors, strict=True):
                        rows = t.shape[0]
                        view = nn.Parameter(fused[start : start + rows], requires_grad=False)
                        getattr(sub, part).register_parameter(kind, view)
                        start += rows
                    fused_here[f"{fused_name}.{kind}"] = fused
                if fused_here:
                    object.__setattr__(sub, _FUSED_ATTR, {**getattr(sub, _FUSED_ATTR, {}), **fused_here})
    report = FuseReport(
        fused_tensors=len(fused_by_parts),
        fused_bytes=sum(f.nbytes for f, _ in fused_by_parts.values()),
        copied_bytes=copied,
    )
    fused_by_parts.clear()  # releases the unfused originals
    setattr(store, _STORE_FLAG, report)
    return report


def fused_tensor(submodule: nn.Module, name: str) -> torch.Tensor | None:
    """The fused tensor ``name`` (e.g. ``"qkv_proj.weight"``) of a fused submodule, or ``None``."""
    table: dict[str, torch.Tensor] = getattr(submodule, _FUSED_ATTR, {})
    return table.get(name)


def is_fused(store: LayerStore) -> bool:
    return isinstance(getattr(store, _STORE_FLAG, None), FuseReport)
