"""Faults, against the real gateway in a subprocess on the tiny family: a drain on SIGTERM, a grace
limit that cuts streams with an error event, clients that disconnect, read slowly or never send their
headers (slowloris), prompts longer than the context, and deploy files that cannot be served.

One long-lived server (``steady``) takes the hostile clients; each SIGTERM test starts its own.
"""

from __future__ import annotations

import json
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.server.deploys import FAMILY, TinyFamilyDirs, deploy_dict, write_deploy
from tests.server.live import KEY, PROMPTS, Server, launch, stop, wait_ready
from tests.server.streams import AUTH, LONG, Stream, open_streams

pytestmark = pytest.mark.server
HEADER_TIMEOUT_S = 1.0
GRACE_S = 0.2
MAX_CONNECTIONS = 8


def config(dirs: TinyFamilyDirs, tmp: Path, name: str, **sections: Any) -> Path:
    data = deploy_dict(dirs, auth={"api_key_env": "TINY_SERVER_KEY"}, **sections)
    data["limits"] = {"max_tokens": 500, **data.get("limits", {})}
    return write_deploy(tmp / f"{name}.yaml", data)


@pytest.fixture(scope="module")
def fleet(tiny_dirs: TinyFamilyDirs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Server]]:
    """Every server of the module, started at once: ``steady`` takes the hostile clients (and a double
    SIGTERM last), ``limited`` has max_prompt_tokens 40 and 8 connections at most (then drains), ``cut``
    a grace of 0.2 s and a keep-alive of 1 s, and two deploys that cannot be served."""
    tmp = tmp_path_factory.mktemp("faults")
    missing_size = deploy_dict(tiny_dirs)
    missing_size["tiers"].append({"name": "huge", "size": "k99"})
    missing_teacher = deploy_dict(tiny_dirs)
    missing_teacher["family"]["teacher"] = str(tmp / "no-such-teacher")
    files = {
        "steady": config(tiny_dirs, tmp, "steady", server={"header_timeout_s": HEADER_TIMEOUT_S}),
        "limited": config(
            tiny_dirs,
            tmp,
            "limited",
            limits={"max_prompt_tokens": 40},
            server={"shutdown_grace_s": 120, "max_connections": MAX_CONNECTIONS},
        ),
        "cut": config(tiny_dirs, tmp, "cut", server={"shutdown_grace_s": GRACE_S, "keep_alive_s": 1}),
        "missing_size": write_deploy(tmp / "missing_size.yaml", missing_size),
        "missing_teacher": write_deploy(tmp / "missing_teacher.yaml", missing_teacher),
    }
    servers = {name: launch(path, tmp / f"{name}.log") for name, path in files.items()}
    try:
        for name in ("steady", "limited", "cut"):
            wait_ready(servers[name])
        yield servers
    finally:
        stop(*servers.values(), timeout=30)


@pytest.fixture(scope="module")
def steady(fleet: dict[str, Server]) -> Server:
    return fleet["steady"]


def wait_health(server: Server, status: int, timeout: float = 20) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = httpx.get(f"{server.url}/health", timeout=5)
        if response.status_code == status:
            return response
        time.sleep(0.02)
    raise AssertionError(f"/health never answered {status}")


def log_lines(server: Server, text: str) -> list[str]:
    return [line for line in server.log.read_text().splitlines() if text in line]


# --- hostile and careless clients -------------------------------------------------------------


def test_a_client_that_disconnects_mid_stream_frees_its_slot(steady: Server) -> None:
    body = {"model": FAMILY, "prompt": PROMPTS[1], "max_tokens": LONG, "temperature": 0, "stream": True,
            "size": "k4", "ignore_eos": True}  # fmt: skip
    with httpx.stream("POST", f"{steady.url}/v1/completions", json=body, headers=AUTH, timeout=60) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        assert steady.metric("boomerang_running_requests", size="k4") == 1
    deadline = time.monotonic() + 30
    while steady.metric("boomerang_running_requests", size="k4") != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert steady.metric("boomerang_running_requests", size="k4") == 0
    reply = steady.client().completions.create(model=f"{FAMILY}:k4", prompt=PROMPTS[0], max_tokens=8, temperature=0)
    assert reply.choices[0].finish_reason == "length" and reply.usage is not None and reply.usage.completion_tokens == 8


