"""The store's tensors in ONE shared mapping that other processes map too: nothing is held twice.

:func:`share_store` fuses the store into vLLM's layout (:func:`~boomerang_core.fused.fuse_store`),
copies every distinct storage ONCE into one buffer and re-points the store's own parameters,
buffers and fused tensors at views of it, so ``build(plan)``, the in-process engine and every
worker process read the same pages:

- CPU: a file-backed shared-memory file (``torch.from_file(path, shared=True)``; ``/dev/shm`` is RAM),
  which each worker maps with :func:`map_shared`;
- CUDA: one device allocation whose CUDA IPC handle (torch's ``reduce_tensor``, as vLLM's weight
  cache daemon exports it) is written into the manifest; the owner must outlive the workers.

The manifest (JSON beside the file) names each tensor by a store key
(``teacher.layers.3.self_attn.qkv_proj.weight``, ``student.embed.weight``; see :func:`store_tensors`)
with its byte offset, shape, stride and dtype; :func:`store_key` names the key behind a size's
parameter. :func:`build_mapped` builds a size in another process from the mapping alone (no
LayerStore, no vLLM), its parameters views of the mapped pages. No web or vLLM imports.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import re
import shutil
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from boomerang_core.fused import _FUSED_ATTR, fuse_store
from boomerang_core.plan import SizePlan
from boomerang_core.store import LayerStore

_ALIGN = 64  # bytes; every storage starts on a cache line (and on any dtype's itemsize)
SHM_DIR = Path("/dev/shm")
_LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class SharedStore:
    """Where a shared store lives: ``manifest`` (JSON) and, on CPU, ``data`` (the mapped file).
    ``nbytes``: bytes of the mapping, the store's weights counted once."""

    manifest: Path
    data: Path | None
    nbytes: int
    device: str

    def remove(self) -> None:
        """Delete the files; processes that mapped them keep their pages until they exit."""
        for path in (self.manifest, self.data):
            if path is not None:
                path.unlink(missing_ok=True)


def store_tensors(store: LayerStore) -> dict[str, torch.Tensor]:
    """Every tensor of the store by key: ``{source}.embed.weight``, ``{source}.norm.weight``,
    ``{source}.head.weight``, ``{source}.layers.{i}.{name}`` (each parameter and, once fused, the
    fused ``self_attn.qkv_proj.weight`` / ``mlp.gate_up_proj.weight``). Tensors are the store's own."""
    out: dict[str, torch.Tensor] = {}
    for source in store.layers:
        for part, module in (("embed", store.embeds[source]), ("norm", store.norms[source]),
                             ("head", store.heads[source])):  # fmt: skip
            for name, param in module.named_parameters():
                out[f"{source}.{part}.{name}"] = param.detach()
        for index, layer in enumerate(store.layers[source]):
            prefix = f"{source}.layers.{index}"
            for name, param in layer.named_parameters():
                out[f"{prefix}.{name}"] = param.detach()
            for sub_name, sub in layer.named_modules():
                for fused_name, fused in getattr(sub, _FUSED_ATTR, {}).items():
                    out[f"{prefix}.{sub_name}.{fused_name}"] = fused.detach()
    return out


def shared_dir(configured: str | None, cache_dir: Path) -> Path:
    """Where the shared store goes: ``configured`` (the deploy file's ``engines.vllm.shared_dir``),
    else ``/dev/shm`` where it exists (RAM, no disk writes), else ``cache_dir``."""
    if configured:
        return Path(os.path.expanduser(configured))
    return SHM_DIR if SHM_DIR.is_dir() else cache_dir


