"""schemathesis checks beyond the schema (loaded through ``hooks`` in schemathesis.toml): every error
body is exactly OpenAI's shape, nothing carries a stack trace, and a stream is well-framed SSE."""

from __future__ import annotations

import json
from typing import Any

import schemathesis
from schemathesis import Case, CheckContext, Response

ERROR_FIELDS: dict[str, type | tuple[type, ...]] = {
    "message": str,
    "type": str,
    "param": (str, type(None)),
    "code": (str, type(None)),
}
CHUNK_OBJECTS = {"chat.completion.chunk", "text_completion"}


def error_problem(body: Any) -> str | None:
    """Why ``body`` is not ``{"error": {"message", "type", "param", "code"}}``, or ``None``."""
    if not isinstance(body, dict) or set(body) != {"error"} or not isinstance(body["error"], dict):
        return f"not an OpenAI error body: {body!r:.300}"
    error = body["error"]
    if set(error) != set(ERROR_FIELDS):
        return f"error fields are {sorted(error)}, not {sorted(ERROR_FIELDS)}"
    wrong = [name for name, kind in ERROR_FIELDS.items() if not isinstance(error[name], kind)]
    return f"error fields of the wrong type: {wrong}" if wrong else None


def sse_problem(text: str) -> str | None:
    """Why ``text`` is not ``data: {chunk}`` events ending in ``data: [DONE]`` (an error event may
    come last before it), or ``None``."""
    if not text.endswith("\n\n"):
        return "the stream does not end with a blank line"
    events = text[:-2].split("\n\n")
    if events[-1] != "data: [DONE]":
        return f"the last event is {events[-1]!r:.200}, not 'data: [DONE]'"
    for i, event in enumerate(events[:-1]):
        if not event.startswith("data: ") or "\n" in event:
            return f"event {i} is not one 'data: ' line: {event!r:.200}"
        data = json.loads(event.removeprefix("data: "))
        if "error" in data:
            if i != len(events) - 2:
                return f"an error event is not the last before [DONE]: {event!r:.200}"
            problem = error_problem(data)
            if problem:
                return problem
        elif data.get("object") not in CHUNK_OBJECTS or not isinstance(data.get("choices"), list):
            return f"event {i} is not a completion chunk: {event!r:.200}"
    return None


@schemathesis.check
def openai_error_shape(ctx: CheckContext, response: Response, case: Case) -> None:
    if response.status_code < 400:
        return
    try:
        body = json.loads(response.content)
    except ValueError:
        raise AssertionError(f"error body is not JSON: {response.content[:300]!r}") from None
    problem = error_problem(body)
    if problem:
        raise AssertionError(problem)


@schemathesis.check
def no_stack_trace(ctx: CheckContext, response: Response, case: Case) -> None:
    text = response.content.decode(errors="replace")
    for marker in ("Traceback (most recent call last)", 'File "', "site-packages"):
        if marker in text:
            raise AssertionError(f"the body carries a stack trace ({marker!r}): {text[:300]!r}")


@schemathesis.check
def sse_framing(ctx: CheckContext, response: Response, case: Case) -> None:
    content_type = (response.headers.get("content-type") or [""])[0]
    streamed = isinstance(case.body, dict) and case.body.get("stream") is True
    if response.status_code != 200 or not (streamed or content_type.startswith("text/event-stream")):
        return
    if not content_type.startswith("text/event-stream"):
        raise AssertionError(f"stream: true answered with {content_type!r}, not text/event-stream")
    if response.stream_cut_short:
        return
    problem = sse_problem(response.content.decode())
    if problem:
        raise AssertionError(problem)
