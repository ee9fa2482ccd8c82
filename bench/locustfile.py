"""The boomerang load workload for locust: chat requests over several sizes, half streamed.

Run by ``bench/load_bench.py`` and ``tests/server/test_load.py``; by hand::

    LOAD_RECORDS=records.jsonl locust -f bench/locustfile.py --headless --host http://127.0.0.1:8000 \\
        -u 20 -r 2 -t 30s --stop-timeout 60

Each request is short and of fixed length (``ignore_eos``, ``max_tokens`` = LOAD_MAX_TOKENS) and asks
for logprobs, so every generated token arrives as exactly one stream chunk with one logprob entry:
the number of tokens streamed is counted exactly and compared with ``usage.completion_tokens``.

Every request writes two JSON lines to LOAD_RECORDS: ``{"kind": "sent", "id": ...}`` before it is
sent and ``{"kind": "done", "id": ..., ...}`` with its outcome, so a request that never reaches an
outcome shows as a ``sent`` without its ``done``. The outcome is also fired as a locust request event
(end-to-end time; 429s and errors as failures), so locust's own statistics and CSVs cover it too.

Environment (all optional but LOAD_RECORDS):

- ``LOAD_RECORDS``: the JSONL file (appended to).
- ``LOAD_SIZES``: comma-separated sizes to cycle through; default: the smallest, middle and largest
  loaded non-dominated size from GET /v1/models. ``auto`` sends no size.
- ``LOAD_STREAM``: ``mix`` (default: alternate), ``stream`` or ``whole``.
- ``LOAD_MAX_TOKENS`` (16), ``LOAD_TIMEOUT_S`` (120), ``LOAD_API_KEY``.
- ``LOAD_PACE_S``: each user starts a request every this many seconds (locust ``constant_pacing``);
  0 (default) runs closed-loop. With ``-u rate*T -r rate -t T`` and a pace of at least ``T`` every
  user sends once, at a fixed arrival rate: open-loop arrivals.
- ``LOAD_BUDGET_MS``: sent as ``max_latency_ms`` on every request.
- ``LOAD_TOKENIZER``: a tokenizer directory; with it each ``usage.prompt_tokens`` is checked against
  the chat template applied here, the way the server applies it. ``LOAD_PROMPT_TOKENS`` gives those
  counts directly (comma-separated; ``python bench/locustfile.py TOKENIZER_DIR`` prints them), which
  spares each locust start the seconds of loading transformers.
- ``LOAD_LABEL``: copied into every record (e.g. the phase of a benchmark).
"""

from __future__ import annotations

import itertools
import json
import os
import time
from typing import Any

import gevent
from locust import User, constant, constant_pacing, events, task
from locust.env import Environment
from requests import RequestException, Response, Session, get  # after locust: it patches ssl first

PROMPTS = [
    "Name three uses of a hash map.",
    "What does a compiler do?",
    "Explain recursion in one sentence.",
    "Why are unit tests useful?",
]
MAX_TOKENS = int(os.environ.get("LOAD_MAX_TOKENS", "16"))
TIMEOUT_S = float(os.environ.get("LOAD_TIMEOUT_S", "120"))
PACE_S = float(os.environ.get("LOAD_PACE_S", "0"))
BUDGET_MS = float(os.environ["LOAD_BUDGET_MS"]) if os.environ.get("LOAD_BUDGET_MS") else None
STREAM_MODE = os.environ.get("LOAD_STREAM", "mix")
LABEL = os.environ.get("LOAD_LABEL", "")
ERROR_KEYS = {"message", "type", "param", "code"}


