"""The deploy YAML schema: what the gateway serves, how it routes, and its limits.

Every section is a pydantic model that refuses unknown keys, so a typo is an error with its path
in the file (``routing.slo_ms: Input should be greater than 0``), not a silently ignored setting.
Relative paths are read relative to the YAML file. Secrets come from the environment
(``auth.api_key_env``), so keys never need to sit in the file.

Later sections (vLLM pools, autoscaling budgets, remote workers) slot in as new ``engine`` kinds on
:class:`TierConfig` and a new top-level section; nothing here assumes the local engine is the only one.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from server.pool.config import PoolConfig, PoolTierFields, VllmEngineConfig

DTypeName = Literal["float32", "bfloat16", "float16"]
_DEVICE = re.compile(r"^(cpu|cuda|mps|xpu)(:\d+)?$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_ORIGIN = re.compile(r"^https?://[^/\s]+$")


class ConfigError(ValueError):
    """A deploy file that cannot be used. ``problems`` holds one ``path: message`` line each."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        if len(problems) == 1:
            super().__init__(f"{source}: {problems[0]}")
        else:
            super().__init__(f"{source}: {len(problems)} problems\n" + "\n".join(f"  {p}" for p in problems))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FamilyConfig(_Section):
    """Where the resident layers come from. Paths may be local HF directories, GGUF files or hub ids."""

    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$")]
    teacher: str
    student: str | None = None
    device: str = "cpu"
    dtype: DTypeName = "float32"
    patch_order: Literal["last", "first"] | list[int] = "last"
    family_file: str | None = Field(
        default=None,
        description="directory holding family.json (sizes chosen by `eval`); default: the student's, if present",
    )
    distill: dict[str, Any] | None = Field(
        default=None,
        description="a recipe (DistillConfig fields) for a student that is not there yet: the teacher serves at "
        "once while the student is distilled into `student` and its sizes searched in the background, then the "
        "family is loaded live",
    )
    search_metric: Literal["ppl", "chat_kl"] = Field(
        default="ppl",
        description="what chooses the plan served at each layer count when `distill` builds the family: "
        "calibration perplexity, or `chat_kl` (KL to the teacher per response token on its own conversations; "
        "a teacher with a chat template)",
    )

    @field_validator("distill")
    @classmethod
    def _recipe(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is None:
            return None
        from boomerang_core.distill import DistillConfig

        known = {f.name for f in dataclasses.fields(DistillConfig)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"unknown recipe field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        try:
            DistillConfig.from_dict(value).spec(1_000)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"not a valid recipe: {exc}") from None
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not _DEVICE.match(value):
            raise ValueError(f"unknown device '{value}': use cpu, cuda or cuda:N (mps, xpu where torch has them)")
        return value

    @field_validator("patch_order")
    @classmethod
    def _blocks(cls, value: str | list[int]) -> str | list[int]:
        if isinstance(value, list):
            if not value:
                raise ValueError("an empty block list: use last, first, or every block index once")
            negative = [b for b in value if b < 0]
            if negative:
                raise ValueError(f"block {negative[0]} is negative: blocks count from 0")
            twice = sorted({b for b in value if value.count(b) > 1})
            if twice:
                raise ValueError(f"block {twice[0]} is listed twice: give every block index once")
        return value


class TierConfig(PoolTierFields, _Section):
    """One served size. ``name`` is what clients may send as ``size``; ``size`` is any size form
    the family resolves (``k3``, ``96M``, ``0.5``)."""

    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$")]
    size: str

    @field_validator("name")
    @classmethod
    def _not_auto(cls, value: str) -> str:
        if value.lower() == "auto":
            raise ValueError("'auto' is reserved for automatic size choice")
        return value


class LocalEngineConfig(_Section):
    max_batch_size: Annotated[int, Field(ge=1, le=1024)] = 16
    max_queue: Annotated[int, Field(ge=1)] = 256


class EnginesConfig(_Section):
    local: LocalEngineConfig = LocalEngineConfig()
    vllm: VllmEngineConfig = VllmEngineConfig()


class RoutingConfig(_Section):
    """How a size is chosen when the request does not name one.

    Latency priors are used for a size before the engine has measured it: prefill at
    ``prior_flops_per_s`` (2 * params FLOPs per token) and a decode step that reads every weight
    byte at ``prior_bytes_per_s`` plus ``prior_step_overhead_ms``.
    """

    default_size: str = Field(default="auto", description="size used when a request names none")
    slo_ms: Annotated[float, Field(gt=0)] = 10_000.0
    allow_degrade: bool = Field(
        default=True, description="when no size meets the budgets, serve the smallest instead of answering 429"
    )
    prior_flops_per_s: Annotated[float, Field(gt=0)] = 2e10
    prior_bytes_per_s: Annotated[float, Field(gt=0)] = 1e10
    prior_step_overhead_ms: Annotated[float, Field(ge=0)] = 5.0
    typical_tokens: Annotated[int, Field(ge=1)] = Field(
        default=256,
        description="tokens a request that sets no max_tokens is predicted to generate (its max_tokens is the rest "
        "of the context), and a running request's remaining tokens where the engine does not report them",
    )
    latency_quantile: Annotated[float, Field(gt=0, lt=1)] = Field(
        default=0.98,
        description="predictions are scaled by this quantile of actual / predicted latency over the engine's "
        "last correction_window requests: 0.98 predicts a latency 98% of them met, 0.5 the median. Set it "
        "a little above the share of budgets you promise: the window lags a change of load",
    )
    correction_window: Annotated[int, Field(ge=1)] = Field(
        default=100, description="finished requests per engine that the latency correction is measured over"
    )
    missing_size: Literal["nearest", "error"] = Field(
        default="nearest",
        description="a request naming a size the family has not built yet, or one a reload removed: served by "
        "the nearest served size (x-boomerang-size says which) or answered 404",
    )
    correction_window_s: Annotated[float, Field(gt=0)] = Field(
        default=60.0, description="... of those, only the ones finished in the last this many seconds"
    )


class LimitsConfig(_Section):
    max_body_bytes: Annotated[int, Field(ge=1024)] = 8 * 1024 * 1024
    max_prompt_tokens: Annotated[int | None, Field(ge=1)] = Field(
        default=None, description="default: the model's context length"
    )
    max_tokens: Annotated[int | None, Field(ge=1)] = Field(
        default=None, description="the most max_tokens a request may ask for; default: no limit but the context"
    )
    default_max_tokens: Annotated[int | None, Field(ge=1)] = Field(
        default=None,
        description="chat max_tokens when the request sets none; default: the rest of the context, as vLLM and "
        "OpenAI (capped by max_tokens)",
    )
    max_n: Annotated[int | None, Field(ge=1)] = Field(
        default=None,
        description="the most choices (n x prompts) in one request; default: what the local engine holds at once "
        "(engines.local max_batch_size + max_queue)",
    )


class AuthConfig(_Section):
    """Bearer-key auth on every path except the API docs; ``/health`` and ``/metrics`` follow their own
    switches (open by default, for probes and scrapers). The environment variable wins over ``api_key``; neither is ever
    logged or echoed in an error body."""

    api_key: SecretStr | None = None
    api_key_env: str = Field(default="BOOMERANG_API_KEY", description="name of the variable holding the key")
    protect_metrics: bool = Field(default=False, description="require the key on /metrics too")
    protect_health: bool = Field(default=False, description="require the key on /health too")

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, value: str) -> str:
        if not _ENV_NAME.match(value):
            hint = f" (without the '$': {value.lstrip('$')})" if value.startswith("$") else ""
            raise ValueError(f"'{value}' is not an environment variable name{hint}")
        return value

    def resolved_key(self) -> str | None:
        env = os.environ.get(self.api_key_env)
        if env:
            return env
        return self.api_key.get_secret_value() if self.api_key is not None else None


