"""Size plans: which store layer runs at each depth of a size, and where its embeddings,
final norm and LM head come from.

A plan is data: it names layers in the store (``LayerRef("teacher", 7)``), never holds modules.
The same plan always builds the same model from the same store, and plans can be saved with a
family and reloaded without repeating the search that found them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from boomerang_core.alignment import StudentSpec
from boomerang_core.errors import SizeOutOfRange

Source = Literal["teacher", "student"]
SOURCES: tuple[Source, ...] = ("teacher", "student")
PATCH_ORDERS = ("last", "first", "klpatch")


@dataclass(frozen=True, order=True)
class LayerRef:
    source: Source
    index: int

    def __str__(self) -> str:
        return f"{self.source[0]}{self.index}"


@dataclass(frozen=True)
class SizePlan:
    """One size of the family.

    ``patched`` lists the student blocks replaced by their teacher blocks, in the order they were
    patched; ``dropped`` lists teacher layers left out of a teacher-only plan (ShortGPT-style).
    """

    layers: tuple[LayerRef, ...]
    embed: Source
    norm: Source
    head: Source
    patched: tuple[int, ...] = ()
    dropped: tuple[int, ...] = ()
    origin: str = "explicit"
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def k(self) -> int:
        return len(self.patched)

    def sources(self) -> set[Source]:
        return {r.source for r in self.layers} | {self.embed, self.norm, self.head}

    def describe(self) -> str:
        return " ".join(str(r) for r in self.layers)

    @property
    def key(self) -> str:
        """What determines the plan's outputs, as a string: embeddings | layers | norm | head
        (``t|t0 t1 s2|s|s``). Two plans with one key are the same model, whatever their origin
        and bookkeeping; scores are cached and saved under it."""
        return f"{self.embed[0]}|{self.describe()}|{self.norm[0]}|{self.head[0]}"

    @property
    def prefix_order(self) -> tuple[Source, tuple[LayerRef, ...], Source, Source]:
        """Sort key that puts plans sharing embeddings and first layers next to each other: in this
        order, a plan's longest layer prefix shared with any earlier plan is the one it shares
        with the plan just before it."""
        return (self.embed, self.layers, self.norm, self.head)

    def shared_depth(self, other: SizePlan | None) -> int:
        """How many of this plan's first layers ``other`` runs on the same inputs: ``-1`` when
        not even the embeddings are shared (no ``other``, or another source)."""
        if other is None or other.embed != self.embed:
            return -1
        depth = 0
        for a, b in zip(other.layers, self.layers, strict=False):
            if a != b:
                break
            depth += 1
        return depth

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": [[r.source, r.index] for r in self.layers],
            "embed": self.embed,
            "norm": self.norm,
            "head": self.head,
            "patched": list(self.patched),
            "dropped": list(self.dropped),
            "origin": self.origin,
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SizePlan:
        return cls(
            layers=tuple(LayerRef(_source(s), int(i)) for s, i in data["layers"]),
            embed=_source(data["embed"]),
            norm=_source(data["norm"]),
            head=_source(data["head"]),
            patched=tuple(data.get("patched", ())),
            dropped=tuple(data.get("dropped", ())),
            origin=data.get("origin", "explicit"),
            meta=dict(data.get("meta", {})),
        )


def _source(value: str) -> Source:
    if value == "teacher":
        return "teacher"
    if value == "student":
        return "student"
    raise ValueError(f"layer source must be 'teacher' or 'student', got {value!r}")


def plan_for_patched(spec: StudentSpec, patched: Sequence[int], origin: str = "explicit") -> SizePlan:
    """The student with the blocks in ``patched`` swapped back for their teacher blocks.

    Patching the first block switches the embeddings to the teacher's, patching the last block the
    final norm and LM head (as in the paper's code), so the pure-teacher plan IS the teacher.
    """
    n_blocks = spec.num_student_layers
    for b in patched:
        if not 0 <= b < n_blocks:
            raise SizeOutOfRange(f"block {b} out of range: valid blocks are 0..{n_blocks - 1}")
    if len(set(patched)) != len(patched):
        raise SizeOutOfRange(f"a block is patched twice in {list(patched)}")
    swapped = set(patched)
    layers: list[LayerRef] = []
    for i, block in enumerate(spec.blocks()):
        if i in swapped:
            layers.extend(LayerRef("teacher", t) for t in block)
        else:
            layers.append(LayerRef("student", i))
    head: Source = "teacher" if n_blocks - 1 in swapped else "student"
    return SizePlan(
        layers=tuple(layers),
        embed="teacher" if 0 in swapped else "student",
        norm=head,
        head=head,
        patched=tuple(patched),
        origin=origin,
    )


def teacher_plan(num_teacher_layers: int, dropped: Sequence[int] = (), origin: str = "teacher") -> SizePlan:
    """The teacher, optionally with whole layers dropped (the ShortGPT baseline)."""
    bad = [d for d in dropped if not 0 <= d < num_teacher_layers]
    if bad:
        raise SizeOutOfRange(f"teacher layers {bad} out of range 0..{num_teacher_layers - 1}")
    gone = set(dropped)
    return SizePlan(
        layers=tuple(LayerRef("teacher", i) for i in range(num_teacher_layers) if i not in gone),
        embed="teacher",
        norm="teacher",
        head="teacher",
        dropped=tuple(sorted(gone)),
        origin=origin,
    )


def patch_order(spec: StudentSpec, order: str | Sequence[int]) -> list[int]:
    """Blocks in the order they are patched. ``klpatch`` needs a store: see :mod:`klpatch`."""
    n_blocks = spec.num_student_layers
    if isinstance(order, str):
        if order == "last":
            return list(reversed(range(n_blocks)))
        if order == "first":
            return list(range(n_blocks))
        raise ValueError(f"unknown patch order {order!r}; use one of {', '.join(PATCH_ORDERS)} or a list of blocks")
    blocks = [int(b) for b in order]
    if sorted(blocks) != list(range(n_blocks)):
        raise SizeOutOfRange(
            f"an explicit patch order must name every block 0..{n_blocks - 1} exactly once, got {blocks}"
        )
    return blocks


def enumerate_plans(spec: StudentSpec, order: Sequence[int], origin: str = "explicit") -> list[SizePlan]:
    """Every size for one patch order: k = 0 (the student) .. S (the teacher)."""
    blocks = list(order)
    return [plan_for_patched(spec, blocks[:k], origin=origin) for k in range(len(blocks) + 1)]


def plan_for_k(spec: StudentSpec, order: Sequence[int], k: int, origin: str = "explicit") -> SizePlan:
    if not 0 <= k <= len(order):
        raise SizeOutOfRange(f"k={k} out of range: valid k are 0..{len(order)}")
    return plan_for_patched(spec, list(order)[:k], origin=origin)
