"""A first start on an empty cache: how soon the demo family answers, and what its build costs serving.

    python bench/first_start_bench.py      # ~6 min on 2 cores; writes bench/results/first_start.{md,json}

1. Starts ``python -m server.run`` (no deploy file: the demo family) with ``BOOMERANG_CACHE`` set to a
   new empty directory, and times the first ``/health`` 200 from the process start (the GGUF teacher
   is converted, loaded and served; the student has not been distilled yet) and the first chat
   answer. ``/health`` is read every 0.2 s, with its build stage.
2. While the demo student distils in the background (the build's own process, ``build.nice`` 19), the
   same chat requests are timed with the build running and with it paused (SIGSTOP to its process
   group, SIGCONT after), alternating in rounds so that both arms see the same box: p50 / p95
   end-to-end latency, and their ratio. ``--concurrency`` clients send back to back.
3. Stops the server (the build is resumable; the temporary cache is deleted).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests: the test suite's launcher

import httpx
import numpy as np
import psutil

from tests.server.live import free_port, spawn, stop

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = [
    "What is the capital of France?",
    "Name a fruit that is yellow.",
    "What colour is the sky on a clear day?",
    "How many legs does a spider have?",
]


def chat(url: str, question: str, max_tokens: int) -> float:
    body = {"model": "smollm2-135m", "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True}  # fmt: skip
    start = time.monotonic()
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300)
    r.raise_for_status()
    return time.monotonic() - start


def timed_round(url: str, requests: int, concurrency: int, max_tokens: int) -> list[float]:
    out: list[float] = []
    lock = threading.Lock()
    todo = list(range(requests))

    def client() -> None:
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop()
            seconds = chat(url, QUESTIONS[i % len(QUESTIONS)], max_tokens)
            with lock:
                out.append(seconds)

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def build_group(server_pid: int) -> int | None:
    """The process group of the server's build child (it runs in its own session)."""
    for child in psutil.Process(server_pid).children(recursive=True):
        if "boomerang_core.build" in " ".join(child.cmdline()):
            return os.getpgid(child.pid)
    return None


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values) * 1e3, q))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--requests", type=int, default=8, help="requests per arm per round")
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "first_start"))
    a = ap.parse_args()

    cache = Path(tempfile.mkdtemp(prefix="boomerang-first-start-"))
    port = free_port()
    log = cache / "server.log"
    env = {**os.environ, "BOOMERANG_CACHE": str(cache), "PYTHONPATH": str(REPO)}
    load_before = os.getloadavg()
    t0 = time.monotonic()
    server = spawn([sys.executable, "-m", "server.run", "--port", str(port)], port, log, env)
    url = server.url
    result: dict[str, Any] = {"machine": f"{os.cpu_count()} cores", "load_before": [round(x, 2) for x in load_before]}
    try:
        first_503: float | None = None
        while True:
            if server.proc.poll() is not None:
                raise RuntimeError(log.read_text()[-3000:])
            try:
                r = httpx.get(f"{url}/health", timeout=2)
                if r.status_code == 503 and first_503 is None:
                    first_503 = time.monotonic() - t0
                if r.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        result["first_health_200_s"] = round(time.monotonic() - t0, 1)
        result["first_http_answer_s"] = round(first_503 or result["first_health_200_s"], 1)
        health = r.json()
        result["health_at_first_200"] = health
        chat(url, QUESTIONS[0], 8)
        result["first_chat_answer_s"] = round(time.monotonic() - t0, 1)
        print(f"first /health 200 after {result['first_health_200_s']} s: {health}", flush=True)

        deadline = time.monotonic() + 120  # until the build is distilling
        while httpx.get(f"{url}/health", timeout=5).json()["build"]["stage"] != "distill":
            if time.monotonic() > deadline:
                raise RuntimeError("the build did not reach its distillation")
            time.sleep(1)
        group = build_group(server.proc.pid)
        assert group is not None, "no build process"
        timed_round(url, 2, 1, a.max_tokens)  # warm-up
        busy: list[float] = []
        idle: list[float] = []
        for i in range(a.rounds):
            busy += timed_round(url, a.requests, a.concurrency, a.max_tokens)
            os.killpg(group, signal.SIGSTOP)
            try:
                time.sleep(1)
                idle += timed_round(url, a.requests, a.concurrency, a.max_tokens)
            finally:
                os.killpg(group, signal.SIGCONT)
            print(f"round {i + 1}: p95 distilling {pct(busy, 95):.0f} ms, paused {pct(idle, 95):.0f} ms", flush=True)
        build = httpx.get(f"{url}/health", timeout=5).json()["build"]
        result.update(
            {
                "rounds": a.rounds,
                "requests_per_arm": len(busy),
                "concurrency": a.concurrency,
                "max_tokens": a.max_tokens,
                "distilling_ms": {"p50": round(pct(busy, 50)), "p95": round(pct(busy, 95))},
                "idle_ms": {"p50": round(pct(idle, 50)), "p95": round(pct(idle, 95))},
                "p50_ratio": round(statistics.median(busy) / statistics.median(idle), 2),
                "p95_ratio": round(pct(busy, 95) / pct(idle, 95), 2),
                "build_at_end": build,
                "load_after": [round(x, 2) for x in os.getloadavg()],
            }
        )
    finally:
        stop(server)
        shutil.rmtree(cache, ignore_errors=True)
    out = Path(a.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


def markdown(r: dict[str, Any]) -> str:
    d, i = r["distilling_ms"], r["idle_ms"]
    return f"""# First start of the demo family on an empty cache

`python bench/first_start_bench.py`, {r["machine"]}, load average before {r["load_before"]}, after {r["load_after"]}.

| from the server process's start | seconds |
|---|---|
| first HTTP answer (`/health` 503, loading) | {r["first_http_answer_s"]} |
| first `/health` 200 (the teacher serves; the student is not distilled yet) | {r["first_health_200_s"]} |
| first chat answer | {r["first_chat_answer_s"]} |

Serving the teacher while the demo student distils in the background (`build.nice` 19), against the
same requests with the build paused (SIGSTOP), alternating in {r["rounds"]} rounds;
{r["requests_per_arm"]} chat requests per arm, {r["concurrency"]} clients, {r["max_tokens"]} tokens each:

| arm | p50 ms | p95 ms |
|---|---|---|
| build distilling | {d["p50"]} | {d["p95"]} |
| build paused | {i["p50"]} | {i["p95"]} |
| ratio | {r["p50_ratio"]}x | {r["p95_ratio"]}x |

The build's state at the end: stage `{r["build_at_end"]["stage"]}`, {r["build_at_end"]["progress"]:.1%} done,
ETA {r["build_at_end"]["eta_s"]} s.
"""


if __name__ == "__main__":
    sys.exit(main())
