"""Build a size from the store without copying, and export it as a standard checkpoint."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from boomerang_core.plan import SizePlan
from boomerang_core.store import LayerStore

PLAN_FILE = "boomerang_plan.json"


class DepthCacheView:
    """A KV cache seen from one depth: ``update`` files keys and values under ``depth``,
    whatever ``layer_idx`` the shared layer carries from the model it came from."""

    __slots__ = ("_cache", "_depth")

    def __init__(self, cache: Any, depth: int) -> None:
        self._cache = cache
        self._depth = depth

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> Any:
        return self._cache.update(key_states, value_states, self._depth, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cache, name)


class DepthBoundLayer(nn.Module):
    """A store layer placed at ``depth`` of one size. The layer itself is shared and never mutated."""

    def __init__(self, layer: nn.Module, depth: int, attention_type: str | None = None) -> None:
        super().__init__()
        self.layer = layer
        self.depth = depth
        if attention_type is not None:
            self.attention_type = attention_type

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        for key in ("past_key_values", "layer_past"):
            cache = kwargs.get(key)
            if cache is not None:
                kwargs[key] = DepthCacheView(cache, self.depth)
        return self.layer(*args, **kwargs)


def size_config(store: LayerStore, plan: SizePlan) -> PretrainedConfig:
    """The teacher's config with this size's layer count, per-depth layer types and tying."""
    config = copy.deepcopy(store.configs["teacher"])
    config.num_hidden_layers = plan.num_layers
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [store.layer_type(r) for r in plan.layers]
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


def build(plan: SizePlan, store: LayerStore) -> PreTrainedModel:
    """A causal LM whose modules ARE the store's: no weight is copied or allocated.

    The container is created on the meta device and its parts are replaced by store modules;
    every layer is wrapped in :class:`DepthBoundLayer` so that several sizes can share a layer
    at different depths. Works with ``generate``.
    """
    config = size_config(store, plan)
    with torch.device("meta"):
        model = store.model_class(config)
    layers = nn.ModuleList(
        DepthBoundLayer(store.layer(r), depth, store.layer_type(r)) for depth, r in enumerate(plan.layers)
    )
    store.adapter.set_parts(
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
    _install_shared_capture_hooks(model)
    return model.eval()


def _install_shared_capture_hooks(model: nn.Module) -> None:
    """transformers installs its ``output_hidden_states`` capture hooks on a model's layers the
    first time one model asks for them. The layers are shared by every size, so each size would
    add its own hook to the same module and hidden states would be captured once per size. Install
    them now and keep one hook per module and capture task."""
    from transformers.utils.output_capturing import maybe_install_capturing_hooks

    maybe_install_capturing_hooks(model)  # type: ignore[arg-type]
    for module in model.modules():
        seen: set[tuple[Any, ...]] = set()
        for handle_id, hook in list(module._forward_hooks.items()):
            if getattr(hook, "__name__", "") != "output_capturing_hook" or hook.__closure__ is None:
                continue
            key = tuple(cell.cell_contents for cell in hook.__closure__)
            if key in seen:
                del module._forward_hooks[handle_id]
            seen.add(key)


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
