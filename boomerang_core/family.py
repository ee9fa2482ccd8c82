"""A model family: one store and the ordered list of sizes it serves.

The family is what the rest of the system sees: sizes with names (``k3``), parameter labels
(``96M``), layer counts, exact parameter counts and bytes. It is saved as ``family.json`` beside
the student so serving never repeats the search (patch order, evaluation) that chose the sizes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from boomerang_core.errors import SizeOutOfRange, StudentConfigError
from boomerang_core.plan import SizePlan, enumerate_plans, patch_order, teacher_plan
from boomerang_core.store import LayerStore

FAMILY_FILE = "family.json"


def param_label(params: int) -> str:
    """``134515008`` -> ``"135M"``; ``2_800_000_000`` -> ``"2.8B"``."""
    if params >= 1e9:
        return f"{params / 1e9:.1f}B".replace(".0B", "B")
    if params >= 1e6:
        return f"{params / 1e6:.0f}M"
    return f"{params / 1e3:.0f}K"


def parse_param_label(text: str) -> float | None:
    t = text.strip().upper()
    scale = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9}.get(t[-1:] if t else "")
    if scale is None:
        return None
    try:
        return float(t[:-1]) * scale
    except ValueError:
        return None


@dataclass(frozen=True)
class FamilySize:
    name: str
    plan: SizePlan
    params: int
    bytes: int
    label: str
    dominated: bool = False
    perplexity: float | None = None

    @property
    def k(self) -> int:
        return self.plan.k

    @property
    def num_layers(self) -> int:
        return self.plan.num_layers


def dominated_flags(params: Sequence[int], scores: Sequence[float]) -> list[bool]:
    """Whether each point is dominated (DESIGN.md section 4: the router never picks it): another
    has at most its parameters and at most its score (lower is better), and is strictly better in
    one of the two. Of exact ties the first in the given order stays."""
    flags = []
    for i, (p_i, s_i) in enumerate(zip(params, scores, strict=True)):
        flags.append(
            any(
                p_j <= p_i and s_j <= s_i and (p_j < p_i or s_j < s_i or j < i)
                for j, (p_j, s_j) in enumerate(zip(params, scores, strict=True))
                if j != i
            )
        )
    return flags


def mark_dominated(sizes: Sequence[FamilySize], never: Collection[str] = ()) -> list[FamilySize]:
    """Sizes in the same order, ``dominated`` set by :func:`dominated_flags` on their parameters
    and perplexities (of exact ties the earlier size stays: in a patch-order family, the one
    patched less). Sizes without a perplexity are left as they are, and so are sizes whose plan key
    is in ``never`` (the teacher: the full size is always served)."""
    scored = [i for i, s in enumerate(sizes) if s.perplexity is not None]
    flags = dominated_flags([sizes[i].params for i in scored], [sizes[i].perplexity or 0.0 for i in scored])
    out = list(sizes)
    for i, flag in zip(scored, flags, strict=True):
        out[i] = replace(sizes[i], dominated=flag and sizes[i].plan.key not in never)
    return out


@dataclass
class Family:
    name: str
    store: LayerStore
    sizes: list[FamilySize]
    order: str = "last"
    info: dict[str, Any] = field(default_factory=dict)

    # --- construction -------------------------------------------------------------------------

    @classmethod
    def from_plans(
        cls, name: str, store: LayerStore, plans: Sequence[SizePlan], order: str = "explicit", **info: Any
    ) -> Family:
        sizes = []
        for i, plan in enumerate(plans):
            params = store.plan_params(plan)
            size_name = f"k{plan.k}" if plan.patched or plan.origin != "teacher" else f"s{i}"
            sizes.append(
                FamilySize(
                    name=size_name,
                    plan=plan,
                    params=params,
                    bytes=params * store.dtype.itemsize,
                    label=param_label(params),
                )
            )
        if len({s.name for s in sizes}) != len(sizes):
            sizes = [replace(s, name=f"s{i}") for i, s in enumerate(sizes)]
        return cls(name=name, store=store, sizes=sizes, order=order, info=dict(info))

    @classmethod
    def from_store(cls, name: str, store: LayerStore, order: str | Sequence[int] = "last") -> Family:
        """Every size for a fixed patch order (``last``, ``first`` or an explicit block list).
        A store without a student gives a one-size family: the teacher."""
        if store.spec is None:
            return cls.from_plans(name, store, [teacher_plan(store.num_teacher_layers)], order="teacher")
        blocks = patch_order(store.spec, order)
        label = order if isinstance(order, str) else "explicit"
        return cls.from_plans(name, store, enumerate_plans(store.spec, blocks, origin=label), order=label)

    @classmethod
    def open(
        cls,
        teacher: str | Path | None = None,
        student: str | Path | None = None,
        *,
        family_file: str | Path | None = None,
        order: str | Sequence[int] | None = None,
        default_order: str | Sequence[int] = "last",
        device: str = "cpu",
        dtype: str | torch.dtype = "float32",
        name: str | None = None,
    ) -> Family:
        """The family of a teacher/student pair (HF directories, GGUF files or hub ids), loaded on
        ``device`` in ``dtype`` (a torch dtype or its name); the demo family without a teacher.
        Blocking: seconds, or the demo's first build.

        Sizes: with ``order`` (``last``, ``first``, ``klpatch`` or a block list), every size of that
        patch order (``klpatch`` searches it on the built-in corpus' calibration split). Else the
        sizes saved in ``family.json`` (in ``family_file``, else in the student's directory; the demo
        always has one), else every size of ``default_order``. ``name`` renames the family."""
        torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        saved: Family | None
        if teacher is None:
            if student is not None:
                raise StudentConfigError("a student needs its teacher")
            from boomerang_core import demo

            saved = demo.load_demo_family(device=device, dtype=torch_dtype)
            store = saved.store
        else:
            store = LayerStore.load(teacher, student, device=device, dtype=torch_dtype)
            directory = family_file if family_file is not None else student
            saved = None
            if order is None and directory is not None and (Path(directory) / FAMILY_FILE).is_file():
                saved = cls.load(directory, store)
        if order is None and saved is not None:
            family = saved
        else:
            order = order if order is not None else default_order
            family = cls.from_store("family", store, order=_klpatch_order(store) if order == "klpatch" else order)
        if name is not None:
            family.name = name
        return family

    # --- lookup -------------------------------------------------------------------------------

    @property
    def servable(self) -> list[FamilySize]:
        """Sizes the router may pick: not dominated, ascending parameters; of equal parameters the
        teacher comes last, so that the largest size is the teacher whenever it is served."""
        teacher = teacher_plan(self.store.num_teacher_layers).key
        return sorted((s for s in self.sizes if not s.dominated), key=lambda s: (s.params, s.plan.key == teacher, s.k))

    @property
    def largest(self) -> FamilySize:
        return self.servable[-1]

    def by_name(self, name: str) -> FamilySize:
        for s in self.sizes:
            if s.name == name.lower():
                return s
        raise SizeOutOfRange(f"unknown size '{name}'; valid: {', '.join(s.name for s in self.sizes)}")

    def resolve(self, spec: str | float) -> FamilySize:
        """A size from a name (``k3``), parameter label (``96M``: nearest at or below) or a
        fraction of the teacher's parameters (``0.5``)."""
        text = str(spec).strip().lower()
        names = {s.name for s in self.sizes}
        if text in names:
            return self.by_name(text)
        servable = self.servable
        target = parse_param_label(text)
        if target is None:
            try:
                fraction = float(text)
            except ValueError:
                raise SizeOutOfRange(
                    f"cannot read size '{spec}': use a size name ({self._name_range()}), a parameter "
                    f"label like '{servable[0].label}', or a fraction of the teacher between 0 and 1"
                ) from None
            if not (0 < fraction <= 1) or math.isnan(fraction):
                raise SizeOutOfRange(f"size fraction {fraction} out of range: use a number in (0, 1]")
            target = fraction * max(s.params for s in self.sizes)
        fitting = [s for s in servable if s.params <= target * 1.005]
        if not fitting:
            raise SizeOutOfRange(
                f"no size has at most {text.upper()} parameters; the smallest is "
                f"{servable[0].name} ({servable[0].label})"
            )
        return fitting[-1]

    def _name_range(self) -> str:
        return f"{self.sizes[0].name}..{self.sizes[-1].name}"

    # --- persistence --------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "order": self.order,
            "info": self.info,
            "sizes": [
                {
                    "name": s.name,
                    "plan": s.plan.to_dict(),
                    "dominated": s.dominated,
                    "perplexity": s.perplexity,
                }
                for s in self.sizes
            ],
        }

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / FAMILY_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, directory: str | Path, store: LayerStore) -> Family:
        data = json.loads((Path(directory) / FAMILY_FILE).read_text())
        family = cls.from_plans(
            data["name"], store, [SizePlan.from_dict(s["plan"]) for s in data["sizes"]], order=data["order"]
        )
        family.info = data.get("info", {})
        family.sizes = [
            replace(s, name=d["name"], dominated=bool(d.get("dominated")), perplexity=d.get("perplexity"))
            for s, d in zip(family.sizes, data["sizes"], strict=True)
        ]
        return family

    def table(self) -> str:
        """The sizes as a plain-text table (what ``boomerang sizes`` prints)."""
        rows = [f"{'size':<6} {'k':>3} {'layers':>6} {'params':>12} {'label':>6} {'bytes':>12}  note"]
        for s in self.sizes:
            note = "dominated" if s.dominated else ""
            if s.perplexity is not None:
                note = f"ppl {s.perplexity:.1f} {note}".strip()
            rows.append(f"{s.name:<6} {s.k:>3} {s.num_layers:>6} {s.params:>12,} {s.label:>6} {s.bytes:>12,}  {note}")
        return "\n".join(rows)


def _klpatch_order(store: LayerStore) -> list[int]:
    """The KLPatch order on the built-in corpus' calibration split (4 blocks of 256 tokens)."""
    from boomerang_core.data import corpus_texts, token_blocks
    from boomerang_core.quality.klpatch import klpatch_order

    if store.tokenizer is None or store.spec is None:
        raise StudentConfigError("klpatch needs a student and a tokenizer")
    _, _, calib = corpus_texts(None)
    return klpatch_order(store, token_blocks(store.tokenizer, calib, 256, max_blocks=4))
