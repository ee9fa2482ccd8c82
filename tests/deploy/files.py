"""The deploy files under test, and one way to run the tools that check them."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


def deploy_configs() -> list[Path]:
    """Every deploy YAML in deploy/: the default, the examples, the Kubernetes ConfigMap sources."""
    files = [DEPLOY / "config.yaml", *sorted((DEPLOY / "examples").glob("*.yaml"))]
    return files + sorted((DEPLOY / "k8s" / "config").glob("*.yaml"))


def run(cmd: list[str | Path], timeout: float = 120, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, check=False, **kw)  # type: ignore[call-overload]
