"""Alignment, plans, families and the errors bad input gets."""

from __future__ import annotations

import json

import pytest
import torch

from boomerang_core.alignment import StudentSpec
from boomerang_core.errors import (
    IncompatiblePair,
    ModelNotFound,
    SizeOutOfRange,
    StudentConfigError,
    UnsupportedArchitecture,
)
from boomerang_core.family import Family, param_label, parse_param_label
from boomerang_core.plan import (
    LayerRef,
    SizePlan,
    enumerate_plans,
    patch_order,
    plan_for_k,
    plan_for_patched,
    teacher_plan,
)
from boomerang_core.store import LayerStore
from tests.tiny import prune_copy, tiny_config, tiny_teacher, write_pair


def test_paper_initialisation_on_a_30_layer_teacher() -> None:
    spec = StudentSpec.from_pruning(30)  # defaults 1 / 2 / 2
    assert spec.copied_teacher_layers == (*range(0, 27, 2), 28, 29)
    assert spec.num_student_layers == 16
    two = StudentSpec.from_pruning(30, first_layers_to_keep=2)
    assert two.copied_teacher_layers == (0, 1, *range(3, 28, 2), 28, 29)
    assert two.teacher_block(1) == range(1, 3)
    assert two.teacher_block(16) == range(29, 30)
    assert sum(len(b) for b in two.blocks()) == 30
    # student layer i's output is aligned with the output of its teacher block's last layer
    assert two.aligned_hidden_states()[2] == 3


def test_student_config_round_trip_in_published_format(tmp_path) -> None:
    spec = StudentSpec.from_pruning(12, 1, 3, 2)
    spec.write(tmp_path)
    data = json.loads((tmp_path / "student_config.json").read_text())
    assert set(data) == {"copied_teacher_layers", "pruned_teacher_layers"}
    assert StudentSpec.read(tmp_path, 12) == spec


@pytest.mark.parametrize(
    "data, message",
    [
        ([1, 2], "JSON object"),
        ({"copied_teacher_layers": [0, 1]}, "lacks 'pruned_teacher_layers'"),
        ({"copied_teacher_layers": [0, 2], "pruned_teacher_layers": [2]}, "both copied and pruned"),
        ({"copied_teacher_layers": [0, 3], "pruned_teacher_layers": [1]}, "missing [2]"),
        ({"copied_teacher_layers": [2, 0, 1], "pruned_teacher_layers": []}, "strictly increasing"),
        ({"copied_teacher_layers": [1, 2], "pruned_teacher_layers": [0]}, "layer 0 must be copied"),
        ({"copied_teacher_layers": "0,1", "pruned_teacher_layers": []}, "must be a list"),
    ],
)
def test_malformed_student_config(data: object, message: str) -> None:
    with pytest.raises(StudentConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        StudentSpec.from_dict(data)


def test_student_config_for_another_teacher_depth() -> None:
    with pytest.raises(StudentConfigError, match="8-layer teacher, but the teacher has 6"):
        StudentSpec.from_dict(StudentSpec.from_pruning(8).to_dict(), num_teacher_layers=6)


def test_plans_for_last_and_first_orders() -> None:
    spec = StudentSpec.from_pruning(6)  # copied 0 2 4 5: blocks [0,1] [2,3] [4] [5]
    last = enumerate_plans(spec, patch_order(spec, "last"))
    assert [p.num_layers for p in last] == [4, 4, 4, 5, 6]
    assert last[0].layers == tuple(LayerRef("student", i) for i in range(4))
    assert (last[1].norm, last[1].head, last[1].embed) == ("teacher", "teacher", "student")
    assert last[-1] == plan_for_patched(spec, [3, 2, 1, 0])
    assert last[-1].layers == teacher_plan(6).layers
    first = enumerate_plans(spec, patch_order(spec, "first"))
    assert first[1].embed == "teacher" and first[1].head == "student"
    assert [p.num_layers for p in first] == [4, 5, 6, 6, 6]


def test_out_of_range_sizes_name_the_valid_range() -> None:
    spec = StudentSpec.from_pruning(6)
    with pytest.raises(SizeOutOfRange, match="valid k are 0..4"):
        plan_for_k(spec, patch_order(spec, "last"), 7)
    with pytest.raises(SizeOutOfRange, match="valid blocks are 0..3"):
        plan_for_patched(spec, [4])
    with pytest.raises(SizeOutOfRange, match="every block 0..3 exactly once"):
        patch_order(spec, [0, 1, 1, 2])
    with pytest.raises(SizeOutOfRange, match="out of range 0..5"):
        teacher_plan(6, [6])


def test_plan_round_trips_through_json() -> None:
    plan = plan_for_patched(StudentSpec.from_pruning(6), [2, 0], origin="klpatch")
    assert SizePlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan


def test_param_labels() -> None:
    assert param_label(134_515_008) == "135M"
    assert param_label(2_800_000_000) == "2.8B"
    assert parse_param_label("96m") == 96e6
    assert parse_param_label("2.8B") == 2.8e9
    assert parse_param_label("auto") is None


def _family() -> Family:
    teacher = tiny_teacher("llama", 8)
    spec = StudentSpec.from_pruning(8)
    store = LayerStore.from_models(teacher, prune_copy(teacher, spec), spec)
    return Family.from_store("tiny", store, order="last")


def test_family_resolves_names_labels_and_fractions(tmp_path) -> None:
    family = _family()
    sizes = family.sizes
    assert family.resolve("k0") is sizes[0]
    assert family.resolve("K3").name == "k3"
    assert family.resolve("1.0").params == max(s.params for s in sizes)
    assert family.resolve(sizes[3].label).params <= sizes[3].params * 1.005
    smallest = min(s.params for s in sizes)
    with pytest.raises(SizeOutOfRange, match="no size has at most"):
        family.resolve(f"{smallest / 2e3:.0f}K")
    with pytest.raises(SizeOutOfRange, match="out of range"):
        family.resolve("1.5")
    with pytest.raises(SizeOutOfRange, match="cannot read size"):
        family.resolve("huge")
    family.save(tmp_path)
    again = Family.load(tmp_path, family.store)
    assert [s.plan for s in again.sizes] == [s.plan for s in sizes]
    assert "k0" in family.table() and "layers" in family.table()


def test_dominated_sizes_are_never_resolved_by_label() -> None:
    family = _family()
    from dataclasses import replace

    top = family.sizes[-1]
    family.sizes[-2] = replace(family.sizes[-2], dominated=True)
    assert family.resolve("1.0") is top
    assert all(not s.dominated for s in family.servable)


def test_unsupported_architecture_names_the_supported_ones() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedArchitecture, match="'gpt2' is not supported; supported: llama, mistral"):
        LayerStore.from_models(model)


