"""fuse_store: q/k/v and gate/up become views of one fused tensor per layer, shared layers stay
shared, and every size built afterwards computes exactly what it computed before."""

from __future__ import annotations

import pytest
import torch

from boomerang_core.assemble import build
from boomerang_core.fused import fuse_store, fused_tensor, is_fused
from boomerang_core.plan import enumerate_plans, patch_order
from boomerang_core.store import LayerStore
from tests.tiny import make_pair, tiny_tokenizer


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_fused_store_builds_the_same_sizes(arch: str) -> None:
    teacher, student, spec = make_pair(arch)
    store = LayerStore.from_models(teacher, student, spec, tiny_tokenizer())
    plans = enumerate_plans(spec, patch_order(spec, "last"))
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    with torch.no_grad():
        before = [build(p, store)(ids).logits for p in plans]
    resident = store.resident_bytes()
    report = fuse_store(store)
    assert is_fused(store) and fuse_store(store) is report  # idempotent
    assert report.copied_bytes == 0
    assert store.resident_bytes() == resident  # re-packed, not duplicated
    with torch.no_grad():
        after = [build(p, store)(ids).logits for p in plans]
    for b, a in zip(before, after, strict=True):
        assert torch.equal(b, a)
    attn = store.layers["teacher"][0].self_attn
    qkv = fused_tensor(attn, "qkv_proj.weight")
    assert qkv is not None
    assert attn.q_proj.weight.data_ptr() == qkv.data_ptr()
    assert attn.v_proj.weight.untyped_storage().data_ptr() == qkv.untyped_storage().data_ptr()
    if arch == "qwen2":
        assert fused_tensor(attn, "qkv_proj.bias") is not None
    gate_up = fused_tensor(store.layers["teacher"][0].mlp, "gate_up_proj.weight")
    assert gate_up is not None and gate_up.shape[0] == 2 * teacher.config.intermediate_size


def test_layers_shared_before_fusing_share_the_fused_tensor() -> None:
    teacher, student, spec = make_pair("llama")
    with torch.no_grad():  # make student layer 1 equal to its teacher layer, so the store shares it
        t_layer = spec.copied_teacher_layers[1]
        pairs = zip(student.model.layers[1].parameters(), teacher.model.layers[t_layer].parameters(), strict=True)
        for s_p, t_p in pairs:
            s_p.copy_(t_p)
    store = LayerStore.from_models(teacher, student, spec, tiny_tokenizer())
    fuse_store(store)
    s_attn, t_attn = store.layers["student"][1].self_attn, store.layers["teacher"][t_layer].self_attn
    assert fused_tensor(s_attn, "qkv_proj.weight") is fused_tensor(t_attn, "qkv_proj.weight")
    assert s_attn.k_proj.weight.data_ptr() == t_attn.k_proj.weight.data_ptr()
