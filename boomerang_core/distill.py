"""Prune-initialise a student from its teacher and distil it (Boomerang distillation).

The student keeps some teacher layers (:meth:`StudentSpec.from_pruning`) and is trained with

    ce_weight * CE(student, next token)
    + kl_weight * KL(teacher || student)
    + cosine_weight * mean over aligned layers of (1 - cos(h_student, h_teacher))

(paper defaults 1, 0.1, 2.0), where student layer ``i`` is aligned with the output of its teacher
block (:meth:`StudentSpec.aligned_hidden_states`). Training runs on transformers' ``Trainer``, so
AdamW, the cosine schedule, gradient accumulation, mixed precision, checkpoints and resume,
logging, and multi-GPU runs (torchrun / accelerate with FSDP or DeepSpeed) come from the library.

Speed on CPU (measured on a 2-core AVX2 machine, see ``bench/results/demo_recipe.md``): bf16 matmuls
have no hardware support there and run ~30x slower than float32, so bf16 autocast is used only
where the hardware has it (CUDA, or a CPU with AVX512-BF16 / AMX). The tied embedding / LM head
matrix is frozen by default: its weight gradient is as costly as ~8 decoder layers of SmolLM2.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedModel, TrainerCallback, TrainingArguments
from transformers.trainer_callback import ProgressCallback
from transformers.trainer_utils import get_last_checkpoint

from boomerang_core.alignment import StudentSpec
from boomerang_core.arch import adapter_for
from boomerang_core.checkpoints import AtomicCheckpointTrainer
from boomerang_core.data import chat_stream, load_corpus, mix_blocks, token_blocks
from boomerang_core.errors import RecipeError
from boomerang_core.loading import load_causal_lm, load_tokenizer

RECIPE_FILE = "distill_config.json"
CHECKPOINTS = "checkpoints"


@dataclass
class DistillConfig:
    """A distillation recipe. Defaults are the paper's where it has one.

    Token counts are tokens of training text; ``token_budget`` sets the number of optimizer steps:
    ``ceil(token_budget / (batch_size * seq_len * grad_accum * world_size))``.
    """

    first_layers_to_keep: int = 1
    every_n: int = 2
    last_layers_to_keep: int = 2
    ce_weight: float = 1.0
    kl_weight: float = 0.1
    cosine_weight: float = 2.0
    kl_temperature: float = 1.0
    kl_top_k: int | None = None  # KL on the teacher's top-k tokens only (renormalised); None: full vocabulary
    corpus: str = "pydoc"
    # Share of the training tokens taken from the teacher's own conversations (boomerang_core.synth,
    # rendered by its chat template); the corpus gives the rest. 0: the corpus only.
    chat_fraction: float = 0.0
    seq_len: int = 256  # tokens per sequence
    batch_size: int = 8  # sequences per device per micro-step
    grad_accum: int = 1
    token_budget: int = 150_000  # training tokens in all
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0
    bf16: bool | None = None  # autocast to bfloat16; None: only where the hardware supports it
    freeze_embeddings: bool = True  # input embeddings (and, when tied, the LM head)
    seed: int = 0
    save_steps: int = 20  # optimizer steps between resumable checkpoints
    save_total_limit: int = 2
    logging_steps: int = 5

    def __post_init__(self) -> None:
        positive = ("every_n", "seq_len", "batch_size", "grad_accum", "token_budget", "save_steps", "logging_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise RecipeError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("first_layers_to_keep", "last_layers_to_keep"):
            if getattr(self, name) < 0:
                raise RecipeError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("ce_weight", "kl_weight", "cosine_weight", "weight_decay", "warmup_ratio", "max_grad_norm"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise RecipeError(f"{name} must be a finite number >= 0, got {value}")
        if self.ce_weight + self.kl_weight + self.cosine_weight == 0:
            raise RecipeError("all loss weights are 0: nothing to train")
        if not (0 < self.learning_rate < 1) or not math.isfinite(self.learning_rate):
            raise RecipeError(f"learning_rate must be in (0, 1), got {self.learning_rate}")
        if self.kl_temperature <= 0:
            raise RecipeError(f"kl_temperature must be > 0, got {self.kl_temperature}")
        if self.kl_top_k is not None and self.kl_top_k < 1:
            raise RecipeError(f"kl_top_k must be >= 1 or None, got {self.kl_top_k}")
        if not (0.0 <= self.chat_fraction <= 1.0):
            raise RecipeError(f"chat_fraction must be in [0, 1], got {self.chat_fraction}")
        if self.warmup_ratio >= 1:
            raise RecipeError(f"warmup_ratio must be below 1, got {self.warmup_ratio}")

    def spec(self, num_teacher_layers: int) -> StudentSpec:
        return StudentSpec.from_pruning(
            num_teacher_layers, self.first_layers_to_keep, self.every_n, self.last_layers_to_keep
        )

    def tokens_per_step(self, world_size: int = 1) -> int:
        return self.batch_size * self.seq_len * self.grad_accum * world_size

    def max_steps(self, world_size: int = 1) -> int:
        return max(1, math.ceil(self.token_budget / self.tokens_per_step(world_size)))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DistillConfig:
        """Unknown keys are ignored, so recipes written by newer versions still load."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


