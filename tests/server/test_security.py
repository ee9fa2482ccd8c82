"""The gateway's security properties, on real server processes over real HTTP (raw sockets where a
client library would not send the request) and the real ``openai`` client.

Two servers for the module: ``keyed`` (API key, /health and /metrics open, no CORS, logging at
DEBUG with uvicorn's access log) and ``locked`` (key, ``protect_health``, ``protect_metrics``, one
CORS origin). The routes checked are enumerated from the app itself, so a new route cannot escape.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from boomerang_core.family import Family
from server.app import create_app
from server.config import DeployConfig, parse_config
from server.engines.base import Engine, GenerationRequest
from server.services import load_family
from tests.server.deploys import FAMILY, TinyFamilyDirs, deploy_dict, write_deploy
from tests.server.fakes import ScriptedEngine
from tests.server.fuzz_checks import error_problem, sse_problem
from tests.server.live import KEY, REPO, Server, free_port, launch, serving, spawn
from tests.tiny import write_pair

pytestmark = pytest.mark.server

WRONG_KEY = "wrong-key-4f1c9e"
MAX_BODY = 4096
APP_ORIGIN = "https://app.example.com"
AUTH = {"Authorization": f"Bearer {KEY}"}
TRACE_MARKERS = ("Traceback", 'File "', "site-packages")
# Logging at DEBUG, uvicorn's access log on: everything the process writes is checked for the key.
DEBUG_SERVER = """
import logging, sys, uvicorn
from server.app import create_app
from server.config import load_config
logging.basicConfig(level=logging.DEBUG, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
app = create_app(load_config(sys.argv[1]))
config = uvicorn.Config(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="debug")
logging.getLogger("boomerang.server").debug("logging at DEBUG")
uvicorn.Server(config).run()
"""


def config_for(dirs: TinyFamilyDirs, **auth: Any) -> dict[str, Any]:
    return deploy_dict(
        dirs,
        limits={"max_body_bytes": MAX_BODY, "max_tokens": 8, "max_n": 2},
        auth={"api_key_env": "TINY_SERVER_KEY", **auth},
    )


def launch_debug(config: Path, log: Path) -> Server:
    """The app under uvicorn with every logger at DEBUG (``DEBUG_SERVER``), like ``live.launch``."""
    port = free_port()
    env = {**os.environ, "TINY_SERVER_KEY": KEY, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return spawn([sys.executable, "-c", DEBUG_SERVER, str(config), str(port)], port, log, env)


@pytest.fixture(scope="module")
def servers(tiny_dirs: TinyFamilyDirs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Server]]:
    tmp = tmp_path_factory.mktemp("security")
    locked = config_for(tiny_dirs, protect_health=True, protect_metrics=True)
    locked["server"] = {"cors_allow_origins": [APP_ORIGIN]}
    started = {
        "keyed": launch_debug(write_deploy(tmp / "keyed.yaml", config_for(tiny_dirs)), tmp / "keyed.log"),
        "locked": launch(write_deploy(tmp / "locked.yaml", locked), tmp / "locked.log"),
    }
    with serving(*started.values(), headers=AUTH):  # /health may need the key
        yield started


@pytest.fixture(scope="module")
def keyed(servers: dict[str, Server]) -> Server:
    return servers["keyed"]


@pytest.fixture(scope="module")
def locked(servers: dict[str, Server]) -> Server:
    return servers["locked"]


def app_routes(dirs: TinyFamilyDirs) -> list[tuple[str, str]]:
    """(method, path) of every route the app serves, path parameters filled with a served model."""
    app = create_app(parse_config(config_for(dirs)))
    out = []
    for route in app.routes:
        path = getattr(route, "path", "")
        for method in sorted(getattr(route, "methods", None) or ()):
            if method != "HEAD":
                out.append((method, path.replace("{model:path}", FAMILY).replace("{model}", FAMILY)))
    return out


def assert_openai_error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert error_problem(body) is None, body
    if code is not None:
        assert body["error"]["code"] == code, body
    for marker in (*TRACE_MARKERS, KEY, WRONG_KEY):
        assert marker not in response.text, response.text
    return body


# --- the key ----------------------------------------------------------------------------------

BAD_AUTH: list[dict[str, str]] = [
    {},
    {"Authorization": f"Bearer {WRONG_KEY}"},
    {"Authorization": f"Bearer {KEY[:-1]}"},  # a prefix of the key
    {"Authorization": f"Bearer {KEY}x"},
    {"Authorization": f"Basic {KEY}"},  # right key, wrong scheme
    {"Authorization": f"Token {KEY}"},
    {"Authorization": KEY},  # no scheme at all
    {"Authorization": "Bearer"},  # the scheme, no key
    {"X-Api-Key": KEY},  # only the Authorization header counts
]


def test_the_enumerated_routes_cover_the_openai_api(tiny_dirs: TinyFamilyDirs) -> None:
    routes = app_routes(tiny_dirs)
    for expected in [("GET", "/v1/models"), ("GET", f"/v1/models/{FAMILY}"), ("POST", "/v1/chat/completions"),
                     ("POST", "/v1/completions")]:  # fmt: skip
        assert expected in routes


def test_every_v1_route_refuses_a_missing_wrong_or_malformed_key(keyed: Server, tiny_dirs: TinyFamilyDirs) -> None:
    v1 = [(m, p) for m, p in app_routes(tiny_dirs) if p.startswith("/v1/")]
    for method, path in v1:
        for headers in BAD_AUTH:
            kw: dict[str, Any] = {"json": {}} if method == "POST" else {}
            response = httpx.request(method, f"{keyed.url}{path}", headers=headers, timeout=30, **kw)
            assert_openai_error(response, 401, "invalid_api_key")
        # the key in the query string is not a key
        response = httpx.request(method, f"{keyed.url}{path}?api_key={KEY}", timeout=30)
        assert_openai_error(response, 401, "invalid_api_key")
        # with the key: past the guard (an empty body is the request's own 400)
        if method == "POST":
            assert_openai_error(httpx.post(f"{keyed.url}{path}", json={}, headers=AUTH, timeout=30), 400)
        else:
            assert httpx.request(method, f"{keyed.url}{path}", headers=AUTH, timeout=30).status_code == 200


def test_every_other_route_needs_the_key_but_docs_health_and_metrics(keyed: Server, tiny_dirs: TinyFamilyDirs) -> None:
    open_paths = {"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc", "/health", "/metrics"}
    for method, path in app_routes(tiny_dirs):
        response = httpx.request(method, f"{keyed.url}{path}", timeout=30)
        if path in open_paths:
            assert response.status_code == 200, (method, path, response.text)
        else:
            assert_openai_error(response, 401, "invalid_api_key")
    # and a path no route serves: 401, not a 404 that tells what exists
    assert_openai_error(httpx.get(f"{keyed.url}/admin", timeout=30), 401, "invalid_api_key")


def test_the_openai_client_with_and_without_the_key(keyed: Server) -> None:
    client = keyed.client()
    assert FAMILY in [m.id for m in client.models.list().data]
    reply = client.completions.create(model=FAMILY, prompt="The module defines", max_tokens=2, temperature=0)
    assert reply.choices[0].finish_reason in ("stop", "length")
    chat = client.chat.completions.create(model=FAMILY, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert chat.choices[0].message.role == "assistant"
    wrong = openai.OpenAI(base_url=f"{keyed.url}/v1", api_key=WRONG_KEY, max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError) as refused:
        wrong.completions.create(model=FAMILY, prompt="x", max_tokens=1)
    assert refused.value.code == "invalid_api_key"
    assert WRONG_KEY not in str(refused.value.body)


def test_health_and_metrics_are_open_by_default(keyed: Server) -> None:
    assert httpx.get(f"{keyed.url}/health", timeout=30).json()["status"] == "ok"
    assert "boomerang" in httpx.get(f"{keyed.url}/metrics", timeout=30).text


def test_health_and_metrics_need_the_key_when_protected(locked: Server) -> None:
    for path in ("/health", "/metrics"):
        for headers in BAD_AUTH:
            assert_openai_error(httpx.get(f"{locked.url}{path}", headers=headers, timeout=30), 401, "invalid_api_key")
        assert httpx.get(f"{locked.url}{path}", headers=AUTH, timeout=30).status_code == 200


def test_the_key_never_reaches_the_log(keyed: Server) -> None:
    """Runs after the tests above, which sent the key and wrong keys many times; these add a 200,
    401s (a wrong key, the key in the query string), a 400 and a stream, then the whole DEBUG log of
    the process is read."""
    httpx.get(f"{keyed.url}/v1/models", headers=AUTH, timeout=30)
    httpx.get(f"{keyed.url}/v1/models", headers={"Authorization": f"Bearer {WRONG_KEY}"}, timeout=30)
    httpx.get(f"{keyed.url}/v1/models?api_key={KEY}", timeout=30)  # a key in the URL: uvicorn logged it
    httpx.post(f"{keyed.url}/v1/completions", json={"model": FAMILY}, headers=AUTH, timeout=30)
    body = {"model": FAMILY, "prompt": "x", "max_tokens": 2, "stream": True}
    stream = httpx.post(f"{keyed.url}/v1/completions", json=body, headers=AUTH, timeout=60)
    assert sse_problem(stream.text) is None
    log = keyed.log.read_text()
    assert "logging at DEBUG" in log and '"GET /v1/models HTTP/1.1" 401' in log  # DEBUG, with access lines
    assert KEY not in log
    assert WRONG_KEY not in log


# --- bodies -----------------------------------------------------------------------------------


def raw_exchange(server: Server, head: str, body_parts: Sequence[bytes] = ()) -> bytes:
    """Send a request as raw bytes; what the server answers before closing (or 30 s)."""
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head.replace("\n", "\r\n").encode() + b"\r\n")
        for part in body_parts:
            sock.sendall(part)
        received = b""
        while b"\r\n\r\n" not in received or not _complete(received):
            data = sock.recv(65536)
            if not data:
                break
            received += data
    return received


def _complete(response: bytes) -> bool:
    head, _, body = response.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return False


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def request_head(method: str, path: str, **headers: str) -> str:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", f"Authorization: Bearer {KEY}"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    return "\n".join(lines) + "\n"


def test_a_body_over_the_limit_is_refused_with_413(keyed: Server) -> None:
    big = {"model": FAMILY, "prompt": "word " * MAX_BODY}
    assert_openai_error(httpx.post(f"{keyed.url}/v1/completions", json=big, headers=AUTH, timeout=30), 413)
    with pytest.raises(openai.APIStatusError) as refused:
        keyed.client().completions.create(model=FAMILY, prompt="word " * MAX_BODY, max_tokens=1)
    assert refused.value.status_code == 413


def test_a_declared_length_over_the_limit_is_refused_before_the_body_is_sent(keyed: Server) -> None:
    """Content-Length says 1 GB and no byte of the body is sent: the answer comes anyway."""
    head = request_head("POST", "/v1/completions", Content_Type="application/json", Content_Length="1000000000")
    assert status_of(raw_exchange(keyed, head)) == 413


def test_a_chunked_body_is_refused_once_it_passes_the_limit(keyed: Server) -> None:
    """Chunks past the limit and no final chunk: the server answers 413 without waiting for the end."""
    head = request_head("POST", "/v1/completions", Content_Type="application/json", Transfer_Encoding="chunked")
    chunk = b"x" * 1024
    parts = [b"%x\r\n%s\r\n" % (len(chunk), chunk)] * (MAX_BODY // len(chunk) + 2)
    response = raw_exchange(keyed, head, parts)
    assert status_of(response) == 413
    assert error_problem(httpx.Response(413, content=response.partition(b"\r\n\r\n")[2]).json()) is None


def test_a_content_length_shorter_than_the_body_reads_only_what_it_declares(keyed: Server) -> None:
    """The bytes past the declared length are not the request's body (that would be a 413): a 400,
    from the app (the JSON is cut short) or from the HTTP parser (the rest is no request), whichever
    answers first; and the server stays healthy."""
    body = b'{"model": "tiny", "prompt": "' + b"x" * (4 * MAX_BODY) + b'"}'
    head = request_head("POST", "/v1/completions", Content_Type="application/json", Content_Length="40")
    response = raw_exchange(keyed, head, [body])
    assert status_of(response) == 400
    assert httpx.get(f"{keyed.url}/health", timeout=30).status_code == 200


# --- no stack traces --------------------------------------------------------------------------

MALFORMED: list[tuple[str, bytes]] = [
    ("/v1/completions", b"{not json"),
    ("/v1/completions", b"\xff\xfe\x00"),
    ("/v1/completions", b"[]"),
    ("/v1/completions", b'{"model": "tiny", "prompt": ' + b"[" * 1500 + b"]" * 1500 + b"}"),  # deep nesting
    ("/v1/completions", b'{"model": "tiny", "prompt": "\\ud800"}'),  # lone surrogate: the tokenizer raised
    ("/v1/completions", b'{"model": "tiny", "prompt": ["ok", "\\udfff"]}'),
    ("/v1/completions", b'{"model": "\\ud800", "prompt": "x"}'),  # quoted in the 404's message
    ("/v1/completions", b'{"model": "tiny", "prompt": "x", "seed": 99999999999999999999999}'),  # overflowed torch
    ("/v1/completions", b'{"model": "tiny", "prompt": [99999999999999999999999]}'),
    ("/v1/completions", b'{"model": "tiny", "prompt": "x", "max_tokens": 1e400}'),
    ("/v1/completions", b'{"model": "tiny", "prompt": "x", "temperature": NaN}'),
    ("/v1/completions", b'{"model": "tiny", "prompt": "x", "size": "nan"}'),
    ("/v1/chat/completions", b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}'),
    (
        "/v1/chat/completions",
        b'{"model": "tiny", "messages": [{"role": "user", "content": [{"text": "\\udc00", "type": "text"}]}]}',
    ),
    ("/v1/chat/completions", b'{"model": "tiny", "messages": [{"role": "tool", "content": "x"}]}'),
]


@pytest.mark.parametrize(("path", "body"), MALFORMED, ids=range(len(MALFORMED)))
def test_malformed_requests_get_a_4xx_without_a_trace(keyed: Server, path: str, body: bytes) -> None:
    headers = {**AUTH, "Content-Type": "application/json"}
    response = httpx.post(f"{keyed.url}{path}", content=body, headers=headers, timeout=60)
    assert 400 <= response.status_code < 500, response.text
    assert_openai_error(response, response.status_code)


class FailingEngine(ScriptedEngine):
    """Raises an unexpected error (not an ``EngineError``) carrying internal detail, at the first
    token or after ``after`` tokens."""

    after = 0
    detail = "worker crashed reading /srv/internal/weights.safetensors"

    async def _generate(self, request: GenerationRequest) -> Any:  # type: ignore[override]
        for i, event in enumerate([e async for e in super()._generate(request)]):
            if i >= self.after:
                raise RuntimeError(self.detail)
            yield event


def failing_app(family: Family, config: DeployConfig, after: int) -> TestClient:
    def make(fam: Family, sizes: Sequence[str], cfg: DeployConfig) -> Engine:
        engine = FailingEngine(fam, sizes)
        engine.after = after
        return engine

    return TestClient(
        create_app(config, family_loader=lambda cfg: family, engine_factory=make), raise_server_exceptions=False
    )


def test_an_internal_error_is_a_plain_500_and_a_mid_stream_one_a_plain_event(tiny_dirs: TinyFamilyDirs) -> None:
    """The one place with an injected fault: an engine raising what it should not, in-process."""
    config = parse_config(deploy_dict(tiny_dirs))
    family = load_family(config)
    body = {"model": FAMILY, "prompt": "x", "max_tokens": 4}
    with failing_app(family, config, after=0) as client:
        _wait_healthy(client)
        response = client.post("/v1/completions", json=body)
        assert response.status_code == 500
        assert response.json()["error"]["code"] == "internal_error"
        for marker in (*TRACE_MARKERS, FailingEngine.detail, "RuntimeError"):
            assert marker not in response.text
    with failing_app(family, config, after=2) as client:
        _wait_healthy(client)
        stream = client.post("/v1/completions", json={**body, "stream": True})
        assert stream.status_code == 200
        assert sse_problem(stream.text) is None
        assert '"internal_error"' in stream.text
        for marker in (*TRACE_MARKERS, FailingEngine.detail, "RuntimeError"):
            assert marker not in stream.text


def _wait_healthy(client: TestClient) -> None:
    import time

    for _ in range(500):
        if client.get("/health").status_code == 200:
            return
        time.sleep(0.02)
    raise TimeoutError(client.get("/health").text)


# --- nothing in a request names a file, a model or a worker -----------------------------------


class Listener:
    """A TCP port that counts connections: any request that makes the server call out shows here."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.sock.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections = 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.done.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self.done.set()
        self.thread.join(5)
        self.sock.close()


def mapped_files(pid: int) -> set[str]:
    """Files the process has mapped (safetensors weights are) or open now."""
    maps = {line.split(maxsplit=5)[5] for line in Path(f"/proc/{pid}/maps").read_text().splitlines()
            if len(line.split(maxsplit=5)) == 6}  # fmt: skip
    fds = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):  # closed since the listing
            fds.add(os.readlink(fd))
    return maps | fds


