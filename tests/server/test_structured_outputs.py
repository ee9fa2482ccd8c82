"""Structured outputs on the in-process engine: ``response_format`` (json_object, json_schema) and
vLLM's ``structured_outputs`` (json, regex, choice, grammar), decoded under an xgrammar grammar. The
tiny family's weights are random, so any answer that parses and validates is the grammar's doing.
A real server in a subprocess and the real ``openai`` client."""

from __future__ import annotations

import json
import re
from typing import Any, Literal

import httpx
import jsonschema
import pytest
from pydantic import BaseModel, Field

from boomerang_core.family import Family
from tests.server.deploys import FAMILY
from tests.server.live import KEY, Server

pytestmark = pytest.mark.server

AUTH = {"Authorization": f"Bearer {KEY}"}
MESSAGES = [{"role": "user", "content": "Describe a person as JSON."}]
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "admin": {"type": "boolean"},
        "role": {"enum": ["user", "guest"]},
    },
    "required": ["name", "age", "admin", "role"],
    "additionalProperties": False,
}


class Person(BaseModel):
    name: str = Field(max_length=8)
    age: int = Field(ge=0, le=120)
    admin: bool
    role: Literal["user", "guest"]


@pytest.fixture(scope="module")
def server(tiny_server: Server) -> Server:
    return tiny_server


def json_schema_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}


def chat(server: Server, size: str = "k5", **fields: Any) -> Any:
    return server.client().chat.completions.create(
        model=f"{FAMILY}:{size}", messages=MESSAGES, temperature=0, **{"max_tokens": 200, **fields}
    )


def post(server: Server, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, headers=AUTH, timeout=120)


def test_json_object_answer_parses(server: Server, family: Family) -> None:
    """Any JSON object: random weights write one endless key, so a bias toward the tokens that close
    strings and objects ends it; the grammar alone keeps every token JSON."""
    tokenizer = family.store.tokenizer
    assert tokenizer is not None
    closing = {str(tokenizer.convert_tokens_to_ids(t)): 30 for t in ('"', "}")}
    reply = chat(server, response_format={"type": "json_object"}, logit_bias=closing)
    choice = reply.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    assert isinstance(json.loads(choice.message.content), dict)


def test_json_schema_answer_validates_on_every_size(server: Server, family: Family) -> None:
    for size in (s for s in family.sizes if not s.dominated):
        reply = chat(server, size.name, response_format=json_schema_format(SCHEMA))
        choice = reply.choices[0]
        assert choice.finish_reason == "stop", (size.name, choice.message.content)
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)


def test_json_schema_on_completions(server: Server) -> None:
    reply = server.client().completions.create(
        model=f"{FAMILY}:k3", prompt="A person:", temperature=0, max_tokens=200,
        extra_body={"response_format": json_schema_format(SCHEMA)},
    )  # fmt: skip
    assert reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(reply.choices[0].text), SCHEMA)


def test_parse_with_pydantic_model(server: Server) -> None:
    """openai's ``chat.completions.parse`` sends the model's schema as a strict json_schema."""
    reply = server.client().chat.completions.parse(
        model=f"{FAMILY}:k4", messages=MESSAGES, temperature=0, max_tokens=200, response_format=Person
    )
    parsed = reply.choices[0].message.parsed
    assert isinstance(parsed, Person)
    assert 0 <= parsed.age <= 120 and len(parsed.name) <= 8


def test_regex_choice_and_grammar(server: Server) -> None:
    pattern = r"[0-9]{3}-[a-z]{2,4}"
    text = chat(server, extra_body={"structured_outputs": {"regex": pattern}}).choices[0].message.content
    assert re.fullmatch(pattern, text), text
    choices = ["yes", "no", 'it "depends"']
    reply = chat(server, extra_body={"structured_outputs": {"choice": choices}})
    assert reply.choices[0].message.content in choices and reply.choices[0].finish_reason == "stop"
    grammar = 'root ::= "(" digit ("+" digit)* ")"\ndigit ::= [0-9]'
    reply = chat(server, max_tokens=40, extra_body={"structured_outputs": {"grammar": grammar}})
    text = reply.choices[0].message.content
    assert re.fullmatch(r"\([0-9](\+[0-9])*\)", text), text
    reply = chat(server, extra_body={"structured_outputs": {"json": SCHEMA}})
    jsonschema.validate(json.loads(reply.choices[0].message.content), SCHEMA)


def test_stream_gives_the_same_text(server: Server) -> None:
    """Greedy: the streamed pieces of a constrained answer join to the whole reply's text."""
    fmt = json_schema_format(SCHEMA)
    whole = chat(server, "k3", response_format=fmt).choices[0].message.content
    stream = chat(server, "k3", response_format=fmt, stream=True)
    pieces, finish = [], None
    for chunk in stream:
        for c in chunk.choices:
            pieces.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert "".join(pieces) == whole and finish == "stop"
    jsonschema.validate(json.loads(whole), SCHEMA)


def test_constrained_and_free_requests_share_a_batch(server: Server) -> None:
    """n=3 constrained choices sampled beside free ones: every constrained answer validates."""
    body = {"model": f"{FAMILY}:k5", "messages": MESSAGES, "max_tokens": 200, "n": 3, "seed": 7}
    constrained = {**body, "response_format": json_schema_format(SCHEMA)}
    with httpx.Client(timeout=120, headers=AUTH) as client:
        free = client.post(f"{server.url}/v1/chat/completions", json={**body, "ignore_eos": True, "max_tokens": 30})
        answer = client.post(f"{server.url}/v1/chat/completions", json=constrained)
    assert free.status_code == 200 and answer.status_code == 200, answer.text
    for choice in answer.json()["choices"]:
        jsonschema.validate(json.loads(choice["message"]["content"]), SCHEMA)


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"response_format": json_schema_format({"type": "objectx"})}, "response_format.json_schema.schema"),
        ({"structured_outputs": {"regex": "[a-"}}, "structured_outputs.regex"),
        ({"structured_outputs": {"grammar": "root ::= undefined_rule"}}, "structured_outputs.grammar"),
        ({"structured_outputs": {"json": "not json"}}, "structured_outputs.json"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
        ({"structured_outputs": {}}, "structured_outputs"),
        ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "structured_outputs"),
    ],
)
def test_bad_constraint_is_a_400_naming_the_field(server: Server, extra: dict[str, Any], param: str) -> None:
    body = {"model": f"{FAMILY}:k5", "messages": MESSAGES, "max_tokens": 8, **extra}
    response = post(server, "/v1/chat/completions", body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param, response.text


def test_text_format_is_free_text(server: Server) -> None:
    free = chat(server, max_tokens=12).choices[0].message.content
    assert chat(server, max_tokens=12, response_format={"type": "text"}).choices[0].message.content == free
