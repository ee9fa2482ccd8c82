"""``boomerang config check FILE...`` and ``boomerang config schema``: deploy files checked before a
deploy, and again by ``boomerang serve`` before it loads anything.

``check`` prints every problem of every file as ``FILE:LINE: path: message`` (the path as it reads
in YAML, ``tiers[2].max_replicas``; the line of that key, or of its parent when the key is missing)
and exits 1 when any file has one. Beyond the schema of :mod:`server.config` it reads every size
form that needs no model (``k3``, ``96M``, ``0.5``), and warns (without failing) when a secret sits
in the file instead of the environment. ``boomerang serve`` runs the same check first
(:func:`refuse_bad_file`) and refuses to start on any problem, printing the same lines. ``schema``
prints the JSON Schema of the deploy file for editors (yaml-language-server:
``# yaml-language-server: $schema=boomerang.schema.json``).

Only :mod:`server.config` is imported: checking a file loads no model and no web stack.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from server.config import ConfigError, DeployConfig, load_config

_SIZE_NAME = re.compile(r"^[a-z]\d+$")  # the names families give their sizes: k3 (patched blocks), l12 (layers)
_PARAM_LABEL = re.compile(r"^\d+(\.\d+)?[kmbg]$")  # 96M, 2.3B (boomerang_core.family.parse_param_label)
_AT_LINE = re.compile(r"^not valid YAML at line (\d+)")
_PROBLEM_PATH = re.compile(r"^((?:[A-Za-z_][\w-]*|\[\d+\])(?:\.[A-Za-z_][\w-]*|\[\d+\])*): (.*)$", re.S)


@dataclass(frozen=True)
class Finding:
    path: str  # "tiers[2].max_replicas", or "" for the whole file
    message: str
    line: int | None = None  # 1-based
    warning: bool = False

    def render(self, source: str) -> str:
        where = f"{source}:{self.line}" if self.line is not None else source
        what = f"{self.path}: {self.message}" if self.path else self.message
        return f"{where}: {'warning: ' if self.warning else ''}{what}"


def check_file(path: str | Path) -> list[Finding]:
    """Every problem (and warning) of one deploy file; an empty list means it is good to deploy."""
    try:
        load_config(path)
        findings: list[Finding] = []
    except ConfigError as exc:
        findings = [_explain(_split(problem)) for problem in exc.problems]
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return findings  # already reported by load_config
    if isinstance(data, dict):
        findings += _semantic(data)
    return _with_lines(findings, path)


class DeployFileError(ConfigError):
    """A deploy file ``config check`` fails; ``str()`` is its problem lines, ``FILE:LINE: path: message``."""

    def __str__(self) -> str:
        return "\n".join(self.problems)


def refuse_bad_file(path: str | Path | None) -> None:
    """What ``boomerang serve`` runs first: raise :class:`DeployFileError` for a file ``config check``
    fails, so a server never starts half-configured and the refusal takes a second (no model and no web
    stack load). ``None`` (the defaults) always passes."""
    if path is None:
        return
    problems = [f.render(str(path)) for f in check_file(path) if not f.warning]
    if problems:
        raise DeployFileError(str(path), problems)


def check_files(paths: Sequence[str | Path]) -> int:
    """Check each file and print its findings, or ``ok`` and what it serves; 1 if any has a problem."""
    failed = 0
    for path in paths:
        findings = check_file(path)
        problems = sum(not f.warning for f in findings)
        for finding in findings:
            print(finding.render(str(path)))
        if problems:
            failed += 1
            print(f"{path}: {problems} problem{'s' if problems > 1 else ''}")
        else:
            print(f"{path}: ok ({_summary(load_config(path))})")
    return 1 if failed else 0


def json_schema() -> dict[str, Any]:
    schema = DeployConfig.model_json_schema()
    return {**schema, "$schema": "https://json-schema.org/draft/2020-12/schema", "title": "boomerang deploy file"}


def print_schema() -> None:
    print(json.dumps(json_schema(), indent=2))


# --- the CLI ------------------------------------------------------------------------------------


def add_config_command(subparsers: Any) -> argparse.ArgumentParser:
    """``config check FILE...`` and ``config schema`` on the ``boomerang`` parser's subparsers; each
    sets ``func(args) -> int`` as the other commands do."""
    parser: argparse.ArgumentParser = subparsers.add_parser("config", help="check deploy files; print their schema")
    sub = parser.add_subparsers(dest="config_command", required=True)
    check = sub.add_parser("check", help="validate deploy files; print every problem with its path; exit 1 on any")
    check.add_argument("files", nargs="+", metavar="FILE")
    check.set_defaults(func=lambda args: check_files(args.files))
    schema = sub.add_parser("schema", help="print the deploy file's JSON Schema (for editors)")
    schema.set_defaults(func=_schema_command)
    return parser


def _schema_command(args: argparse.Namespace) -> int:
    print_schema()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m server.config_cli check FILE...`` / ``schema``: the same as ``boomerang config ...``."""
    parser = argparse.ArgumentParser(prog="python -m server.config_cli")
    add_config_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["config", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args))


