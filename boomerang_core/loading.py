"""Load a causal LM and its tokenizer from a local HF directory, a GGUF file or a hub id."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from boomerang_core.errors import ModelNotFound


def _split_gguf(source: str | Path) -> tuple[str, dict[str, str]]:
    path = Path(source)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFound(f"GGUF file {path} not found")
        return str(path.parent), {"gguf_file": path.name}
    if path.exists() or str(source).startswith((".", "/", "~")):
        if not (path / "config.json").is_file():
            raise ModelNotFound(f"{path} is not a model directory (no config.json found)")
        return str(path), {}
    return str(source), {}  # a hub id


def load_config(source: str | Path) -> PretrainedConfig:
    where, extra = _split_gguf(source)
    try:
        config = AutoConfig.from_pretrained(where, **extra)
    except OSError as exc:
        raise ModelNotFound(f"cannot load model config from '{source}': {exc}") from None
    return clean_config(config)


def clean_config(config: PretrainedConfig) -> PretrainedConfig:
    """Drop loader-only fields (GGUF quantisation) so the config describes plain weights."""
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


def load_causal_lm(
    source: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> PreTrainedModel:
    where, extra = _split_gguf(source)
    try:
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **extra)
    except OSError as exc:
        raise ModelNotFound(f"cannot load model from '{source}': {exc}") from None
    clean_config(model.config)
    # GGUF weights are dequantised on load: what remains is a plain torch model.
    setattr(model, "hf_quantizer", None)  # noqa: B010
    setattr(model, "is_quantized", False)  # noqa: B010
    model.requires_grad_(False)
    model.to(torch.device(device))  # type: ignore[arg-type]
    return model.eval()


def load_tokenizer(source: str | Path) -> PreTrainedTokenizerBase:
    where, extra = _split_gguf(source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **extra)
    except OSError as exc:
        raise ModelNotFound(f"cannot load tokenizer from '{source}': {exc}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
