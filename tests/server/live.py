"""A real server process for tests and benchmarks: launch it on a free port, wait for /health, read
its metrics, hold long streams open to load it, stop it. The bench scripts import it too (with the
repository root on ``sys.path``)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai

from tests.server.deploys import FAMILY

REPO = Path(__file__).resolve().parents[2]
KEY = "test-key-0123"
PROMPTS = ["The module defines", "Return the value of", "A class is", "If the argument is"]


@dataclass
class Server:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def client(self, **kw: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=KEY, max_retries=0, timeout=120, **kw)

    def metric(self, name: str, **labels: str) -> float:
        text = httpx.get(f"{self.url}/metrics", timeout=30).text
        for line in text.splitlines():
            m = re.match(rf"{name}\{{(.*)\}} (\S+)$", line)
            if m and all(f'{k}="{v}"' in m.group(1) for k, v in labels.items()):
                return float(m.group(2))
        return 0.0

    def requests_by_status(self, endpoint: str) -> Counter[str]:
        """``boomerang_requests_total`` of ``endpoint``, summed over sizes, by HTTP status."""
        counts: Counter[str] = Counter()
        for line in httpx.get(f"{self.url}/metrics", timeout=30).text.splitlines():
            m = re.match(r"boomerang_requests_total\{(.*)\} (\S+)$", line)
            if m and f'endpoint="{endpoint}"' in m.group(1):
                status = re.search(r'status="(\d+)"', m.group(1))
                counts[status.group(1) if status else "?"] += int(float(m.group(2)))
        return counts

    def live_requests(self) -> float:
        """Requests the engines are running or holding in their queues, over every size."""
        text = httpx.get(f"{self.url}/metrics", timeout=30).text
        return sum(float(v) for v in re.findall(r"^boomerang_(?:running|waiting)_requests\{.*\} (\S+)$", text, re.M))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn(argv: Sequence[str], port: int, log: Path, env: Mapping[str, str] | None = None) -> Server:
    """Run ``argv``, a server that listens on ``port`` of loopback, from the repository root with
    ``env`` (default: this process's), its output appended to ``log``."""
    proc = subprocess.Popen(
        list(argv), cwd=REPO, env=dict(os.environ if env is None else env), stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    return Server(f"http://127.0.0.1:{port}", proc, log)


def launch(
    config: Path, log: Path, *, port: int | None = None, threads: int = 1, env: Mapping[str, str] | None = None
) -> Server:
    """``python -m server.run CONFIG`` on ``port`` (a free one by default) with ``TINY_SERVER_KEY`` set to
    ``KEY``, ``threads`` intra-op threads and ``env`` on top of this process's environment."""
    port = port or free_port()
    # one intra-op thread by default: tiny models gain nothing from more, and the test machine is shared
    defaults = {"TINY_SERVER_KEY": KEY, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads)}
    argv = [sys.executable, "-m", "server.run", str(config), "--port", str(port)]
    return spawn(argv, port, log, {**os.environ, **defaults, **(env or {})})


def stop(*servers: Server, timeout: float = 20) -> None:
    """Terminate every server still running, then wait for each (killed after ``timeout`` s)."""
    for server in servers:
        if server.proc.poll() is None:
            server.proc.terminate()
    for server in servers:
        try:
            server.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()


def wait_ready(
    server: Server, timeout: float = 180, headers: Mapping[str, str] | None = None, path: str = "/health"
) -> None:
    """Until ``path`` (asked with ``headers``) answers 200; an error if the process exits first or
    ``timeout`` s pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"server exited:\n{server.log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{server.url}{path}", headers=headers, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"server not ready in {timeout} s:\n{server.log.read_text()[-3000:]}")


@contextmanager
def serving(
    *servers: Server, timeout: float = 180, headers: Mapping[str, str] | None = None, stop_timeout: float = 20
) -> Iterator[None]:
    """Wait until each of ``servers`` is ready (``wait_ready``); stop them all on leaving (``stop``)."""
    try:
        for server in servers:
            wait_ready(server, timeout, headers)
        yield
    finally:
        stop(*servers, timeout=stop_timeout)


class Holders:
    """``count`` long greedy streams of ``size`` in the background; ``release`` disconnects them."""

    def __init__(self, server: Server, size: str, count: int, max_tokens: int = 380) -> None:
        self.stop = threading.Event()
        body = {"model": FAMILY, "prompt": PROMPTS[1], "max_tokens": max_tokens, "temperature": 0, "stream": True,
                "size": size, "ignore_eos": True}  # fmt: skip

        def one() -> None:
            with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=120,
                              headers={"Authorization": f"Bearer {KEY}"}) as response:  # fmt: skip
                for _ in response.iter_lines():
                    if self.stop.is_set():
                        return

        self.threads = [threading.Thread(target=one, daemon=True) for _ in range(count)]
        for t in self.threads:
            t.start()

    def release(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)
