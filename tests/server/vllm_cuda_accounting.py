"""Run in a subprocess by tests/server/test_vllm_workers.py: vLLM's own CUDA memory check
(``request_memory``) on a CUDA-shaped configuration, fed by the loader's report and the worker's
``--gpu-memory-utilization``. Needs vLLM, no GPU: the device is described by its figures.

Usage: python vllm_cuda_accounting.py WORKDIR  -> one ``RESULT {json}`` line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from server.engines.vllm import loader
from server.engines.vllm.worker import worker_memory_utilization

GIB = 1 << 30
# an 80 GiB GPU: the store (10) and seven workers of 8 KV + 2 runtime fill it exactly
DEVICE, STORE, KV, RUNTIME, WORKERS = 80 * GIB, 10 * GIB, 8 * GIB, 2 * GIB, 7


def start_workers(external_of: Any, count: int = WORKERS) -> list[Any]:
    """Each worker's outcome of vLLM's start-up check: its engine budget (bytes) or the error text.
    Free memory is the device minus the store (once) minus what the workers before it hold (each
    holds its KV cache, set in bytes, and its runtime)."""
    from vllm.config import CacheConfig
    from vllm.v1.worker.utils import request_memory

    share = worker_memory_utilization(DEVICE, STORE, KV, RUNTIME)
    out: list[Any] = []
    held = STORE
    for _ in range(count):
        snapshot = SimpleNamespace(total_memory=DEVICE, free_memory=DEVICE - held, device_="cuda:0")
        try:
            budget = request_memory(snapshot, CacheConfig(gpu_memory_utilization=share), external_of())  # type: ignore[arg-type]
        except ValueError as exc:
            out.append(str(exc).splitlines()[0])
            continue
        out.append(budget)
        held += KV + RUNTIME
    return out


def main() -> None:
    from vllm.config.load import LoadConfig

    workdir = Path(sys.argv[1])
    manifest = workdir / "store.json"  # what share_store writes for a CUDA store (handle elided)
    manifest.write_text(json.dumps({"bytes": STORE, "device": "cuda:0", "cuda_ipc": "", "tensors": {}}))
    loader.register()
    extra = {"manifest": str(manifest), "plan": {}}
    cls = loader._loader_class()
    reported = cls(LoadConfig(load_format=loader.LOAD_FORMAT, model_loader_extra_config=extra))
    result = {
        "reported": reported.get_external_weight_memory(None),
        "store": STORE,
        "engine_need": KV + RUNTIME,
        "with_report": start_workers(lambda: reported.get_external_weight_memory(None)),
        "without_report": start_workers(lambda: 0),
    }
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