def test_slow_readers_and_slowloris_connections_do_not_stop_other_clients(steady: Server) -> None:
    host, port = "127.0.0.1", int(steady.url.rsplit(":", 1)[1])
    silent = [socket.create_connection((host, port)) for _ in range(25)]
    partial = [socket.create_connection((host, port)) for _ in range(25)]
    for sock in partial:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
    slow = socket.create_connection((host, port))
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    body = json.dumps({"model": FAMILY, "prompt": PROMPTS[1], "max_tokens": LONG, "temperature": 0, "stream": True,
                       "size": "k3", "ignore_eos": True, "logprobs": 5}).encode()  # fmt: skip
    slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)  # fmt: skip
    try:
        assert slow.recv(1).startswith(b"H")  # the slow reader's stream has started; it reads a byte at a time
        client = steady.client()
        for prompt in PROMPTS[:2]:
            reply = client.completions.create(model=FAMILY, prompt=prompt, max_tokens=16, temperature=0,
                                              extra_body={"size": "k3", "ignore_eos": True})  # fmt: skip
            assert reply.usage is not None and reply.usage.completion_tokens == 16
        assert slow.recv(1)  # still open, still being served
        for sock in silent + partial:  # each closed by the server once header_timeout_s passed
            sock.settimeout(HEADER_TIMEOUT_S + 20)
            assert sock.recv(1024) == b""
    finally:
        for sock in [*silent, *partial, slow]:
            sock.close()


def test_an_idle_kept_alive_connection_is_closed_after_keep_alive_s(fleet: dict[str, Server]) -> None:
    host, port = "127.0.0.1", int(fleet["cut"].url.rsplit(":", 1)[1])
    with socket.create_connection((host, port)) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        while not answer.endswith(b"}"):
            answer += sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 200")
        sock.settimeout(4)  # uvicorn's own default (5 s) would not close it by then; keep_alive_s (1 s) does
        assert sock.recv(1024) == b""


def test_keep_alive_connections_with_partial_headers_are_closed_too(steady: Server) -> None:
    host, port = "127.0.0.1", int(steady.url.rsplit(":", 1)[1])
    with socket.create_connection((host, port)) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(20)
        first = b""
        while not first.endswith(b"}"):  # the JSON body of the first answer, whole
            first += sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200")
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # the next request never completes its headers
        assert sock.recv(1024) == b""


# --- requests the engine must never see -------------------------------------------------------


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_a_prompt_longer_than_the_context_is_a_400(steady: Server, endpoint: str) -> None:
    client = steady.client()
    words = " ".join(["module"] * 600)  # more tokens than the 512 of the context
    with pytest.raises(openai.BadRequestError) as error:
        if endpoint == "completions":
            client.completions.create(model=FAMILY, prompt=words, max_tokens=4)
        else:
            client.chat.completions.create(model=FAMILY, messages=[{"role": "user", "content": words}], max_tokens=4)
    assert error.value.response.json()["error"]["code"] == "context_length_exceeded"
    assert client.completions.create(model=FAMILY, prompt=PROMPTS[0], max_tokens=2).choices  # the engine is fine


