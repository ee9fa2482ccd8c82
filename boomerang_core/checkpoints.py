"""Atomic training checkpoints: a ``checkpoint-N`` directory either holds everything or does not exist.

transformers' ``Trainer`` writes ``checkpoint-N/`` in place (weights, then optimizer and scheduler,
then RNG and trainer state) and only then rotates old ones out. A kill in the middle leaves a
directory with the weights of step N and no trainer state, which ``get_last_checkpoint`` picks on
resume. :class:`AtomicCheckpointTrainer` has the Trainer write into ``STAGING/checkpoint-N``,
fsyncs every file and directory, renames it into place, and only then rotates: a kill at any moment
leaves the previous complete checkpoint as the newest one, and what was staged is cleared by the
next save.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from torch import nn
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

STAGING = ".incomplete"  # beside the checkpoints; never matches checkpoint-N, so resume and rotation ignore it


class AtomicCheckpointTrainer(Trainer):
    """``Trainer`` whose checkpoints appear whole or not at all (see the module docstring).

    Subclasses add files to a checkpoint before it is published by overriding :meth:`complete_checkpoint`.
    """

    _staging_root: str | None = None

    def complete_checkpoint(self, staged: Path) -> None:
        """Called on the saving process with the staged ``checkpoint-N`` before it is published."""

    def _get_output_dir(self, trial: Any) -> str:
        return self._staging_root if self._staging_root is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        run_dir = Path(super()._get_output_dir(trial))
        staging = run_dir / STAGING
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.args.should_save and staging.exists():
            shutil.rmtree(staging)  # what a killed save left
        self.accelerator.wait_for_everyone()
        self._staging_root = str(staging)
        try:
            super()._save_checkpoint(model, trial)  # every process writes its part under staging/
        finally:
            self._staging_root = None
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            self.complete_checkpoint(staging / name)
            publish(staging / name, run_dir / name)
            staging.rmdir()
            rotate_checkpoints(str(run_dir), self.args.save_total_limit, self.state.best_model_checkpoint)
        self.accelerator.wait_for_everyone()


def publish(staged: Path, final: Path) -> None:
    """Make ``staged`` durable and rename it to ``final`` in one step. An existing ``final`` (a
    checkpoint of the same step from an earlier run) is moved aside first and deleted after."""
    fsync_tree(staged)
    old = staged.with_name(f"replaced-{final.name}")
    if final.exists():
        os.replace(final, old)
    os.replace(staged, final)
    fsync_dir(final.parent)
    if old.exists():
        shutil.rmtree(old)


def fsync_tree(root: Path) -> None:
    """fsync every file under ``root``, then every directory (deepest first), so that a rename that
    follows never publishes data still in the page cache only."""
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for filename in filenames:
            fd = os.open(os.path.join(dirpath, filename), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def fsync_dir(path: Path) -> None:
    """fsync a directory's entries (POSIX); a no-op where directories cannot be opened (Windows)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
