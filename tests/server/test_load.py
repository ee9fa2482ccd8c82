"""A short real load run: locust (headless, in a subprocess, bench/locustfile.py) against a real
gateway on a tiny family, with a batch of 2 and a queue of 2 so that many requests are shed.

Nothing may be lost: every request locust counted has an outcome in the records; the server counted
the same 200s and 429s; every 200 stream ends with ``[DONE]`` after usage equal to the tokens
streamed; every error is OpenAI-shaped and every 429 says when to retry.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from typing import Any

import pytest

from tests.server.deploys import TinyFamilyDirs, deploy_dict, write_deploy
from tests.server.live import KEY, REPO, launch, serving
from tests.tiny import tiny_tokenizer

pytestmark = pytest.mark.server
MAX_TOKENS = 8
ENDPOINT = "/v1/chat/completions"


def expected_prompt_tokens(prompt: str) -> int:
    tokenizer = tiny_tokenizer()
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)  # fmt: skip
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


@pytest.fixture(scope="module")
def load_run(tiny_dirs: TinyFamilyDirs, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("load")
    config = deploy_dict(tiny_dirs, engines={"local": {"max_batch_size": 2, "max_queue": 2}},
                         auth={"api_key_env": "TINY_SERVER_KEY"})  # fmt: skip
    server = launch(write_deploy(tmp / "deploy.yaml", config), tmp / "server.log")
    with serving(server, stop_timeout=30):
        records = tmp / "records.jsonl"
        env = {**os.environ, "LOAD_RECORDS": str(records), "LOAD_API_KEY": KEY, "LOAD_MAX_TOKENS": str(MAX_TOKENS),
               "LOAD_PACE_S": "0.5"}  # fmt: skip
        command = [
            sys.executable, "-m", "locust", "-f", str(REPO / "bench" / "locustfile.py"), "--headless",
            "--host", server.url, "-u", "10", "-r", "10", "-t", "6s", "--stop-timeout", "60", "--only-summary",
            "--exit-code-on-error", "0", "--json-file", str(tmp / "locust"),
        ]  # fmt: skip
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180, cwd=REPO)
        assert done.returncode == 0, done.stderr[-3000:]
        deadline = time.monotonic() + 30
        while server.live_requests() and time.monotonic() < deadline:
            time.sleep(0.1)
        rows = [json.loads(line) for line in records.read_text().splitlines()]
        counted = sum(e["num_requests"] for e in json.loads((tmp / "locust.json").read_text()))  # written at exit
        return {"rows": rows, "server": server.requests_by_status(ENDPOINT), "live": server.live_requests(),
                "locust_requests": counted}  # fmt: skip


def test_every_request_locust_sent_has_an_outcome_and_the_server_agrees(load_run: dict[str, Any]) -> None:
    rows = load_run["rows"]
    sent = [r["id"] for r in rows if r["kind"] == "sent"]
    done = [r for r in rows if r["kind"] == "done"]
    assert len(sent) == len(set(sent)) == len(done) == load_run["locust_requests"] > 20
    assert {r["id"] for r in done} == set(sent)
    outcomes = Counter(r["outcome"] for r in done)
    assert set(outcomes) <= {"ok", "shed"}, [r for r in done if r["outcome"] not in ("ok", "shed")][:3]
    assert outcomes["ok"] >= 10 and outcomes["shed"] >= 5, outcomes  # the queue of 2 overflowed
    statuses = Counter(str(r["status"]) for r in done)
    assert load_run["server"] == statuses, (load_run["server"], statuses)
    assert load_run["live"] == 0  # no slot left behind


def test_every_accepted_stream_ends_with_done_and_usage_equal_to_the_tokens_streamed(load_run: dict[str, Any]) -> None:
    ok = [r for r in load_run["rows"] if r["kind"] == "done" and r["outcome"] == "ok"]
    streams = [r for r in ok if r["stream"]]
    assert streams and len(streams) < len(ok)  # both kinds were accepted
    expected = {p: expected_prompt_tokens(p) for p in {r["prompt"] for r in ok}}
    for r in ok:
        assert r["status"] == 200 and r["served"] == r["size"] and r["finish_reason"] == "length"
        usage = r["usage"]
        assert usage["completion_tokens"] == r["tokens"] == MAX_TOKENS, r
        assert usage["prompt_tokens"] == expected[r["prompt"]], r
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    for r in streams:
        assert r["done"] is True and r["content_deltas"] <= r["tokens"]
        assert r["ttft_s"] > 0 and len(r["itl_s"]) == MAX_TOKENS - 1


def test_every_refusal_is_an_openai_shaped_429_with_retry_after(load_run: dict[str, Any]) -> None:
    shed = [r for r in load_run["rows"] if r["kind"] == "done" and r["outcome"] == "shed"]
    assert shed
    for r in shed:
        body = r["error"]
        assert r["status"] == 429 and set(body) == {"error"}, r
        assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["code"] == "queue_full"
        assert int(r["retry_after"]) >= 1
