"""A vLLM model loader that serves a size from the LayerStore's tensors, without copying them.

vLLM builds the size's model from a folder that holds only ``config.json`` (the size's layer
count) and tokenizer files; this loader then re-registers every parameter as an ``nn.Parameter``
VIEW of the store's tensor (vLLM's fused ``qkv_proj`` / ``gate_up_proj`` come from
:func:`boomerang_core.fused.fuse_store`; a tied ``lm_head`` is bound to the embedding). On CPU,
vLLM would repack every linear weight into a private oneDNN copy and empty the original: store
layers are marked ``_cpu_skip_gemm_dispatch`` and the embedding / LM head keep plain
``F.linear``, so every engine reads the store's bytes.

The store reaches the loader in one of two ways, named by ``model_loader_extra_config``:

- ``{"token": ...}``: in this process, through :func:`offer` (a handoff the engine takes once);
- ``{"manifest": path, "plan": SizePlan.to_dict()}``: in a worker process, from the gateway's
  shared store (:mod:`boomerang_core.shared_store`): the file's pages on CPU, the owner's CUDA
  allocation through its IPC handle on CUDA (the local device index is checked against the
  owner's GPU). The mapping is reported through ``get_external_weight_memory``, so vLLM's CUDA
  free-memory check counts the shared weights once (as its own ``ipc_cache`` loader does).
"""

from __future__ import annotations

import functools
import threading
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from boomerang_core.errors import UnsupportedArchitecture
from boomerang_core.fused import fuse_store
from boomerang_core.plan import SizePlan
from boomerang_core.shared_store import manifest_bytes, map_shared, store_key, store_tensors
from boomerang_core.store import LayerStore

LOAD_FORMAT = "boomerang_store"
_SUPPORTED_ADAPTERS = ("llama-family",)


@dataclass(frozen=True)
class StoreOffer:
    """One size's plan over the store's tensors by key (:func:`~boomerang_core.shared_store.store_tensors`)."""

    tensors: Mapping[str, torch.Tensor]
    plan: SizePlan


_offers: dict[str, StoreOffer] = {}  # token -> offer; a handoff, emptied as engines take them
_offers_lock = threading.Lock()


def offer(store: LayerStore, plan: SizePlan) -> str:
    """Make ``plan`` over ``store`` available to the next engine built with the returned token."""
    if store.adapter.name not in _SUPPORTED_ADAPTERS:
        raise UnsupportedArchitecture(
            f"vLLM serving from the store supports {_SUPPORTED_ADAPTERS}, not {store.adapter.name}"
        )
    fuse_store(store)
    token = uuid.uuid4().hex
    with _offers_lock:
        _offers[token] = StoreOffer(store_tensors(store), plan)
    return token


def withdraw(token: str) -> None:
    with _offers_lock:
        _offers.pop(token, None)


def _take(token: str) -> StoreOffer:
    with _offers_lock:
        found = _offers.get(token)
    if found is None:
        raise RuntimeError(f"no LayerStore was offered under token {token!r} in this process")
    return found


def store_tensor(name: str, offer: StoreOffer) -> torch.Tensor:
    """The store tensor behind vLLM parameter ``name``."""
    key = store_key(name, offer.plan)
    if key not in offer.tensors:
        raise KeyError(f"vLLM parameter {name!r}: the store has no tensor {key!r}")
    return offer.tensors[key]


def same_device(a: torch.device, b: torch.device) -> bool:
    """Same device type AND index (an unset CUDA index means the current device)."""
    if a.type != b.type:
        return False
    return a.type != "cuda" or _cuda_index(a) == _cuda_index(b)


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def bind_model(model: nn.Module, found: StoreOffer) -> dict[str, int]:
    """Re-register every parameter of ``model`` as a view of its store tensor.

    Returns ``{"shared": bytes bound to the store, "copied": bytes that had to be copied}`` (a
    copy happens only when vLLM pads the vocabulary past the store's rows).
    """
    shared = copied = 0
    bound: dict[int, nn.Parameter] = {}  # id of vLLM's original parameter -> its replacement
    for module_name, module in model.named_modules(remove_duplicate=False):
        for leaf, param in list(module.named_parameters(recurse=False, remove_duplicate=False)):
            if id(param) in bound:  # a tied parameter seen under another module
                module.register_parameter(leaf, bound[id(param)])
                continue
            name = f"{module_name}.{leaf}" if module_name else leaf
            source = store_tensor(name, found).detach()
            if source.dtype != param.dtype or not same_device(source.device, param.device):
                raise TypeError(
                    f"{name}: store holds {source.dtype} on {source.device}, vLLM wants {param.dtype} on {param.device}"
                )
            if source.shape == param.shape:
                view = source
                shared += source.nbytes
            elif source.dim() == 2 and source.shape[1:] == param.shape[1:] and source.shape[0] < param.shape[0]:
                view = torch.zeros(param.shape, dtype=param.dtype, device=source.device)  # padded vocabulary
                view[: source.shape[0]] = source
                copied += view.nbytes
            else:
                raise ValueError(f"{name}: store tensor {tuple(source.shape)} does not fit {tuple(param.shape)}")
            new = nn.Parameter(view, requires_grad=False)
            bound[id(param)] = new
            module.register_parameter(leaf, new)
    keep_plain_linear(model)
    return {"shared": shared, "copied": copied}


