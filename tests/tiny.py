"""Tiny random families for tests: a few layers, hidden 64, head_dim 32 (the smallest vLLM's CPU
attention accepts), a small BPE tokenizer with a chat
template, written as real HF directories (teacher/, student/ with student_config.json)."""

from __future__ import annotations

import copy
import functools
import pydoc_data.topics
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

from boomerang_core.alignment import StudentSpec
from boomerang_core.arch import adapter_for
from boomerang_core.distill import prune_student
from boomerang_core.plan import SizePlan

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
VOCAB = 512


@functools.cache
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on Python's topic docs: deterministic, offline, < 1 s."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = list(pydoc_data.topics.topics.values())[:60]
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(arch: str = "llama", layers: int = 6, tied: bool = True) -> PretrainedConfig:
    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=layers, max_position_embeddings=512)
    if arch == "gpt_neox":
        return GPTNeoXConfig(
            **common,
            intermediate_size=128,
            num_attention_heads=2,
            tie_word_embeddings=False,
            use_parallel_residual=True,
            rotary_pct=0.25,
        )
    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[arch]
    cfg = cls(
        **common,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        tie_word_embeddings=tied,
        eos_token_id=2,
        bos_token_id=1,
        pad_token_id=0,
    )
    return cfg


def tiny_teacher(arch: str = "llama", layers: int = 6, seed: int = 0, tied: bool = True) -> PreTrainedModel:
    torch.manual_seed(seed)
    cfg = tiny_config(arch, layers, tied)
    cfg.eos_token_id, cfg.bos_token_id, cfg.pad_token_id = 2, 1, 0
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # larger weights than the default init, so that layers matter
        for _name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return model


def prune_copy(teacher: PreTrainedModel, spec: StudentSpec, noise: float = 0.02, seed: int = 1) -> PreTrainedModel:
    """A student initialised by pruning the teacher (``distill.prune_student``), then perturbed to
    stand in for distillation. Embeddings are left equal to the teacher's (as with frozen embeddings)."""
    student = prune_student(teacher, spec)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if ".layers." in name or "norm" in name:
                p.add_(torch.randn(p.shape, generator=gen) * noise)
    student.requires_grad_(False)
    return student.eval()


def write_pair(
    directory: Path, arch: str = "llama", layers: int = 6, spec: StudentSpec | None = None, tied: bool = True
) -> tuple[Path, Path]:
    """Write teacher/ and student/ (with student_config.json) under ``directory``."""
    teacher = tiny_teacher(arch, layers, tied=tied)
    spec = spec or StudentSpec.from_pruning(layers)
    student = prune_copy(teacher, spec)
    tok = tiny_tokenizer()
    t_dir, s_dir = directory / "teacher", directory / "student"
    for model, path in ((teacher, t_dir), (student, s_dir)):
        model.save_pretrained(path)
        tok.save_pretrained(path)
    spec.write(s_dir)
    return t_dir, s_dir


def write_teacher(path: Path, arch: str = "llama", layers: int = 6) -> Path:
    """A tiny teacher with its tokenizer saved as an HF directory (what ``boomerang distill`` reads)."""
    tiny_teacher(arch, layers).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def training_blocks(seq_len: int = 32, max_blocks: int = 8) -> torch.Tensor:
    """Token blocks from the first 20 Python topic docs (sorted by name): tiny training data."""
    from boomerang_core.data import token_blocks

    texts = [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)[:20]]
    return token_blocks(tiny_tokenizer(), texts, seq_len, max_blocks=max_blocks)


def noisy_pair(layers: int = 6) -> tuple[PreTrainedModel, PreTrainedModel, StudentSpec]:
    """A llama teacher and its pruned student with noise on the copies (so that no plan ties)."""
    teacher = tiny_teacher("llama", layers)
    spec = StudentSpec.from_pruning(layers)
    return teacher, prune_copy(teacher, spec, noise=0.05), spec


def make_pair(arch: str, layers: int = 6) -> tuple[PreTrainedModel, PreTrainedModel, StudentSpec]:
    teacher = tiny_teacher(arch, layers)
    spec = StudentSpec.from_pruning(layers)
    return teacher, prune_copy(teacher, spec), spec


def copied_model(plan: SizePlan, teacher: PreTrainedModel, student: PreTrainedModel) -> PreTrainedModel:
    """The paper code's way: deep copies of the layers, layer_idx rewritten, layer count fixed."""
    adapter = adapter_for(teacher.config)
    models = {"teacher": teacher, "student": student}
    model = copy.deepcopy(teacher)
    layers = nn.ModuleList()
    for depth, ref in enumerate(plan.layers):
        layer = copy.deepcopy(adapter.get_layers(models[ref.source])[ref.index])
        for m in layer.modules():
            if hasattr(m, "layer_idx"):
                m.layer_idx = depth
        layers.append(layer)
    adapter.set_parts(
        model,
        embed=copy.deepcopy(adapter.get_embed(models[plan.embed])),
        layers=layers,
        norm=copy.deepcopy(adapter.get_norm(models[plan.norm])),
        head=copy.deepcopy(adapter.get_head(models[plan.head])),
        rotary=None,
    )
    model.config.num_hidden_layers = len(layers)
    if getattr(model.config, "layer_types", None) is not None:
        types = {"teacher": teacher.config.layer_types, "student": student.config.layer_types}
        model.config.layer_types = [types[r.source][r.index] for r in plan.layers]
    return model.eval()
