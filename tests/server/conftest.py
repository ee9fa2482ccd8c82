"""Shared fixtures: one tiny family on disk per session (teacher 8 layers, student 5; sizes k1 and
k2 have k0's parameter count and are marked dominated in family.json). Deploy files for it are
written with ``tests/server/deploys.py``."""

from __future__ import annotations

import dataclasses

import pytest

from boomerang_core.family import Family
from boomerang_core.store import LayerStore
from tests.server.deploys import FAMILY, TinyFamilyDirs
from tests.tiny import write_pair

DOMINATED = ("k1", "k2")


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> TinyFamilyDirs:
    root = tmp_path_factory.mktemp("tiny-family")
    teacher, student = write_pair(root, "llama", layers=8)
    family = Family.from_store(FAMILY, LayerStore.load(teacher, student))
    family.sizes = [dataclasses.replace(s, dominated=s.name in DOMINATED) for s in family.sizes]
    family.save(student)
    return TinyFamilyDirs(teacher, student)
