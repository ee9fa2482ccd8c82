"""Incremental detokenisation and stop strings for one request's stream.

Text is released only when it is final: a token that ends inside a multi-byte character waits for
the token that completes it, and text that could still be the start of a stop string waits until it
cannot. The concatenation of every released piece equals decoding all generated tokens at once.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers.tokenization_utils_base import PreTrainedTokenizerBase

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Decodes only a short window of recent tokens per step (cost independent of the length so far).

    ``prefix`` .. ``read`` are tokens already released; decoding ``prefix ..`` and dropping the text of
    ``prefix .. read`` gives the new text with the context the tokenizer needs for spaces and merges.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0
        self._released = ""  # decode(ids[prefix:read]), cached

    def _decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=self.skip_special_tokens))

    def push(self, token_id: int) -> str:
        """Add one token; return the text that became final with it (often '' mid-character)."""
        self.ids.append(token_id)
        text = self._decode(self.ids[self.prefix :])
        if len(text) <= len(self._released) or text.endswith(REPLACEMENT) or not text.startswith(self._released):
            return ""
        delta = text[len(self._released) :]
        self.prefix, self.read = self.read, len(self.ids)
        self._released = self._decode(self.ids[self.prefix : self.read])
        return delta

    def flush(self) -> str:
        """At the end of the stream: whatever is still held (an incomplete character as U+FFFD)."""
        text = self._decode(self.ids[self.prefix :])
        released = self._released if text.startswith(self._released) else ""
        self.prefix = self.read = len(self.ids)
        self._released = ""
        return text[len(released) :]


class StopStrings:
    """Holds back text that may begin a stop string; reports the first stop string completed.
    ``include``: the stop string ends the released text (vLLM's ``include_stop_str_in_output``)."""

    def __init__(self, stops: Sequence[str], include: bool = False) -> None:
        self.stops = tuple(s for s in stops if s)
        self.include = include
        self.held = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to release, whether a stop string was reached). Anything after the
        first stop string is never released, nor the stop string itself unless ``include``."""
        if not self.stops:
            return text, False
        buffer = self.held + text
        hits = [(i, len(s)) for s in self.stops if (i := buffer.find(s)) >= 0]
        if hits:
            self.held = ""
            start, length = min(hits)
            return buffer[: start + (length if self.include else 0)], True
        keep = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buffer)), keep, -1):
                if buffer.endswith(s[:n]):
                    keep = n
                    break
        self.held = buffer[len(buffer) - keep :] if keep else ""
        return buffer[: len(buffer) - keep], False

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held
