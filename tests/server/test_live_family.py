"""The family changes while the server serves: a first start serves the teacher while the student is
distilled and searched in a child process, then swaps to the built family live; an operator reloads
a changed deploy file or family with SIGHUP or ``POST /admin/reload``; a broken family is refused and
the old one keeps serving. Real server in a subprocess, real clients, real distillation (tiny)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from boomerang_core.family import Family
from boomerang_core.store import LayerStore
from tests.server.deploys import FAMILY, write_deploy
from tests.server.live import KEY, Server, launch, serving
from tests.tiny import write_pair

pytestmark = pytest.mark.server
AUTH = {"Authorization": f"Bearer {KEY}"}
# A student distilled for a few seconds: 4,096 tokens of the built-in corpus, 16 steps.
TINY_RECIPE = {"token_budget": 4096, "seq_len": 64, "batch_size": 4, "save_steps": 100}


@dataclass
class Load:
    """Clients in a loop (streamed completions and whole chat replies) until stopped; every outcome
    is kept: (start, end, ok, detail, served size)."""

    server: Server
    sizes: list[str | None]
    stop: threading.Event = field(default_factory=threading.Event)
    results: list[tuple[float, float, bool, str, str]] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self, clients: int = 2, pause_s: float = 0.1) -> Load:
        for i in range(clients):
            t = threading.Thread(target=self._loop, args=(i, pause_s), daemon=True)
            t.start()
            self.threads.append(t)
        return self

    def _loop(self, i: int, pause_s: float) -> None:
        n = 0
        while not self.stop.is_set():
            size = self.sizes[(i + n) % len(self.sizes)]
            start = time.time()
            try:
                ok, detail, served = (self._stream if n % 2 == 0 else self._chat)(size)
            except Exception as exc:  # a dropped connection is a failure too
                ok, detail, served = False, repr(exc), ""
            self.results.append((start, time.time(), ok, detail, served))
            n += 1
            time.sleep(pause_s)

    def _stream(self, size: str | None) -> tuple[bool, str, str]:
        body: dict[str, Any] = {"model": FAMILY, "prompt": "The module defines", "max_tokens": 24,
                                "temperature": 0, "stream": True, "ignore_eos": True,
                                "stream_options": {"include_usage": True}}  # fmt: skip
        if size is not None:
            body["size"] = size
        tokens, done = 0, False
        with httpx.stream("POST", f"{self.server.url}/v1/completions", json=body, headers=AUTH, timeout=120) as r:
            if r.status_code != 200:
                return False, f"{r.status_code} {r.read().decode()[:300]}", ""
            served = r.headers.get("x-boomerang-size", "")
            for line in r.iter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        return False, line, served
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
        return done and tokens == 24, f"stream: {tokens} tokens, done={done}", served

    def _chat(self, size: str | None) -> tuple[bool, str, str]:
        body: dict[str, Any] = {"model": FAMILY, "messages": [{"role": "user", "content": "Name a colour."}],
                                "max_tokens": 12, "temperature": 0}  # fmt: skip
        if size is not None:
            body["size"] = size
        r = httpx.post(f"{self.server.url}/v1/chat/completions", json=body, headers=AUTH, timeout=120)
        ok = r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        return ok, f"chat {r.status_code} {r.text[:300] if not ok else ''}", r.headers.get("x-boomerang-size", "")

    def finish(self) -> list[tuple[float, float, bool, str, str]]:
        self.stop.set()
        for t in self.threads:
            t.join(180)
        return self.results


def health(server: Server) -> dict[str, Any]:
    body: dict[str, Any] = httpx.get(f"{server.url}/health", timeout=30).json()
    return body


def wait_for(predicate: Any, timeout: float, what: str, server: Server) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if server.proc.poll() is not None:
            raise RuntimeError(f"server exited:\n{server.log.read_text()[-3000:]}")
        time.sleep(0.25)
    raise TimeoutError(f"{what} not within {timeout} s:\n{server.log.read_text()[-3000:]}")


class SlowStream:
    """One stream that reads its first chunk, then holds until ``release``: a request in flight
    across whatever happens meanwhile."""

    def __init__(self, server: Server, size: str, max_tokens: int = 200) -> None:
        self.release = threading.Event()
        self.first = threading.Event()
        self.lines: list[str] = []
        self.status = 0
        body = {"model": FAMILY, "prompt": "A class is", "max_tokens": max_tokens, "temperature": 0, "stream": True,
                "ignore_eos": True, "size": size, "stream_options": {"include_usage": True}}  # fmt: skip

        def run() -> None:
            with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=AUTH, timeout=600) as r:
                self.status = r.status_code
                for line in r.iter_lines():
                    self.lines.append(line)
                    if not self.first.is_set():
                        self.first.set()
                        self.release.wait(600)

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def finish(self) -> tuple[int, str]:
        """(completion tokens, model) of the whole stream, which must end with its usage and [DONE]."""
        self.release.set()
        self.thread.join(120)
        chunks = [json.loads(x[6:]) for x in self.lines if x.startswith("data: {")]
        assert not any("error" in c for c in chunks), chunks[-1]
        assert [x for x in self.lines if x][-1] == "data: [DONE]"
        return chunks[-1]["usage"]["completion_tokens"], chunks[0]["model"]


def test_first_start_serves_the_teacher_then_the_built_family_live(tmp_path: Path) -> None:
    teacher, _ = write_pair(tmp_path, "llama", layers=8)
    student = tmp_path / "built-student"  # not there yet: the server distils it
    config = {
        "family": {"name": FAMILY, "teacher": str(teacher), "student": str(student), "distill": TINY_RECIPE},
        "auth": {"api_key_env": "TINY_SERVER_KEY"},
        "routing": {"slo_ms": 60_000},
        # interim sizes at any perplexity: a random tiny teacher's layer drops are all about as bad as it is
        "build": {"nice": 5, "threads": 1, "interim_max_ppl_ratio": 100},
    }
    server = launch(write_deploy(tmp_path / "deploy.yaml", config), tmp_path / "server.log")
    with serving(server, timeout=120):
        # the teacher serves before the student exists
        first = health(server)
        assert first["sizes"] == ["l8"] and first["generation"] == 0
        assert not (student / "family.json").exists()
        # then teacher-only layer drops stand in for the sizes still building
        wait_for(lambda: health(server)["generation"] == 1, 300, "the interim sizes", server)
        interim = health(server)
        # the smallest drop and the teacher always serve (a random teacher's larger drops may be dominated)
        assert interim["sizes"][0] == "l5" and interim["sizes"][-1] == "l8", interim
        assert interim["build"]["stage"] in ("interim", "distill", "order", "search"), interim
        assert interim["build"]["pending_sizes"] == ["l5", "l6", "l7"]
        assert interim["last_reload"]["reason"] == "interim sizes while the family builds"
        models = httpx.get(f"{server.url}/v1/models", headers=AUTH, timeout=30).json()
        status = {m["id"]: m["status"] for m in models["data"] if m.get("size")}
        assert status == {"tiny:l8": "ready", "tiny:l5": "interim", "tiny:l6": "interim", "tiny:l7": "interim"}
        assert models["build"]["stage"] in ("distill", "order", "search")
        r = httpx.post(f"{server.url}/v1/completions", headers=AUTH, timeout=60,
                       json={"model": FAMILY, "prompt": "A class is", "max_tokens": 4, "size": "l5"})  # fmt: skip
        assert r.status_code == 200 and r.json()["model"] == "tiny:l5", r.text
        metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
        assert "boomerang_family_build_progress" in metrics and "boomerang_family_build_stage{" in metrics

        held = SlowStream(server, "l8")
        assert held.first.wait(60), server.log.read_text()[-2000:]
        load = Load(server, [None, "l5"]).start()
        try:
            wait_for(lambda: health(server)["generation"] == 2, 900, "the built family", server)
            time.sleep(3)  # more requests, on the built family
        finally:
            results = load.finish()
        swapped_at = health(server)["last_reload"]["at"]
        chunks, model = held.finish()  # started on the teacher-only family, ends after the swap

        after = health(server)
        assert after["build"]["stage"] == "done" and after["build"]["pending_sizes"] == []
        saved = Family.load(student, LayerStore.load(teacher, student))
        assert after["sizes"] == sorted(s.name for s in saved.servable)
        assert chunks == 200 and model == "tiny:l8"
        failed = [r for r in results if not r[2]]
        assert not failed, failed[:5]
        assert any(start < swapped_at < end for start, end, *_ in results) or chunks == 200
        assert any(start > swapped_at for start, *_ in results), "no request ran on the built family"
        retired = ("retired family generation 0", "retired family generation 1")
        wait_for(lambda: all(x in server.log.read_text() for x in retired), 60, "the old families' end", server)
        assert server.log.read_text().count("family build:") >= 3  # one line per stage
        # the new family answers under its own sizes
        smallest = saved.servable[0].name
        r = httpx.post(f"{server.url}/v1/completions", headers=AUTH, timeout=60,
                       json={"model": FAMILY, "prompt": "A class is", "max_tokens": 4, "size": smallest})  # fmt: skip
        assert r.status_code == 200 and r.headers["x-boomerang-route-reason"] == "named", r.text


@pytest.fixture
def reloadable(tmp_path: Path) -> Iterator[tuple[Server, Path, Path, Family]]:
    """A server of a tiny family whose deploy file and family file a test rewrites."""
    teacher, student = write_pair(tmp_path, "llama", layers=8)
    family = Family.from_store(FAMILY, LayerStore.load(teacher, student))
    family_dir = tmp_path / "family"
    family_dir.mkdir()
    family.save(family_dir)
    config = {
        "family": {"name": FAMILY, "teacher": str(teacher), "student": str(student), "family_file": str(family_dir)},
        "tiers": [{"name": "small", "size": "k0"}, {"name": "large", "size": "k5"}],
        "auth": {"api_key_env": "TINY_SERVER_KEY"},
        "routing": {"slo_ms": 60_000},
    }
    deploy = write_deploy(tmp_path / "deploy.yaml", config)
    server = launch(deploy, tmp_path / "server.log")
    with serving(server):
        yield server, deploy, family_dir, family


def test_reloads_under_load_lose_nothing_and_a_broken_family_is_refused(
    reloadable: tuple[Server, Path, Path, Family],
) -> None:
    server, deploy, family_dir, family = reloadable
    config = yaml.safe_load(deploy.read_text())
    assert health(server)["sizes"] == ["k0", "k5"]
    held = SlowStream(server, "k5")
    assert held.first.wait(60)
    load = Load(server, [None, "small", "large", "k5"]).start(clients=3)
    try:
        # 1. SIGHUP after a tier is added to the deploy file
        config["tiers"].insert(1, {"name": "mid", "size": "k3"})
        write_deploy(deploy, config)
        os.kill(server.proc.pid, signal.SIGHUP)
        wait_for(lambda: health(server)["generation"] == 1, 300, "the SIGHUP reload", server)
        assert health(server)["sizes"] == ["k0", "k3", "k5"]

        # 2. the admin endpoint after the family file drops sizes k1, k2 and k4
        kept = [s for s in family.sizes if s.name in ("k0", "k3", "k5")]
        Family(family.name, family.store, kept, family.order, family.info).save(family_dir)
        assert httpx.post(f"{server.url}/admin/reload", timeout=300).status_code == 401  # the key is needed
        r = httpx.post(f"{server.url}/admin/reload", headers=AUTH, timeout=300)
        assert r.status_code == 200, r.text
        assert r.json() == {"status": "reloaded", "family": FAMILY, "sizes": ["k0", "k3", "k5"], "generation": 2}
        ids = {m["id"] for m in httpx.get(f"{server.url}/v1/models", headers=AUTH, timeout=30).json()["data"]}
        assert ids == {"tiny", "tiny:k0", "tiny:k3", "tiny:k5"}
        # a size the reload removed: the nearest served one (k4 has 7 layers: k3 and k5 are 1 away, the smaller wins)
        r = httpx.post(f"{server.url}/v1/completions", headers=AUTH, timeout=60,
                       json={"model": FAMILY, "prompt": "A class is", "max_tokens": 3, "size": "k4"})  # fmt: skip
        assert r.status_code == 200, r.text
        assert (r.headers["x-boomerang-size"], r.headers["x-boomerang-route-reason"]) == ("k3", "nearest")

        # 3. a broken family file: refused with one log line, the old family keeps serving
        (family_dir / "family.json").write_text('{"name": "tiny", "sizes": [{"name": "k0", "plan": "no"}]}')
        r = httpx.post(f"{server.url}/admin/reload", headers=AUTH, timeout=300)
        assert r.status_code == 409, r.text
        assert r.json()["error"]["code"] == "reload_refused"
        os.kill(server.proc.pid, signal.SIGHUP)
        wait_for(lambda: server.log.read_text().count("reload refused") >= 2, 120, "the refused SIGHUP", server)
        state = health(server)
        assert state["generation"] == 2 and state["sizes"] == ["k0", "k3", "k5"]
        assert state["last_reload"]["result"] == "refused"
        time.sleep(2)  # more requests on the family that stayed
    finally:
        results = load.finish()
    chunks, model = held.finish()  # began before the first reload, read to its end after the last
    assert (chunks, model) == (200, "tiny:k5")
    failed = [r for r in results if not r[2]]
    assert not failed, failed[:5]
    assert len(results) >= 10
    retired = ("retired family generation 0", "retired family generation 1")
    wait_for(lambda: all(x in server.log.read_text() for x in retired), 60, "the old families' end", server)
    assert 'boomerang_family_reloads_total{result="swapped"} 2.0' in httpx.get(f"{server.url}/metrics").text
