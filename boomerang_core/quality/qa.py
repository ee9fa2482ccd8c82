"""Answer accuracy: does a size still answer easy questions the way a chat user asks them?

The question set (``qa.json`` beside this module, written for this project) holds easy questions
with short factual answers: capitals, arithmetic, colours, animals, opposites, single-word
translations and general facts. Each question has a list of accepted answers. The 120 questions
were chosen from 353 drafted ones as those the demo teacher (SmolLM2-135M-Instruct, a weak model)
answered correctly within 16 tokens, so the score of a size reads as the share of the teacher's
answers it keeps; no colour question made it (the teacher answered none of 36 within 16 tokens).

The rule, applied to the greedy reply (the special tokens removed): a reply is correct when any
accepted answer occurs in it as a whole word or phrase, ignoring case. "Whole" means the
characters on either side of the match are not letters, digits or underscores (Python's ``\\w``),
so ``4`` matches "2 + 2 = 4." but not "14", and ``cat`` matches "The cat." but not "category".
Whitespace inside a multi-word answer matches any whitespace. No accepted answer occurs as a
whole word in its own question (tested), so a reply that only repeats the question never counts.

Every plan answers the same prompts (the question as a single user turn through the tokenizer's
chat template, with its generation prompt), greedily, ``max_new_tokens`` at most, in batches
(left padding), on a size built from the store: teacher and sizes in one run, so their numbers
compare.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from boomerang_core.assemble import build
from boomerang_core.errors import StudentConfigError
from boomerang_core.plan import SizePlan
from boomerang_core.store import LayerStore

QA_FILE = Path(__file__).with_name("qa.json")
QA_MAX_NEW_TOKENS = 16  # the answers are a word or a number; 16 tokens is a short sentence around it


@dataclass(frozen=True)
class QAItem:
    question: str
    answers: tuple[str, ...]
    topic: str = ""

    def correct(self, reply: str) -> bool:
        return answer_matches(reply, self.answers)


@dataclass(frozen=True)
class QAResult:
    """One plan's answers: ``replies[i]`` to question ``i``, ``correct[i]`` by the matching rule."""

    replies: list[str]
    correct: list[bool]

    @property
    def accuracy(self) -> float:
        """Share of the questions answered correctly, 0..1."""
        return sum(self.correct) / len(self.correct) if self.correct else 0.0

    @property
    def num_correct(self) -> int:
        return sum(self.correct)


@functools.cache
def load_qa(path: str | Path | None = None) -> tuple[QAItem, ...]:
    """The question set: ``qa.json`` shipped with the package, or another file of the same shape
    (a JSON list of ``{"question", "answers", "topic"}``)."""
    data = json.loads(Path(path or QA_FILE).read_text(encoding="utf-8"))
    items = tuple(
        QAItem(question=d["question"], answers=tuple(d["answers"]), topic=d.get("topic", "")) for d in data["items"]
    )
    for item in items:
        if not item.question.strip() or not item.answers or not all(a.strip() for a in item.answers):
            raise ValueError(f"question set {path or QA_FILE}: empty question or answer in {item}")
    return items


@functools.cache
def _answer_pattern(answer: str) -> re.Pattern[str]:
    words = [re.escape(w) for w in answer.split()]
    return re.compile(r"(?<!\w)" + r"\s+".join(words) + r"(?!\w)", re.IGNORECASE)


def answer_matches(reply: str, answers: Sequence[str]) -> bool:
    """True when any of ``answers`` occurs in ``reply`` as a whole word or phrase, ignoring case
    (see the module docstring)."""
    return any(_answer_pattern(a).search(reply) for a in answers)


def chat_prompts(tokenizer: PreTrainedTokenizerBase, questions: Sequence[str]) -> list[str]:
    """Each question as one user turn, rendered by the chat template with its generation prompt."""
    if not getattr(tokenizer, "chat_template", None):
        raise StudentConfigError("answer accuracy needs a tokenizer with a chat template")
    return [
        str(tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True))
        for q in questions
    ]


@torch.no_grad()
def greedy_replies(
    store: LayerStore,
    plan: SizePlan,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = QA_MAX_NEW_TOKENS,
    batch_size: int = 50,
) -> list[str]:
    """The greedy reply of ``plan`` to each rendered prompt, special tokens removed, stopping at the
    end of turn (the generation config's EOS) or after ``max_new_tokens`` tokens."""
    tokenizer = store.tokenizer
    if tokenizer is None:
        raise StudentConfigError("answering questions needs the family's tokenizer")
    model: Any = build(plan, store)  # GenerationMixin.generate: typed loosely by transformers
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    replies: list[str] = []
    for start in range(0, len(prompts), batch_size):
        batch = list(prompts[start : start + batch_size])
        enc = tokenizer(batch, add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt")
        ids = enc["input_ids"].to(store.device)  # (batch, prompt)
        out = model.generate(
            input_ids=ids,
            attention_mask=enc["attention_mask"].to(store.device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=pad_id,
        )
        replies += [s.strip() for s in tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)]
    return replies


def answer_questions(
    store: LayerStore,
    plans: Sequence[SizePlan],
    items: Sequence[QAItem] | None = None,
    *,
    max_new_tokens: int = QA_MAX_NEW_TOKENS,
    batch_size: int = 50,
    progress: bool = False,
) -> list[QAResult]:
    """Every plan's greedy answers to ``items`` (default: the shipped set) and which are correct, in
    the order of ``plans``. Each distinct plan (by :attr:`SizePlan.key`) answers once."""
    if store.tokenizer is None:
        raise StudentConfigError("answering questions needs the family's tokenizer")
    items = list(items if items is not None else load_qa())
    prompts = chat_prompts(store.tokenizer, [it.question for it in items])
    unique = list({p.key: p for p in plans}.values())
    results: dict[str, QAResult] = {}
    for plan in tqdm(unique, desc="questions", unit="plan", disable=not progress, leave=False):
        replies = greedy_replies(store, plan, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
        results[plan.key] = QAResult(
            replies=replies, correct=[it.correct(r) for it, r in zip(items, replies, strict=True)]
        )
    return [results[p.key] for p in plans]