def test_paths_and_urls_in_a_request_load_and_contact_nothing(
    keyed: Server, tmp_path: Path
) -> None:  # fmt: skip
    other_teacher, other_student = write_pair(tmp_path, "llama", layers=4)  # a real family, never configured
    listener = Listener()
    models_before = httpx.get(f"{keyed.url}/v1/models", headers=AUTH, timeout=30).json()
    health_before = httpx.get(f"{keyed.url}/health", timeout=30).json()
    names = [
        *(str(d) for d in (other_teacher, other_student)), "/etc/passwd", "../x", "../../teacher", "file:///etc/passwd",
        f"{listener.url}/v1", listener.url, "hf://HuggingFaceTB/SmolLM2-135M", "HuggingFaceTB/SmolLM2-135M",
    ]  # fmt: skip
    routes: list[tuple[str, dict[str, Any]]] = [
        ("/v1/completions", {"prompt": "x"}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
    ]
    try:
        for name in names:
            for path, extra in routes:
                base: dict[str, Any] = {"model": FAMILY, "max_tokens": 1, **extra}
                as_model = httpx.post(f"{keyed.url}{path}", json={**base, "model": name}, headers=AUTH, timeout=30)
                assert_openai_error(as_model, 404, "model_not_found")
                as_size = httpx.post(f"{keyed.url}{path}", json={**base, "size": name}, headers=AUTH, timeout=30)
                assert as_size.status_code in (400, 404), as_size.text
                assert_openai_error(as_size, as_size.status_code)
                for field in ("teacher", "student", "family_file", "url", "base_url", "worker_url", "path"):
                    extra_field = httpx.post(f"{keyed.url}{path}", json={**base, field: name}, headers=AUTH,
                                             timeout=30)  # fmt: skip
                    assert_openai_error(extra_field, 400, "unsupported_field")
            retrieved = httpx.get(f"{keyed.url}/v1/models/{name}", headers=AUTH, timeout=30)
            assert_openai_error(retrieved, 404)
        assert listener.connections == 0
        assert not [f for f in mapped_files(keyed.proc.pid) if str(tmp_path) in f or f == "/etc/passwd"]
        assert httpx.get(f"{keyed.url}/v1/models", headers=AUTH, timeout=30).json() == models_before
        assert httpx.get(f"{keyed.url}/health", timeout=30).json() == health_before
    finally:
        listener.close()


# --- CORS -------------------------------------------------------------------------------------


def preflight(server: Server, origin: str, path: str = "/v1/chat/completions") -> httpx.Response:
    headers = {"Origin": origin, "Access-Control-Request-Method": "POST",
               "Access-Control-Request-Headers": "authorization, content-type"}  # fmt: skip
    return httpx.options(f"{server.url}{path}", headers=headers, timeout=30)


def test_no_cors_headers_unless_configured(keyed: Server) -> None:
    assert "access-control-allow-origin" not in preflight(keyed, APP_ORIGIN).headers
    with_origin = httpx.get(f"{keyed.url}/v1/models", headers={**AUTH, "Origin": APP_ORIGIN}, timeout=30)
    assert with_origin.status_code == 200
    assert not [h for h in with_origin.headers if h.startswith("access-control-")]


def test_cors_allows_the_configured_origin_only(locked: Server) -> None:
    allowed = preflight(locked, APP_ORIGIN)  # no key: a browser's preflight never carries one
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == APP_ORIGIN
    allowed_headers = allowed.headers["access-control-allow-headers"].lower()
    assert "authorization" in allowed_headers and "content-type" in allowed_headers
    assert "POST" in allowed.headers["access-control-allow-methods"]
    refused = preflight(locked, "https://evil.example.com")
    assert refused.status_code == 400
    assert "access-control-allow-origin" not in refused.headers
    # the real request still needs the key; its 401 carries CORS headers so the page can read it
    unauthorized = httpx.get(f"{locked.url}/v1/models", headers={"Origin": APP_ORIGIN}, timeout=30)
    assert_openai_error(unauthorized, 401, "invalid_api_key")
    assert unauthorized.headers["access-control-allow-origin"] == APP_ORIGIN
    ok = httpx.get(f"{locked.url}/v1/models", headers={**AUTH, "Origin": APP_ORIGIN}, timeout=30)
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == APP_ORIGIN
    evil = httpx.get(f"{locked.url}/v1/models", headers={**AUTH, "Origin": "https://evil.example.com"}, timeout=30)
    assert "access-control-allow-origin" not in evil.headers