# --- helpers ------------------------------------------------------------------------------------


def _split(problem: str) -> Finding:
    match = _PROBLEM_PATH.match(problem)
    if match:
        return Finding(match.group(1), match.group(2))
    at_line = _AT_LINE.match(problem)  # YAML syntax errors name their line
    return Finding("", problem, line=int(at_line.group(1)) if at_line else None)


def _semantic(data: dict[str, Any]) -> list[Finding]:
    """Checks on the raw document that need no model; they run even when the schema fails."""
    findings = []
    tiers = data["tiers"] if isinstance(data.get("tiers"), list) else []
    tier_names = {str(t.get("name", "")).lower() for t in tiers if isinstance(t, dict)}
    for i, tier in enumerate(tiers):
        size = tier.get("size") if isinstance(tier, dict) else None
        problem = _size_form_problem(str(size)) if isinstance(size, str | int | float) else None
        if problem:
            findings.append(Finding(f"tiers[{i}].size", problem))
    routing = _mapping(data, "routing")
    default = routing.get("default_size")
    if isinstance(default, str) and default.strip().lower() not in tier_names | {"auto"}:
        problem = _size_form_problem(default)
        if problem:
            findings.append(Finding("routing.default_size", f"{problem}, 'auto', or a tier name"))
    auth = _mapping(data, "auth")
    if auth.get("api_key"):
        env = auth.get("api_key_env", "BOOMERANG_API_KEY")
        message = f"a secret in the file: set ${env} in the environment instead"
        findings.append(Finding("auth.api_key", message, warning=True))
    return findings


def _mapping(data: dict[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key)
    return value if isinstance(value, dict) else {}


def _explain(finding: Finding) -> Finding:
    """Name the keys that ARE allowed where pydantic says only 'Extra inputs are not permitted'."""
    if finding.message != "Extra inputs are not permitted" or not finding.path:
        return finding
    parent, _, key = finding.path.rpartition(".")
    known = _schema_keys(re.findall(r"\[\d+\]|[^.\[\]]+", parent) if parent else [])
    if not known:
        return replace(finding, message=f"unknown key '{key}'")
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"did you mean '{close[0]}'?" if close else f"known keys here: {', '.join(sorted(known))}"
    return replace(finding, message=f"unknown key '{key}'; {hint}")


def _schema_keys(parts: list[str]) -> list[str]:
    """The property names the JSON Schema allows at ``parts`` (``["tiers", "[2]"]``)."""
    schema = json_schema()
    defs = schema.get("$defs", {})

    def deref(node: dict[str, Any]) -> dict[str, Any]:
        while True:
            if "$ref" in node:
                node = defs[node["$ref"].rsplit("/", 1)[-1]]
            elif "anyOf" in node:  # X | None
                node = next((n for n in node["anyOf"] if n.get("type") != "null"), {})
            else:
                return node

    node = deref(schema)
    for part in parts:
        node = deref(node.get("items", {}) if part.startswith("[") else node.get("properties", {}).get(part, {}))
    return list(node.get("properties", {}))


def _size_form_problem(text: str) -> str | None:
    t = text.strip().lower()
    if _SIZE_NAME.match(t) or _PARAM_LABEL.match(t):
        return None
    try:
        fraction = float(t)
    except ValueError:
        return f"cannot read size '{text}': use a size name like k3, a parameter label like 96M, or a fraction"
    if not 0 < fraction <= 1:
        return f"size fraction {text} is out of range: use a fraction of the teacher in (0, 1]"
    return None


def _with_lines(findings: list[Finding], path: str | Path) -> list[Finding]:
    """Attach the line of each finding's key (or of the deepest parent the file has)."""
    try:
        root = yaml.compose(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return findings
    located = [replace(f, line=_line_of(root, f.path)) for f in findings]
    return sorted(located, key=lambda f: f.line or 0)


def _line_of(root: yaml.Node | None, path: str) -> int | None:
    if root is None or not path:
        return None
    node, line = root, root.start_mark.line + 1
    for part in re.findall(r"\[\d+\]|[^.\[\]]+", path):
        found: tuple[int, yaml.Node] | None = None
        if isinstance(node, yaml.SequenceNode) and part.startswith("["):
            index = int(part[1:-1])
            if index < len(node.value):
                found = (node.value[index].start_mark.line + 1, node.value[index])
        elif isinstance(node, yaml.MappingNode):
            keys = [(k.start_mark.line + 1, v) for k, v in node.value if getattr(k, "value", None) == part]
            found = keys[0] if keys else None
        if found is None:
            break
        line, node = found
    return line


def _summary(config: DeployConfig) -> str:
    family = config.family.name if config.family is not None else "the demo family"
    tiers = ", ".join(f"{t.name}={t.size} ({t.engine})" for t in config.tiers) or "every non-dominated size"
    return f"{family}: {tiers}"


if __name__ == "__main__":
    sys.exit(main())