# --- student initialisation -------------------------------------------------------------------


def prune_student(teacher: PreTrainedModel, spec: StudentSpec) -> PreTrainedModel:
    """A new model holding copies of the teacher layers ``spec`` keeps (embeddings, final norm
    and head copied too). The teacher is left untouched."""
    adapter = adapter_for(teacher.config)
    if spec.num_teacher_layers != teacher.config.num_hidden_layers:
        raise RecipeError(
            f"the student spec is for a {spec.num_teacher_layers}-layer teacher; "
            f"this teacher has {teacher.config.num_hidden_layers} layers"
        )
    student = copy.deepcopy(teacher)
    layers = adapter.get_layers(student)
    kept = nn.ModuleList(layers[i] for i in spec.copied_teacher_layers)
    for depth, layer in enumerate(kept):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                setattr(module, "layer_idx", depth)  # noqa: B010 - its own depth when the student runs alone with a KV cache
    setattr(adapter.base_model(student), adapter.layers, kept)
    config = student.config
    config.num_hidden_layers = spec.num_student_layers
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in spec.copied_teacher_layers]
    student.requires_grad_(True)
    return student


# --- the loss ---------------------------------------------------------------------------------


@dataclass
class LossParts:
    total: Tensor
    ce: Tensor
    kl: Tensor
    cosine: Tensor


def kl_teacher_student(
    student_logprobs: Tensor, teacher_logits: Tensor, temperature: float = 1.0, top_k: int | None = None
) -> Tensor:
    """Mean over tokens of KL(teacher || student), scaled by ``temperature**2``.

    ``student_logprobs``: (tokens, vocab) log-softmax of student logits / temperature.
    With ``top_k`` the teacher distribution is its top-k tokens renormalised (cheaper, and
    what is left out carries little mass for a trained LM)."""
    t = teacher_logits.float() / temperature  # (tokens, vocab)
    if top_k is not None and top_k < t.shape[-1]:
        values, idx = t.topk(top_k, dim=-1)  # (tokens, k)
        t_logp = F.log_softmax(values, dim=-1)
        s_logp = student_logprobs.gather(-1, idx)
    else:
        t_logp = F.log_softmax(t, dim=-1)
        s_logp = student_logprobs
    kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1)  # (tokens,)
    return kl.mean() * temperature**2