def test_mismatched_pair_is_refused() -> None:
    teacher = tiny_teacher("llama", 6)
    cfg = tiny_config("llama", 4)
    cfg.hidden_size = 32
    from transformers import AutoModelForCausalLM

    other = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(IncompatiblePair, match="hidden_size: teacher 64, student 32"):
        LayerStore.from_models(teacher, other, StudentSpec.from_pruning(6))
    qwen = AutoModelForCausalLM.from_config(tiny_config("qwen3", 4))
    with pytest.raises(IncompatiblePair, match="model_type: teacher 'llama', student 'qwen3'"):
        LayerStore.from_models(teacher, qwen, StudentSpec.from_pruning(6))


def test_store_load_errors(tmp_path) -> None:
    t_dir, s_dir = write_pair(tmp_path, "llama", 6)
    with pytest.raises(ModelNotFound, match="not found"):
        LayerStore.load(tmp_path / "missing.gguf")
    with pytest.raises(ModelNotFound, match="no config.json"):
        LayerStore.load(tmp_path / "nowhere")
    (s_dir / "student_config.json").write_text("{not json")
    with pytest.raises(StudentConfigError, match="not valid JSON"):
        LayerStore.load(t_dir, s_dir)
    (s_dir / "student_config.json").unlink()
    with pytest.raises(StudentConfigError, match="needs its student_config.json"):
        LayerStore.load(t_dir, s_dir)
    StudentSpec.from_pruning(6, 2, 2, 2).write(s_dir)  # 5 layers, but the student has 4
    with pytest.raises(StudentConfigError, match="copies 5 layers, but the student has 4"):
        LayerStore.load(t_dir, s_dir)


def test_store_loads_from_directories(tmp_path) -> None:
    t_dir, s_dir = write_pair(tmp_path, "qwen3", 6)
    store = LayerStore.load(t_dir, s_dir)
    assert store.tokenizer is not None and store.spec == StudentSpec.from_pruning(6)
    assert store.dtype == torch.float32 and store.has_student
