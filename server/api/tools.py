"""Tools on ``/v1/chat/completions`` for the sizes the gateway runs itself: ``tools``,
``tool_choice`` and ``parallel_tool_calls`` as vLLM's OpenAI server takes them.

Rendering: the tools go to the model's chat template (``apply_chat_template(tools=...)``). A template
that never mentions ``tools`` gets the default rendering instead (:data:`DEFAULT_TOOLS_PROMPT`): a
system block listing the functions as JSON and asking for Hermes-style
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` output (the block Qwen2.5's template
writes), and replayed assistant tool calls written into the turn's text in that same form.
``tool_choice: "none"`` renders no tools.

Parsing: vLLM's own Hermes tool parser (``Hermes2ProToolParser``) and vLLM's serving logic around it
(``DelegatingParser.parse`` / ``parse_delta``), used as a library, one parser per choice. ``required``
and a named function are decoded under the JSON schema vLLM derives from the tools (a list of
``{"name", "parameters"}`` objects, or the named function's arguments object) and parsed as that
JSON, as vLLM does when it constrains with a JSON schema. vLLM is an optional dependency: without it
a request with tools is a 400. Finish reasons are vLLM's (and OpenAI's): ``tool_calls`` when calls
were made under ``auto`` or ``required`` and the output ended by itself, the engine's for a named
function.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from server.api.common import NullableBool, check_text
from server.engines.base import StructuredSpec
from server.errors import BadRequest

# --- protocol ---------------------------------------------------------------------------------


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = Field(default=None, description="a JSON schema of the arguments object")
    strict: bool | None = None


class ChatTool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"] = "function"
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class ToolFields(BaseModel):
    """The request fields of tools (mixed into the chat request)."""

    tools: Annotated[list[ChatTool], Field(min_length=1)] | None = Field(
        default=None, description="functions the model may call (at least one, as OpenAI requires)"
    )
    tool_choice: ToolChoice | None = Field(
        default=None, description="none, auto (the default with tools), required, or a named function"
    )
    parallel_tool_calls: NullableBool = Field(default=True, description="false: at most one call per reply")


# --- rendering --------------------------------------------------------------------------------

DEFAULT_TOOLS_PROMPT = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


def template_takes_tools(tokenizer: Any) -> bool:
    """Whether the chat template reads ``tools`` (a template that never names it ignores them)."""
    template = getattr(tokenizer, "chat_template", None)
    texts = template.values() if isinstance(template, dict) else [template or ""]
    return any("tools" in text for text in texts)


def _call_text(call: dict[str, Any]) -> str:
    function = call["function"]
    body = json.dumps({"name": function["name"], "arguments": function["arguments"]}, ensure_ascii=False)
    return f"<tool_call>\n{body}\n</tool_call>"


def default_rendering(turns: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """The turns for a template without tool support: the tools block in the (first) system message,
    replayed assistant calls as ``<tool_call>`` text after the turn's own text. ``tool`` turns keep
    their role."""
    out = []
    for turn in turns:
        if turn.get("tool_calls"):
            calls = "\n".join(_call_text(call) for call in turn["tool_calls"])
            text = f"{turn['content']}\n{calls}" if turn["content"] else calls
            turn = {k: v for k, v in turn.items() if k != "tool_calls"} | {"content": text}
        out.append(turn)
    if tools:
        block = DEFAULT_TOOLS_PROMPT.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
        if out and out[0]["role"] in ("system", "developer"):
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{block}" if out[0]["content"] else block}
        else:
            out.insert(0, {"role": "system", "content": block})
    return out


def tool_dicts(tools: list[ChatTool]) -> list[dict[str, Any]]:
    """The tools as the chat template receives them, checked to be text a tokenizer can encode."""
    dicts = [tool.model_dump(exclude_none=True) for tool in tools]
    check_text(json.dumps(dicts, ensure_ascii=False), "tools")
    return dicts


def rendered_tools(body: ToolFields) -> list[dict[str, Any]] | None:
    """The tools of a chat request as its template receives them (none with ``tool_choice: "none"``)."""
    if not body.tools or body.tool_choice == "none":
        return None
    return tool_dicts(body.tools)


# --- parsing ----------------------------------------------------------------------------------


@functools.cache
def _vllm() -> Any:
    """vLLM's parser classes (imported on the first request with tools: the import takes seconds),
    or None without vLLM."""
    try:
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.exceptions import VLLMClientError
        from vllm.parser.abstract_parser import DelegatingParser
        from vllm.renderers.chat_utils import make_tool_call_id
        from vllm.tool_parsers.hermes_tool_parser import Hermes2ProToolParser
    except ImportError:
        return None

    class JsonConstrainedHermes(Hermes2ProToolParser):
        """Hermes, with ``required`` / named calls read as the JSON their schema constrains (the gateway
        decodes under a JSON schema, not under vLLM's xgrammar structural tags)."""

        structural_tag_model = None  # type: ignore[assignment]  # ToolParser allows None: no structural tag
        supports_required_and_named = True

    class HermesParser(DelegatingParser):
        tool_parser_cls = JsonConstrainedHermes

    @dataclass(frozen=True)
    class Vllm:
        request: type
        parser: type
        call_id: Any
        client_error: type[Exception]

    return Vllm(ChatCompletionRequest, HermesParser, make_tool_call_id, VLLMClientError)


class ToolCalling:
    """One request's tools: the constraint its sampling takes, and the parser of each choice's output.
    Build with :meth:`of` (blocking: may import vLLM)."""

    def __init__(self, vllm: Any, request: Any, tokenizer: Any, parallel: bool) -> None:
        self._vllm = vllm
        self.request = request  # vLLM's ChatCompletionRequest, as its parsers read it
        self.tokenizer = tokenizer
        self.parallel = parallel
        adjusted = vllm.parser(tokenizer, request.tools).adjust_request(request.model_copy())
        schema = adjusted.structured_outputs.json if adjusted.structured_outputs is not None else None
        self.structured = StructuredSpec("json", json.dumps(schema), param="tools") if schema is not None else None
        self.skip_special_tokens = adjusted.skip_special_tokens  # <tool_call> may be a special token
        self.named = not isinstance(request.tool_choice, str | None)  # a named function

    @classmethod
    def of(cls, body: ToolFields, tokenizer: Any) -> ToolCalling | None:
        """None when the request has no tools or calls none (plain chat, as vLLM answers ``none``)."""
        choice = body.tool_choice
        if not body.tools:
            if choice not in (None, "none", "auto"):
                raise BadRequest("tool_choice needs tools", param="tool_choice")
            return None
        if choice == "none":
            return None
        if isinstance(choice, NamedToolChoice) and choice.function.name not in {t.function.name for t in body.tools}:
            raise BadRequest(f"tool_choice names '{choice.function.name}', which is not one of the tools",
                             param="tool_choice")  # fmt: skip
        vllm = _vllm()
        if vllm is None:
            raise BadRequest("tools need vllm installed", param="tools", code="unsupported_field")
        try:
            request = vllm.request(
                model="", messages=[], tools=tool_dicts(body.tools),
                tool_choice=choice.model_dump() if isinstance(choice, BaseModel) else (choice or "auto"),
                parallel_tool_calls=body.parallel_tool_calls,
            )  # fmt: skip
            return cls(vllm, request, tokenizer, body.parallel_tool_calls)
        except (ValueError, TypeError, vllm.client_error) as exc:  # vLLM's request checks; pydantic's are ValueErrors
            raise BadRequest(f"tools: {exc}", param="tools") from None

    def _parser(self) -> Any:
        return self._vllm.parser(self.tokenizer, self.request.tools)

    def _call(self, call: Any) -> dict[str, Any]:
        return {"id": call.id or self._vllm.call_id(), "type": "function",
                "function": {"name": call.name, "arguments": call.arguments}}  # fmt: skip

    def message(self, text: str, finish_reason: str | None) -> tuple[dict[str, Any], str | None]:
        """The reply's assistant message for the whole output ``text`` and its finish reason:
        ``content`` (the text outside the calls, or null) and ``tool_calls`` when calls were made."""
        _, content, calls = self._parser().parse(text, self.request, enable_auto_tools=True)
        calls = (calls or [])[: None if self.parallel else 1]
        message: dict[str, Any] = {"role": "assistant", "content": content or None}
        if not calls:
            return message, finish_reason
        message["tool_calls"] = [self._call(c) for c in calls]
        return message, self.finish_reason(finish_reason, called=True)

    def finish_reason(self, engine_reason: str | None, called: bool) -> str | None:
        if called and not self.named and engine_reason == "stop":
            return "tool_calls"
        return engine_reason

    def stream(self, prompt_ids: tuple[int, ...]) -> ToolStream:
        return ToolStream(self, self._parser(), list(prompt_ids))


class ToolStream:
    """One choice's stream: each engine event's text to the chunk's ``delta`` (content and
    ``tool_calls`` pieces: index, id, type and name first, then the arguments' text)."""

    def __init__(self, calling: ToolCalling, parser: Any, prompt_ids: list[int]) -> None:
        self.calling = calling
        self.parser = parser
        self.prompt_ids = prompt_ids
        self.called = False

    def delta(self, text: str, token_ids: tuple[int, ...], finished: bool) -> dict[str, Any] | None:
        """The delta for the new ``text``, or None when there is nothing to send yet."""
        message = self.parser.parse_delta(
            text, list(token_ids), self.calling.request, self.prompt_ids, finished=finished
        )
        if message is None:
            return None
        delta: dict[str, Any] = {}
        if message.content:
            delta["content"] = message.content
        calls = [c for c in message.tool_calls if self.calling.parallel or c.index == 0]
        if calls:
            self.called = True
            delta["tool_calls"] = [c.model_dump(exclude_none=True) for c in calls]
        return delta or None

    def finish_reason(self, engine_reason: str | None) -> str | None:
        return self.calling.finish_reason(engine_reason, self.called)