def share_store(store: LayerStore, directory: str | Path) -> SharedStore:
    """Move the store's tensors into one shared mapping (see the module docstring); the store's
    modules are re-pointed in place, so every existing reference to a module stays valid."""
    fuse_store(store)
    modules = _store_modules(store)
    storages: dict[int, torch.UntypedStorage] = {}
    for tensor in _all_tensors(modules):
        storage = tensor.untyped_storage()
        storages.setdefault(storage.data_ptr(), storage)
    offsets: dict[int, int] = {}
    total = 0
    for ptr, storage in storages.items():
        offsets[ptr] = total
        total += -(-storage.nbytes() // _ALIGN) * _ALIGN
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    name = f"boomerang-store-{uuid.uuid4().hex[:12]}"
    data_path: Path | None = None
    if store.device.type == "cpu":
        free = shutil.disk_usage(directory).free
        if free < total:
            raise OSError(f"{directory} has {free / 1e9:.2f} GB free; the shared store needs {total / 1e9:.2f} GB")
        data_path = directory / f"{name}.bin"
        flat = torch.from_file(str(data_path), shared=True, size=total, dtype=torch.uint8)  # (total,) bytes
        data_path.chmod(0o600)
    else:
        flat = torch.empty(total, dtype=torch.uint8, device=store.device)
    for ptr, storage in storages.items():
        source = torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)  # (nbytes,)
        flat[offsets[ptr] : offsets[ptr] + source.numel()].copy_(source)
    _repoint(modules, flat, offsets)
    setattr(store, "_boomerang_shared_flat", flat)  # noqa: B010 - keeps a CUDA allocation (and its IPC handle) alive

    keys = {key: _entry(t, flat) for key, t in store_tensors(store).items()}
    manifest: dict[str, Any] = {"bytes": total, "device": str(store.device), "tensors": keys}
    if data_path is not None:
        manifest["file"] = data_path.name
    else:
        manifest |= _cuda_export(flat)
    manifest_path = directory / f"{name}.json"
    manifest_path.write_text(json.dumps(manifest))
    manifest_path.chmod(0o600)  # it may hold a CUDA IPC handle: the owner's user only
    return SharedStore(manifest_path, data_path, total, str(store.device))


def map_shared(manifest_path: str | Path, device_index: int | None = None) -> dict[str, torch.Tensor]:
    """The store's tensors by key (:func:`store_tensors`' keys), as views of the shared mapping:
    the file on CPU, the owner's CUDA allocation (mapped on local device ``device_index``) on CUDA."""
    manifest_path = Path(manifest_path)
    manifest = json.loads(manifest_path.read_text())
    total = int(manifest["bytes"])
    if "file" in manifest:
        flat = torch.from_file(str(manifest_path.with_name(manifest["file"])), shared=True, size=total,
                               dtype=torch.uint8)  # fmt: skip
    else:
        flat = _cuda_import(manifest, device_index)
    storage = flat.untyped_storage()
    out: dict[str, torch.Tensor] = {}
    for key, e in manifest["tensors"].items():
        dtype = getattr(torch, e["dtype"])
        out[key] = torch.empty(0, dtype=dtype, device=flat.device).set_(
            storage, e["offset"] // dtype.itemsize, tuple(e["shape"]), tuple(e["stride"])
        )
    return out


def store_key(name: str, plan: SizePlan) -> str:
    """The store key of parameter ``name`` of a Llama-family size (transformers' and vLLM's
    naming: ``model.layers.3.self_attn.q_proj.weight``, vLLM's fused ``qkv_proj`` too) in ``plan``."""
    if name == "model.embed_tokens.weight":
        return f"{plan.embed}.embed.weight"
    if name == "model.norm.weight":
        return f"{plan.norm}.norm.weight"
    if name == "lm_head.weight":
        return f"{plan.head}.head.weight"
    match = _LAYER_NAME.match(name)
    if match is None:
        raise KeyError(f"parameter {name!r} has no counterpart in the store")
    ref = plan.layers[int(match.group(1))]
    return f"{ref.source}.layers.{ref.index}.{match.group(2)}"  # e.g. ...self_attn.qkv_proj.weight


