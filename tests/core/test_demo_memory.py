"""On the demo architecture (the real SmolLM2 teacher, a prune-initialised 17-layer student; no
distillation is waited for): building every size at once adds < 1% to the store's bytes."""

from __future__ import annotations

import gc

import pytest

from boomerang_core import demo
from boomerang_core.alignment import StudentSpec
from boomerang_core.assemble import build
from boomerang_core.family import Family
from boomerang_core.loading import load_causal_lm
from boomerang_core.store import LayerStore, unique_storage_bytes
from tests.tiny import prune_copy


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    import os

    return pages * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.slow
def test_every_demo_size_at_once_adds_under_one_percent() -> None:
    teacher = load_causal_lm(demo.ensure_teacher(progress=False))
    spec = StudentSpec.from_pruning(teacher.config.num_hidden_layers, first_layers_to_keep=2)
    # noise > 0: student layers differ from the teacher's, so the store really holds both
    student = prune_copy(teacher, spec, noise=0.01)
    store = LayerStore.from_models(teacher, student, spec)
    del teacher, student
    gc.collect()
    family = Family.from_store("demo", store, order="last")
    store_bytes = store.resident_bytes()
    rss_before = rss_bytes()
    models = [build(size.plan, store) for size in family.sizes]
    gc.collect()
    rss_after = rss_bytes()
    held = unique_storage_bytes([*models, *store.layers.values(), *store.embeds.values(), *store.heads.values()])
    separate = sum(size.bytes for size in family.sizes)
    print(
        f"\n{len(models)} sizes: store {store_bytes / 2**20:.1f} MiB, unique storages with every size built "
        f"{held / 2**20:.1f} MiB, RSS +{(rss_after - rss_before) / 2**20:.2f} MiB, "
        f"separate checkpoints {separate / 2**20:.0f} MiB"
    )
    assert len(models) == spec.num_student_layers + 1
    assert held <= store_bytes * 1.01
    assert rss_after - rss_before <= store_bytes * 0.01
