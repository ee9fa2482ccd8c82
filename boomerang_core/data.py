"""Text for distillation and evaluation, with held-out splits that distillation never sees.

Sources:

- ``"pydoc"`` or ``"builtin"`` (the default, always present offline): Python's own documentation. Training text is
  every standard-library docstring (read with :mod:`ast`, nothing is imported) plus most of
  ``pydoc_data.topics``; a fixed set of topics is held out for evaluation and another, disjoint set
  for calibration (the KL patch-order search). About 0.45M tokens in all.
- a text file or a folder of text files (``.txt``, ``.md``, ``.rst``, ``.text``, searched
  recursively).
- ``"hf:<dataset id>[:<config>]"``: a hub dataset's ``text`` column, when the optional ``datasets``
  package is installed and the hub is reachable.

Splits are by a hash of each document's name (topic name, file path, row index), so they are the
same on every machine and run, and a document lies in exactly one split.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib
import math
import sysconfig
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from boomerang_core.errors import CorpusError

DEFAULT_SOURCE = "pydoc"
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
# Per-mille buckets of the name hash: [0, CALIB) calibration, [CALIB, CALIB + HELDOUT) evaluation.
CALIB_PER_MILLE = 100
HELDOUT_PER_MILLE = 200
# Standard-library folders whose docstrings are tests, demos or vendored code rather than docs.
_SKIP_DIRS = frozenset(
    {
        "test",
        "tests",
        "idle_test",
        "site-packages",
        "dist-packages",
        "__pycache__",
        "lib2to3",
        "turtledemo",
        "idlelib",
        "ensurepip",
        "tkinter",
    }
)


@dataclass(frozen=True)
class Corpus:
    """Three disjoint lists of documents. ``heldout`` is for evaluation, ``calib`` for searches
    that pick a patch order; distillation uses ``train`` only."""

    train: list[str]
    heldout: list[str]
    calib: list[str]

    def without_leaks(self) -> Corpus:
        """Remove from training (and calibration) text every paragraph that also occurs in the
        held-out (and calibration) text: documents repeat each other (a ``pydoc`` topic on
        compound statements quotes the ``for`` topic), and held-out text must be unseen."""
        heldout = _paragraph_set(self.heldout)
        calib = _drop_paragraphs(self.calib, heldout)
        train = _drop_paragraphs(self.train, heldout | _paragraph_set(calib))
        return Corpus(train=train, heldout=self.heldout, calib=calib)


def _paragraphs(text: str) -> list[str]:
    return [p for p in text.split("\n\n") if p.strip()]


def _paragraph_set(texts: Sequence[str]) -> set[str]:
    return {p.strip() for t in texts for p in _paragraphs(t) if len(p.strip()) >= 40}


def _drop_paragraphs(texts: Sequence[str], seen: set[str]) -> list[str]:
    out = []
    for text in texts:
        kept = [p for p in _paragraphs(text) if p.strip() not in seen]
        if kept:
            out.append("\n\n".join(kept))
    return out


def corpus_texts(
    source: str | Path | None = None, max_texts: int | None = None
) -> tuple[list[str], list[str], list[str]]:
    """``(train_texts, heldout_texts, calib_texts)`` for a source (see the module docstring).

    ``max_texts`` caps how many rows a hub dataset contributes (it is ignored for local sources).
    """
    corpus = load_corpus(source, max_texts=max_texts)
    return corpus.train, corpus.heldout, corpus.calib


def load_corpus(source: str | Path | None = None, max_texts: int | None = None) -> Corpus:
    src = DEFAULT_SOURCE if source is None else source
    if isinstance(src, str) and src in (DEFAULT_SOURCE, "builtin"):
        return pydoc_corpus()
    if isinstance(src, str) and src.startswith("hf:"):
        return split_named(_hub_documents(src[3:], max_texts or 20_000))
    path = Path(src).expanduser()
    if not path.exists():
        raise CorpusError(
            f"corpus source '{src}' not found: give '{DEFAULT_SOURCE}' (built in), a text file, a folder of "
            f"{'/'.join(TEXT_SUFFIXES)} files, or 'hf:<dataset id>'"
        )
    return split_named(_file_documents(path))


# --- the built-in corpus ----------------------------------------------------------------------


@functools.cache
def pydoc_corpus() -> Corpus:
    """Python's documentation: held-out and calibration text are ``pydoc_data.topics`` entries
    only, so evaluation is on prose the student was never trained on."""
    import pydoc_data.topics

    topics = sorted(pydoc_data.topics.topics.items())
    split = split_named([(f"topic:{name}", text) for name, text in topics])
    return Corpus(train=split.train + stdlib_docstrings(), heldout=split.heldout, calib=split.calib).without_leaks()


@functools.cache
def stdlib_docstrings() -> list[str]:
    """One document per standard-library module: its module, class and function docstrings,
    each under the name it documents. Deterministic (sorted paths); parses, never imports."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs: list[str] = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in _SKIP_DIRS for part in rel.parts[:-1]):
            continue
        text = _module_docstrings(path, ".".join(rel.with_suffix("").parts))
        if text:
            docs.append(text)
    return docs


