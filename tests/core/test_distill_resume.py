"""Distillation survives interruption: a run stopped after step s and resumed trains the same
batches in the same order, takes the same optimizer steps and ends with the same weights as an
uninterrupted run; a ``boomerang distill`` killed while writing a checkpoint resumes from the
previous complete one."""

from __future__ import annotations

import json
import os
import pydoc_data.topics
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from boomerang_core import cli
from boomerang_core.alignment import StudentSpec
from boomerang_core.distill import CHECKPOINTS, BoomerangTrainer, DistillConfig, distill
from boomerang_core.errors import RecipeError
from tests.tiny import training_blocks, write_teacher

REPO = Path(__file__).resolve().parents[2]
STEPS = 6  # optimizer steps of the whole recipe
STOP = 3  # the interrupted run stops here: mid-epoch (8 blocks = 4 micro-batches = 2 optimizer steps an epoch)


def recipe(**overrides: Any) -> DistillConfig:
    base: dict[str, Any] = dict(
        seq_len=32,
        batch_size=2,
        grad_accum=2,
        token_budget=2 * 32 * 2 * STEPS,
        learning_rate=3e-3,
        warmup_ratio=0.2,
        save_steps=2,
        save_total_limit=1,
        logging_steps=1,
        bf16=False,
    )
    return DistillConfig(**{**base, **overrides})


@dataclass
class Trace:
    """What a run did: the block indices of every micro-batch with the optimizer step it fed, and
    the optimizer steps taken."""

    batches: list[tuple[int, list[int]]] = field(default_factory=list)
    optimizer_steps: int = 0


class CountOptimizerSteps(TrainerCallback):
    def __init__(self, trace: Trace) -> None:
        self.trace = trace

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trace.optimizer_steps += 1


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_teacher(tmp_path_factory.mktemp("resume") / "teacher")


@pytest.fixture(scope="module")
def blocks() -> torch.Tensor:
    blocks = training_blocks()  # (8, 32)
    assert len({tuple(row) for row in blocks.tolist()}) == len(blocks)  # each block identifiable
    return blocks