class ServerConfig(_Section):
    """The HTTP front: shutdown, slow or idle connections, CORS."""

    shutdown_grace_s: Annotated[float, Field(ge=0)] = Field(
        default=30.0,
        description="on SIGTERM, in-flight requests get this long to finish while new ones get 503; then exit 0",
    )
    keep_alive_s: Annotated[float, Field(gt=0)] = Field(
        default=5.0, description="an idle keep-alive connection is closed after this long"
    )
    header_timeout_s: Annotated[float, Field(gt=0)] = Field(
        default=10.0, description="a connection that has not sent complete request headers by then is closed"
    )
    max_connections: Annotated[int, Field(ge=1)] = Field(
        default=1024, description="open connections above this get 503 at once"
    )
    cors_allow_origins: list[str] = Field(
        default_factory=list, description="origins allowed by CORS ('*' for any); empty: no CORS headers at all"
    )

    @field_validator("cors_allow_origins")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        for origin in value:
            if origin != "*" and not _ORIGIN.match(origin):
                raise ValueError(
                    f"'{origin}' is not an origin: scheme, host and optional port only, no path or trailing "
                    "slash (https://app.example.com), or '*'"
                )
        return value


class BuildConfig(_Section):
    """The background build of a family that is not ready (the demo on first use, or a ``family.distill``
    recipe): a child process at a lower CPU priority, so that serving keeps its latency."""

    nice: Annotated[int, Field(ge=0, le=19)] = Field(
        default=19, description="how much lower the build's CPU priority is than the server's"
    )
    threads: Annotated[int | None, Field(ge=1)] = Field(
        default=None, description="torch threads of the build; null: torch's default (every core)"
    )
    status_file: str | None = Field(
        default=None, description="where the build reports its stages; null: next to the student"
    )
    interim_max_ppl_ratio: Annotated[float | None, Field(gt=1)] = Field(
        default=1.3,
        description="while the family builds, also serve the teacher with layers dropped (ShortGPT) at the sizes "
        "still building, where their calibration perplexity is within this factor of the teacher's; null: the "
        "teacher alone",
    )


