"""Student <-> teacher block map.

A student is the teacher with some layers pruned. Student layer ``i`` is a copy of teacher layer
``copied[i]`` and, after distillation, stands for its *teacher block*: the run of teacher layers
``copied[i] .. copied[i + 1] - 1`` (the copied layer and the pruned layers that follow it). The
file format is the published one, so released students load unchanged::

    {"copied_teacher_layers": [...], "pruned_teacher_layers": [...]}
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from boomerang_core.errors import StudentConfigError

STUDENT_CONFIG_FILE = "student_config.json"


@dataclass(frozen=True)
class StudentSpec:
    """Which teacher layers the student kept. ``num_teacher_layers`` is the teacher's depth."""

    copied_teacher_layers: tuple[int, ...]
    pruned_teacher_layers: tuple[int, ...]

    def __post_init__(self) -> None:
        copied, pruned = self.copied_teacher_layers, self.pruned_teacher_layers
        if not copied:
            raise StudentConfigError("copied_teacher_layers is empty: a student needs at least one layer")
        if any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in copied + pruned):
            raise StudentConfigError("layer indices must be non-negative integers")
        if list(copied) != sorted(set(copied)):
            raise StudentConfigError(f"copied_teacher_layers must be strictly increasing, got {list(copied)}")
        overlap = set(copied) & set(pruned)
        if overlap:
            raise StudentConfigError(f"layers {sorted(overlap)} are both copied and pruned")
        everything = sorted(set(copied) | set(pruned))
        if everything != list(range(len(everything))) or len(everything) != len(copied) + len(pruned):
            missing = sorted(set(range(max(everything) + 1)) - set(everything))
            raise StudentConfigError(
                f"copied + pruned teacher layers must cover 0..N-1 exactly once; missing {missing}"
            )
        if copied[0] != 0:
            raise StudentConfigError("teacher layer 0 must be copied: every teacher block starts at a copied layer")

    @property
    def num_teacher_layers(self) -> int:
        return len(self.copied_teacher_layers) + len(self.pruned_teacher_layers)

    @property
    def num_student_layers(self) -> int:
        return len(self.copied_teacher_layers)

    def teacher_block(self, student_layer: int) -> range:
        """Teacher layers that student layer ``student_layer`` stands for."""
        copied = self.copied_teacher_layers
        if not 0 <= student_layer < len(copied):
            raise StudentConfigError(f"student layer {student_layer} out of range 0..{len(copied) - 1}")
        end = copied[student_layer + 1] if student_layer + 1 < len(copied) else self.num_teacher_layers
        return range(copied[student_layer], end)

    def blocks(self) -> list[range]:
        return [self.teacher_block(i) for i in range(self.num_student_layers)]

    def aligned_hidden_states(self) -> dict[int, int]:
        """Student hidden-state index -> teacher hidden-state index (0 = embeddings output).

        The output of student layer ``i`` (hidden index ``i + 1``) is aligned with the output of
        the last teacher layer of its block (hidden index ``block.stop``).
        """
        return {i + 1: block.stop for i, block in enumerate(self.blocks())}

    # --- construction -------------------------------------------------------------------------

    @classmethod
    def from_pruning(
        cls,
        num_teacher_layers: int,
        first_layers_to_keep: int = 1,
        every_n: int = 2,
        last_layers_to_keep: int = 2,
    ) -> StudentSpec:
        """The paper's initialisation: keep the first ``first_layers_to_keep`` layers, then one of
        every ``every_n`` (the last of each group, its group's earlier layers pruned), then the last
        ``last_layers_to_keep``. Defaults 1, 2, 2 as in the paper."""
        n = num_teacher_layers
        if every_n < 1 or first_layers_to_keep < 0 or last_layers_to_keep < 0:
            raise StudentConfigError("every_n must be >= 1 and the kept counts >= 0")
        if first_layers_to_keep + last_layers_to_keep > n:
            raise StudentConfigError(
                f"first ({first_layers_to_keep}) + last ({last_layers_to_keep}) layers to keep exceed "
                f"the teacher's {n} layers"
            )
        pruned: list[int] = []
        idx = first_layers_to_keep + every_n - 1
        while idx <= n - last_layers_to_keep:
            pruned.extend(range(idx - every_n + 1, idx))
            idx += every_n
        first = max(first_layers_to_keep, 1)  # teacher layer 0 always starts the first block
        pruned = [p for p in pruned if p >= first]
        copied = [i for i in range(n) if i not in set(pruned)]
        return cls(tuple(copied), tuple(pruned))

    @classmethod
    def from_dict(cls, data: object, num_teacher_layers: int | None = None) -> StudentSpec:
        if not isinstance(data, dict):
            raise StudentConfigError("student_config.json must be a JSON object")
        for key in ("copied_teacher_layers", "pruned_teacher_layers"):
            if key not in data:
                raise StudentConfigError(f"student_config.json lacks '{key}'")
            if not isinstance(data[key], list):
                raise StudentConfigError(f"'{key}' must be a list of layer indices")
        spec = cls(tuple(data["copied_teacher_layers"]), tuple(sorted(data["pruned_teacher_layers"])))
        if num_teacher_layers is not None and spec.num_teacher_layers != num_teacher_layers:
            raise StudentConfigError(
                f"student_config.json describes a {spec.num_teacher_layers}-layer teacher, "
                f"but the teacher has {num_teacher_layers} layers"
            )
        return spec

    def to_dict(self) -> dict[str, list[int]]:
        return {
            "copied_teacher_layers": list(self.copied_teacher_layers),
            "pruned_teacher_layers": list(self.pruned_teacher_layers),
        }

    @classmethod
    def read(cls, directory: str | Path, num_teacher_layers: int | None = None) -> StudentSpec:
        path = Path(directory) / STUDENT_CONFIG_FILE
        if not path.is_file():
            raise StudentConfigError(f"{path} not found: a boomerang student needs its {STUDENT_CONFIG_FILE}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise StudentConfigError(f"{path} is not valid JSON: {exc}") from None
        return cls.from_dict(data, num_teacher_layers)

    def write(self, directory: str | Path) -> Path:
        path = Path(directory) / STUDENT_CONFIG_FILE
        path.write_text(json.dumps(self.to_dict()))
        return path