def boomerang_loss(
    student_out: Any, teacher_out: Any, input_ids: Tensor, aligned: dict[int, int], config: DistillConfig
) -> LossParts:
    """CE + KL + cosine for one batch. ``aligned``: student hidden index -> teacher hidden index."""
    s_logits = student_out.logits[:, :-1].float()  # (batch, seq-1, vocab)
    vocab = s_logits.shape[-1]
    s_logits = s_logits.reshape(-1, vocab)  # (tokens, vocab)
    targets = input_ids[:, 1:].reshape(-1)  # (tokens,)
    temp = config.kl_temperature
    s_logp = F.log_softmax(s_logits, dim=-1)
    ce = F.nll_loss(s_logp, targets)
    zero = s_logits.new_zeros(())
    kl = zero
    if config.kl_weight > 0:
        s_logp_t = s_logp if temp == 1.0 else F.log_softmax(s_logits / temp, dim=-1)
        t_logits = teacher_out.logits[:, :-1].reshape(-1, vocab)
        kl = kl_teacher_student(s_logp_t, t_logits, temp, config.kl_top_k)
    cosine = zero
    if config.cosine_weight > 0:
        s_h, t_h = student_out.hidden_states, teacher_out.hidden_states
        terms = [1 - F.cosine_similarity(s_h[s].float(), t_h[t].float(), dim=-1).mean() for s, t in aligned.items()]
        cosine = torch.stack(terms).mean()
    total = config.ce_weight * ce + config.kl_weight * kl + config.cosine_weight * cosine
    return LossParts(total, ce.detach(), kl.detach(), cosine.detach())


# --- the trainer ------------------------------------------------------------------------------


class TokenBlocks(torch.utils.data.Dataset):
    """Fixed-length token blocks as Trainer examples."""

    def __init__(self, blocks: Tensor) -> None:
        self.blocks = blocks  # (n, seq_len)

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"input_ids": self.blocks[i]}


class BoomerangTrainer(AtomicCheckpointTrainer):
    """``Trainer`` whose loss is the Boomerang loss against a frozen teacher.

    The teacher is not wrapped by the Trainer (no optimizer state, no FSDP sharding of its own
    unless the caller shards it); it is moved to the training device on first use. Checkpoints are
    written atomically, each with its ``student_config.json``, so every checkpoint loads as a student."""

    def __init__(self, *args: Any, teacher: PreTrainedModel, spec: StudentSpec, recipe: DistillConfig, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.teacher = teacher.eval().requires_grad_(False)
        self.spec = spec
        self.aligned = spec.aligned_hidden_states()
        self.recipe = recipe
        self.loss_is_scaled_for_ga = False  # compute_loss returns a per-micro-batch mean
        self._sums: dict[str, float] = {"ce": 0.0, "kl": 0.0, "cos": 0.0}
        self._count = 0
        self._tokens = 0
        self._t0 = time.perf_counter()

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Tensor],
        return_outputs: bool = False,
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor | tuple[Tensor, Any]:
        input_ids = inputs["input_ids"]  # (batch, seq)
        if next(self.teacher.parameters()).device != input_ids.device:
            self.teacher.to(input_ids.device)
        student_out = model(input_ids=input_ids, output_hidden_states=True, use_cache=False)
        with torch.no_grad(), _autocast(input_ids.device, self.args.bf16):
            teacher_out = self.teacher(input_ids=input_ids, output_hidden_states=True, use_cache=False)
        parts = boomerang_loss(student_out, teacher_out, input_ids, self.aligned, self.recipe)
        if model.training:
            self._sums["ce"] += parts.ce.item()
            self._sums["kl"] += parts.kl.item()
            self._sums["cos"] += parts.cosine.item()
            self._count += 1
            self._tokens += input_ids.numel()
        return (parts.total, student_out) if return_outputs else parts.total

    def complete_checkpoint(self, staged: Path) -> None:
        self.spec.write(staged)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the loss parts (means since the last log) and training tokens per second."""
        if self._count:
            for key, value in self._sums.items():
                logs[key] = round(value / self._count, 4)
            now = time.perf_counter()
            logs["tok_per_s"] = round(self._tokens * self.args.world_size / (now - self._t0), 1)
            self._sums = dict.fromkeys(self._sums, 0.0)
            self._count, self._tokens, self._t0 = 0, 0, now
        super().log(logs, start_time)


def _autocast(device: torch.device, enabled: bool) -> torch.autocast:
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def bf16_supported(device: str | torch.device) -> bool:
    """True where bf16 matmuls run in hardware: CUDA with bf16, or a CPU with AVX512-BF16/AMX."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if dev.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


