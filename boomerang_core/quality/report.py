"""A family's curve: the result type (held-out perplexity of every size, both baselines, the patch
orders) with its verdicts, as a markdown report and a PNG plot (parameters vs held-out perplexity)."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from boomerang_core.quality.klpatch import KLPatchResult

if TYPE_CHECKING:
    from boomerang_core.quality.chateval import ChatEvalResult


@dataclass(frozen=True)
class CurvePoint:
    """One size on one curve: ``perplexity`` is held-out token-level perplexity."""

    name: str
    k: int
    num_layers: int
    params: int
    perplexity: float


@dataclass
class CurveResult:
    """A family's held-out curve with its baselines.

    ``sizes``: the family's own sizes (its order ``family_order``), smallest first.
    ``undistilled[i]``: perplexity of ``sizes[i]``'s plan on the pruned, not distilled student.
    ``shortgpt``: layer count -> the teacher cut to that many layers by lowest block influence.
    ``orders``: each compared patch order's curve, k = 0 (student) .. S (teacher).
    """

    family: str
    family_order: str
    sizes: list[CurvePoint]
    dominated: list[bool]
    undistilled: list[float]
    shortgpt: dict[int, CurvePoint]
    shortgpt_dropped: dict[int, tuple[int, ...]]
    block_influence: list[float]
    orders: dict[str, list[CurvePoint]]
    klpatch: KLPatchResult | None
    heldout_tokens: int
    calib_tokens: int
    seconds: float
    scores: dict[str, float] = field(default_factory=dict)  # SizePlan.key -> perplexity, every plan run
    chat: ChatEvalResult | None = None  # chat KL, QA accuracy, general-text perplexity (boomerang eval)

    # --- verdicts -----------------------------------------------------------------------------

    def rises(self) -> list[tuple[CurvePoint, CurvePoint]]:
        """Consecutive family sizes (by parameters) where perplexity does not fall."""
        pts = sorted(self.sizes, key=lambda p: (p.params, p.k))
        return [(a, b) for a, b in itertools.pairwise(pts) if b.perplexity >= a.perplexity]

    @property
    def monotone(self) -> bool:
        """True when perplexity falls strictly at every step from the student to the teacher."""
        return not self.rises()

    def interpolated(self) -> list[int]:
        """Indices of the family sizes strictly between the pure student and the pure teacher."""
        s_max = max(p.k for p in self.sizes)
        return [i for i, p in enumerate(self.sizes) if 0 < p.k < s_max]

    def losses_to(self, baseline: str) -> list[tuple[CurvePoint, float]]:
        """Interpolated sizes no better than ``baseline`` (``"undistilled"`` or ``"shortgpt"``),
        with the baseline's perplexity."""
        out = []
        for i in self.interpolated():
            point = self.sizes[i]
            ref = self._baseline(baseline, i)
            if ref is not None and point.perplexity >= ref:
                out.append((point, ref))
        return out

    def _baseline(self, baseline: str, i: int) -> float | None:
        if baseline == "undistilled":
            return self.undistilled[i]
        sg = self.shortgpt.get(self.sizes[i].num_layers)
        return sg.perplexity if sg is not None else None

    def order_scores(self) -> dict[str, float]:
        """Per patch order: exp of the mean log-perplexity over the parameter range from student
        to teacher (trapezoids in parameters). Every order spans the same range, so this compares
        whole curves whose sizes sit at different parameter counts. Lower is better."""
        scores = {}
        for order, pts in self.orders.items():
            pts = sorted(pts, key=lambda p: p.params)
            span = pts[-1].params - pts[0].params
            if span <= 0:
                scores[order] = pts[0].perplexity
                continue
            area = sum(
                (b.params - a.params) * (math.log(a.perplexity) + math.log(b.perplexity)) / 2
                for a, b in itertools.pairwise(pts)
            )
            scores[order] = math.exp(area / span)
        return scores

    @property
    def best_order(self) -> str:
        scores = self.order_scores()
        return min(scores, key=lambda o: scores[o])

    # --- reports ------------------------------------------------------------------------------

    def to_markdown(self) -> str:
        return curve_markdown(self)

    def plot(self, path: str | Path) -> Path:
        """Parameters vs held-out perplexity (log scale) as a PNG."""
        return curve_plot(self, Path(path))


