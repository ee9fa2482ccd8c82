"""Held-out perplexity of every size of a family, with the baselines that say whether it is good."""

from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(
    model: nn.Module, blocks: torch.Tensor, batch_size: int = 4, progress: bool = False, desc: str = "perplexity"
) -> float:
    """Token-level perplexity of ``model`` on ``blocks`` (``(n, seq)`` token ids).

    Every block is scored on its own: each of its ``seq - 1`` next-token predictions counts once,
    and the result is ``exp(total NLL / total predicted tokens)`` (nats per token, exponentiated).
    The loss is computed in float32 whatever the model's dtype, so bf16 sizes are comparable.
    """
    if blocks.dim() != 2 or blocks.shape[1] < 2:
        raise ValueError(f"blocks must be (n, seq) token ids with seq >= 2, got shape {tuple(blocks.shape)}")
    device = _device_of(model)
    total_nll, total_tokens = 0.0, 0
    starts = range(0, blocks.shape[0], batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", disable=not progress, leave=False):
        ids = blocks[start : start + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits  # (batch, seq, vocab)
        nll = nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
        total_nll += float(nll)
        total_tokens += ids[:, 1:].numel()
    return math.exp(total_nll / total_tokens)


def _device_of(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")