def keep_plain_linear(model: nn.Module) -> None:
    """Stop vLLM's CPU repacking (a private oneDNN copy per engine) on every store-backed layer."""
    from vllm.model_executor.layers.linear import LinearBase
    from vllm.model_executor.layers.vocab_parallel_embedding import (
        UnquantizedEmbeddingMethod,
        VocabParallelEmbedding,
    )

    for module in model.modules():
        if isinstance(module, LinearBase):
            setattr(module, "_cpu_skip_gemm_dispatch", True)  # noqa: B010 - not a declared attribute
        elif isinstance(module, VocabParallelEmbedding) and isinstance(module.quant_method, UnquantizedEmbeddingMethod):
            module.quant_method = _plain_embedding_method_class()()


@functools.cache
def _plain_embedding_method_class() -> type:
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

    class PlainEmbeddingMethod(UnquantizedEmbeddingMethod):  # type: ignore[misc]
        """The embedding / LM head method without the CPU repack: ``F.linear`` on the store tensor."""

        def process_weights_after_loading(self, layer: nn.Module) -> None:
            setattr(layer, "cpu_linear", torch.nn.functional.linear)  # noqa: B010

    return PlainEmbeddingMethod


@functools.cache
def _mapped(manifest: str, device_index: int | None) -> Mapping[str, torch.Tensor]:
    """The shared store of ``manifest``, mapped once per process (every engine of it binds views)."""
    return map_shared(manifest, device_index)


def external_weight_bytes(extra: Mapping[str, Any]) -> int:
    """Bytes of weights this loader binds that live outside the engine's allocations: the whole
    shared mapping (a manifest) or the offered store's storages (a token), each counted once."""
    if isinstance(extra.get("manifest"), str):
        return manifest_bytes(extra["manifest"])
    token = extra.get("token")
    if isinstance(token, str):
        with _offers_lock:
            found = _offers.get(token)
        if found is not None:
            storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in found.tensors.values()}
            return sum(storages.values())
    return 0


def offer_from_config(extra: Mapping[str, Any], device: torch.device) -> StoreOffer:
    """The store offer ``model_loader_extra_config`` names, for a model on ``device``."""
    manifest = extra.get("manifest")
    if isinstance(manifest, str):
        plan = extra.get("plan")
        if not isinstance(plan, dict):
            raise RuntimeError(
                f"load_format={LOAD_FORMAT!r} with a manifest needs the size's 'plan' (SizePlan.to_dict)"
            )
        return StoreOffer(_mapped(manifest, device.index if device.type == "cuda" else None), SizePlan.from_dict(plan))
    token = extra.get("token")
    if isinstance(token, str):
        return _take(token)
    raise RuntimeError(
        f"load_format={LOAD_FORMAT!r} needs model_loader_extra_config "
        "{'token': ...} or {'manifest': ..., 'plan': ...}"
    )


def _loader_class() -> type:
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    class BoomerangStoreLoader(BaseModelLoader):  # type: ignore[misc]
        """Binds the store's tensors named by ``model_loader_extra_config`` (see the module docstring)."""

        def get_external_weight_memory(self, vllm_config: Any) -> int:
            return external_weight_bytes(self.load_config.model_loader_extra_config or {})

        def download_model(self, model_config: Any) -> None:
            return None  # nothing to download: the weights are in the store

        def load_weights(self, model: nn.Module, model_config: Any) -> None:
            extra = self.load_config.model_loader_extra_config or {}
            device = next(model.parameters()).device
            stats = bind_model(model, offer_from_config(extra, device))
            model.boomerang_bound_bytes = stats  # type: ignore[assignment]

    return BoomerangStoreLoader


def register() -> None:
    """Register the loader with vLLM (also the ``vllm.general_plugins`` entry point); idempotent."""
    from vllm.model_executor import model_loader

    registry: dict[str, type] = getattr(model_loader, "_LOAD_FORMAT_TO_MODEL_LOADER", {})
    if LOAD_FORMAT not in registry:  # registering twice would only log a warning
        model_loader.register_model_loader(LOAD_FORMAT)(_loader_class())