def _ppl(value: float) -> str:
    if value >= 1000:
        return f"{value:,.0f}"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def _pct(value: float, ref: float) -> str:
    return f"{(value / ref - 1) * 100:+.0f}%"


def _mparams(params: int) -> str:
    return f"{params / 1e6:.1f}M"


def _verdicts(r: CurveResult) -> list[str]:
    pts = sorted(r.sizes, key=lambda p: p.params)
    student, teacher = pts[0], pts[-1]
    lines = []
    rises = r.rises()
    if not rises:
        lines.append(
            f"- **Monotone: yes.** Perplexity falls at every step from the student ({_ppl(student.perplexity)}, "
            f"{student.num_layers} layers) to the teacher ({_ppl(teacher.perplexity)}, {teacher.num_layers} layers)."
        )
    else:
        where = "; ".join(
            f"{a.name}->{b.name} ({a.num_layers}->{b.num_layers} layers): {_ppl(a.perplexity)} -> {_ppl(b.perplexity)}"
            for a, b in rises
        )
        lines.append(
            f"- **Monotone: no.** From the student ({_ppl(student.perplexity)}) to the teacher "
            f"({_ppl(teacher.perplexity)}) perplexity does not fall at {len(rises)} step(s): {where}."
        )
    n_inter = len(r.interpolated())
    for key, label in (("undistilled", "the pruned, undistilled student"), ("shortgpt", "ShortGPT")):
        losses = r.losses_to(key)
        if not losses:
            lines.append(f"- **Beats {label} at every interpolated size: yes** ({n_inter} of {n_inter}).")
        else:
            detail = "; ".join(
                f"{p.name} ({p.num_layers} layers): {_ppl(p.perplexity)} vs {_ppl(ref)} ({_pct(p.perplexity, ref)})"
                for p, ref in losses
            )
            lines.append(
                f"- **Beats {label} at every interpolated size: no** ({n_inter - len(losses)} of {n_inter}); "
                f"worse or equal at {detail}."
            )
    if r.orders:
        scores = r.order_scores()
        ranked = ", ".join(f"`{o}` {_ppl(scores[o])}" for o in sorted(scores, key=lambda o: scores[o]))
        lines.append(
            f"- **Best patch order: `{r.best_order}`** (geometric-mean perplexity over the parameter range, "
            f"lower is better: {ranked})."
        )
    dominated = [p.name for p, d in zip(r.sizes, r.dominated, strict=True) if d]
    lines.append(
        f"- **Dominated sizes** (a size with no more parameters is at least as good; never routed to): "
        f"{', '.join(dominated) if dominated else 'none'}."
    )
    return lines


