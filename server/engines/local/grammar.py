"""Structured outputs for the in-process engine: grammar-constrained decoding with xgrammar.

A :class:`Grammars` (one per engine) holds xgrammar's view of the tokenizer and its compiler, whose
cache keeps each compiled grammar by its source, so a schema sent again (or by the ``n`` choices of
one request) compiles once. A request with a :class:`~server.engines.base.StructuredSpec` gets its
own :class:`Constraint`, a matcher over that grammar: before a token is chosen, every token the
grammar does not allow next is masked to -inf in that request's logits row; the chosen token then
advances the matcher, and the request ends ("stop") when the grammar is complete and a stop token
was chosen. Unconstrained rows cost nothing.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from server.engines.base import StructuredSpec

if TYPE_CHECKING:  # xgrammar is imported on first use: a server that never constrains an output skips its import
    import xgrammar as xgr

KINDS = ("json", "json_object", "regex", "choice", "grammar")
# whitespace characters allowed between two JSON tokens: without a bound a model that prefers
# whitespace (small or random ones do) writes it until max_tokens and the object never closes
MAX_WHITESPACE = 16
CACHED_GRAMMARS = 64
# xgrammar 0.2.8 writes a string with minLength/maxLength as this character class, which lets raw
# control characters (U+0000-U+001F but CR and LF) into the string: invalid JSON (xgrammar issue
# #800). The JSON string characters of its own basic_string rule replace it.
_LOOSE_STRING_CHAR = r"[^\"\\\r\n]"
_JSON_STRING_CHAR = r"[^\0-\x1f\"\\]"
# xgrammar's messages start with a time stamp and a source position: "[06:49:01] /x/y.cc:83: "
_NATIVE_PREFIX = re.compile(r"^\[[^\]]*\]\s+\S+:\d+:\s*")


class GrammarError(ValueError):
    """The spec does not compile: the client's error (a 400)."""


def choice_grammar(choices: Sequence[str]) -> str:
    """An EBNF grammar whose only sentences are ``choices`` (JSON escapes are EBNF string escapes)."""
    if not choices:
        raise GrammarError("choice needs at least one string")
    return "root ::= " + " | ".join(json.dumps(c) for c in choices)


def _native_message(exc: BaseException) -> str:
    """xgrammar's message without its time stamp and C++ source position, first line only."""
    lines = [line for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
    return _NATIVE_PREFIX.sub("", lines[0])


class Grammars:
    """xgrammar's tokenizer info and compiler for one tokenizer. ``vocab_size`` is the model's (the
    logits' width); ``stop_ids`` end a complete sentence; the tokenizer's other special tokens are
    never allowed inside a constrained output."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: Iterable[int]) -> None:
        import xgrammar as xgr

        stops = sorted(stop_ids)
        self.vocab_size = vocab_size
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stops)
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=2, cache_enabled=False)
        self._cache: OrderedDict[tuple[str, str], xgr.CompiledGrammar] = OrderedDict()
        special = set(getattr(tokenizer, "all_special_ids", ())) - set(stops)
        self.banned = torch.tensor(sorted(t for t in special if 0 <= t < vocab_size), dtype=torch.long)

    def compile(self, spec: StructuredSpec) -> xgr.CompiledGrammar:
        """The compiled grammar of ``spec``, kept by kind and value for the next request that sends it
        (the least recently used of :data:`CACHED_GRAMMARS` go); raises :class:`GrammarError`."""
        key = (spec.kind, spec.value)
        compiled = self._cache.get(key)
        if compiled is None:
            compiled = self._cache[key] = self._compile(spec)
            if len(self._cache) > CACHED_GRAMMARS:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        return compiled

    def _compile(self, spec: StructuredSpec) -> xgr.CompiledGrammar:
        import xgrammar as xgr

        try:
            if spec.kind in ("json", "json_object"):
                schema = spec.value if spec.kind == "json" else '{"type": "object"}'
                grammar = xgr.Grammar.from_json_schema(schema, max_whitespace_cnt=MAX_WHITESPACE)
                return self.compiler.compile_grammar(str(grammar).replace(_LOOSE_STRING_CHAR, _JSON_STRING_CHAR))
            if spec.kind == "regex":
                return self.compiler.compile_regex(spec.value)
            if spec.kind == "choice":
                return self.compiler.compile_grammar(choice_grammar(json.loads(spec.value)))
            if spec.kind == "grammar":
                return self.compiler.compile_grammar(spec.value)
        except (RuntimeError, ValueError, TypeError) as exc:
            if isinstance(exc, GrammarError):
                raise
            raise GrammarError(_native_message(exc)) from None
        raise GrammarError(f"unknown structured output kind {spec.kind!r}; one of {', '.join(KINDS)}")

    def constraint(self, spec: StructuredSpec) -> Constraint:
        import xgrammar as xgr

        return Constraint(xgr.GrammarMatcher(self.compile(spec)), self.banned)


class Constraint:
    """One request's position in its grammar."""

    def __init__(self, matcher: xgr.GrammarMatcher, banned: Tensor) -> None:
        self.matcher = matcher
        self.banned = banned
        self.broken = False  # a chosen token the grammar refused (every allowed token was held back)

    @property
    def ended(self) -> bool:
        """True once the output is a complete sentence closed by a stop token, or cannot go on."""
        return self.broken or self.matcher.is_terminated()

    def accept(self, token_id: int) -> None:
        if not self.ended and not self.matcher.accept_token(token_id):
            self.broken = True


def mask_rows(logits: Tensor, rows: Sequence[int], constraints: Sequence[Constraint]) -> None:
    """In place: in each of ``rows`` of ``logits`` (batch, vocab; float32 on the CPU), -inf for every
    token the row's constraint does not allow next. A row left with no finite logit (``min_tokens``
    holding back the only token the grammar allows) gets the grammar's tokens back at logit 0: the
    grammar wins."""
    import xgrammar as xgr

    bitmask = xgr.allocate_token_bitmask(logits.shape[0], logits.shape[-1])
    for row, c in zip(rows, constraints, strict=True):
        c.matcher.fill_next_token_bitmask(bitmask, row)
    xgr.apply_token_bitmask_inplace(logits, bitmask, indices=list(rows))
    for row, c in zip(rows, constraints, strict=True):
        logits[row, c.banned] = float("-inf")
        if not bool(torch.isfinite(logits[row]).any()):
            logits[row] = 0.0
            xgr.apply_token_bitmask_inplace(logits, bitmask, indices=[row])
            logits[row, c.banned] = float("-inf")
            if not bool(torch.isfinite(logits[row]).any()):  # only banned tokens: any token, the matcher refuses it
                logits[row] = 0.0
