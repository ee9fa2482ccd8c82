"""Score many plans on the same token blocks, running every shared layer prefix once.

A plan search scores tens to hundreds of plans that differ in a few edges; most of them begin with
the same embeddings and the same first layers. Plans are visited in
:attr:`~boomerang_core.plan.SizePlan.prefix_order` and the hidden states of the current plan's
prefix are kept on a stack, so each plan only runs the layers after its longest prefix in common
with the previous one (:func:`advance`: the hidden state at the end of the shared prefix is fed to
a size built from the remaining layers through ``inputs_embeds``). KLPatch steps through its
candidates with the same :func:`advance` and :class:`TeacherPass`. Memory: one hidden state per
depth and batch, ``(batch, seq, hidden)`` float32 each.

Two scores per plan, both in nats per token:

- ``nll``: mean next-token negative log-likelihood, counted exactly as
  :func:`perplexity` counts it (``exp(nll)`` is that perplexity);
- ``kl``: mean KL(teacher || plan) over every position, when the teacher's distributions are given.

A teacher pass may carry a mask of the positions that count (a chat conversation's response
tokens: :mod:`~boomerang_core.quality.chat`); then both scores are means over those positions
only, and the teacher's distributions are kept at those positions only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from boomerang_core.assemble import build
from boomerang_core.plan import LayerRef, SizePlan, teacher_plan
from boomerang_core.store import LayerStore


@dataclass(frozen=True)
class PlanScore:
    """``nll``: next-token NLL, nats per predicted token; ``kl``: KL(teacher || plan), nats per
    position (``None`` without teacher targets)."""

    nll: float
    kl: float | None


@dataclass
class TeacherPass:
    """The teacher on a set of blocks, computed once: per batch, the token ids, the hidden state at
    every teacher layer boundary (``states[b][i]`` enters teacher layer ``i``; ``states[b][N]``
    leaves the last layer, before the final norm; empty when not kept) and the next-token
    distributions. With ``masks``, only the positions ``masks[b]`` marks count (position ``t``
    predicts token ``t + 1``) and ``probs[b]`` holds the distributions at those positions only."""

    batches: list[torch.Tensor]  # (batch, seq) token ids
    states: list[list[torch.Tensor]]  # per batch, N + 1 tensors (batch, seq, hidden), or none
    probs: list[torch.Tensor]  # (batch, seq, vocab) float32; (counted positions, vocab) with masks
    neg_entropy: list[float]  # per batch: sum over counted positions of sum_v p log p, nats
    masks: list[torch.Tensor] | None = None  # per batch, (batch, seq) bool

    @property
    def num_positions(self) -> int:
        """Positions that count: every position, or those the masks mark."""
        if self.masks is not None:
            return sum(int(m.sum()) for m in self.masks)
        return sum(ids.numel() for ids in self.batches)

    @property
    def num_predicted(self) -> int:
        """Next-token predictions that count: all but each row's last position, or those masked."""
        if self.masks is not None:
            return self.num_positions
        return sum(ids[:, 1:].numel() for ids in self.batches)

    def kl_sum(self, b: int, logp: torch.Tensor) -> float:
        """KL(teacher || plan) summed over the counted positions of batch ``b``, nats; ``logp``:
        the plan's log-probabilities on that batch, ``(batch, seq, vocab)``."""
        if self.masks is not None:
            logp = logp[self.masks[b]]  # (counted positions, vocab)
        return self.neg_entropy[b] - float((self.probs[b] * logp).sum())

    def nll_sum(self, b: int, logp: torch.Tensor) -> float:
        """Next-token NLL summed over the counted predictions of batch ``b``, nats."""
        return next_token_nll(logp, self.batches[b], self.masks[b] if self.masks is not None else None)


