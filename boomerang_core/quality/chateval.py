"""What a chat user feels, for every size of a family, ShortGPT at the same layer counts and the
teacher, measured in one run so that the numbers compare:

- **chat KL**: KL(teacher || size) per response token on held-out teacher conversations
  (:mod:`.chat`), 0 for the teacher;
- **QA accuracy**: share of the fixed easy questions answered correctly, greedy (:mod:`.qa`);
- **Python-docs perplexity** on the built-in corpus' held-out split (as ``boomerang eval`` has always
  reported), and **general-text perplexity** on a book nobody here trains on (:func:`.chat.general_texts`),
  so that a gain in one domain is not paid for in another.

Every distinct plan is scored once: perplexities and chat KL through the prefix-sharing scorer
(:func:`~.scoring.score_plans`) against one teacher pass each; QA by greedy generation.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from boomerang_core.plan import SizePlan, teacher_plan
from boomerang_core.quality.baselines import shortgpt_plan
from boomerang_core.quality.chat import GENERAL_TEXT_NAME, ChatSet, chat_scores
from boomerang_core.quality.qa import QA_MAX_NEW_TOKENS, QAItem, answer_questions, load_qa
from boomerang_core.quality.scoring import perplexities
from boomerang_core.store import LayerStore

KINDS = ("size", "shortgpt", "teacher")


@dataclass(frozen=True)
class ChatPoint:
    """One plan's row. ``kind``: ``size`` (a family size), ``shortgpt`` (the teacher cut to the same
    layer count by lowest block influence) or ``teacher``. Scores are ``None`` where not measured."""

    name: str
    kind: str
    num_layers: int
    params: int
    chat_kl: float | None = None  # nats per response token
    chat_nll: float | None = None  # nats per response token, of the teacher's replies
    qa_correct: int | None = None
    pydoc_ppl: float | None = None
    general_ppl: float | None = None
    dominated: bool = False
    key: str = ""  # the plan's SizePlan.key: a family size that IS the teacher has the teacher's

    def qa_accuracy(self, questions: int) -> float | None:
        return self.qa_correct / questions if self.qa_correct is not None and questions else None


@dataclass
class ChatEvalResult:
    family: str
    points: list[ChatPoint]
    questions: list[QAItem]
    replies: dict[str, list[str]]  # point name -> reply to each question
    chat_conversations: int = 0
    chat_tokens: int = 0
    pydoc_tokens: int = 0
    general_tokens: int = 0
    general_name: str = GENERAL_TEXT_NAME
    max_new_tokens: int = QA_MAX_NEW_TOKENS
    seconds: dict[str, float] = field(default_factory=dict)

    def of(self, kind: str) -> list[ChatPoint]:
        return sorted((p for p in self.points if p.kind == kind), key=lambda p: (p.params, p.name))

    @property
    def teacher(self) -> ChatPoint | None:
        found = self.of("teacher")
        return found[0] if found else None

    def shortgpt_at(self, num_layers: int) -> ChatPoint | None:
        """ShortGPT with ``num_layers`` layers (the teacher at the teacher's count)."""
        for p in self.points:
            if p.kind in ("shortgpt", "teacher") and p.num_layers == num_layers:
                return p
        return None

    def accuracy(self, p: ChatPoint) -> float | None:
        return p.qa_accuracy(len(self.questions))

    # --- verdicts (the targets), on the served sizes ---------------------------------

    def served(self) -> list[ChatPoint]:
        return [p for p in self.of("size") if not p.dominated]

    def verdicts(self) -> list[str]:
        out = []
        served = self.served()
        teacher = self.teacher
        if self.questions and served:
            below = [
                p
                for p in served
                if (sg := self.shortgpt_at(p.num_layers)) is not None and _lt(p.qa_correct, sg.qa_correct)
            ]
            out.append(
                f"- **Every served size answers at least as many questions as ShortGPT with as many layers: "
                f"{'yes' if not below else 'no'}**"
                + (f" (fewer at {', '.join(p.name for p in below)})." if below else ".")
            )
            smallest = served[0]
            if teacher is not None and teacher.qa_correct is not None and smallest.qa_correct is not None:
                ok = 2 * smallest.qa_correct >= teacher.qa_correct
                out.append(
                    f"- **The smallest served size keeps at least half of the teacher's accuracy: "
                    f"{'yes' if ok else 'no'}** ({smallest.name} {smallest.qa_correct}/{len(self.questions)}, "
                    f"teacher {teacher.qa_correct}/{len(self.questions)})."
                )
        if self.chat_tokens and served and all(p.chat_kl is not None for p in served):
            # the teacher ends the chain, unless the largest served size is the teacher itself
            last = served[-1]
            same = teacher is not None and (teacher is last or (bool(teacher.key) and teacher.key == last.key))
            chain = [*served, *([teacher] if teacher is not None and not same else [])]
            rises = [(a, b) for a, b in itertools.pairwise(chain) if not _lt(b.chat_kl, a.chat_kl)]
            out.append(
                f"- **Chat KL falls strictly from the smallest size to the teacher: {'yes' if not rises else 'no'}**"
                + (
                    " (not at " + ", ".join(f"{a.name}->{b.name}" for a, b in rises) + ")."
                    if rises
                    else f" ({_num(served[0].chat_kl)} at {served[0].name})."
                )
            )
        if self.general_tokens and served:
            worse = [
                p
                for p in served
                if (sg := self.shortgpt_at(p.num_layers)) is not None
                and sg.kind == "shortgpt"
                and _lt(sg.general_ppl, p.general_ppl)
            ]
            out.append(
                f"- **No served size is worse than ShortGPT on the general text: {'yes' if not worse else 'no'}**"
                + (f" (worse at {', '.join(p.name for p in worse)})." if worse else ".")
            )
        return out

    # --- reports ------------------------------------------------------------------------------

    def to_markdown(self) -> str:
        return chat_markdown(self)

    def plot(self, axes: Sequence[Any]) -> None:
        """Draw chat KL, QA accuracy and both perplexities against parameters on four axes."""
        chat_plot(self, axes)


def _lt(a: float | None, b: float | None) -> bool:
    return a is not None and b is not None and a < b


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _ppl(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if value >= 1000 else (f"{value:.1f}" if value >= 10 else f"{value:.2f}")


def evaluate_chat(
    store: LayerStore,
    sizes: Sequence[tuple[str, SizePlan, bool]],
    *,
    influence: Sequence[float] | None = None,
    chat: ChatSet | None = None,
    questions: Sequence[QAItem] | None = None,
    pydoc_blocks: torch.Tensor | None = None,
    general_blocks: torch.Tensor | None = None,
    known_pydoc: Mapping[str, float] | None = None,
    family: str = "family",
    max_new_tokens: int = QA_MAX_NEW_TOKENS,
    batch_size: int = 4,
    qa_batch_size: int = 50,
    progress: bool = True,
) -> ChatEvalResult:
    """Score ``sizes`` (``(name, plan, dominated)``), ShortGPT at each of their layer counts (when the
    teacher layers' block ``influence`` is given) and the teacher on what is given: held-out
    conversations ``chat``, ``questions`` (``None``: the shipped set; ``[]``: none), Python-docs and
    general-text blocks (``(n, seq)`` token ids). ``known_pydoc`` maps :attr:`SizePlan.key` to a
    Python-docs perplexity already measured on ``pydoc_blocks`` (not run again)."""
    n = store.num_teacher_layers
    rows: list[tuple[str, str, SizePlan, bool]] = [(nm, "size", plan, dom) for nm, plan, dom in sizes]
    if influence is not None:
        for count in sorted({plan.num_layers for _, plan, _ in sizes}):
            if count < n:
                rows.append((f"shortgpt-{count}", "shortgpt", shortgpt_plan(influence, count), False))
    rows.append(("teacher", "teacher", teacher_plan(n), False))
    plans = [r[2] for r in rows]
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[stage] = now - clock
        clock = now

    pydoc: dict[str, float] = {}
    if pydoc_blocks is not None:
        known = dict(known_pydoc or {})
        todo = list({p.key: p for p in plans if p.key not in known}.values())
        values = perplexities(store, todo, pydoc_blocks, batch_size=batch_size, progress=progress)
        pydoc = {**known, **{p.key: v for p, v in zip(todo, values, strict=True)}}
        lap("pydoc_ppl")
    general: dict[str, float] = {}
    if general_blocks is not None:
        values = perplexities(store, plans, general_blocks, batch_size=batch_size, progress=progress)
        general = {p.key: v for p, v in zip(plans, values, strict=True)}
        lap("general_ppl")
    chat_kl: dict[str, tuple[float | None, float]] = {}
    if chat is not None:
        scores = chat_scores(store, plans, chat, batch_size=batch_size, progress=progress)
        chat_kl = {p.key: (s.kl, s.nll) for p, s in zip(plans, scores, strict=True)}
        lap("chat_kl")
    items = list(load_qa() if questions is None else questions)
    answers: dict[str, Any] = {}
    if items:
        results = answer_questions(
            store, plans, items, max_new_tokens=max_new_tokens, batch_size=qa_batch_size, progress=progress
        )
        answers = {p.key: r for p, r in zip(plans, results, strict=True)}
        lap("qa")
    points = []
    replies: dict[str, list[str]] = {}
    for name, kind, plan, dominated in rows:
        qa = answers.get(plan.key)
        kl = chat_kl.get(plan.key)
        points.append(
            ChatPoint(
                name=name,
                kind=kind,
                num_layers=plan.num_layers,
                params=store.plan_params(plan),
                chat_kl=kl[0] if kl is not None else None,
                chat_nll=kl[1] if kl is not None else None,
                qa_correct=qa.num_correct if qa is not None else None,
                pydoc_ppl=pydoc.get(plan.key),
                general_ppl=general.get(plan.key),
                dominated=dominated,
                key=plan.key,
            )
        )
        if qa is not None:
            replies[name] = qa.replies
    return ChatEvalResult(
        family=family,
        points=points,
        questions=items,
        replies=replies,
        chat_conversations=chat.conversations if chat is not None else 0,
        chat_tokens=chat.response_tokens if chat is not None else 0,
        pydoc_tokens=int(pydoc_blocks.numel()) if pydoc_blocks is not None else 0,
        general_tokens=int(general_blocks.numel()) if general_blocks is not None else 0,
        max_new_tokens=max_new_tokens,
        seconds=seconds,
    )


def chat_table(r: ChatEvalResult) -> list[str]:
    """Markdown rows: every family size beside ShortGPT at its layer count, then the teacher."""
    nq = len(r.questions)
    lines = [
        "| size | layers | params | chat KL | QA | Python-docs ppl | general ppl "
        "| ShortGPT chat KL | ShortGPT QA | ShortGPT general ppl |",
        "| --- " * 10 + "|",
    ]

    def qa(p: ChatPoint | None) -> str:
        return "-" if p is None or p.qa_correct is None else f"{p.qa_correct}/{nq}"

    for p in [*r.of("size"), *([r.teacher] if r.teacher is not None else [])]:
        sg = r.shortgpt_at(p.num_layers) if p.kind == "size" else None
        sg = sg if sg is not None and sg.kind == "shortgpt" else None
        name = f"{p.name} (dominated)" if p.dominated else p.name
        lines.append(
            f"| {name} | {p.num_layers} | {p.params / 1e6:.1f}M | {_num(p.chat_kl)} | {qa(p)} | {_ppl(p.pydoc_ppl)} | "
            f"{_ppl(p.general_ppl)} | {_num(sg.chat_kl) if sg else '-'} | {qa(sg)} | "
            f"{_ppl(sg.general_ppl) if sg else '-'} |"
        )
    return lines


def chat_markdown(r: ChatEvalResult, sample: int = 10) -> str:
    """The chat section of the eval report: what was measured, the verdicts, the table, and the
    replies of a few sizes to the first ``sample`` questions."""
    nq = len(r.questions)
    what = []
    if r.chat_tokens:
        what.append(
            f"chat KL = KL(teacher || size) in nats per response token on {r.chat_conversations} held-out teacher "
            f"conversations ({r.chat_tokens:,} response tokens)"
        )
    if nq:
        what.append(
            f"QA = questions answered correctly of {nq} easy questions (greedy, at most {r.max_new_tokens} new "
            "tokens; correct when an accepted answer occurs in the reply as a whole word, ignoring case)"
        )
    if r.pydoc_tokens:
        what.append(f"Python-docs ppl on {r.pydoc_tokens:,} held-out tokens")
    if r.general_tokens:
        what.append(f"general ppl on {r.general_tokens:,} tokens of {r.general_name}")
    took = ", ".join(f"{k} {v / 60:.1f} min" for k, v in r.seconds.items())
    out = [
        "### What a chat user feels",
        "",
        "; ".join(what) + f". ShortGPT: the teacher cut to the same layer count, no training. Took {took}.",
        "",
        *r.verdicts(),
        "",
        *chat_table(r),
    ]
    if r.replies and nq:
        shown = _reply_columns(r)
        out += [
            "",
            f"Replies to the first {min(sample, nq)} questions:",
            "",
            "| question | " + " | ".join(shown) + " |",
            "| --- " * (len(shown) + 1) + "|",
        ]
        for i, item in enumerate(r.questions[:sample]):
            cells = [_cell(r.replies[name][i], item) for name in shown]
            out.append(f"| {item.question} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def _reply_columns(r: ChatEvalResult, count: int = 4) -> list[str]:
    """Up to ``count`` served sizes spread from the smallest to the teacher."""
    names = [p.name for p in r.served()] + ([r.teacher.name] if r.teacher is not None else [])
    names = [nm for nm in dict.fromkeys(names) if nm in r.replies]
    if len(names) <= count:
        return names
    picks = sorted({round(i * (len(names) - 1) / (count - 1)) for i in range(count)})
    return [names[i] for i in picks]


def _cell(reply: str, item: QAItem) -> str:
    text = " ".join(reply.split()).replace("|", "\\|")
    return f"{'✓' if item.correct(reply) else '✗'} {text}"


def chat_plot(r: ChatEvalResult, axes: Sequence[Any]) -> None:
    """Four panels against millions of parameters: chat KL (log), QA accuracy, Python-docs and
    general-text perplexity (log); the family's sizes, ShortGPT and the teacher."""
    nq = len(r.questions)
    panels = [
        ("chat KL to the teacher, nats/response token (log)", lambda p: p.chat_kl, True),
        (
            f"QA accuracy ({nq} questions)",
            lambda p: p.qa_correct / nq if p.qa_correct is not None and nq else None,
            False,
        ),
        ("Python-docs perplexity (log)", lambda p: p.pydoc_ppl, True),
        (f"general-text perplexity (log): {r.general_name}", lambda p: p.general_ppl, True),
    ]
    teacher = r.teacher
    for ax, (title, value, log) in zip(axes, panels, strict=False):
        for kind, style in (
            ("size", dict(marker="o", color="black", lw=2)),
            ("shortgpt", dict(marker="s", ls=":", color="tab:red")),
        ):
            pts = [p for p in r.of(kind) if not p.dominated and value(p) is not None]
            if kind == "shortgpt" and teacher is not None and value(teacher) is not None:
                pts = [*pts, teacher]
            ys = [value(p) for p in pts]
            if log:
                pts, ys = [p for p, y in zip(pts, ys, strict=True) if y and y > 0], [y for y in ys if y and y > 0]
            ax.plot([p.params / 1e6 for p in pts], ys, label="served sizes" if kind == "size" else "ShortGPT", **style)
        if teacher is not None and value(teacher) is not None and (not log or (value(teacher) or 0) > 0):
            ax.scatter(
                [teacher.params / 1e6],
                [value(teacher)],
                marker="*",
                s=160,
                color="tab:green",
                zorder=5,
                label="teacher",
            )
        if log:
            ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("parameters (millions)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)


def accuracy_summary(r: ChatEvalResult) -> str:
    """One line per plan for the terminal: chat KL, QA, both perplexities."""
    nq = len(r.questions)
    rows = [f"{'plan':<14} {'layers':>6} {'chat KL':>8} {'QA':>8} {'pydoc ppl':>10} {'general ppl':>12}"]
    for p in [*r.of("size"), *r.of("shortgpt"), *([r.teacher] if r.teacher else [])]:
        qa = f"{p.qa_correct}/{nq}" if p.qa_correct is not None else "-"
        name = p.name + ("*" if p.dominated else "")
        rows.append(
            f"{name:<14} {p.num_layers:>6} {_num(p.chat_kl):>8} {qa:>8} "
            f"{_ppl(p.pydoc_ppl):>10} {_ppl(p.general_ppl):>12}"
        )
    return "\n".join(rows)
