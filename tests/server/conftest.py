"""Shared fixtures: one tiny family on disk per session (teacher 8 layers, student 5; sizes k1 and
k2 have k0's parameter count and are marked dominated in family.json), and deploy files for it."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml

from boomerang_core.family import Family
from boomerang_core.store import LayerStore
from tests.tiny import write_pair

FAMILY = "tiny"
DOMINATED = ("k1", "k2")


@dataclasses.dataclass(frozen=True)
class TinyFamilyDirs:
    teacher: Path
    student: Path


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> TinyFamilyDirs:
    root = tmp_path_factory.mktemp("tiny-family")
    teacher, student = write_pair(root, "llama", layers=8)
    family = Family.from_store(FAMILY, LayerStore.load(teacher, student))
    family.sizes = [dataclasses.replace(s, dominated=s.name in DOMINATED) for s in family.sizes]
    family.save(student)
    return TinyFamilyDirs(teacher, student)


def deploy_dict(dirs: TinyFamilyDirs, **sections: Any) -> dict[str, Any]:
    """A deploy file for the tiny family; ``sections`` replace or extend the defaults."""
    data: dict[str, Any] = {
        "family": {"name": FAMILY, "teacher": str(dirs.teacher), "student": str(dirs.student)},
        "tiers": [
            {"name": "small", "size": "k0"},
            {"name": "k3", "size": "k3"},
            {"name": "k4", "size": "k4"},
            {"name": "large", "size": "k5"},
        ],
        "routing": {"slo_ms": 60_000},
    }
    for key, value in sections.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) and key in data else value
    return data


def write_deploy(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path