def test_max_prompt_tokens_below_the_context_is_a_400(fleet: dict[str, Server]) -> None:
    client = fleet["limited"].client()
    words = " ".join(["module"] * 60)  # 60 tokens: within the context, above max_prompt_tokens
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model=FAMILY, prompt=words, max_tokens=4)
    assert error.value.response.json()["error"]["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as chat_error:
        client.chat.completions.create(model=FAMILY, messages=[{"role": "user", "content": words}], max_tokens=4)
    assert chat_error.value.response.json()["error"]["code"] == "context_length_exceeded"
    assert client.completions.create(model=FAMILY, prompt=PROMPTS[0], max_tokens=2).choices


def test_connections_above_max_connections_get_503(fleet: dict[str, Server]) -> None:
    server = fleet["limited"]
    host, port = "127.0.0.1", int(server.url.rsplit(":", 1)[1])
    idle = [socket.create_connection((host, port)) for _ in range(MAX_CONNECTIONS)]
    try:
        with pytest.raises(openai.APIStatusError) as refused:
            server.client().completions.create(model=FAMILY, prompt=PROMPTS[0], max_tokens=2)
        assert refused.value.status_code == 503
        assert refused.value.response.headers["retry-after"]
        assert refused.value.response.headers["connection"] == "close"
        error = refused.value.response.json()["error"]
        assert error["type"] == "server_error" and error["code"] == "too_many_connections", error
    finally:
        for sock in idle:
            sock.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the server notices the closed sockets
        if httpx.get(f"{server.url}/health", timeout=5).status_code == 200:
            break
        time.sleep(0.05)
    assert server.client().completions.create(model=FAMILY, prompt=PROMPTS[0], max_tokens=2).choices


# --- refusing to start half-configured --------------------------------------------------------


@pytest.mark.parametrize("fault", ["missing_size", "missing_teacher"])
def test_a_deploy_that_cannot_be_served_exits_non_zero_with_one_line(fleet: dict[str, Server], fault: str) -> None:
    server = fleet[fault]
    assert server.proc.wait(120) != 0
    text = server.log.read_text()
    errors = [line for line in text.splitlines() if " ERROR " in line]
    named = {"missing_size": "k99", "missing_teacher": "no-such-teacher"}[fault]
    assert len(errors) == 1 and named in errors[0], text
    assert "Traceback" not in text


# --- drain on SIGTERM -------------------------------------------------------------------------


def test_sigterm_drains_streams_in_flight_refuses_new_requests_and_exits_0(fleet: dict[str, Server]) -> None:
    server = fleet["limited"]
    streams = open_streams(server, 3)
    server.proc.send_signal(signal.SIGTERM)
    health = wait_health(server, 503)
    assert health.json()["status"] == "draining"
    with pytest.raises(openai.APIStatusError) as refused:
        server.client().completions.create(model=FAMILY, prompt=PROMPTS[0], max_tokens=4)
    refused_at = time.monotonic()
    assert refused.value.status_code == 503
    assert refused.value.response.json()["error"]["code"] == "shutting_down"
    assert refused.value.response.headers["retry-after"] and refused.value.response.headers["connection"] == "close"
    for s in streams:
        s.join()
        assert s.failure is None and s.error is None and s.done
        assert s.completion_tokens == LONG and s.finish_reason == "length"  # every token, none lost
        assert s.ended_at is not None and s.ended_at > refused_at  # the refusal happened mid-drain
    assert server.proc.wait(60) == 0
    assert any("3 request(s) finished, 0 cut" in line for line in log_lines(server, "drained"))


def test_grace_exceeded_cuts_streams_with_an_error_event_and_exits_0(fleet: dict[str, Server]) -> None:
    server = fleet["cut"]
    streams = open_streams(server, 4)
    server.proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    assert server.proc.wait(30) == 0
    exited = time.monotonic()
    for s in streams:
        s.join()
        assert s.failure is None and s.done, s  # the stream ended properly: error event, then [DONE]
        assert s.error is not None and s.error["code"] == "shutting_down"
        assert s.pieces  # it was cut mid-way, not refused
    # bounded, not a speed figure: grace + a tick + the flush window + uvicorn's close window
    assert exited - signalled < GRACE_S + 10
    assert any("0 request(s) finished, 4 cut" in line for line in log_lines(server, "drained"))


def test_a_second_sigterm_exits_at_once(fleet: dict[str, Server]) -> None:
    server = fleet["steady"]  # last: it ends the steady server (grace 30 s)
    stream = Stream(server, max_tokens=LONG).start()
    assert stream.first.wait(60)
    server.proc.send_signal(signal.SIGTERM)
    wait_health(server, 503)
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(30) == 128 + signal.SIGTERM  # well before the 30 s grace
