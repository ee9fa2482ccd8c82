"""Perplexity, baselines, dominance and the curve on tiny random families."""

from __future__ import annotations

import math

import torch

from boomerang_core.evaluate import perplexity
from tests.tiny import tiny_teacher


def test_perplexity_matches_hand_computation() -> None:
    model = tiny_teacher("llama", layers=2)
    blocks = torch.randint(3, 500, (5, 12), generator=torch.Generator().manual_seed(0))
    nll, count = 0.0, 0
    with torch.no_grad():
        for row in blocks:  # one block at a time, token by token, in float64
            logp = torch.log_softmax(model(row[None]).logits[0].double(), dim=-1)
            for t in range(len(row) - 1):
                nll -= float(logp[t, row[t + 1]])
                count += 1
    expected = math.exp(nll / count)
    assert count == 5 * 11
    assert math.isclose(perplexity(model, blocks, batch_size=2), expected, rel_tol=1e-5)
    assert math.isclose(perplexity(model, blocks, batch_size=5), expected, rel_tol=1e-5)
