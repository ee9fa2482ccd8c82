"""One forward step over every running request of every size, with all tokens on one packed axis.

Each step packs the new tokens of every request (1 for a decoding request, a prompt chunk for a
prefilling one) of every size into ``(1, tokens, hidden)``. The store's decoder layers run in one
global order consistent with every size's plan, so a layer used by several sizes (the student
prefix every last-k size shares, or a teacher layer two sizes hold at different depths) runs ONCE
per step over the tokens of all of them: its weights are read once, not once per size.

Attention is the only part that must know which request a token belongs to. The layers are
transformers' own, bound to the store's weights by the engine with a config whose attention
implementation is :data:`ATTENTION`, a function registered under that name through transformers'
public ``AttentionInterface``; nothing registered under another name changes, so every other model
in the process keeps its own attention. The step hands each layer call its :class:`LayerCall`
(keyword :data:`CALL_KWARG`, which transformers' layers forward to the attention function as
they do every extra keyword); keys and values go into each size's :class:`SizeCache` and attention
runs per request over its own cache.
"""

from __future__ import annotations

import graphlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AttentionInterface

ATTENTION = "boomerang_packed"  # the attention implementation named in the engine's layer config
CALL_KWARG = "layer_call"


class SizeCache:
    """KV cache of one size: ``data[depth, 0 = key / 1 = value, row, kv_head, position, head_dim]``.

    Row ``r`` belongs to the r-th running request of the size; rows stay dense (a finished request's
    row is refilled by the last one), so a decoding batch reads a view, never a gathered copy.
    Grown by doubling, dropped when the size goes idle.
    """

    def __init__(self, depths: int) -> None:
        self.depths = depths
        self.data: Tensor | None = None

    def ensure(self, rows: int, length: int, like: Tensor) -> Tensor:
        """Room for ``rows`` rows of ``length`` positions; ``like`` is a key tensor (1, kv_heads, t, head_dim)."""
        kv_heads, head_dim = like.shape[1], like.shape[3]
        data = self.data
        if data is not None and data.shape[2] >= rows and data.shape[4] >= length:
            return data
        old_rows, old_len = (data.shape[2], data.shape[4]) if data is not None else (0, 0)
        new_rows = max(rows, min(2 * old_rows, rows + 16))
        new_len = max(_round_up(length, 64), 2 * old_len if length > old_len else old_len)
        shape = (self.depths, 2, new_rows, kv_heads, new_len, head_dim)
        fresh = torch.zeros(shape, dtype=like.dtype, device=like.device)  # masked keys must be finite
        if data is not None:
            fresh[:, :, :old_rows, :, :old_len] = data
        self.data = fresh
        return fresh

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` positions of row ``src`` into row ``dst`` (at every depth)."""
        if self.data is not None and length > 0 and src < self.data.shape[2]:
            self.data[:, :, dst, :, :length] = self.data[:, :, src, :, :length]

    def release(self) -> None:
        self.data = None

    def nbytes(self) -> int:
        return 0 if self.data is None else self.data.numel() * self.data.element_size()


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


@dataclass
class RowWork:
    """The tokens one request feeds this step: ``length`` tokens at positions ``start``.. of row ``row``."""

    row: int
    start: int
    length: int


@dataclass
class SizeWork:
    """Everything one size computes in a step. Decode rows (length 1) come first in token order."""

    cache: SizeCache
    token_ids: list[int]
    decode: list[RowWork]
    extend: list[RowWork]
    logit_index: list[int]  # offsets into this size's tokens whose logits are needed
    _masks: dict[int | None, Tensor | None] = field(default_factory=dict)
    _decode_index: tuple[Tensor, Tensor] | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def positions(self) -> list[int]:
        out = [r.start for r in self.decode]
        for r in self.extend:
            out.extend(range(r.start, r.start + r.length))
        return out

    def max_length(self) -> int:
        return max(r.start + r.length for r in (*self.decode, *self.extend))

    def num_rows(self) -> int:
        return 1 + max(r.row for r in (*self.decode, *self.extend))

    def decode_index(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """(rows, positions) of the decode rows, as index tensors for the cache write."""
        if self._decode_index is None:
            rows = torch.tensor([r.row for r in self.decode], device=device)
            pos = torch.tensor([r.start for r in self.decode], device=device)
            self._decode_index = (rows, pos)
        return self._decode_index

    def decode_mask(self, window: int | None, device: torch.device) -> Tensor | None:
        """(rows, 1, 1, keys) bool mask for the decode rows; None when every row sees all keys."""
        if window not in self._masks:
            pos = torch.tensor([r.start for r in self.decode], device=device)
            keys = torch.arange(self.decode_max_length(), device=device)
            mask = keys[None, :] <= pos[:, None]
            if window is not None:
                mask &= keys[None, :] > pos[:, None] - window
            self._masks[window] = None if bool(mask.all()) else mask[:, None, None, :]
        return self._masks[window]

    def decode_max_length(self) -> int:
        return 1 + max(r.start for r in self.decode)


@dataclass
class LayerCall:
    """The packed tokens of one layer call: which size, at which depth, owns which token range."""

    segments: list[tuple[SizeWork, int, int]]  # (work, depth of this layer in that size, first token)


def attend(call: LayerCall, query: Tensor, key: Tensor, value: Tensor, scaling: float, window: int | None) -> Tensor:
    """Write ``key``/``value`` (1, kv_heads, tokens, head_dim) into each size's cache and attend per request.

    ``query`` is (1, heads, tokens, head_dim); returns (1, tokens, heads, head_dim) as transformers expects.
    """
    _, heads, tokens, head_dim = query.shape
    out = query.new_empty(1, tokens, heads, head_dim)
    for work, depth, first in call.segments:
        data = work.cache.ensure(work.num_rows(), work.max_length(), key)
        cache_k, cache_v = data[depth, 0], data[depth, 1]  # (rows, kv_heads, positions, head_dim)
        offset = first
        if work.decode:
            n = len(work.decode)
            k_new = key[0, :, offset : offset + n].transpose(0, 1)  # (n, kv_heads, head_dim)
            v_new = value[0, :, offset : offset + n].transpose(0, 1)
            rows, pos = work.decode_index(query.device)
            cache_k[rows, :, pos] = k_new
            cache_v[rows, :, pos] = v_new
            length = work.decode_max_length()
            row_ids = [r.row for r in work.decode]
            if row_ids == list(range(n)):
                keys, values = cache_k[:n, :, :length], cache_v[:n, :, :length]
            else:
                keys, values = cache_k[rows, :, :length], cache_v[rows, :, :length]
            q = query[0, :, offset : offset + n].transpose(0, 1).unsqueeze(2)  # (n, heads, 1, head_dim)
            mask = work.decode_mask(window, query.device)
            o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scaling, enable_gqa=True)
            out[0, offset : offset + n] = o[:, :, 0]
            offset += n
        for r in work.extend:
            sl = slice(offset, offset + r.length)
            cache_k[r.row, :, r.start : r.start + r.length] = key[0, :, sl]
            cache_v[r.row, :, r.start : r.start + r.length] = value[0, :, sl]
            q = query[:, :, sl]
            end = r.start + r.length
            if r.start == 0 and (window is None or window >= r.length):
                keys, values, mask, causal = key[:, :, sl], value[:, :, sl], None, True
            else:
                keys, values = cache_k[r.row : r.row + 1, :, :end], cache_v[r.row : r.row + 1, :, :end]
                q_pos = torch.arange(r.start, end, device=query.device)[:, None]
                k_pos = torch.arange(end, device=query.device)[None, :]
                mask = k_pos <= q_pos
                if window is not None:
                    mask &= k_pos > q_pos - window
                causal = False
            o = F.scaled_dot_product_attention(
                q, keys, values, attn_mask=mask, is_causal=causal, scale=scaling, enable_gqa=True
            )
            out[0, sl] = o[0].transpose(0, 1)
            offset += r.length
    return out


def packed_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """transformers' attention-function signature over :func:`attend`; the mask is the step's own."""
    call = kwargs.get(CALL_KWARG)
    if not isinstance(call, LayerCall):
        raise RuntimeError(f"{ATTENTION} attention runs only inside a packed step (no {CALL_KWARG} was given)")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return attend(call, query, key, value, scale, sliding_window), None


def register_attention() -> None:
    """Register :func:`packed_attention` as :data:`ATTENTION` (idempotent)."""
    AttentionInterface.register(ATTENTION, packed_attention)


@dataclass(frozen=True)
class SizeParts:
    """The modules of one size: the store's embeddings, final norm, head and rotary embedding, and
    its layers in depth order (the engine's layer containers bound to the store's weights)."""

    embed: nn.Module
    layers: tuple[nn.Module, ...]
    norm: nn.Module
    head: nn.Module
    rotary: nn.Module


def layer_order(plans: Sequence[Sequence[nn.Module]]) -> list[nn.Module] | None:
    """One order of the store's layers consistent with every size's depth order, or None if none exists
    (a layer used twice in one size, or two sizes that order two layers differently)."""
    graph: dict[int, set[int]] = {}
    by_id: dict[int, nn.Module] = {}
    for layers in plans:
        ids = [id(m) for m in layers]
        if len(set(ids)) != len(ids):
            return None
        for i, m in enumerate(layers):
            by_id[id(m)] = m
            graph.setdefault(id(m), set())
            if i:
                graph[id(m)].add(ids[i - 1])
    try:
        order = list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError:
        return None
    return [by_id[i] for i in order]


def forward_step(
    parts: Sequence[SizeParts], works: Sequence[SizeWork], order: Sequence[nn.Module] | None, share: bool = True
) -> list[Tensor]:
    """Run one packed step; returns, per work, float32 logits (len(logit_index), vocab).

    ``order`` is :func:`layer_order` over the sizes in ``parts`` (None: layers run depth by depth,
    shared only where two sizes hold the same layer at the same depth); ``share=False`` runs every
    size's layers separately (the baseline that sharing is measured against).
    """
    device = next(parts[0].embed.parameters()).device
    hidden: list[Tensor] = [torch.empty(0)] * len(works)
    for group in _group(range(len(works)), lambda i: id(parts[i].embed)):
        ids = torch.tensor([t for i in group for t in works[i].token_ids], device=device)
        _scatter(hidden, group, works, parts[group[0]].embed(ids))
    rope: list[tuple[Tensor, Tensor]] = [(torch.empty(0), torch.empty(0))] * len(works)
    for group in _group(range(len(works)), lambda i: id(parts[i].rotary)):
        pos = torch.tensor([p for i in group for p in works[i].positions()], device=device)[None]
        like = hidden[group[0]][None]
        cos, sin = parts[group[0]].rotary(like, pos)  # (1, tokens, rotary_dim)
        offset = 0
        for i in group:
            n = works[i].num_tokens
            rope[i] = (cos[:, offset : offset + n], sin[:, offset : offset + n])
            offset += n
    for step in _layer_steps(parts, works, order, share):
        module, members = step
        h = torch.cat([hidden[i] for i, _ in members]) if len(members) > 1 else hidden[members[0][0]]
        cos = torch.cat([rope[i][0] for i, _ in members], dim=1) if len(members) > 1 else rope[members[0][0]][0]
        sin = torch.cat([rope[i][1] for i, _ in members], dim=1) if len(members) > 1 else rope[members[0][0]][1]
        segments, first = [], 0
        for i, depth in members:
            segments.append((works[i], depth, first))
            first += works[i].num_tokens
        out = module(h[None], attention_mask=None, position_embeddings=(cos, sin), **{CALL_KWARG: LayerCall(segments)})
        out = out[0] if isinstance(out, tuple) else out
        _scatter(hidden, [i for i, _ in members], works, out[0])
    logits: list[Tensor] = [torch.empty(0)] * len(works)
    for group in _group(range(len(works)), lambda i: (id(parts[i].norm), id(parts[i].head))):
        picked = [hidden[i][works[i].logit_index] for i in group]
        h = torch.cat(picked) if len(picked) > 1 else picked[0]
        out = parts[group[0]].head(parts[group[0]].norm(h)).float()
        offset = 0
        for i in group:
            n = len(works[i].logit_index)
            logits[i] = out[offset : offset + n]
            offset += n
    return logits


def _group(indices: Sequence[int] | range, key: Callable[[int], Any]) -> list[list[int]]:
    groups: dict[Any, list[int]] = {}
    for i in indices:
        groups.setdefault(key(i), []).append(i)
    return list(groups.values())


def _scatter(hidden: list[Tensor], group: Sequence[int], works: Sequence[SizeWork], packed: Tensor) -> None:
    offset = 0
    for i in group:
        n = works[i].num_tokens
        hidden[i] = packed[offset : offset + n]
        offset += n


def _layer_steps(
    parts: Sequence[SizeParts], works: Sequence[SizeWork], order: Sequence[nn.Module] | None, share: bool
) -> list[tuple[nn.Module, list[tuple[int, int]]]]:
    """(layer, [(work index, depth)]) in execution order: each layer once, over every size that holds it."""
    active = [i for i, w in enumerate(works) if w.num_tokens]
    if not share:
        return [(layer, [(i, d)]) for i in active for d, layer in enumerate(parts[i].layers)]
    if order is not None:
        depth_of = [{id(m): d for d, m in enumerate(parts[i].layers)} for i in range(len(parts))]
        steps = []
        for module in order:
            members = [(i, depth_of[i][id(module)]) for i in active if id(module) in depth_of[i]]
            if members:
                steps.append((module, members))
        return steps
    steps = []
    for depth in range(max(len(parts[i].layers) for i in active)):
        here = [i for i in active if depth < len(parts[i].layers)]
        for group in _group(here, lambda i: id(parts[i].layers[depth])):  # noqa: B023
            steps.append((parts[group[0]].layers[depth], [(i, depth) for i in group]))
    return steps
