"""Distillation of a tiny random teacher: the loss falls, the student loads (exact resume and atomic
checkpoints: test_distill_resume.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from boomerang_core.alignment import StudentSpec
from boomerang_core.distill import CHECKPOINTS, DistillConfig, distill, kl_teacher_student, prune_student
from boomerang_core.errors import BoomerangError, ModelNotFound, RecipeError
from boomerang_core.store import LayerStore
from tests.tiny import tiny_teacher, training_blocks, write_teacher

STEPS = 6


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_teacher(tmp_path_factory.mktemp("distill") / "teacher")


@pytest.fixture(scope="module")
def blocks() -> torch.Tensor:
    return training_blocks()  # (8, 32)


def recipe(**overrides: object) -> DistillConfig:
    base: dict = dict(
        seq_len=32,
        batch_size=4,
        token_budget=4 * 32 * STEPS,
        learning_rate=3e-3,
        warmup_ratio=0.0,
        save_steps=3,
        logging_steps=1,
        bf16=False,
    )
    return DistillConfig(**{**base, **overrides})


def log_steps(out: Path) -> list[dict]:
    state = json.loads((out / CHECKPOINTS / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    return [e for e in state["log_history"] if "loss" in e]


@pytest.fixture(scope="module")
def full_run(teacher_dir: Path, blocks: torch.Tensor) -> Path:
    return distill(teacher_dir, teacher_dir.parent / "full", recipe(), train_blocks=blocks, progress=False)


def test_loss_falls_and_student_loads(full_run: Path, teacher_dir: Path) -> None:
    logs = log_steps(full_run)
    assert [e["step"] for e in logs] == list(range(1, STEPS + 1))
    assert logs[-1]["loss"] < logs[0]["loss"] - 0.1
    assert {"ce", "kl", "cos", "tok_per_s"} <= set(logs[0])
    spec = StudentSpec.read(full_run)
    assert spec == StudentSpec.from_pruning(6, 1, 2, 2)
    store = LayerStore.load(teacher_dir, full_run)
    assert store.spec == spec and len(store.layers["student"]) == spec.num_student_layers
    # every checkpoint is itself a loadable student
    assert StudentSpec.read(full_run / CHECKPOINTS / "checkpoint-3") == spec


def test_frozen_embeddings_stay_the_teachers(full_run: Path, teacher_dir: Path) -> None:
    student = load_file(str(full_run / "model.safetensors"))
    teacher = load_file(str(teacher_dir / "model.safetensors"))
    key = "model.embed_tokens.weight"
    assert torch.equal(student[key], teacher[key])
    layer = "model.layers.1.mlp.up_proj.weight"  # student layer 1 = teacher layer 2, trained
    assert not torch.equal(student[layer], teacher["model.layers.2.mlp.up_proj.weight"])


def test_prune_student_copies_layers() -> None:
    teacher = tiny_teacher("qwen3", 6)
    spec = StudentSpec.from_pruning(6, 2, 2, 2)
    student = prune_student(teacher, spec)
    assert student.config.num_hidden_layers == spec.num_student_layers
    assert teacher.config.num_hidden_layers == 6 and len(teacher.model.layers) == 6
    for i, t in enumerate(spec.copied_teacher_layers):
        s_layer, t_layer = student.model.layers[i], teacher.model.layers[t]
        assert s_layer.self_attn.layer_idx == i
        assert torch.equal(s_layer.mlp.up_proj.weight, t_layer.mlp.up_proj.weight)
        assert s_layer.mlp.up_proj.weight.data_ptr() != t_layer.mlp.up_proj.weight.data_ptr()


def test_top_k_kl_approaches_full_kl() -> None:
    torch.manual_seed(0)
    t_logits = torch.randn(10, 50) * 4
    s_logp = torch.log_softmax(torch.randn(10, 50), dim=-1)
    full = kl_teacher_student(s_logp, t_logits)
    assert kl_teacher_student(s_logp, t_logits, top_k=50) == pytest.approx(full.item(), rel=1e-5)
    assert kl_teacher_student(s_logp, t_logits, top_k=40).item() == pytest.approx(full.item(), rel=0.05)
    assert kl_teacher_student(torch.log_softmax(t_logits, -1), t_logits).item() == pytest.approx(0, abs=1e-5)


@pytest.mark.parametrize(
    "bad",
    [
        dict(every_n=0),
        dict(token_budget=0),
        dict(learning_rate=0.0),
        dict(kl_weight=-1.0),
        dict(kl_top_k=0),
        dict(ce_weight=0.0, kl_weight=0.0, cosine_weight=0.0),
        dict(seq_len=0),
    ],
)
def test_bad_recipes_are_refused(bad: dict) -> None:
    with pytest.raises(RecipeError):
        recipe(**bad)


def test_bad_inputs_give_clear_errors(tmp_path: Path, teacher_dir: Path, blocks: torch.Tensor) -> None:
    with pytest.raises(ModelNotFound):
        distill(tmp_path / "no-such-model", tmp_path / "out", recipe(), progress=False)
    with pytest.raises(ModelNotFound, match="GGUF"):
        distill(tmp_path / "missing.gguf", tmp_path / "out", recipe(), progress=False)
    with pytest.raises(BoomerangError, match="exceed"):  # 5 + 2 kept layers of a 6-layer teacher
        distill(teacher_dir, tmp_path / "out", recipe(first_layers_to_keep=5), train_blocks=blocks, progress=False)


def test_time_limit_saves_a_resumable_checkpoint(teacher_dir: Path, blocks: torch.Tensor) -> None:
    out = teacher_dir.parent / "timed"
    distill(teacher_dir, out, recipe(), train_blocks=blocks, progress=False, time_limit_s=0)
    assert (out / CHECKPOINTS / "checkpoint-1").is_dir()
    assert not (out / CHECKPOINTS / "checkpoint-2").exists() and not (out / "model.safetensors").exists()