def curve_markdown(r: CurveResult) -> str:
    """The whole report: verdicts first, then the tables they rest on."""
    out = [
        f"## Family `{r.family}` (sizes in patch order `{r.family_order}`)",
        "",
        f"Held-out perplexity on {r.heldout_tokens:,} tokens; calibration (KLPatch, block influence) on "
        f"{r.calib_tokens:,} other tokens. Evaluation took {r.seconds / 60:.1f} min.",
        "",
        *_verdicts(r),
        "",
        "### Every size against both baselines",
        "",
        "*pruned only*: the same plan on the student before distillation (teacher layers "
        "`copied_teacher_layers` only); *ShortGPT*: the teacher cut to the same layer count by lowest "
        "block influence, no training.",
        "",
        "| size | k | layers | params | perplexity | pruned only | ShortGPT | vs ShortGPT | dominated |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for i, p in enumerate(r.sizes):
        sg = r.shortgpt.get(p.num_layers)
        sg_cell = _ppl(sg.perplexity) if sg else "-"
        vs = _pct(p.perplexity, sg.perplexity) if sg else "-"
        out.append(
            f"| {p.name} | {p.k} | {p.num_layers} | {_mparams(p.params)} | {_ppl(p.perplexity)} | "
            f"{_ppl(r.undistilled[i])} | {sg_cell} | {vs} | {'yes' if r.dominated[i] else ''} |"
        )
    if r.orders:
        names = list(r.orders)
        out += [
            "",
            "### Patch orders",
            "",
            "Perplexity (layers) after patching k blocks in each order; the same k patches different "
            "blocks, hence different layer counts.",
            "",
            "| k | " + " | ".join(f"`{o}`" for o in names) + " |",
            "| --- | " + " | ".join("---" for _ in names) + " |",
        ]
        for k in range(max(len(pts) for pts in r.orders.values())):
            cells = [
                f"{_ppl(r.orders[o][k].perplexity)} ({r.orders[o][k].num_layers})" if k < len(r.orders[o]) else "-"
                for o in names
            ]
            out.append(f"| {k} | " + " | ".join(cells) + " |")
    if r.klpatch is not None:
        kp = r.klpatch
        text = f"Blocks patched in the order {', '.join(map(str, kp.order))}."
        if kp.kl:
            kl = ", ".join(f"{v:.3f}" for v in kp.kl)
            text += (
                f" KL(teacher || size) after each step, nats per token: {kl}. Search: {kp.seconds / 60:.1f} min "
                f"wall, {kp.cpu_seconds / 60:.1f} min CPU, {kp.work:.0%} of the layer work of a naive search."
            )
        else:
            text += " Order as saved with the family (searched when the family was built), not searched again."
        out += ["", "### KLPatch", "", text]
    if r.shortgpt:
        ranked = sorted(range(len(r.block_influence)), key=lambda i: (r.block_influence[i], -i))
        out += [
            "",
            "### ShortGPT",
            "",
            "Block influence (1 - cos(layer input, layer output), averaged over the calibration tokens) per "
            "teacher layer: " + ", ".join(f"{i}: {b:.3f}" for i, b in enumerate(r.block_influence)) + ".",
            "",
            f"Dropped first (lowest influence): {', '.join(map(str, ranked))}.",
            "",
            "| layers | params | perplexity | dropped teacher layers |",
            "| --- | --- | --- | --- |",
        ]
        for n in sorted(r.shortgpt):
            sg = r.shortgpt[n]
            dropped = ", ".join(map(str, r.shortgpt_dropped[n])) or "none"
            out.append(f"| {n} | {_mparams(sg.params)} | {_ppl(sg.perplexity)} | {dropped} |")
    if r.chat is not None:
        out += ["", r.chat.to_markdown().rstrip("\n")]
    return "\n".join(out) + "\n"


def _line(ax: object, pts: list[CurvePoint], **kw: object) -> None:
    """Points joined in the order given (patch order, so a curve reads from student to teacher)."""
    ax.plot([p.params / 1e6 for p in pts], [p.perplexity for p in pts], **kw)  # type: ignore[attr-defined]


def curve_plot(r: CurveResult, path: Path) -> Path:
    """Two panels, log perplexity against millions of parameters: everything (the undistilled
    baseline can be orders of magnitude worse), and a zoom on the family, its orders and ShortGPT.
    With chat results, four more below: chat KL, QA accuracy, Python-docs and general-text perplexity
    of the served sizes, ShortGPT and the teacher."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = 3 if r.chat is not None else 1
    fig, grid = plt.subplots(rows, 2, figsize=(13, 5 * rows), squeeze=False)
    axes = grid[0]
    if r.chat is not None:
        r.chat.plot(list(grid[1:].flat))
    undistilled = [
        CurvePoint(p.name, p.k, p.num_layers, p.params, u) for p, u in zip(r.sizes, r.undistilled, strict=True)
    ]
    shortgpt = list(r.shortgpt.values())
    styles = {"last": "tab:blue", "first": "tab:orange", "klpatch": "tab:green"}
    for ax in axes:
        for order, pts in r.orders.items():
            _line(ax, pts, marker=".", lw=1, alpha=0.7, color=styles.get(order), label=f"boomerang, order {order}")
        _line(ax, r.sizes, marker="o", lw=2.2, color="black", label=f"family sizes ({r.family_order})")
        _line(ax, shortgpt, marker="s", ls=":", color="tab:red", label="ShortGPT (teacher, layers dropped)")
        ax.set_xlabel("parameters (millions)")
        ax.set_ylabel("held-out perplexity (log scale)")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    _line(axes[0], undistilled, marker="x", ls="--", color="tab:gray", label="pruned only (not distilled)")
    axes[0].set_title(f"{r.family}: every size and both baselines")
    family_ppl = [p.perplexity for pts in [r.sizes, *r.orders.values()] for p in pts]
    axes[1].set_ylim(min(family_ppl) * 0.9, max(family_ppl) * 1.3)
    axes[1].set_title("zoom: the family's orders against ShortGPT")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
