"""Batched sampling for the conversation synthesiser (:mod:`boomerang_core.synth`): one seed per
prompt, each continuation cut at the first stop token. vLLM's offline ``LLM`` (run it in a child
process: it binds the process's threads) or transformers' ``generate`` on a left-padded batch."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol


class Engine(Protocol):
    """Sampled continuations of token-id prompts, one seed per prompt: ``(ids, finished)`` with the
    ids cut before the first stop token, ``finished`` when one was reached."""

    name: str

    def sample(
        self, prompts: list[list[int]], seeds: list[int], max_tokens: int, temperature: float, top_p: float
    ) -> list[tuple[list[int], bool]]: ...


def _cut(ids: Sequence[int], stops: set[int]) -> tuple[list[int], bool]:
    for i, tok in enumerate(ids):
        if tok in stops:
            return [int(t) for t in ids[:i]], True
    return [int(t) for t in ids], False


class TransformersEngine:
    """``generate`` on a left-padded batch, seeded once per batch (by its first sample's seed)."""

    name = "transformers"

    def __init__(self, teacher: str | Path, stops: list[int], device: str | None = None) -> None:
        import torch

        from boomerang_core.loading import load_causal_lm

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model: Any = load_causal_lm(teacher, device=self.device, dtype=torch.float32)
        self.stops = stops
        self.pad = int(self.model.config.pad_token_id if self.model.config.pad_token_id is not None else stops[0])

    def sample(
        self, prompts: list[list[int]], seeds: list[int], max_tokens: int, temperature: float, top_p: float
    ) -> list[tuple[list[int], bool]]:
        import torch

        width = max(len(p) for p in prompts)
        ids = torch.tensor([[self.pad] * (width - len(p)) + p for p in prompts], device=self.device)  # (batch, width)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        torch.manual_seed(seeds[0])
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {}
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_tokens,
                eos_token_id=self.stops,
                pad_token_id=self.pad,
                top_k=0,  # vLLM's default: no top-k cut
                **({"do_sample": False} | sampling),
            )
        stops = set(self.stops)
        return [_cut(row.tolist(), stops) for row in out[:, width:]]


class VllmEngine:
    """vLLM's offline ``LLM`` (run it in a child process: it binds the process's threads)."""

    name = "vllm"

    def __init__(self, teacher: str | Path, stops: list[int], max_model_len: int, max_num_seqs: int) -> None:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core on this process's thread
        from vllm import LLM

        self.stops = stops
        self.llm = LLM(
            model=str(teacher),
            dtype="float32",
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            enforce_eager=True,
            seed=0,
            kv_cache_memory_bytes=1 << 30,
            generation_config="vllm",  # the sampling settings below are the only ones
        )

    def sample(
        self, prompts: list[list[int]], seeds: list[int], max_tokens: int, temperature: float, top_p: float
    ) -> list[tuple[list[int], bool]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = [
            SamplingParams(
                temperature=temperature,
                top_p=top_p,
                max_tokens=max_tokens,
                seed=seed,
                stop_token_ids=self.stops,
                detokenize=False,
            )
            for seed in seeds
        ]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        stops = set(self.stops)
        return [_cut(o.outputs[0].token_ids, stops) for o in outs]
