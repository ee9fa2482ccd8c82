"""The deploy YAML schema: what the gateway serves, how it routes, and its limits.

Every section is a pydantic model that refuses unknown keys, so a typo is an error with its path
in the file (``routing.slo_ms: Input should be greater than 0``), not a silently ignored setting.
Relative paths are read relative to the YAML file. Secrets come from the environment
(``auth.api_key_env``), so keys never need to sit in the file.

Later sections (vLLM pools, autoscaling budgets, remote workers) slot in as new ``engine`` kinds on
:class:`TierConfig` and a new top-level section; nothing here assumes the local engine is the only one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from server.pool_config import PoolConfig, PoolTierFields, VllmEngineConfig

DTypeName = Literal["float32", "bfloat16", "float16"]


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


class LimitsConfig(_Section):
    max_body_bytes: Annotated[int, Field(ge=1024)] = 8 * 1024 * 1024
    max_prompt_tokens: Annotated[int | None, Field(ge=1)] = Field(
        default=None, description="default: the model's context length"
    )
    max_tokens: Annotated[int, Field(ge=1)] = 4096
    default_max_tokens: Annotated[int, Field(ge=1)] = Field(
        default=256, description="chat max_tokens when the request sets none (capped by max_tokens and the context)"
    )
    max_n: Annotated[int, Field(ge=1, le=128)] = 16


class AuthConfig(_Section):
    """Bearer-key auth on ``/v1/*``. ``/health`` and ``/metrics`` follow their own switches (open by
    default, for probes and scrapers). The environment variable wins over ``api_key``; neither is ever
    logged or echoed in an error body."""

    api_key: SecretStr | None = None
    api_key_env: str = "BOOMERANG_API_KEY"
    protect_metrics: bool = Field(default=False, description="require the key on /metrics too")
    protect_health: bool = Field(default=False, description="require the key on /health too")

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

    @model_validator(mode="after")
    def _unique_tiers(self) -> DeployConfig:
        seen: set[str] = set()
        for tier in self.tiers:
            if tier.name.lower() in seen:
                raise ValueError(f"tier name '{tier.name}' is used twice")
            seen.add(tier.name.lower())
        return self


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
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), [f"not valid YAML: {exc}"]) from None
    return parse_config(data, str(path), file.parent)
