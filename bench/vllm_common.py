"""What the vLLM benches share: the family they serve, four sizes of it, PSS of a process, a plain vLLM engine.

Family: the demo family when it is built (``boomerang_core.demo``); else a store of the demo teacher
alone with four teacher plans that drop middle layers (plans over the same resident layers, as
ShortGPT sizes are). Either way every size is served from one store.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any

import torch

from boomerang_core.family import FAMILY_FILE, Family
from boomerang_core.plan import teacher_plan
from boomerang_core.store import LayerStore


def load_family() -> tuple[Family, str]:
    from boomerang_core import demo

    if (demo.demo_dir() / "student" / FAMILY_FILE).is_file():
        return demo.load_demo_family(), "demo family (teacher + distilled student)"
    store = LayerStore.load(demo.ensure_teacher())
    n = store.num_teacher_layers
    plans = [teacher_plan(n, dropped=range(n // 2 - k // 2, n // 2 - k // 2 + k)) for k in (12, 8, 4, 0)]
    return Family.from_plans("demo-teacher", store, plans, order="teacher"), "demo teacher, 4 layer-dropped sizes"


def four_sizes(family: Family) -> list[str]:
    """Four servable sizes spread from the smallest to the largest."""
    servable = family.servable
    if len(servable) <= 4:
        return [s.name for s in servable]
    picks = {round(i * (len(servable) - 1) / 3) for i in range(4)}
    return [servable[i].name for i in sorted(picks)]


def pss_bytes(pid: int | str = "self") -> int:
    """Proportional set size of a process (bytes): shared pages split among the processes mapping them."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no Pss in /proc/{pid}/smaps_rollup")


def settled_pss() -> int:
    gc.collect()
    time.sleep(1.0)
    return pss_bytes()


def plain_engine(model_dir: str, kv_cache_gb: float, max_model_len: int = 1024) -> Any:
    """vLLM on an exported checkpoint with its default loader (in-process engine core, eager)."""
    from vllm import EngineArgs
    from vllm.v1.engine.llm_engine import LLMEngine

    args = EngineArgs(model=model_dir, dtype="float32", enforce_eager=True, max_model_len=max_model_len,
                      max_num_seqs=16, kv_cache_memory_bytes=int(kv_cache_gb * 1e9), seed=0,
                      generation_config="vllm", disable_log_stats=True)  # fmt: skip
    threads = torch.get_num_threads()
    try:
        return LLMEngine.from_engine_args(args)
    finally:
        torch.set_num_threads(threads)


def run_greedy(engine: Any, prompt: list[int], tokens: int) -> list[int]:
    from vllm import SamplingParams

    engine.add_request("bench", {"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=tokens))
    out: list[int] = []
    while engine.has_unfinished_requests():
        for o in engine.step():
            out = list(o.outputs[0].token_ids)
    return out
