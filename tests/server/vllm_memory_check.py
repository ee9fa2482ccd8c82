"""PSS of vLLM engines fed from the store vs an engine that loads its own copy (run by vllm_pool_check.py).

A model large enough that weights dominate the noise (hidden 512, 8 layers, ~100 MB a size in
float32): a second store-backed engine must add about its KV cache and overhead, while a plain vLLM
engine on the same size's exported checkpoint must add its weight bytes on top of that.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from boomerang_core.alignment import StudentSpec
from boomerang_core.assemble import export
from boomerang_core.family import Family
from boomerang_core.store import LayerStore
from server.engines.vllm.replica import VllmReplica, VllmSettings, release_engine
from server.engines.vllm.stepper import VllmStepper
from tests.tiny import VOCAB, prune_copy, tiny_tokenizer

SETTINGS = VllmSettings(max_model_len=256, max_num_seqs=2, kv_cache_gb=0.02)


def pss_bytes() -> int:
    """Proportional set size of this process (bytes), from /proc/self/smaps_rollup."""
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no Pss line in smaps_rollup")


def settle() -> int:
    gc.collect()
    time.sleep(0.5)
    return pss_bytes()


def mid_family() -> Family:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=4, head_dim=64, max_position_embeddings=512,
                         tie_word_embeddings=True, eos_token_id=2, bos_token_id=1, pad_token_id=0)  # fmt: skip
    teacher = AutoModelForCausalLM.from_config(config).eval()
    spec = StudentSpec.from_pruning(8)
    student = prune_copy(teacher, spec)
    return Family.from_store("mid", LayerStore.from_models(teacher, student, spec, tiny_tokenizer()))


async def memory_checks(workdir: Path) -> dict[str, Any]:
    """What a second store-backed engine and a plain engine on an exported size each add to PSS (bytes)."""
    family = mid_family()
    small, large = "k2", "k4"
    stepper = VllmStepper()
    a = VllmReplica(family, small, SETTINGS, stepper)
    await a.start()
    p1 = settle()
    b = VllmReplica(family, large, SETTINGS, stepper)
    await b.start()
    p2 = settle()
    checkpoint = export(family.by_name(large).plan, family.store, workdir / large)

    def plain_engine() -> Any:
        from vllm import EngineArgs
        from vllm.v1.engine.llm_engine import LLMEngine

        threads = torch.get_num_threads()
        try:
            return LLMEngine.from_engine_args(
                EngineArgs(model=str(checkpoint), dtype="float32", enforce_eager=True, max_model_len=256,
                           max_num_seqs=2, kv_cache_memory_bytes=int(SETTINGS.kv_cache_gb * 1e9), seed=0,
                           generation_config="vllm", disable_log_stats=True)
            )  # fmt: skip
        finally:
            torch.set_num_threads(threads)

    plain = await stepper.call(plain_engine)
    p3 = settle()
    weights = family.by_name(large).bytes
    shared = len({id(m) for m in family.store.plan_modules(family.by_name(small).plan)}
                 & {id(m) for m in family.store.plan_modules(family.by_name(large).plan)})  # fmt: skip
    result = {"store_added": p2 - p1, "plain_added": p3 - p2, "weights": weights, "shared_modules": shared,
              "bound": b.bound_bytes}  # fmt: skip
    await stepper.call(lambda: release_engine(plain))
    await a.stop()
    await b.stop()
    stepper.stop()
    return result
