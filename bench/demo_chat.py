"""What a chat user gets from each size of the demo family: chat KL to the teacher, answers to easy
questions, Python-docs and general-text perplexity; for the served sizes, ShortGPT at the same layer
counts and the teacher, in one run on the same questions; beside them the previous demo student's
committed Python-docs perplexities (distilled on Python's documentation only, chosen by perplexity).

    .venv/bin/python bench/demo_chat.py [--conversations 32] [--tokens 2048] [--threads 0]

Needs the built demo family in the cache (a first ``make serve`` builds it). Writes
``bench/results/demo_chat.md``, ``.png`` and ``.json``. The build's own stage times come from its
status file (``build-status.json`` beside the family), as the server showed them.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from boomerang_core import demo
from boomerang_core.data import corpus_texts, token_blocks
from boomerang_core.family import Family
from boomerang_core.quality.baselines import block_influence
from boomerang_core.quality.chat import chat_set, general_blocks
from boomerang_core.quality.chateval import ChatEvalResult, accuracy_summary, chat_markdown, chat_plot, evaluate_chat
from boomerang_core.store import LayerStore
from boomerang_core.synth import teacher_conversations

RESULTS = Path(__file__).resolve().parent / "results"
PREVIOUS = RESULTS / "demo_front_family" / "family.json"  # the previous student's served front, committed
METRIC_WORDS = {
    "chat_kl": "KL to the teacher per response token on the teacher's calibration conversations",
    "ppl": "calibration perplexity",
}


def previous_front() -> dict[int, float]:
    """Layer count -> held-out Python-docs perplexity of the previous demo family's served size
    (2,048 held-out tokens: the same text and count this script uses by default)."""
    sizes = json.loads(PREVIOUS.read_text())["sizes"]
    return {len(s["plan"]["layers"]): float(s["perplexity"]) for s in sizes if s.get("perplexity") is not None}


def build_times(status: Path) -> dict[str, Any]:
    if not status.is_file():
        return {}
    data = json.loads(status.read_text())
    return {"stage_seconds": data.get("stage_seconds", {}), "elapsed_s": data.get("elapsed_s")}


def report(r: ChatEvalResult, family: Family, previous: dict[int, float], times: dict[str, Any], cmd: str) -> str:
    recipe = family.info.get("recipe", {})
    lines = [
        "# The demo family as a chat user meets it",
        "",
        f"Family `{family.name}` (demo family version {family.info.get('demo_family_version')}): a student of "
        f"{family.store.spec.num_student_layers if family.store.spec else '?'} layers distilled on "
        f"{recipe.get('token_budget', 0):,} tokens, {recipe.get('chat_fraction', 0):.0%} of them the teacher's own "
        f"conversations (the rest Python's documentation); the plan served at each layer count is the one with the "
        f"lowest {METRIC_WORDS.get(family.info.get('metric', 'ppl'), family.info.get('metric'))}; the largest size "
        "is the teacher itself.",
        "",
        chat_markdown(r),
        "## The previous demo student (committed numbers)",
        "",
        "Distilled on 150,000 tokens of Python's documentation only, sizes chosen by Python-docs perplexity "
        "(`bench/results/demo_front.md`); its weights are not kept, so only its held-out Python-docs perplexity "
        "(the same 2,048 tokens) can be set beside today's sizes.",
        "",
        "| layers | served now: Python-docs ppl | previous student: Python-docs ppl | now: chat KL | now: QA |",
        "| --- | --- | --- | --- | --- |",
    ]
    nq = len(r.questions)
    for p in r.served():
        prev = previous.get(p.num_layers)
        lines.append(
            f"| {p.num_layers} | {p.pydoc_ppl:.1f} | {f'{prev:.1f}' if prev else '-'} | "
            f"{p.chat_kl:.3f} | {p.qa_correct}/{nq} |"
            if p.pydoc_ppl is not None and p.chat_kl is not None
            else f"| {p.num_layers} | - | {prev} | - | - |"
        )
    if times.get("stage_seconds"):
        secs = times["stage_seconds"]
        lines += [
            "",
            "## What the build cost (the first `make serve`, this machine)",
            "",
            "| stage | minutes |",
            "| --- | --- |",
            *(f"| {k} | {v / 60:.1f} |" for k, v in secs.items()),
            f"| all stages (from the build's start) | {sum(secs.values()) / 60:.1f} |",
        ]
    lines += ["", f"Command: `{cmd}`", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--conversations", type=int, default=32, help="held-out teacher conversations (chat KL)")
    ap.add_argument("--tokens", type=int, default=2048, help="held-out tokens of each text (Python docs, general)")
    ap.add_argument("--questions", type=int, default=None, help="first N questions (default: all)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default=str(RESULTS / "demo_chat"), help="output path without suffix")
    ap.add_argument("--student", help="another student of the demo teacher (with family.json): a recipe being tried")
    ap.add_argument("--status", help="its build's status file (default: the demo's build-status.json)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.time()
    if a.student:
        student = Path(a.student)
    elif demo.demo_ready():
        student = demo.ensure_demo(progress=False)
    else:
        raise SystemExit("the demo family is not built yet: run `make serve` (or `boomerang distill`) first")
    status = Path(a.status) if a.status else demo.demo_dir() / "build-status.json"
    teacher = demo.ensure_teacher(progress=False)
    store = LayerStore.load(teacher, student)
    family = Family.load(student, store)
    assert store.tokenizer is not None
    conversations = teacher_conversations(teacher, a.conversations, split="heldout")
    _, heldout, calib = corpus_texts(None)
    blocks = max(1, a.tokens // 256)
    pydoc = token_blocks(store.tokenizer, heldout, 256, max_blocks=blocks)
    general = general_blocks(store.tokenizer, 256, max_blocks=blocks)
    influence = block_influence(store, token_blocks(store.tokenizer, calib, 256, max_blocks=4))
    from boomerang_core.quality.qa import load_qa

    questions = list(load_qa())[: a.questions] if a.questions else None
    result = evaluate_chat(
        store,
        [(s.name, s.plan, s.dominated) for s in family.sizes],
        influence=influence,
        chat=chat_set(store.tokenizer, conversations),
        questions=questions,
        pydoc_blocks=pydoc,
        general_blocks=general,
        family=family.name,
        progress=True,
    )
    print(accuracy_summary(result), flush=True)
    cmd = "python bench/demo_chat.py" + (f" --conversations {a.conversations}" if a.conversations != 32 else "")
    cmd += " --student STUDENT --status STATUS --out OUT" if a.student else ""
    out = Path(a.out)
    prev, times = previous_front(), build_times(status)
    out.with_suffix(".md").write_text(report(result, family, prev, times, cmd))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(20, 4.6))
    chat_plot(result, axes)
    params = {s.num_layers: s.params / 1e6 for s in family.sizes}
    xs = [params[n] for n in sorted(prev) if n in params]
    axes[2].plot(xs, [prev[n] for n in sorted(prev) if n in params], marker="x", ls="--", color="tab:gray",
                 label="previous student (committed)")  # fmt: skip
    axes[2].legend(fontsize=7)
    fig.suptitle(f"{family.name}: what a chat user gets at each size (one run)")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    points = [vars(p) for p in result.points]
    out.with_suffix(".json").write_text(
        json.dumps(
            {
                "points": points,
                "verdicts": result.verdicts(),
                "questions": len(result.questions),
                "chat_tokens": result.chat_tokens,
                "seconds": result.seconds,
                "previous_pydoc_ppl": prev,
                "build": times,
            },
            indent=1,
        )
        + "\n"
    )
    print(f"wrote {out}.md/.png/.json in {(time.time() - t0) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
