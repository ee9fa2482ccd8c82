"""Shared fixtures: one tiny family on disk per session (teacher 8 layers, student 5; sizes k1 and
k2 have k0's parameter count and are marked dominated in family.json). Deploy files for it are
written with ``tests/server/deploys.py``."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest

from boomerang_core.family import Family
from boomerang_core.store import LayerStore
from server.config import parse_config
from server.services import load_family
from tests.server.deploys import FAMILY, TinyFamilyDirs, deploy_dict, write_deploy
from tests.server.live import Server, launch, serving
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


@pytest.fixture(scope="module")
def tiny_server(
    tiny_dirs: TinyFamilyDirs, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Server]:
    """A live server of the tiny family with the default deploy file (no limits set: vLLM's
    defaults) and the test key, one per test module."""
    name = request.module.__name__.rpartition(".")[2]
    tmp = tmp_path_factory.mktemp(name)
    config = deploy_dict(tiny_dirs, auth={"api_key_env": "TINY_SERVER_KEY"})
    started = launch(write_deploy(tmp / f"{name}.yaml", config), tmp / f"{name}.log")
    with serving(started):
        yield started


@pytest.fixture(scope="module")
def family(tiny_dirs: TinyFamilyDirs) -> Family:
    """The tiny family as the server loads it from its default deploy file (a module may define its own)."""
    return load_family(parse_config(deploy_dict(tiny_dirs)))