def build_mapped(tensors: Mapping[str, torch.Tensor], plan: SizePlan, config: PretrainedConfig) -> PreTrainedModel:
    """The causal LM of ``plan`` (``config``: the size's, ``assemble.size_config``) whose every
    parameter IS a mapped store tensor (:func:`map_shared`): what another process needs to run a
    size from the shared store with no copy of its weights. Llama-family naming (:func:`store_key`);
    the rotary embedding, computed from ``config``, is the only tensor this allocates."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    device = next(iter(tensors.values())).device
    for module_name, module in list(model.named_modules(remove_duplicate=False)):
        for leaf, param in list(module.named_parameters(recurse=False, remove_duplicate=False)):
            name = f"{module_name}.{leaf}" if module_name else leaf
            source = tensors.get(store_key(name, plan))
            if source is None or source.shape != param.shape:
                found = "none" if source is None else tuple(source.shape)
                raise ValueError(f"{name}: the mapping holds {found}, the size needs {tuple(param.shape)}")
            module.register_parameter(leaf, nn.Parameter(source, requires_grad=False))
        if type(module).__name__.endswith("RotaryEmbedding"):
            parent, _, attr = module_name.rpartition(".")
            setattr(model.get_submodule(parent), attr, type(module)(config=config).to(device))
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"the mapping left unallocated tensors: {left[:5]}")
    return model.eval()


def manifest_bytes(manifest_path: str | Path) -> int:
    """Bytes of the shared mapping a manifest describes (the store's weights, counted once)."""
    return int(json.loads(Path(manifest_path).read_text())["bytes"])


# --- internals ------------------------------------------------------------------------------------


def _store_modules(store: LayerStore) -> list[nn.Module]:
    mods: list[nn.Module] = [*store.embeds.values(), *store.norms.values(), *store.heads.values()]
    mods += [layer for layers in store.layers.values() for layer in layers]
    if store.rotary is not None:
        mods.append(store.rotary)
    return mods


def _all_tensors(modules: list[nn.Module]) -> Iterator[torch.Tensor]:
    for top in modules:
        for module in top.modules():
            yield from (p for p in module._parameters.values() if p is not None)
            yield from (b for b in module._buffers.values() if b is not None)
            yield from getattr(module, _FUSED_ATTR, {}).values()


def _view(tensor: torch.Tensor, flat: torch.Tensor, offsets: dict[int, int]) -> torch.Tensor:
    """``tensor`` as a view of ``flat``: same shape, stride and place within its storage."""
    base = offsets[tensor.untyped_storage().data_ptr()]
    start = base // tensor.itemsize + tensor.storage_offset()
    return torch.empty(0, dtype=tensor.dtype, device=flat.device).set_(
        flat.untyped_storage(), start, tensor.shape, tensor.stride()
    )


def _repoint(modules: list[nn.Module], flat: torch.Tensor, offsets: dict[int, int]) -> None:
    """Re-register every parameter, buffer and fused tensor as a view of ``flat``; a parameter
    object seen twice (tied embeddings, a student layer sharing a teacher tensor) stays one object."""
    replaced: dict[int, torch.Tensor] = {}

    def new(t: torch.Tensor, parameter: bool) -> torch.Tensor:
        if id(t) not in replaced:
            view = _view(t.detach(), flat, offsets)
            replaced[id(t)] = nn.Parameter(view, requires_grad=False) if parameter else view
        return replaced[id(t)]

    seen: set[int] = set()
    for top in modules:
        for module in top.modules():
            if id(module) in seen:
                continue
            seen.add(id(module))
            for name, param in list(module._parameters.items()):
                if param is not None:
                    module.register_parameter(name, new(param, parameter=True))  # type: ignore[arg-type]
            for name, buffer in list(module._buffers.items()):
                if buffer is not None:
                    module.register_buffer(name, new(buffer, parameter=False),
                                           persistent=name not in module._non_persistent_buffers_set)  # fmt: skip
            fused = getattr(module, _FUSED_ATTR, None)
            if fused:
                object.__setattr__(module, _FUSED_ATTR, {k: new(v, parameter=False) for k, v in fused.items()})


def _entry(tensor: torch.Tensor, flat: torch.Tensor) -> dict[str, Any]:
    """Where a re-pointed tensor sits in ``flat``: byte offset, shape, stride (elements), dtype."""
    if tensor.untyped_storage().data_ptr() != flat.data_ptr():
        raise ValueError("a store tensor was left outside the shared mapping")
    return {
        "offset": tensor.data_ptr() - flat.data_ptr(),
        "shape": list(tensor.shape),
        "stride": list(tensor.stride()),
        "dtype": str(tensor.dtype).removeprefix("torch."),
    }


def _cuda_export(flat: torch.Tensor) -> dict[str, Any]:
    """The CUDA IPC handle of ``flat`` (torch's reduction args) and the physical GPU it lives on."""
    from torch.multiprocessing.reductions import reduce_tensor

    _, args = reduce_tensor(flat)
    return {
        "cuda_ipc": base64.b64encode(pickle.dumps(args)).decode(),
        "device_uuid": str(torch.cuda.get_device_properties(flat.device).uuid),
    }


def _cuda_import(manifest: dict[str, Any], device_index: int | None) -> torch.Tensor:
    """Map the owner's CUDA allocation on local device ``device_index``, after checking that this
    index names the owner's physical GPU (indices differ between processes with other
    ``CUDA_VISIBLE_DEVICES``; the device type alone says nothing)."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    index = torch.cuda.current_device() if device_index is None else device_index
    local = str(torch.cuda.get_device_properties(index).uuid)
    if local != manifest["device_uuid"]:
        raise RuntimeError(
            f"the shared store lives on GPU {manifest['device_uuid']}, but local cuda:{index} is GPU {local}"
        )
    args = list(pickle.loads(base64.b64decode(manifest["cuda_ipc"])))
    args[6] = index  # the device index of torch's reduction args, re-targeted as vLLM's weight cache does
    return rebuild_cuda_tensor(*args)