def _module_docstrings(path: Path, module: str) -> str:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, OSError):
        return ""
    parts: list[str] = []
    doc = ast.get_docstring(tree)
    if doc:
        parts.append(f"Module {module}\n\n{doc}")
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node)
            if doc and len(doc) >= 40:
                kind = "class" if isinstance(node, ast.ClassDef) else "def"
                parts.append(f"{kind} {node.name}\n\n{doc}")
    return "\n\n".join(parts)


# --- other sources ----------------------------------------------------------------------------


def _file_documents(path: Path) -> list[tuple[str, str]]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix.lower() in TEXT_SUFFIXES)
    if not files:
        raise CorpusError(f"no text files ({', '.join(TEXT_SUFFIXES)}) under {path}")
    docs: list[tuple[str, str]] = []
    for f in files:
        try:
            text = f.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            raise CorpusError(f"cannot read {f}: {exc}") from None
        # Split each file into ~4K-character chunks at paragraph breaks, so that even a single file
        # gives held-out and calibration text.
        for i, chunk in enumerate(_chunks(text, 4000)):
            docs.append((f"{f.relative_to(path) if path.is_dir() else f.name}#{i}", chunk))
    if not docs:
        raise CorpusError(f"the text files under {path} are empty")
    return docs


def _chunks(text: str, size: int) -> Iterable[str]:
    buf: list[str] = []
    n = 0
    for para in text.split("\n\n"):
        if not para.strip():
            continue
        buf.append(para)
        n += len(para) + 2
        if n >= size:
            yield "\n\n".join(buf)
            buf, n = [], 0
    if buf:
        yield "\n\n".join(buf)


def _hub_documents(spec: str, max_texts: int) -> list[tuple[str, str]]:
    try:
        datasets: Any = importlib.import_module("datasets")
    except ImportError:
        raise CorpusError(
            "a hub dataset needs the optional 'datasets' package (pip install datasets); "
            f"or use the built-in '{DEFAULT_SOURCE}' corpus or a local text folder"
        ) from None
    name, _, config = spec.partition(":")
    try:
        rows = datasets.load_dataset(name, config or None, split="train", streaming=True)
        docs = []
        for i, row in enumerate(rows):
            if i >= max_texts:
                break
            if "text" not in row:
                raise CorpusError(f"dataset '{name}' has no 'text' column (columns: {', '.join(row)})")
            docs.append((f"{name}#{i}", str(row["text"])))
    except CorpusError:
        raise
    except Exception as exc:  # the hub client raises many types: offline, gated, missing
        raise CorpusError(f"cannot load hub dataset '{name}': {exc}") from None
    if not docs:
        raise CorpusError(f"hub dataset '{name}' gave no rows")
    return docs


# --- splitting and tokenising -----------------------------------------------------------------


def split_bucket(name: str) -> int:
    """A stable per-mille bucket (0..999) for a document name."""
    return int.from_bytes(hashlib.sha1(name.encode()).digest()[:4], "big") % 1000