class LossBar(ProgressCallback):
    """Trainer's progress bar with the latest losses and tokens/s on the bar itself."""

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if state.is_world_process_zero and self.training_bar is not None and logs:
            keys = ("loss", "ce", "kl", "cos", "tok_per_s")
            self.training_bar.set_postfix({k: logs[k] for k in keys if k in logs}, refresh=True)


class StopAfter(TrainerCallback):
    """Save a checkpoint and stop after optimizer step ``step`` or once ``seconds`` of wall time
    have passed, as an interrupted run would (a rerun resumes from there)."""

    def __init__(self, step: int | None = None, seconds: float | None = None) -> None:
        self.step = step
        self.deadline = time.monotonic() + seconds if seconds is not None else None

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        late = self.deadline is not None and time.monotonic() >= self.deadline
        if late or (self.step is not None and state.global_step >= self.step):
            control.should_save = True
            control.should_training_stop = True


# --- the entry point --------------------------------------------------------------------------


def distill(
    teacher_source: str | Path,
    out_dir: str | Path,
    config: DistillConfig | None = None,
    *,
    device: str | None = None,
    resume: bool = True,
    progress: bool = True,
    train_blocks: Tensor | None = None,
    callbacks: list[TrainerCallback] | None = None,
    stop_after_steps: int | None = None,
    time_limit_s: float | None = None,
    report: Callable[[str], None] | None = None,
    chat_engine: str = "auto",
) -> Path:
    """Distil a student from ``teacher_source`` (HF directory, GGUF file or hub id) into ``out_dir``.

    ``out_dir`` ends as a standard HF checkpoint (safetensors, config, tokenizer) plus
    ``student_config.json`` and ``distill_config.json``. Resumable checkpoints are kept in
    ``out_dir/checkpoints``, each written atomically (:mod:`boomerang_core.checkpoints`): with
    ``resume`` a rerun, even after a kill mid-save, continues from the latest complete one (same data
    order, RNG and schedule: no repeated or lost optimizer steps); ``resume=False`` deletes them and
    starts over. ``train_blocks`` (n, seq_len) overrides the corpus;
    ``stop_after_steps`` stops early after that optimizer step (as an interruption would) without
    changing the schedule; ``time_limit_s`` does the same after that many seconds of training.
    With ``config.chat_fraction`` > 0 that share of the budget is the teacher's own conversations,
    generated first (cached and resumable) on ``chat_engine`` (see :func:`boomerang_core.synth.teacher_conversations`).
    Returns ``out_dir``; it holds a final student only if the whole budget was trained.
    """
    config = config or DistillConfig()
    out = Path(out_dir).expanduser()
    say = report or (lambda msg: print(msg, flush=True) if progress else None)
    teacher = load_causal_lm(teacher_source, dtype=torch.float32)
    tokenizer = load_tokenizer(teacher_source)
    spec = config.spec(teacher.config.num_hidden_layers)
    _check_recipe(out, config, resume)
    student = prune_student(teacher, spec)
    if config.freeze_embeddings:
        adapter_for(teacher.config).get_embed(student).requires_grad_(False)
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = bf16_supported(dev) if config.bf16 is None else config.bf16
    args = _training_args(out / CHECKPOINTS, config, dev, bf16, progress)
    if train_blocks is None:
        corpus = load_corpus(config.corpus)
        train_blocks = token_blocks(tokenizer, corpus.train, config.seq_len)
        if config.chat_fraction > 0:
            train_blocks = _mixed_blocks(
                teacher_source, tokenizer, train_blocks, config, args.world_size, chat_engine, say, progress
            )
    trainer = BoomerangTrainer(
        model=student,
        args=args,
        train_dataset=TokenBlocks(train_blocks),
        processing_class=tokenizer,
        teacher=teacher,
        spec=spec,
        recipe=config,
        callbacks=callbacks,
    )
    if stop_after_steps is not None or time_limit_s is not None:
        trainer.add_callback(StopAfter(stop_after_steps, time_limit_s))
    if progress:
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(LossBar())
    last = get_last_checkpoint(str(out / CHECKPOINTS)) if resume and (out / CHECKPOINTS).is_dir() else None
    steps = config.max_steps(args.world_size)
    say(
        f"distilling {spec.num_student_layers}-layer student from {teacher.config.num_hidden_layers}-layer teacher: "
        f"{steps} steps x {config.tokens_per_step(args.world_size):,} tokens on {dev}"
        f"{' (bf16 autocast)' if bf16 else ''}" + (f", resuming from {Path(last).name}" if last else "")
    )
    trainer.train(resume_from_checkpoint=last)
    if trainer.state.global_step < steps:  # stopped early: leave the checkpoints, no final student
        return out
    trainer.save_model(str(out))
    if trainer.is_world_process_zero():
        spec.write(out)
        tokenizer.save_pretrained(out)
    return out


