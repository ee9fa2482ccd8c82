"""Build a size from the store without copying, and export it as a standard checkpoint."""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from boomerang_core.plan import LayerRef, SizePlan
from boomerang_core.store import LayerStore

PLAN_FILE = "boomerang_plan.json"


def layers_config(
    store: LayerStore, refs: Sequence[LayerRef], attn_implementation: str | None = None
) -> PretrainedConfig:
    """The teacher's config for a stack of ``refs``: their count and per-depth layer types, and the
    attention function registered in transformers' ``AttentionInterface`` under ``attn_implementation``
    (the teacher's own when None)."""
    teacher = store.configs["teacher"]
    if attn_implementation is None:
        config = copy.deepcopy(teacher)
    else:
        config = type(teacher).from_dict(teacher.to_dict(), attn_implementation=attn_implementation)
    config.num_hidden_layers = len(refs)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [store.layer_type(r) for r in refs]
    return config


def size_config(store: LayerStore, plan: SizePlan) -> PretrainedConfig:
    """The teacher's config with this size's layer count, per-depth layer types and tying."""
    config = layers_config(store, plan.layers)
    head_w = _weight(store.heads[plan.head])
    embed_w = _weight(store.embeds[plan.embed])
    config.tie_word_embeddings = head_w.data_ptr() == embed_w.data_ptr()
    config.architectures = [store.model_class.__name__]
    config.use_cache = True
    return config


def _weight(module: nn.Module) -> torch.Tensor:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{type(module).__name__} has no weight tensor")
    return weight


def bind_layer(shell: nn.Module, layer: nn.Module) -> nn.Module:
    """Make every module of ``shell`` that holds tensors the module at the same path in ``layer``.

    ``shell`` is a decoder layer of the same class built on the meta device for one depth of one
    size: its containers (the layer, its attention, its MLP) stay its own and carry that depth
    (``layer_idx``, attention type), while its weights ARE the store layer's. Several sizes thus
    hold one store layer at different depths with nothing copied, and nothing of the store layer
    (no attribute, no hook) is changed. Returns ``shell``."""
    if type(shell) is not type(layer):
        raise TypeError(f"cannot bind a {type(layer).__name__} into a {type(shell).__name__}")
    for name, child in list(shell.named_children()):
        source = layer.get_submodule(name)
        if _holds_tensors(child) or _holds_tensors(source):
            shell.register_module(name, source)
        else:
            bind_layer(child, source)
    return shell


def _holds_tensors(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False))


def bound_layers(store: LayerStore, refs: Sequence[LayerRef], config: PretrainedConfig) -> list[nn.Module]:
    """One decoder layer of ``config`` per ref, at depth = its position, bound to the store layer
    (see :func:`bind_layer`); ``config`` is :func:`layers_config` of ``refs``."""
    out = []
    for depth, ref in enumerate(refs):
        layer = store.layer(ref)
        with torch.device("meta"):
            shell = type(layer)(config, depth)
        out.append(bind_layer(shell, layer).eval())
    return out


def build(plan: SizePlan, store: LayerStore) -> PreTrainedModel:
    """A causal LM whose weights ARE the store's: no weight is copied or allocated.

    The model is created on the meta device; its embeddings, final norm, head and rotary embedding
    are replaced by the store's modules and each decoder layer is bound to its store layer
    (:func:`bind_layer`), so that several sizes share a layer at different depths, each with its
    own ``layer_idx`` (KV cache slot) and its own transformers hooks. Works with ``generate``.
    """
    config = size_config(store, plan)
    with torch.device("meta"):
        model = store.model_class(config)
    adapter = store.adapter
    layers = adapter.get_layers(model)
    for shell, ref in zip(layers, plan.layers, strict=True):
        bind_layer(shell, store.layer(ref))
    adapter.set_parts(
        model,
        embed=store.embeds[plan.embed],
        layers=layers,
        norm=store.norms[plan.norm],
        head=store.heads[plan.head],
        rotary=store.rotary,
    )
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"build left unallocated tensors: {left[:5]}")
    if store.generation_config is not None:
        model.generation_config = copy.deepcopy(store.generation_config)
    model.boomerang_plan = plan  # type: ignore[assignment]
    return model.eval()


def plan_state_dict(plan: SizePlan, store: LayerStore) -> dict[str, torch.Tensor]:
    """Checkpoint tensors of a size under the architecture's standard names."""
    adapter = store.adapter
    parts: list[tuple[str, nn.Module]] = [
        (adapter.state_key("embed"), store.embeds[plan.embed]),
        (adapter.state_key("norm"), store.norms[plan.norm]),
    ]
    parts += [(adapter.state_key("layer", d), store.layer(r)) for d, r in enumerate(plan.layers)]
    if not size_config(store, plan).tie_word_embeddings:
        parts.append((adapter.state_key("head"), store.heads[plan.head]))
    out: dict[str, torch.Tensor] = {}
    for prefix, module in parts:
        for name, tensor in module.state_dict().items():
            out[f"{prefix}.{name}"] = tensor
    return out


def export(plan: SizePlan, store: LayerStore, directory: str | Path) -> Path:
    """Write a standard HF checkpoint (safetensors, config, generation config, tokenizer with its
    chat template) that plain transformers and vLLM load. Returns the directory."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, tensor in plan_state_dict(plan, store).items():
        t = tensor.detach().to("cpu").contiguous()
        if t.data_ptr() in seen:  # safetensors refuses aliased tensors: a layer used twice
            t = t.clone()
        seen.add(t.data_ptr())
        tensors[key] = t
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = size_config(store, plan)
    config.dtype = store.dtype
    config.save_pretrained(out)
    if store.generation_config is not None:
        store.generation_config.save_pretrained(out)
    if store.tokenizer is not None:
        store.tokenizer.save_pretrained(out)
    (out / PLAN_FILE).write_text(json.dumps(plan.to_dict(), indent=1))
    return out