def split_named(docs: Sequence[tuple[str, str]]) -> Corpus:
    """Split ``(name, text)`` pairs by name hash: 10% calibration, 20% held-out, the rest train.

    Every split gets at least one document when there are three or more (the first names by
    bucket are moved), so small corpora still evaluate.
    """
    ranked = sorted(docs, key=lambda d: (split_bucket(d[0]), d[0]))
    buckets = [split_bucket(n) for n, _ in ranked]
    calib = [t for (_, t), b in zip(ranked, buckets, strict=True) if b < CALIB_PER_MILLE]
    heldout = [
        t
        for (_, t), b in zip(ranked, buckets, strict=True)
        if CALIB_PER_MILLE <= b < CALIB_PER_MILLE + HELDOUT_PER_MILLE
    ]
    train = [t for (_, t), b in zip(ranked, buckets, strict=True) if b >= CALIB_PER_MILLE + HELDOUT_PER_MILLE]
    if len(ranked) >= 3 and not (calib and heldout and train):
        texts = [t for _, t in ranked]
        calib, heldout, train = texts[:1], texts[1 : max(2, len(texts) // 5 + 1)], texts[max(2, len(texts) // 5 + 1) :]
    if not train:
        raise CorpusError(f"the corpus has only {len(ranked)} document(s): too little to train on")
    return Corpus(train=train, heldout=heldout, calib=calib).without_leaks()


def token_ids(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[int]:
    """All texts as one token stream, each followed by the end-of-text token."""
    if not texts:
        return []
    eos = tokenizer.eos_token_id
    encoded = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
    stream: list[int] = []
    for ids in encoded:
        stream.extend(ids)
        if eos is not None:
            stream.append(int(eos))
    return stream


def token_blocks(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], seq_len: int, max_blocks: int | None = None
) -> torch.Tensor:
    """Non-overlapping blocks of ``seq_len`` tokens cut from the texts' token stream, in order:
    a LongTensor of shape ``(n, seq_len)``; the tail shorter than ``seq_len`` is dropped.

    ``max_blocks`` keeps the first ``max_blocks`` blocks (deterministic). Raises
    :class:`CorpusError` if the texts do not fill one block.
    """
    if seq_len < 2:
        raise CorpusError(f"seq_len must be at least 2 tokens, got {seq_len}")
    if max_blocks is not None and max_blocks < 1:
        raise CorpusError(f"max_blocks must be at least 1, got {max_blocks}")
    stream = token_ids(tokenizer, texts)
    n = len(stream) // seq_len
    if max_blocks is not None:
        n = min(n, max_blocks)
    if n == 0:
        raise CorpusError(f"the texts give {len(stream)} tokens: fewer than one block of {seq_len}")
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)  # (n, seq_len)


# --- teacher conversations and the data mix ----------------------------------------------------


def chat_stream(
    teacher: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    tokens: int,
    *,
    split: str = "train",
    progress: bool = True,
    engine: str = "auto",
) -> list[int]:
    """At least ``tokens`` tokens of the teacher's own conversations (:mod:`boomerang_core.synth`),
    rendered by its chat template, as one stream. Asks the synthesiser for more conversations
    until they fill ``tokens`` (each call extends the cached list)."""
    from boomerang_core.synth import conversation_ids, teacher_conversations

    if tokens <= 0:
        return []
    count = max(8, tokens // 200)  # ~200 tokens a conversation, corrected below
    while True:
        conversations = teacher_conversations(teacher, count, split=split, progress=progress, engine=engine)
        stream = conversation_ids(tokenizer, conversations)
        if len(stream) >= tokens:
            return stream
        per = max(1.0, len(stream) / max(1, len(conversations)))
        count = len(conversations) + math.ceil((tokens - len(stream)) / per * 1.1) + 1


def mix_blocks(
    general: torch.Tensor, chat: torch.Tensor, total: int, chat_fraction: float, seed: int = 0
) -> torch.Tensor:
    """``total`` blocks: ``round(chat_fraction * total)`` chat blocks (the first ones, in order)
    and the rest drawn from ``general`` without replacement by a seeded permutation (so that every
    part of the general corpus can be picked, as the trainer's shuffle does without a mix).

    Shapes: ``general`` (n, seq_len), ``chat`` (m, seq_len) -> (total, seq_len)."""
    n_chat = round(chat_fraction * total)
    n_general = total - n_chat
    if n_chat > chat.shape[0]:
        raise CorpusError(f"the mix needs {n_chat} chat blocks; only {chat.shape[0]} were given")
    if n_general > general.shape[0]:
        raise CorpusError(
            f"the mix needs {n_general} blocks of the general corpus; it has {general.shape[0]}: "
            "lower the token budget or raise chat_fraction"
        )
    order = torch.randperm(general.shape[0], generator=torch.Generator().manual_seed(seed))[:n_general]
    return torch.cat([chat[:n_chat], general[order.sort().values]])  # (total, seq_len)
