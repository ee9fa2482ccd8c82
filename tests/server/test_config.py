"""The deploy file schema: defaults, paths in errors, relative paths, secrets from the environment."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.config import ConfigError, DeployConfig, load_config, parse_config


def test_no_file_serves_the_demo_family_with_defaults() -> None:
    config = load_config(None)
    assert config == DeployConfig() and config.family is None and config.tiers == []
    assert config.routing.default_size == "auto" and config.routing.allow_degrade


def test_every_problem_is_reported_with_its_path() -> None:
    data = {
        "family": {"name": "x", "teacher": "t", "dtype": "float64"},
        "tiers": [{"name": "a", "size": "k1"}, {"name": "auto", "size": "k2"}, {"size": "k3"}],
        "routing": {"slo_ms": -1, "colour": "red"},
    }
    with pytest.raises(ConfigError) as info:
        parse_config(data, "deploy.yaml")
    problems = info.value.problems
    assert any(p.startswith("family.dtype: Input should be") for p in problems)
    assert "tiers[1].name: 'auto' is reserved for automatic size choice" in problems
    assert "tiers[2].name: Field required" in problems
    assert any(p.startswith("routing.slo_ms: Input should be greater than 0") for p in problems)
    assert "routing.colour: Extra inputs are not permitted" in problems
    assert str(info.value).startswith(f"deploy.yaml: {len(problems)} problems")


def test_tier_names_are_unique_ignoring_case() -> None:
    with pytest.raises(ConfigError, match="tier name 'A' is used twice"):
        parse_config({"tiers": [{"name": "a", "size": "k1"}, {"name": "A", "size": "k2"}]})


def test_relative_paths_are_read_from_the_files_folder(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "deploy.yaml"
    path.write_text("family:\n  name: f\n  teacher: ./models/t\n  student: ../s\nlimits:\n  max_tokens: 64\n")
    family = load_config(path).family
    assert family is not None
    assert family.teacher == str(tmp_path / "sub" / "models" / "t") and family.student == str(tmp_path / "s")
    hub = parse_config({"family": {"name": "f", "teacher": "org/model"}}, base_dir=tmp_path).family
    assert hub is not None and hub.teacher == "org/model"


def test_unreadable_and_broken_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the file"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("family: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(tmp_path / "list.yaml")


def test_the_api_key_comes_from_the_environment_first(monkeypatch: pytest.MonkeyPatch) -> None:
    config = parse_config({"auth": {"api_key": "from-file", "api_key_env": "MY_KEY"}})
    monkeypatch.delenv("MY_KEY", raising=False)
    assert config.auth.resolved_key() == "from-file"
    assert "from-file" not in repr(config)  # a secret never shows in logs or reprs
    monkeypatch.setenv("MY_KEY", "from-env")
    assert config.auth.resolved_key() == "from-env"