def traced_distill(teacher_dir: Path, out: Path, blocks: torch.Tensor, **kwargs: Any) -> Trace:
    """``distill`` with the block indices of each training micro-batch recorded as the Trainer
    feeds them to the loss (the real loss still runs)."""
    trace = Trace()
    index = {tuple(row): i for i, row in enumerate(blocks.tolist())}
    real = BoomerangTrainer.compute_loss

    def spy(self: BoomerangTrainer, model: Any, inputs: dict[str, torch.Tensor], *args: Any, **kw: Any) -> Any:
        if model.training:
            trace.batches.append((self.state.global_step + 1, [index[tuple(r)] for r in inputs["input_ids"].tolist()]))
        return real(self, model, inputs, *args, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(BoomerangTrainer, "compute_loss", spy)
        distill(
            teacher_dir,
            out,
            recipe(),
            train_blocks=blocks,
            progress=False,
            callbacks=[CountOptimizerSteps(trace)],
            **kwargs,
        )
    return trace


def trainer_state(out: Path) -> dict[str, Any]:
    return json.loads((out / CHECKPOINTS / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())


def step_logs(out: Path) -> list[dict[str, Any]]:
    return [e for e in trainer_state(out)["log_history"] if "loss" in e]


@pytest.fixture(scope="module")
def full(teacher_dir: Path, blocks: torch.Tensor) -> tuple[Path, Trace]:
    out = teacher_dir.parent / "full"
    return out, traced_distill(teacher_dir, out, blocks)


@pytest.fixture(scope="module")
def resumed(teacher_dir: Path, blocks: torch.Tensor) -> tuple[Path, Trace, Trace]:
    out = teacher_dir.parent / "resumed"
    first = traced_distill(teacher_dir, out, blocks, stop_after_steps=STOP)
    assert not (out / "model.safetensors").exists()  # interrupted: checkpoints only
    return out, first, traced_distill(teacher_dir, out, blocks)


def test_resumed_run_takes_the_same_steps_on_the_same_batches(
    full: tuple[Path, Trace], resumed: tuple[Path, Trace, Trace]
) -> None:
    (full_out, whole), (out, first, rest) = full, resumed
    assert len(whole.batches) == STEPS * 2 and whole.optimizer_steps == STEPS
    assert [step for step, _ in first.batches] == [s for s in range(1, STOP + 1) for _ in range(2)]
    assert first.optimizer_steps == STOP and rest.optimizer_steps == STEPS - STOP
    assert first.batches + rest.batches == whole.batches  # same order, none repeated or skipped
    assert trainer_state(out)["global_step"] == trainer_state(full_out)["global_step"] == STEPS


def test_resumed_run_ends_with_the_same_schedule_and_weights(
    full: tuple[Path, Trace], resumed: tuple[Path, Trace, Trace]
) -> None:
    (full_out, _), (out, _, _) = full, resumed
    logs, full_logs = step_logs(out), step_logs(full_out)
    assert [e["step"] for e in logs] == [e["step"] for e in full_logs] == list(range(1, STEPS + 1))
    assert [e["learning_rate"] for e in logs] == [e["learning_rate"] for e in full_logs]  # scheduler state resumed
    for key in ("loss", "grad_norm"):
        torch.testing.assert_close([e[key] for e in logs], [e[key] for e in full_logs], atol=1e-5, rtol=1e-5)
    got, want = load_file(str(out / "model.safetensors")), load_file(str(full_out / "model.safetensors"))
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].dtype == torch.float32
        torch.testing.assert_close(got[key], want[key], atol=1e-6, rtol=1e-5)


def test_resume_refuses_another_recipe(
    resumed: tuple[Path, Trace, Trace], teacher_dir: Path, blocks: torch.Tensor
) -> None:
    with pytest.raises(RecipeError, match="different recipe"):
        distill(teacher_dir, resumed[0], recipe(learning_rate=1e-3), train_blocks=blocks, progress=False)


def test_starting_over_drops_the_old_checkpoints(
    resumed: tuple[Path, Trace, Trace], teacher_dir: Path, blocks: torch.Tensor
) -> None:
    out = teacher_dir.parent / "restarted"
    shutil.copytree(resumed[0] / CHECKPOINTS, out / CHECKPOINTS)  # another run's checkpoint-6
    distill(
        teacher_dir,
        out,
        recipe(learning_rate=1e-3),
        train_blocks=blocks,
        progress=False,
        resume=False,
        stop_after_steps=1,
    )
    assert sorted(p.name for p in (out / CHECKPOINTS).iterdir()) == ["checkpoint-1"]  # not rotated out by step 6


# A `boomerang distill` that stops inside the save of step KILL_AT, after the weights of that step
# are on disk and before its optimizer state is: the test kills it there, so the kill lands mid-write
# every time. The marker file names the directory being written.
HANG_IN_SAVE = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from transformers import Trainer
    from boomerang_core import cli

    marker, kill_at = Path(sys.argv[1]), int(sys.argv[2])
    save_optimizer = Trainer._save_optimizer_and_scheduler

    def save_then_hang(self, output_dir):
        if self.state.global_step == kill_at:
            marker.write_text(output_dir)
            time.sleep(600)
        save_optimizer(self, output_dir)

    Trainer._save_optimizer_and_scheduler = save_then_hang
    sys.exit(cli.main(sys.argv[3:]))
    """
)
KILL_AT = 4


def test_distill_killed_mid_checkpoint_resumes_from_the_previous_complete_one(
    teacher_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    corpus = teacher_dir.parent / "corpus.txt"
    corpus.write_text("\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)[:30]))
    out, marker = teacher_dir.parent / "killed", teacher_dir.parent / "saving"
    argv = ["distill", "--teacher", str(teacher_dir), "--out", str(out), "--data", str(corpus), "--device", "cpu"]
    argv += ["--seq-len", "32", "--batch-size", "2", "--tokens", str(2 * 32 * STEPS), "--lr", "1e-3"]
    argv += ["--save-steps", "2", "--keep-checkpoints", "1"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", HANG_IN_SAVE, str(marker), str(KILL_AT), *argv],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert marker.exists(), f"distill never reached the save of step {KILL_AT}: {proc.poll()}"
    finally:
        proc.send_signal(signal.SIGKILL)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, stderr

    checkpoints = out / CHECKPOINTS
    partial = Path(marker.read_text())
    assert partial.name == f"checkpoint-{KILL_AT}" and (partial / "model.safetensors").is_file()
    assert not (partial / "optimizer.pt").exists() and not (partial / "trainer_state.json").exists()
    published = sorted(p.name for p in checkpoints.iterdir() if p.name.startswith("checkpoint-"))
    assert published == ["checkpoint-2"]  # the half-written step 4 is not among them, and rotation kept step 2
    for name in ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"):
        assert (checkpoints / "checkpoint-2" / name).is_file(), name
    assert StudentSpec.read(checkpoints / "checkpoint-2") == StudentSpec.from_pruning(6, 1, 2, 2)

    assert cli.main(argv) == 0  # `boomerang distill` again, here in the test's process
    assert "resuming from checkpoint-2" in capsys.readouterr().out
    assert (out / "model.safetensors").is_file()
    assert sorted(p.name for p in checkpoints.iterdir()) == [f"checkpoint-{STEPS}"]  # staging cleared, one kept
    state = trainer_state(out)
    assert state["global_step"] == state["max_steps"] == STEPS
    assert [e["step"] for e in state["log_history"] if "loss" in e] == [5]  # the CLI logs every 5 steps