def _mixed_blocks(
    teacher_source: str | Path,
    tokenizer: Any,
    general: Tensor,
    config: DistillConfig,
    world_size: int,
    engine: str,
    say: Callable[[str], None],
    progress: bool,
) -> Tensor:
    """Exactly the budget's blocks (one epoch): ``chat_fraction`` of them the teacher's conversations."""
    total = budget_blocks(config, world_size)
    n_chat = chat_blocks(config, world_size)
    say(f"data mix: {n_chat} of {total} blocks of {config.seq_len} tokens from the teacher's own conversations")
    stream = chat_stream(teacher_source, tokenizer, n_chat * config.seq_len, progress=progress, engine=engine)
    chat = torch.tensor(stream[: n_chat * config.seq_len], dtype=torch.long).view(n_chat, config.seq_len)
    return mix_blocks(general, chat, total, config.chat_fraction, seed=config.seed)  # (total, seq_len)


def budget_blocks(config: DistillConfig, world_size: int = 1) -> int:
    """Blocks of ``config.seq_len`` tokens that ``config`` trains on (one epoch of its budget)."""
    return config.max_steps(world_size) * config.tokens_per_step(world_size) // config.seq_len


def chat_blocks(config: DistillConfig, world_size: int = 1) -> int:
    """Of :func:`budget_blocks`, those taken from the teacher's conversations."""
    return round(config.chat_fraction * budget_blocks(config, world_size))


def _training_args(
    output_dir: Path, config: DistillConfig, device: str, bf16: bool, progress: bool
) -> TrainingArguments:
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=config.max_steps(),
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        warmup_steps=config.warmup_ratio,  # a float below 1 is a fraction of max_steps
        lr_scheduler_type="cosine",
        optim="adamw_torch",
        max_grad_norm=config.max_grad_norm,
        bf16=bf16,
        use_cpu=device == "cpu",
        seed=config.seed,
        data_seed=config.seed,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        logging_steps=config.logging_steps,
        report_to="none",
        disable_tqdm=not progress,
        remove_unused_columns=False,
        dataloader_num_workers=0,
    )
    return args


def _check_recipe(out: Path, config: DistillConfig, resume: bool) -> None:
    """Refuse to resume checkpoints made by a different recipe; record the recipe otherwise.
    Without ``resume`` old checkpoints go: a later resume must never pick up another run's."""
    path = out / RECIPE_FILE
    if not resume:
        shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)  # every rank may run this; the first one wins
    if resume and path.is_file() and (out / CHECKPOINTS).is_dir():
        old = DistillConfig.from_dict(json.loads(path.read_text())).to_dict()
        new = config.to_dict()
        changed = [k for k in new if k not in ("save_steps", "save_total_limit", "logging_steps") and old[k] != new[k]]
        if changed:
            raise RecipeError(
                f"{out} holds checkpoints of a different recipe "
                f"({', '.join(f'{k}: {old[k]} -> {new[k]}' for k in changed)}); "
                "use another output directory or resume=False"
            )
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config.to_dict(), indent=1))
