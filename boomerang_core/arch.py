"""Per-architecture adapters: where embeddings, decoder layers, final norm and LM head live.

Every size of a family is a plain model of the teacher's architecture with another layer count,
so this table is all the method needs to know about an architecture.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn
from transformers import PretrainedConfig

from boomerang_core.errors import IncompatiblePair, UnsupportedArchitecture


@dataclass(frozen=True)
class ArchAdapter:
    """Attribute paths inside a ``*ForCausalLM`` of one architecture family."""

    name: str
    model_types: tuple[str, ...]
    base: str  # the decoder stack inside the causal LM
    embed: str  # on base
    layers: str  # on base
    norm: str  # on base
    head: str  # on the causal LM
    rotary: str | None  # on base; shared by every size, holds only buffers
    head_checkpoint_key: str = ""  # the head's name in standard checkpoints, if not ``head``

    def base_model(self, model: nn.Module) -> nn.Module:
        return getattr(model, self.base)

    def get_embed(self, model: nn.Module) -> nn.Module:
        return getattr(self.base_model(model), self.embed)

    def get_layers(self, model: nn.Module) -> nn.ModuleList:
        return getattr(self.base_model(model), self.layers)

    def get_norm(self, model: nn.Module) -> nn.Module:
        return getattr(self.base_model(model), self.norm)

    def get_head(self, model: nn.Module) -> nn.Module:
        return getattr(model, self.head)

    def get_rotary(self, model: nn.Module) -> nn.Module | None:
        return getattr(self.base_model(model), self.rotary) if self.rotary else None

    def set_parts(
        self,
        model: nn.Module,
        *,
        embed: nn.Module,
        layers: nn.ModuleList,
        norm: nn.Module,
        head: nn.Module,
        rotary: nn.Module | None,
    ) -> None:
        base = self.base_model(model)
        setattr(base, self.embed, embed)
        setattr(base, self.layers, layers)
        setattr(base, self.norm, norm)
        setattr(model, self.head, head)
        if self.rotary and rotary is not None:
            setattr(base, self.rotary, rotary)

    def state_key(self, part: str, depth: int | None = None) -> str:
        """Checkpoint key prefix of a part: ``embed``, ``norm``, ``head`` or ``layer`` (with depth)."""
        if part == "head":
            return self.head_checkpoint_key or self.head
        if part == "layer":
            return f"{self.base}.{self.layers}.{depth}"
        return f"{self.base}.{getattr(self, part)}"


LLAMA_FAMILY = ArchAdapter(
    name="llama-family",
    model_types=("llama", "mistral", "qwen2", "qwen3"),
    base="model",
    embed="embed_tokens",
    layers="layers",
    norm="norm",
    head="lm_head",
    rotary="rotary_emb",
)

GPT_NEOX = ArchAdapter(
    name="gpt-neox",
    model_types=("gpt_neox",),
    base="gpt_neox",
    embed="embed_in",
    layers="layers",
    norm="final_layer_norm",
    head="lm_head",
    rotary="rotary_emb",
    head_checkpoint_key="embed_out",
)

ADAPTERS: tuple[ArchAdapter, ...] = (LLAMA_FAMILY, GPT_NEOX)
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(t for a in ADAPTERS for t in a.model_types)


def adapter_for(config: PretrainedConfig) -> ArchAdapter:
    model_type = getattr(config, "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    raise UnsupportedArchitecture(
        f"architecture '{model_type}' is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
    )


# Config fields that must agree for a student layer to stand in for a teacher block.
_MATCHING_FIELDS = (
    "model_type",
    "hidden_size",
    "vocab_size",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "head_dim",
    "hidden_act",
)


def check_pair(teacher: PretrainedConfig, student: PretrainedConfig) -> None:
    """Raise :class:`IncompatiblePair` naming every field where teacher and student disagree."""
    adapter_for(teacher)
    problems = []
    for name in _MATCHING_FIELDS:
        t: Any = getattr(teacher, name, None)
        s: Any = getattr(student, name, None)
        if t != s:
            problems.append(f"{name}: teacher {t!r}, student {s!r}")
    if problems:
        raise IncompatiblePair("teacher and student do not match: " + "; ".join(problems))
    if student.num_hidden_layers > teacher.num_hidden_layers:
        raise IncompatiblePair(
            f"the student has {student.num_hidden_layers} layers, more than the teacher's {teacher.num_hidden_layers}"
        )
