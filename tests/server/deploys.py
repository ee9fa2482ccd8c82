"""Deploy files for the tiny family of the server tests (written on disk by the ``tiny_dirs`` fixture)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

FAMILY = "tiny"


@dataclasses.dataclass(frozen=True)
class TinyFamilyDirs:
    teacher: Path
    student: Path


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
