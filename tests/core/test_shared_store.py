"""The store in one shared-memory file: the store's own tensors are views of it, sizes built from it
give the same logits as before, and a second mapping of the file sees the very same pages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from boomerang_core.assemble import build, size_config
from boomerang_core.family import Family
from boomerang_core.fused import is_fused
from boomerang_core.shared_store import build_mapped, map_shared, share_store, store_tensors
from boomerang_core.store import LayerStore
from tests.tiny import write_pair


def test_shared_store_is_one_mapping_that_other_mappings_share(tmp_path: Path) -> None:
    teacher, student = write_pair(tmp_path, "llama", layers=6)
    family = Family.from_store("tiny", LayerStore.load(teacher, student))
    store = family.store
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    sizes = [s.name for s in family.sizes]
    before = {name: build(family.by_name(name).plan, store)(ids).logits for name in sizes}
    held = store.resident_bytes()

    shared = share_store(store, tmp_path / "shm")

    assert is_fused(store) and shared.data is not None
    assert shared.data.stat().st_size == shared.nbytes
    own = store_tensors(store)
    storages = {t.untyped_storage().data_ptr() for t in own.values()}
    assert len(storages) == 1  # every store tensor is a view of the one mapping
    assert store.resident_bytes() == shared.nbytes <= held + 64 * len(own)  # held once (plus alignment)
    for name in sizes:
        assert torch.equal(build(family.by_name(name).plan, store)(ids).logits, before[name]), name

    mapped = map_shared(shared.manifest)
    assert mapped.keys() == own.keys()
    key = "teacher.layers.0.self_attn.qkv_proj.weight"
    assert mapped[key].data_ptr() != own[key].data_ptr()  # another mapping...
    assert all(torch.equal(mapped[k], own[k]) for k in own)
    original = float(own[key][0, 0])
    own[key][0, 0] = 123.0  # ...of the same pages: a write through one is seen through the other
    assert float(mapped[key][0, 0]) == 123.0
    own[key][0, 0] = original
    shared.remove()
    assert not shared.data.exists() and not shared.manifest.exists()


def test_a_size_built_over_the_mapping_alone_is_the_size(tmp_path: Path) -> None:
    """build_mapped: the size from map_shared's tensors (no LayerStore), every parameter a view of
    the mapped pages, gives build(plan)'s logits."""
    teacher, student = write_pair(tmp_path, "llama", layers=6)
    family = Family.from_store("tiny", LayerStore.load(teacher, student))
    store = family.store
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    shared = share_store(store, tmp_path / "shm")
    mapped = map_shared(shared.manifest)
    pages = {t.untyped_storage().data_ptr() for t in mapped.values()}
    for size in family.sizes:
        model = build_mapped(mapped, size.plan, size_config(store, size.plan))
        assert {p.untyped_storage().data_ptr() for p in model.parameters()} == pages, size.name
        assert torch.equal(model(ids).logits, build(size.plan, store)(ids).logits), size.name
    with pytest.raises(ValueError, match="the mapping holds none"):
        build_mapped({k: v for k, v in mapped.items() if "norm.weight" not in k or "layers" in k},
                     family.sizes[0].plan, size_config(store, family.sizes[0].plan))  # fmt: skip


def test_gpu_check_maps_the_store_from_a_second_process() -> None:
    """bench/gpu_check.py's ipc part, on the CPU path (the shared-memory file instead of a CUDA IPC
    handle): a second process maps the store, builds two sizes and gives the owner's tokens, and
    the pages it read stay shared."""
    script = Path(__file__).resolve().parents[2] / "bench" / "gpu_check.py"
    run = subprocess.run([sys.executable, str(script), "--device", "cpu", "--tiny", "--only", "ipc"],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert "16 greedy tokens equal" in run.stdout and "ipc: PASS" in run.stdout, run.stdout
