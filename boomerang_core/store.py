"""LayerStore: teacher and student weights loaded ONCE, on one device and dtype.

The store owns the decoder layers, embeddings, final norms and LM heads of both models and hands
out the modules themselves; every size built from it shares them. Student tensors that are equal
to their teacher counterparts (frozen embeddings, layers distillation left alone) are made to
point at the teacher's tensor, so they are held once.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import nn
from transformers import GenerationConfig, PretrainedConfig, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from boomerang_core.alignment import StudentSpec
from boomerang_core.arch import ArchAdapter, adapter_for, check_pair
from boomerang_core.errors import IncompatiblePair, StudentConfigError
from boomerang_core.loading import load_causal_lm, load_config, load_tokenizer
from boomerang_core.plan import LayerRef, SizePlan, Source


class LayerStore:
    def __init__(
        self,
        *,
        adapter: ArchAdapter,
        configs: dict[Source, PretrainedConfig],
        spec: StudentSpec | None,
        layers: dict[Source, nn.ModuleList],
        embeds: dict[Source, nn.Module],
        norms: dict[Source, nn.Module],
        heads: dict[Source, nn.Module],
        rotary: nn.Module | None,
        model_class: type[PreTrainedModel],
        generation_config: GenerationConfig | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
    ) -> None:
        self.adapter = adapter
        self.configs = configs
        self.spec = spec
        self.layers = layers
        self.embeds = embeds
        self.norms = norms
        self.heads = heads
        self.rotary = rotary
        self.model_class = model_class
        self.generation_config = generation_config
        self.tokenizer = tokenizer
        first = next(iter(layers["teacher"].parameters()))
        self.device = first.device
        self.dtype = first.dtype

    # --- construction -------------------------------------------------------------------------

    @classmethod
    def from_models(
        cls,
        teacher: PreTrainedModel,
        student: PreTrainedModel | None = None,
        spec: StudentSpec | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
    ) -> LayerStore:
        """Take the parts of already-loaded models. The models' containers are not kept."""
        adapter = adapter_for(teacher.config)
        configs: dict[Source, PretrainedConfig] = {"teacher": teacher.config}
        models: dict[Source, PreTrainedModel] = {"teacher": teacher}
        if student is not None:
            check_pair(teacher.config, student.config)
            if spec is None:
                raise StudentConfigError("a student needs its StudentSpec (student_config.json)")
            if spec.num_teacher_layers != teacher.config.num_hidden_layers:
                raise StudentConfigError(
                    f"student_config.json describes a {spec.num_teacher_layers}-layer teacher, "
                    f"but the teacher has {teacher.config.num_hidden_layers} layers"
                )
            if spec.num_student_layers != student.config.num_hidden_layers:
                raise StudentConfigError(
                    f"student_config.json copies {spec.num_student_layers} layers, "
                    f"but the student has {student.config.num_hidden_layers}"
                )
            t_param = next(teacher.parameters())
            s_param = next(student.parameters())
            if (t_param.device, t_param.dtype) != (s_param.device, s_param.dtype):
                raise IncompatiblePair("teacher and student must be on the same device and dtype")
            configs["student"] = student.config
            models["student"] = student
        for model in models.values():
            model.requires_grad_(False)
            model.eval()
        store = cls(
            adapter=adapter,
            configs=configs,
            spec=spec if student is not None else None,
            layers={s: adapter.get_layers(m) for s, m in models.items()},
            embeds={s: adapter.get_embed(m) for s, m in models.items()},
            norms={s: adapter.get_norm(m) for s, m in models.items()},
            heads={s: adapter.get_head(m) for s, m in models.items()},
            rotary=adapter.get_rotary(teacher),
            model_class=type(teacher),
            generation_config=copy.deepcopy(teacher.generation_config),
            tokenizer=tokenizer,
        )
        if student is not None:
            store._share_equal_tensors()
        return store

    @classmethod
    def load(
        cls,
        teacher: str | Path,
        student: str | Path | None = None,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        spec: StudentSpec | None = None,
    ) -> LayerStore:
        """Load from local HF directories, GGUF files or hub ids. The student's
        ``student_config.json`` is read from its directory unless ``spec`` is given."""
        teacher_config = load_config(teacher)
        adapter_for(teacher_config)
        student_model = None
        if student is not None:
            student_config = load_config(student)
            check_pair(teacher_config, student_config)
            if spec is None:
                spec = StudentSpec.read(student, teacher_config.num_hidden_layers)
            student_model = load_causal_lm(student, device=device, dtype=dtype)
        teacher_model = load_causal_lm(teacher, device=device, dtype=dtype)
        return cls.from_models(teacher_model, student_model, spec, load_tokenizer(teacher))

    def _share_equal_tensors(self) -> None:
        """Point student parameters that equal their teacher counterpart at the teacher's tensor."""
        assert self.spec is not None
        pairs: list[tuple[nn.Module, nn.Module]] = [
            (self.embeds["student"], self.embeds["teacher"]),
            (self.norms["student"], self.norms["teacher"]),
            (self.heads["student"], self.heads["teacher"]),
        ]
        for i, t in enumerate(self.spec.copied_teacher_layers):
            pairs.append((self.layers["student"][i], self.layers["teacher"][t]))
        replacement: dict[int, nn.Parameter] = {}
        for s_mod, t_mod in pairs:
            t_params = dict(t_mod.named_parameters())
            for name, s_param in s_mod.named_parameters():
                t_param = t_params.get(name)
                if (
                    t_param is not None
                    and t_param.shape == s_param.shape
                    and s_param.data_ptr() != t_param.data_ptr()
                    and torch.equal(s_param, t_param)
                ):
                    replacement[s_param.data_ptr()] = t_param
        if not replacement:
            return
        for s_mod in self._student_modules():
            for module in s_mod.modules():
                for name, param in list(module.named_parameters(recurse=False, remove_duplicate=False)):
                    if param.data_ptr() in replacement:
                        module.register_parameter(name, replacement[param.data_ptr()])

    def _student_modules(self) -> Iterator[nn.Module]:
        yield self.embeds["student"]
        yield self.norms["student"]
        yield self.heads["student"]
        yield from self.layers["student"]

    # --- access -------------------------------------------------------------------------------

    @property
    def has_student(self) -> bool:
        return "student" in self.layers

    @property
    def num_teacher_layers(self) -> int:
        return len(self.layers["teacher"])

    def layer(self, ref: LayerRef) -> nn.Module:
        if ref.source not in self.layers:
            raise StudentConfigError("this store holds no student")
        layers = self.layers[ref.source]
        if not 0 <= ref.index < len(layers):
            raise IndexError(f"{ref.source} layer {ref.index} out of range 0..{len(layers) - 1}")
        return layers[ref.index]

    def layer_type(self, ref: LayerRef) -> str | None:
        types = getattr(self.configs[ref.source], "layer_types", None)
        return types[ref.index] if types else None

    def plan_modules(self, plan: SizePlan) -> list[nn.Module]:
        mods = [self.embeds[plan.embed], self.norms[plan.norm], self.heads[plan.head]]
        return mods + [self.layer(r) for r in plan.layers]

    # --- accounting ---------------------------------------------------------------------------

    def plan_params(self, plan: SizePlan) -> int:
        """Exact parameter count of a size; a tensor used twice (tied embeddings) counts once."""
        return sum(t.numel() for t in _unique_tensors(self.plan_modules(plan), buffers=False))

    def plan_bytes(self, plan: SizePlan, dtype: torch.dtype | None = None) -> int:
        """Weight bytes of a size at ``dtype`` (default: the store's serving dtype)."""
        itemsize = (dtype or self.dtype).itemsize
        return self.plan_params(plan) * itemsize

    def resident_bytes(self) -> int:
        """Bytes of unique storages held by the store (parameters and buffers)."""
        mods: list[nn.Module] = [*self.embeds.values(), *self.norms.values(), *self.heads.values()]
        mods += [layer for layers in self.layers.values() for layer in layers]
        if self.rotary is not None:
            mods.append(self.rotary)
        return unique_storage_bytes(mods)


def _unique_tensors(modules: Iterable[nn.Module], buffers: bool = True) -> list[torch.Tensor]:
    seen: set[tuple[int, int]] = set()
    out: list[torch.Tensor] = []
    for mod in modules:
        tensors = list(mod.parameters()) + (list(mod.buffers()) if buffers else [])
        for t in tensors:
            key = (t.data_ptr(), t.numel())
            if key not in seen:
                seen.add(key)
                out.append(t)
    return out


def unique_storage_bytes(modules: Iterable[nn.Module]) -> int:
    """Bytes of the distinct storages behind every parameter and buffer of ``modules``."""
    seen: dict[int, int] = {}
    for mod in modules:
        for t in list(mod.parameters()) + list(mod.buffers()):
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())
