"""schemathesis against a real gateway: every operation of the OpenAPI schema the server serves
(``/v1/models``, ``/v1/models/{model}``, ``/v1/chat/completions``, ``/v1/completions``, ``/health``,
``/metrics``), in its coverage, fuzzing and stateful phases, with the settings committed in
``schemathesis.toml``. A failure is any 5xx, a status or content type the schema does not declare,
a body that does not match its schema (OpenAI error bodies included), a schema-invalid request that
is accepted, a stack trace in a body, or a badly framed stream (``tests/server/fuzz_checks.py``).

The fuzzed server keeps generations cheap (``max_tokens`` 4, ``n`` 2) so that a run stays near a minute.
Then regression tests for what the fuzzer found.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest
from fastapi.exceptions import RequestValidationError

from server.errors import to_api_error
from tests.server.deploys import FAMILY, TinyFamilyDirs, deploy_dict, write_deploy
from tests.server.fuzz_checks import error_problem, sse_problem
from tests.server.live import KEY, REPO, Server, launch, serving

pytestmark = pytest.mark.server

MIN_CASES = 1500  # one run of the committed settings generates about 2,300
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(tiny_dirs: TinyFamilyDirs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("fuzz")
    config = deploy_dict(
        tiny_dirs,
        limits={"max_body_bytes": 65536, "max_tokens": 4, "default_max_tokens": 4, "max_n": 2},
        auth={"api_key_env": "TINY_SERVER_KEY"},
    )
    started = launch(write_deploy(tmp / "fuzz.yaml", config), tmp / "fuzz.log")
    with serving(started):
        yield started


def test_schemathesis_finds_nothing(server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "run", f"{server.url}/openapi.json", "--no-color",
         "-H", f"Authorization: Bearer {KEY}"],
        cwd=REPO, capture_output=True, text=True, timeout=540,
    )  # fmt: skip
    found = re.search(r"(\d+) generated", run.stdout)
    cases = int(found.group(1)) if found else 0
    with capsys.disabled():
        print(f"\nschemathesis: {cases} cases, exit code {run.returncode}")
    assert run.returncode == 0, run.stdout[-12000:] + run.stderr[-3000:]
    assert cases >= MIN_CASES, run.stdout[-3000:]
    log = server.log.read_text()
    assert "Traceback" not in log, log[log.index("Traceback") - 2000 :][:6000]


# --- the checks themselves catch what they are for --------------------------------------------


def test_error_check_refuses_non_openai_bodies() -> None:
    assert error_problem({"error": {"message": "m", "type": "t", "param": None, "code": None}}) is None
    assert error_problem({"detail": "Not Found"}) is not None  # FastAPI's default
    assert error_problem({"error": {"message": "m", "type": "t"}}) is not None
    assert error_problem({"error": {"message": 1, "type": "t", "param": None, "code": None}}) is not None


def test_sse_check_refuses_bad_framing() -> None:
    chunk = '{"object": "text_completion", "choices": []}'
    error = '{"error": {"message": "m", "type": "t", "param": null, "code": null}}'
    assert sse_problem(f"data: {chunk}\n\ndata: {error}\n\ndata: [DONE]\n\n") is None
    assert sse_problem(f"data: {chunk}\n\n") is not None  # no [DONE]
    assert sse_problem(f"data: {chunk}\ndata: [DONE]\n\n") is not None  # one blank line missing
    assert sse_problem(f"data: {error}\n\ndata: {chunk}\n\ndata: [DONE]\n\n") is not None  # error not last
    assert sse_problem('data: {"object": "list"}\n\ndata: [DONE]\n\n') is not None


# --- regressions found by the fuzzer ----------------------------------------------------------


def test_schema_declares_each_reply_and_no_422(server: Server) -> None:
    schema = httpx.get(f"{server.url}/openapi.json", timeout=30).json()
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            assert "422" not in operation["responses"], (method, path)  # validation errors are 400s
            if path.startswith("/v1/"):
                assert operation["security"] == [{"bearer": []}], (method, path)
                assert operation["responses"]["401"]["content"]["application/json"]["schema"] == {
                    "$ref": "#/components/schemas/ErrorBody"
                }
    chat = schema["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    assert chat["application/json"]["schema"] == {"$ref": "#/components/schemas/ChatCompletion"}
    assert "ChatCompletionChunk" in str(chat["text/event-stream"]["itemSchema"])
    assert "ChatCompletionChunk" in schema["components"]["schemas"]


def test_unsupported_method_answers_405_with_allow(server: Server) -> None:
    response = httpx.request("DELETE", f"{server.url}/v1/models", headers=AUTH, timeout=30)
    assert response.status_code == 405
    assert response.headers["allow"] == "GET"
    assert error_problem(response.json()) is None


@pytest.mark.parametrize("temperature", [1e-300, 5e-324, 1e-6])
def test_tiny_temperature_is_greedy_not_an_engine_failure(server: Server, temperature: float) -> None:
    def complete(t: float) -> httpx.Response:
        body = {"model": FAMILY, "prompt": "The module defines", "max_tokens": 4, "temperature": t, "size": "large"}
        return httpx.post(f"{server.url}/v1/completions", json=body, headers=AUTH, timeout=60)

    tiny, greedy = complete(temperature), complete(0.0)
    assert tiny.status_code == 200, tiny.text
    assert tiny.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]


@pytest.mark.parametrize(
    ("loc", "message"),
    [
        (("body",), "the request body must be a JSON object"),
        (("body", "stream_options"), "stream_options: must be a JSON object"),
    ],
)
def test_a_field_that_is_not_an_object_is_named_as_such(loc: tuple[str, ...], message: str) -> None:
    """It said "stream_options: the request body must be a JSON object"."""
    error = to_api_error(RequestValidationError([{"type": "model_attributes_type", "loc": loc, "msg": "m"}]))
    assert (error.status, error.message) == (400, message)


def test_metrics_is_declared_as_text(server: Server) -> None:
    schema = httpx.get(f"{server.url}/openapi.json", timeout=30).json()
    assert list(schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
    assert httpx.get(f"{server.url}/metrics", timeout=30).headers["content-type"].startswith("text/plain")