class Workload:
    """What every user shares: the family, the sizes, the expected prompt lengths, the records file."""

    def __init__(self) -> None:
        self.family = ""
        self.sizes: list[str] = []
        self.expected_prompt: list[int | None] = [None] * len(PROMPTS)
        self.counter = itertools.count()
        self.records: Any = None

    def setup(self, host: str) -> None:
        headers = _auth()
        cards = get(f"{host}/v1/models", headers=headers, timeout=30).json()["data"]
        self.family = next(c["id"] for c in cards if c.get("size") is None)
        if os.environ.get("LOAD_SIZES"):
            self.sizes = [s.strip() for s in os.environ["LOAD_SIZES"].split(",") if s.strip()]
        else:
            served = sorted((c for c in cards if c["loaded"] and not c["dominated"] and c["size"]),
                            key=lambda c: c["params"])  # fmt: skip
            picks = [served[0], served[len(served) // 2], served[-1]]
            self.sizes = list(dict.fromkeys(c["size"] for c in picks))
        if os.environ.get("LOAD_PROMPT_TOKENS"):
            self.expected_prompt = [int(n) for n in os.environ["LOAD_PROMPT_TOKENS"].split(",")]
        elif os.environ.get("LOAD_TOKENIZER"):
            self.expected_prompt = list(prompt_tokens(os.environ["LOAD_TOKENIZER"]))
        self.records = open(os.environ["LOAD_RECORDS"], "a", buffering=1)  # noqa: SIM115 (closed at test stop)

    def write(self, record: dict[str, Any]) -> None:
        self.records.write(json.dumps(record) + "\n")


WORKLOAD = Workload()


def prompt_tokens(tokenizer_dir: str) -> list[int]:
    """Prompt tokens of each prompt as the server counts them: the chat template, then the tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    counts = []
    for prompt in PROMPTS:
        text = tokenizer.apply_chat_template(_messages(prompt), tokenize=False, add_generation_prompt=True)
        counts.append(len(tokenizer(text, add_special_tokens=False)["input_ids"]))
    return counts


def _auth() -> dict[str, str]:
    key = os.environ.get("LOAD_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def _messages(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


@events.init.add_listener
def _on_init(environment: Environment, **_: Any) -> None:
    """Before locust's run-time clock starts: loading a tokenizer takes seconds."""
    assert environment.host, "--host is required"
    WORKLOAD.setup(environment.host.rstrip("/"))
    gevent.get_hub().loop.update_now()  # the blocking setup left gevent's clock behind: -t would end at once


@events.test_stop.add_listener
def _on_stop(environment: Environment, **_: Any) -> None:
    if WORKLOAD.records is not None:
        WORKLOAD.records.flush()


def error_shape(body: Any) -> bool:
    """True when ``body`` is exactly OpenAI's ``{"error": {message, type, param, code}}``."""
    return isinstance(body, dict) and set(body) == {"error"} and set(body["error"]) == ERROR_KEYS


class ChatUser(User):
    """One client: its own HTTP session; sends the next request of the shared cycle each task."""

    wait_time = constant_pacing(PACE_S) if PACE_S > 0 else constant(0)

    def on_start(self) -> None:
        self.session = Session()
        self.session.headers.update(_auth())

    def on_stop(self) -> None:
        self.session.close()

    @task
    def chat(self) -> None:
        # A stop that came as this user woke from its wait is delivered here, before anything is sent:
        # locust kills a waiting user at once, even when its wake-up was already scheduled.
        gevent.sleep(0)
        n = next(WORKLOAD.counter)
        sizes = WORKLOAD.sizes
        size = sizes[n % len(sizes)]
        stream = STREAM_MODE == "stream" or (STREAM_MODE == "mix" and (n // len(sizes)) % 2 == 0)
        prompt = n % len(PROMPTS)
        body: dict[str, Any] = {
            "model": WORKLOAD.family,
            "messages": _messages(PROMPTS[prompt]),
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
            "ignore_eos": True,
            "logprobs": True,
            "stream": stream,
        }
        if size != "auto":
            body["size"] = size
        if BUDGET_MS is not None:
            body["max_latency_ms"] = BUDGET_MS
        if stream:
            body["stream_options"] = {"include_usage": True}
        rid = f"{os.getpid()}-{n}"
        WORKLOAD.write({"kind": "sent", "id": rid, "t": time.time()})
        record: dict[str, Any] = {
            "kind": "done", "id": rid, "label": LABEL, "size": size, "stream": stream, "budget_ms": BUDGET_MS,
            "prompt": PROMPTS[prompt], "expected_prompt_tokens": WORKLOAD.expected_prompt[prompt],
            "max_tokens": MAX_TOKENS, "start": time.time(), "outcome": "killed",
        }  # fmt: skip
        t0 = time.perf_counter()
        try:
            if stream:
                self._stream(body, record, t0)
            else:
                self._whole(body, record)
        except RequestException as exc:
            record.update(outcome="failed", error=f"{type(exc).__name__}: {exc}")
        finally:  # also when locust stops the user mid-request: the record says "killed"
            record["e2e_s"] = time.perf_counter() - t0
            record["end"] = time.time()
            WORKLOAD.write(record)
            self._fire(record)

    def _post(self, body: dict[str, Any], stream: bool) -> Response:
        host = (self.environment.host or "").rstrip("/")
        return self.session.post(f"{host}/v1/chat/completions", json=body, stream=stream, timeout=(10, TIMEOUT_S))

    def _refused(self, response: Response, record: dict[str, Any]) -> None:
        """A non-200 answer: 429 is shed, anything else failed; both must be OpenAI-shaped."""
        record["status"] = response.status_code
        try:
            error = response.json()
        except ValueError:
            error = response.text[:500]
        record.update(error=error, error_shaped=error_shape(error))
        if response.status_code == 429:
            record.update(outcome="shed", retry_after=response.headers.get("retry-after"))
        else:
            record["outcome"] = "failed"

    def _headers(self, response: Response, record: dict[str, Any]) -> None:
        h = response.headers
        predicted = h.get("x-boomerang-predicted-ms")
        record.update(status=response.status_code, served=h.get("x-boomerang-size"),
                      reason=h.get("x-boomerang-route-reason"))  # fmt: skip
        record["predicted_ms"] = None if predicted is None else float(predicted)

    def _whole(self, body: dict[str, Any], record: dict[str, Any]) -> None:
        response = self._post(body, stream=False)
        if response.status_code != 200:
            self._refused(response, record)
            return
        self._headers(response, record)
        reply = response.json()
        choice = reply["choices"][0]
        record["tokens"] = len((choice.get("logprobs") or {}).get("content") or [])
        record["finish_reason"] = choice.get("finish_reason")
        self._usage(reply.get("usage"), record)
        record["outcome"] = "ok"

    def _stream(self, body: dict[str, Any], record: dict[str, Any], t0: float) -> None:
        arrivals: list[float] = []  # one per token: when its chunk was read
        deltas, usage, done, error, finish = 0, None, False, None, None
        with self._post(body, stream=True) as response:
            if response.status_code != 200:
                self._refused(response, record)
                return
            self._headers(response, record)
            for line in response.iter_lines():
                if not line:
                    continue
                if not line.startswith(b"data: "):
                    error = f"not an SSE data line: {line[:200]!r}"
                    break
                data = line[len(b"data: ") :]
                if data == b"[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    error = chunk
                    record["error_shaped"] = error_shape(chunk)
                    continue
                now = time.perf_counter()
                for choice in chunk.get("choices") or []:
                    entries = (choice.get("logprobs") or {}).get("content") or []
                    arrivals.extend([now] * len(entries))
                    deltas += bool((choice.get("delta") or {}).get("content"))
                    finish = choice.get("finish_reason") or finish
                if chunk.get("usage"):
                    usage = chunk["usage"]
        record.update(done=done, tokens=len(arrivals), content_deltas=deltas, finish_reason=finish)
        if arrivals:
            record["ttft_s"] = arrivals[0] - t0
            record["itl_s"] = [round(b - a, 6) for a, b in itertools.pairwise(arrivals)]
        self._usage(usage, record)
        if error is not None:
            record.update(outcome="failed", error=error)
        elif not done or usage is None:
            record.update(outcome="failed", error="the stream ended without usage and [DONE]")
        else:
            record["outcome"] = "ok"

    @staticmethod
    def _usage(usage: dict[str, Any] | None, record: dict[str, Any]) -> None:
        if usage is None:
            return
        record["usage"] = usage
        record["usage_ok"] = usage["completion_tokens"] == record.get("tokens") == record["max_tokens"]
        expected = record["expected_prompt_tokens"]
        record["prompt_ok"] = None if expected is None else usage["prompt_tokens"] == expected

    def _fire(self, record: dict[str, Any]) -> None:
        outcome = record["outcome"]
        exception = None if outcome == "ok" else RuntimeError(f"{outcome} {record.get('status', '')}".strip())
        self.environment.events.request.fire(
            request_type="chat-stream" if record["stream"] else "chat", name=record["size"],
            response_time=record["e2e_s"] * 1e3, response_length=record.get("tokens", 0), exception=exception,
            context={"served": record.get("served")},
        )  # fmt: skip


if __name__ == "__main__":  # python bench/locustfile.py TOKENIZER_DIR: the LOAD_PROMPT_TOKENS value
    import sys

    print(",".join(str(n) for n in prompt_tokens(sys.argv[1])))