def split_blocks(store: LayerStore, blocks: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    if blocks.dim() != 2 or blocks.shape[1] < 2:
        raise ValueError(f"blocks must be (n, seq) token ids with seq >= 2, got shape {tuple(blocks.shape)}")
    return [b.to(store.device) for b in blocks.split(batch_size)]


@torch.no_grad()
def teacher_pass(
    store: LayerStore,
    blocks: torch.Tensor,
    batch_size: int = 4,
    *,
    mask: torch.Tensor | None = None,
    keep_states: bool = True,
) -> TeacherPass:
    """One teacher forward over ``blocks`` (``(n, seq)`` token ids), keeping what every later
    score needs: the boundary hidden states (unless ``keep_states`` is false) and the teacher's
    next-token distributions.

    ``mask`` (``(n, seq)`` bool) marks the positions that count: position ``t`` counts when its
    prediction of token ``t + 1`` does, so the last column must be false. Rows are right-padded
    sequences (causal attention: padding after a position never changes it); each batch is cut
    after its last counted prediction, so sorting rows by length saves most padding."""
    plan = teacher_plan(store.num_teacher_layers)
    batches = split_blocks(store, blocks, batch_size)
    masks: list[torch.Tensor] | None = None
    if mask is not None:
        if mask.shape != blocks.shape or mask.dtype != torch.bool:
            raise ValueError(f"mask must be bool of shape {tuple(blocks.shape)}, got {mask.dtype} {tuple(mask.shape)}")
        if bool(mask[:, -1].any()):
            raise ValueError("the last position has no next token to predict: mask[:, -1] must be false")
        masks, trimmed = [], []
        for ids, m in zip(batches, mask.to(store.device).split(batch_size), strict=True):
            counted = m.any(0).nonzero()
            end = int(counted.max()) + 2 if counted.numel() else 2
            trimmed.append(ids[:, :end])
            masks.append(m[:, :end])
        batches = trimmed
    states, probs, neg_entropy = [], [], []
    for b, ids in enumerate(batches):
        path: list[torch.Tensor] = []
        logp = advance(store, plan, path, ids, shared=-1)
        if masks is not None:
            logp = logp[masks[b]]  # (counted positions, vocab)
        p = logp.exp()
        states.append(path if keep_states else [])
        probs.append(p)
        neg_entropy.append(float((p * logp).sum()))
    return TeacherPass(batches=batches, states=states, probs=probs, neg_entropy=neg_entropy, masks=masks)


def run_layers(store: LayerStore, plan: SizePlan, refs: Sequence[LayerRef], hidden: torch.Tensor) -> list[torch.Tensor]:
    """Feed ``hidden`` (the input of the first of ``refs``) through the store layers ``refs``;
    returns the output of each, in order. Layers run inside a size built from the store (so masks
    and rotary embeddings are the model's own), never by calling a layer with hand-made arguments."""
    if not refs:
        return []
    model = build(SizePlan(layers=tuple(refs), embed=plan.embed, norm=plan.norm, head=plan.head), store)
    outputs: list[torch.Tensor] = []

    def hook(_m: nn.Module, _args: Any, output: Any) -> None:
        outputs.append(output[0] if isinstance(output, tuple) else output)

    handles = [layer.register_forward_hook(hook) for layer in store.adapter.get_layers(model)]
    try:
        store.adapter.base_model(model)(inputs_embeds=hidden, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    if len(outputs) != len(refs):
        raise RuntimeError(f"ran {len(outputs)} layers, expected {len(refs)}")
    return outputs


def final_log_probs(store: LayerStore, plan: SizePlan, hidden: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities from the last layer's output, through the plan's final norm and
    head: ``(batch, seq, vocab)`` float32."""
    logits = store.heads[plan.head](store.norms[plan.norm](hidden))
    return torch.log_softmax(logits.float(), dim=-1)


@torch.no_grad()
def score_plans(
    store: LayerStore,
    plans: Sequence[SizePlan],
    blocks: torch.Tensor | None = None,
    *,
    teacher: TeacherPass | None = None,
    batch_size: int = 4,
    progress: bool = False,
    desc: str = "plans",
) -> list[PlanScore]:
    """Scores of ``plans`` (in their order) on ``blocks``, or on ``teacher``'s blocks with the KL
    to the teacher as well. Each distinct plan (by :attr:`SizePlan.key`) is run once, in
    :attr:`SizePlan.prefix_order`; shared prefixes are run once per run of plans that share them."""
    if teacher is None and blocks is None:
        raise ValueError("give the token blocks, or a TeacherPass to score against")
    if teacher is not None:
        batches = teacher.batches
        n_predicted, n_positions = teacher.num_predicted, teacher.num_positions
    else:
        assert blocks is not None
        batches = split_blocks(store, blocks, batch_size)
        n_predicted, n_positions = sum(ids[:, 1:].numel() for ids in batches), 0
    visit = sorted({p.key: p for p in plans}.values(), key=lambda p: p.prefix_order)
    # stacks[b][d]: input of depth d of the current plan for batch b; stacks[b][0] is the embedding.
    stacks: list[list[torch.Tensor]] = [[] for _ in batches]
    current: SizePlan | None = None
    scores: dict[str, PlanScore] = {}
    for plan in tqdm(visit, desc=desc, unit="plan", disable=not progress, leave=False):
        shared = plan.shared_depth(current)
        nll_sum, kl_sum = 0.0, 0.0
        for b, ids in enumerate(batches):
            logp = advance(store, plan, stacks[b], ids, shared)  # (batch, seq, vocab)
            if teacher is not None:
                nll_sum += teacher.nll_sum(b, logp)
                kl_sum += teacher.kl_sum(b, logp)
            else:
                nll_sum += next_token_nll(logp, ids)
        current = plan
        scores[plan.key] = PlanScore(
            nll=nll_sum / n_predicted, kl=kl_sum / n_positions if teacher is not None else None
        )
    return [scores[p.key] for p in plans]


def perplexities(
    store: LayerStore, plans: Sequence[SizePlan], blocks: torch.Tensor, batch_size: int = 4, progress: bool = False
) -> list[float]:
    """Token-level perplexity of every plan on ``blocks`` (``(n, seq)`` token ids), counted as
    :func:`perplexity` counts it: ``exp`` of :func:`score_plans`' NLL."""
    scores = score_plans(store, plans, blocks, batch_size=batch_size, progress=progress, desc="perplexity")
    return [math.exp(s.nll) for s in scores]


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


def advance(
    store: LayerStore, plan: SizePlan, stack: list[torch.Tensor], ids: torch.Tensor, shared: int
) -> torch.Tensor:
    """Turn ``stack``, the hidden states of a plan that shares ``shared`` first layers with
    ``plan`` (:meth:`SizePlan.shared_depth`), into ``plan``'s, running only the layers after the
    shared ones; returns ``plan``'s next-token log-probabilities on ``ids``, ``(batch, seq, vocab)``."""
    del stack[shared + 1 :]
    if not stack:
        stack.append(store.embeds[plan.embed](ids))  # (batch, seq, hidden)
    stack.extend(run_layers(store, plan, plan.layers[max(shared, 0) :], stack[-1]))
    return final_log_probs(store, plan, stack[-1])


def next_token_nll(logp: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Summed negative log-likelihood of each next token of ``ids`` (``(batch, seq)``), nats; with
    ``mask`` (``(batch, seq)`` bool), of the tokens after the marked positions only."""
    picked = logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)  # (batch, seq - 1)
    if mask is not None:
        picked = picked[mask[:, :-1]]
    return float(-picked.sum())