class DeployConfig(_Section):
    """The whole deploy file. ``family: null`` (or no file at all) serves the demo family."""

    family: FamilyConfig | None = None
    tiers: list[TierConfig] = Field(default_factory=list, description="empty: every non-dominated size")
    engines: EnginesConfig = EnginesConfig()
    routing: RoutingConfig = RoutingConfig()
    limits: LimitsConfig = LimitsConfig()
    auth: AuthConfig = AuthConfig()
    pool: PoolConfig = PoolConfig()
    server: ServerConfig = ServerConfig()
    build: BuildConfig = BuildConfig()

    @field_validator("tiers")
    @classmethod
    def _unique_tiers(cls, tiers: list[TierConfig]) -> list[TierConfig]:
        seen: dict[str, int] = {}
        for i, tier in enumerate(tiers):
            first = seen.setdefault(tier.name.lower(), i)
            if first != i:
                raise ValueError(
                    f"tier name '{tier.name}' is used twice (tiers[{first}] and tiers[{i}]; names ignore case)"
                )
        return tiers


def format_validation_error(exc: ValidationError) -> list[str]:
    """``tiers[2].size: Field required`` lines, one per problem, paths as they read in YAML."""
    lines = []
    for err in exc.errors():
        path = ""
        for part in err["loc"]:
            path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
        message = err["msg"].removeprefix("Value error, ")
        lines.append(f"{path}: {message}" if path else message)
    return lines


def parse_config(data: Any, source: str = "<config>", base_dir: Path | None = None) -> DeployConfig:
    """Validate a parsed YAML document; relative model paths are resolved against ``base_dir``."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, [f"the top level must be a mapping, not {type(data).__name__}"])
    try:
        config = DeployConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, format_validation_error(exc)) from None
    if base_dir is not None and config.family is not None:
        config = config.model_copy(update={"family": _resolve_paths(config.family, base_dir)})
    return config


def _resolve_paths(family: FamilyConfig, base_dir: Path) -> FamilyConfig:
    def local(path: str | None) -> str | None:
        if path is None or not path.startswith(("./", "../")):
            return path  # absolute, ~, or a hub id
        return str((base_dir / path).resolve())

    return family.model_copy(
        update={
            "teacher": local(family.teacher),
            "student": local(family.student),
            "family_file": local(family.family_file),
        }
    )


def load_config(path: str | Path | None) -> DeployConfig:
    """Read a deploy YAML file; ``None`` gives the defaults (the demo family)."""
    if path is None:
        return DeployConfig()
    file = Path(path)
    try:
        text = file.read_text()
    except OSError as exc:
        raise ConfigError(str(path), [f"cannot read the file: {exc.strerror}"]) from None
    try:
        data = yaml.safe_load(text)
        twice = _keys_given_twice(yaml.compose(text))
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), [_yaml_problem(exc)]) from None
    if twice:
        raise ConfigError(str(path), twice)
    return parse_config(data, str(path), file.parent)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's multi-line report as one line: where, and what."""
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"not valid YAML{where}: {what}"


def _keys_given_twice(node: yaml.Node | None, path: str = "") -> list[str]:
    """``routing.slo_ms: given twice (lines 3 and 9)`` for each repeated key: YAML loaders keep only
    the last one, so the first would be silently ignored."""
    problems: list[str] = []
    if isinstance(node, yaml.MappingNode):
        first_line: dict[str, int] = {}
        for key, value in node.value:
            name = str(getattr(key, "value", ""))
            sub = f"{path}.{name}" if path else name
            line = key.start_mark.line + 1
            if name in first_line and name != "<<":
                problems.append(f"{sub}: given twice (lines {first_line[name]} and {line}); only the last would count")
            first_line.setdefault(name, line)
            problems += _keys_given_twice(value, sub)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            problems += _keys_given_twice(item, f"{path}[{i}]")
    return problems
