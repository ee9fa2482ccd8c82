"""A streamed completion read on a thread, for fault tests: its text, usage, error event and ``[DONE]``."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from tests.server.deploys import FAMILY
from tests.server.live import KEY, PROMPTS, Server

LONG = 480  # tokens of a long stream (the tiny family's context is 512)
AUTH = {"Authorization": f"Bearer {KEY}"}


@dataclass
class Stream:
    """One streamed completion read in a thread: its text pieces, whether it saw ``[DONE]``, its error event."""

    server: Server
    max_tokens: int = LONG
    size: str = "k5"
    pieces: list[str] = field(default_factory=list)
    done: bool = False
    error: dict[str, Any] | None = None
    failure: BaseException | None = None
    first: threading.Event = field(default_factory=threading.Event)
    ended_at: float | None = None
    finish_reason: str | None = None
    completion_tokens: int | None = None

    def start(self) -> Stream:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        body = {"model": FAMILY, "prompt": PROMPTS[1], "max_tokens": self.max_tokens, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}, "size": self.size,
                "ignore_eos": True}  # fmt: skip
        try:
            with httpx.stream("POST", f"{self.server.url}/v1/completions", json=body, headers=AUTH,
                              timeout=120) as response:  # fmt: skip
                for line in response.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        self.done = True
                        continue
                    event = json.loads(data)
                    if "error" in event:
                        self.error = event["error"]
                    else:
                        self.pieces.extend(c["text"] for c in event["choices"])
                        self.finish_reason = next((c["finish_reason"] for c in event["choices"]), self.finish_reason)
                        if event.get("usage"):
                            self.completion_tokens = event["usage"]["completion_tokens"]
                    self.first.set()
        except BaseException as exc:
            self.failure = exc
        finally:
            self.ended_at = time.monotonic()
            self.first.set()

    def join(self) -> Stream:
        self.thread.join(120)
        assert not self.thread.is_alive()
        return self


def open_streams(server: Server, count: int, timeout: float = 60, **kw: Any) -> list[Stream]:
    """``count`` streams (``kw`` as for ``Stream``) started at once, each past its first event unfailed."""
    streams = [Stream(server, **kw).start() for _ in range(count)]
    for s in streams:
        assert s.first.wait(timeout) and s.failure is None
    return streams
