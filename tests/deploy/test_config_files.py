"""``boomerang config check`` on every deploy file in deploy/ (all pass) and on the committed broken
files (each prints exactly the problems its ``# expect:`` lines name, one line each); ``boomerang serve``
refuses every broken file with the same lines, without a traceback and without opening its port;
``config schema``."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from server.config import DeployConfig, load_config
from server.config_cli import check_file, check_files, json_schema
from tests.deploy.files import DEPLOY, REPO, deploy_configs, run
from tests.server.live import free_port

BROKEN = sorted((Path(__file__).parent / "broken").glob("*.yaml"))


@pytest.mark.parametrize("path", deploy_configs(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_deploy_file_passes_check(path: Path) -> None:
    findings = check_file(path)
    assert not [f for f in findings if not f.warning], "\n".join(f.render(str(path)) for f in findings)


def test_default_config_documents_the_defaults() -> None:
    """deploy/config.yaml says what `boomerang serve` does with no file: every key at its default."""
    assert load_config(DEPLOY / "config.yaml") == DeployConfig()


@pytest.mark.parametrize("path", BROKEN, ids=lambda p: p.stem)
def test_broken_file_reports_every_expected_problem(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    expected = re.findall(r"^# expect: (.+)$", path.read_text(), re.M)
    assert expected, f"{path.name} names no expected problem"
    assert check_files([path]) == 1
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(f"{path}:")]
    problems = [line for line in lines[:-1] if ": warning: " not in line]
    assert lines[-1] == f"{path}: {len(expected)} problem{'s' if len(expected) > 1 else ''}", lines
    for message in expected:
        assert any(message in line for line in problems), f"{message!r} not in:\n" + "\n".join(problems)


def test_there_are_many_distinct_broken_files() -> None:
    assert len(BROKEN) >= 15
    single = [p for p in BROKEN if len(re.findall(r"^# expect: ", p.read_text(), re.M)) == 1]
    assert len(single) >= 8  # one mistake each: the error is one line


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.parametrize("path", BROKEN, ids=lambda p: p.stem)
def test_serve_refuses_a_broken_file(path: Path) -> None:
    """``boomerang serve --config BROKEN`` exits 2 with the lines ``config check`` prints (the
    field's path in each), no traceback, and never listens."""
    port = free_port()
    cmd = [sys.executable, "-m", "server.cli", "serve", "--config", str(path), "--port", str(port)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    listened = False
    deadline = time.monotonic() + 60  # a guard against a server that starts after all, not a speed check
    while proc.poll() is None and time.monotonic() < deadline:
        listened = listened or _port_open(port)
        time.sleep(0.05)
    if proc.poll() is None:
        proc.kill()
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 2, out + err
    assert not listened and not _port_open(port)
    assert "Traceback" not in err and not out, err
    lines = err.splitlines()
    assert lines[0].startswith("boomerang serve: error: "), err
    printed = [lines[0].removeprefix("boomerang serve: error: "), *lines[1:]]
    assert printed == [f.render(str(path)) for f in check_file(path) if not f.warning]  # as `config check` says
    expected = re.findall(r"^# expect: (.+)$", path.read_text(), re.M)
    assert len(printed) == len(expected)
    for message in expected:
        assert any(message in line for line in printed), f"{message!r} not in:\n{err}"


def test_problem_lines_point_into_the_file() -> None:
    path = REPO / "tests/deploy/broken/unknown-keys.yaml"
    text = path.read_text().splitlines()
    for finding in check_file(path):
        assert finding.line is not None
        key = finding.path.rsplit(".", 1)[-1]
        assert text[finding.line - 1].strip().lstrip("- ").startswith(f"{key}:"), (finding, text[finding.line - 1])


def test_secret_in_file_is_a_warning_not_a_failure(tmp_path: Path) -> None:
    path = tmp_path / "key.yaml"
    path.write_text("auth:\n  api_key: sk-in-a-file\n")
    findings = check_file(path)
    assert [(f.path, f.warning, f.line) for f in findings] == [("auth.api_key", True, 2)]
    assert "$BOOMERANG_API_KEY" in findings[0].message and "sk-in-a-file" not in findings[0].message
    assert check_files([path]) == 0


def test_command_line_exit_codes_and_schema() -> None:
    good = run([sys.executable, "-m", "server.config_cli", "check", DEPLOY / "config.yaml"], cwd=REPO)
    assert good.returncode == 0 and "ok (the demo family" in good.stdout, good.stdout + good.stderr
    bad = run([sys.executable, "-m", "server.config_cli", "check", DEPLOY / "config.yaml", *BROKEN], cwd=REPO)
    assert bad.returncode == 1
    assert bad.stdout.count(" problem") == len(BROKEN), bad.stdout
    schema = run([sys.executable, "-m", "server.config_cli", "schema"], cwd=REPO)
    assert schema.returncode == 0
    assert json.loads(schema.stdout) == json_schema()


def test_schema_covers_every_section_and_refuses_unknown_keys() -> None:
    schema = json_schema()
    assert set(schema["properties"]) == set(DeployConfig.model_fields)
    assert schema["additionalProperties"] is False
    assert all(d.get("additionalProperties") is False for d in schema["$defs"].values() if "properties" in d)


def test_boomerang_console_script_has_the_config_commands(capsys: pytest.CaptureFixture[str]) -> None:
    from server.cli import main

    assert main(["config", "check", str(DEPLOY / "config.yaml")]) == 0
    assert main(["config", "check", str(BROKEN[0])]) == 1
    capsys.readouterr()
    assert main(["config", "schema"]) == 0
    assert json.loads(capsys.readouterr().out) == json_schema()


def test_every_size_form_a_family_reads_passes(tmp_path: Path) -> None:
    forms = ["k3", "l12", "s0", "96M", "2.3B", "0.5", "1"]
    tiers = "".join(f"  - name: t{i}\n    size: '{form}'\n" for i, form in enumerate(forms))
    path = tmp_path / "forms.yaml"
    path.write_text(f"tiers:\n{tiers}routing:\n  default_size: t3\n")
    assert check_file(path) == []
