"""The corpus: held-out and calibration text that distillation never sees; token blocks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from boomerang_core.data import corpus_texts, load_corpus, split_named, token_blocks
from boomerang_core.errors import CorpusError
from tests.tiny import tiny_tokenizer


def test_builtin_splits_are_disjoint_and_stable() -> None:
    train, heldout, calib = corpus_texts()
    assert len(train) > 100 and len(heldout) >= 5 and len(calib) >= 3
    assert not set(train) & set(heldout)
    assert not set(train) & set(calib)
    assert not set(heldout) & set(calib)
    # no held-out paragraph hides inside a training text either
    paragraphs = [p for t in heldout for p in t.split("\n\n") if len(p) > 200][:50]
    joined = "\n".join(train)
    assert paragraphs and not any(p in joined for p in paragraphs)
    assert corpus_texts("builtin") == (train, heldout, calib)


def test_split_depends_on_names_only() -> None:
    docs = [(f"doc{i}", f"text {i}") for i in range(200)]
    a = split_named(docs)
    b = split_named(list(reversed(docs)))
    assert a == b
    assert 10 <= len(a.calib) <= 35 and 25 <= len(a.heldout) <= 60


def test_text_folder(tmp_path: Path) -> None:
    for i in range(12):
        (tmp_path / f"f{i}.txt").write_text(f"file {i}\n\n" + "words and more words. " * 50)
    (tmp_path / "ignored.bin").write_bytes(b"\x00\x01")
    corpus = load_corpus(tmp_path)
    assert corpus.train and corpus.heldout and corpus.calib
    assert not set(corpus.train) & set(corpus.heldout)
    single = load_corpus(tmp_path / "f0.txt")
    assert single.train


def test_bad_sources_say_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="not found"):
        corpus_texts(tmp_path / "missing")
    with pytest.raises(CorpusError, match="no text files"):
        corpus_texts(tmp_path)
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(CorpusError, match="datasets"):
            corpus_texts("hf:some/dataset")


def test_token_blocks() -> None:
    tok = tiny_tokenizer()
    texts = ["alpha beta gamma " * 40, "delta epsilon " * 40]
    blocks = token_blocks(tok, texts, 16)
    assert blocks.dtype == torch.long and blocks.shape[1] == 16
    stream = tok(texts[0], add_special_tokens=False)["input_ids"]
    assert blocks.flatten()[:32].tolist() == stream[:32]
    assert (blocks == tok.eos_token_id).any()  # documents are separated
    assert token_blocks(tok, texts, 16, max_blocks=2).shape == (2, 16)
    with pytest.raises(CorpusError, match="fewer than one block"):
        token_blocks(tok, ["x"], 64)
    with pytest.raises(CorpusError):
        token_blocks(tok, texts, 1)
