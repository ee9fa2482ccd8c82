"""Deploy YAML sections for engine pools: per-tier engine kind and replicas, ``engines.vllm``, ``pool``.

Kept apart from :mod:`server.config` (which composes them) so that the pool's schema and its checks
live beside the code that reads them. Errors name their path in the file, e.g.
``tiers[2].max_replicas: must be >= min_replicas``.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

EngineKind = Literal["local", "vllm", "remote"]


class PoolTierFields(BaseModel):
    """Fields every tier has for the pool: which engine serves it and how many replicas.

    ``local``: the in-process engine (one engine for all local sizes; replicas do not apply).
    ``vllm``: vLLM engines fed from the store, ``min_replicas`` kept up, at most ``max_replicas``.
    ``remote``: an OpenAI-compatible worker at ``url`` (its own replicas sit behind that URL).
    ``min_replicas: 0`` starts the size on demand and lets it be evicted when idle.
    """

    engine: EngineKind = "local"
    url: str | None = Field(default=None, validate_default=True, description="base URL of a remote worker")
    min_replicas: Annotated[int, Field(ge=0)] = 1
    max_replicas: Annotated[int, Field(ge=1)] = 1

    @field_validator("url")
    @classmethod
    def _url_for_remote(cls, value: str | None, info: ValidationInfo) -> str | None:
        engine = info.data.get("engine")
        if engine == "remote" and not value:
            raise ValueError("a remote tier needs the worker's base URL, e.g. http://worker:8000")
        if engine != "remote" and value:
            raise ValueError(f"only remote tiers take a url (this tier's engine is {engine})")
        if value and not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/") if value else value

    @field_validator("max_replicas")
    @classmethod
    def _replicas(cls, value: int, info: ValidationInfo) -> int:
        low = info.data.get("min_replicas")
        if low is not None and value < low:
            raise ValueError("must be >= min_replicas")
        engine = info.data.get("engine")
        if engine in ("local", "remote") and value > 1:
            raise ValueError(f"{engine} tiers have one engine; replicas apply to engine: vllm")
        return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class VllmEngineConfig(_Section):
    """Settings of every vLLM replica. ``kv_cache_gb``: KV cache reserved per replica (1 GB = 1e9
    bytes), counted against ``pool.memory_budget_gb`` before a replica starts, with ``runtime_gb``.

    ``mode``: ``process`` runs each replica as its own vLLM OpenAI server over the shared store
    (``shared_dir``: where the store's shared-memory file goes; default ``/dev/shm``, else the
    cache folder), its CPU threads bound to ``cpu_cores_per_worker`` cores (default: the cores
    divided by the most workers the tiers may run, so no two share a core while there are cores
    enough; one core is kept for the gateway and the workers' API servers when the others still give
    every worker its share); ``in_process`` runs
    every replica in the gateway on one stepper thread (engines take turns: for comparison and tests).
    ``runtime_gb``: what a replica holds besides the weights and its KV cache; ``null``: the figure
    measured for the mode (a worker: 1.5 GB, its three processes on CPU; an in-process engine: 0.08 GB).
    ``tool_call_parser``: the vLLM tool parser a worker reads the model's tool calls with (``hermes``:
    the ``<tool_call>`` JSON of Qwen2.5 / Qwen3 and the gateway's default tool rendering; any name of
    vLLM's ``--tool-call-parser``). With a parser, vLLM holds a forced call (``required``, a named
    function) to the parser's format, and its arguments to the tool's schema only for tools marked
    ``strict: true`` (vLLM's ``--tool-strict-level auto``; the in-process engine always does). ``null``:
    workers start without ``--enable-auto-tool-choice``, so ``tool_choice: auto`` on them is vLLM's 400
    (a forced call is then JSON under the tools' schema). ``in_process`` replicas take tools through
    the gateway's own parser.
    """

    mode: Literal["process", "in_process"] = "process"
    max_model_len: Annotated[int, Field(ge=16)] = 2048
    max_num_seqs: Annotated[int, Field(ge=1, le=1024)] = 16
    enforce_eager: bool = True
    kv_cache_gb: Annotated[float, Field(gt=0)] = 0.25
    runtime_gb: Annotated[float | None, Field(ge=0)] = None
    shared_dir: str | None = None
    cpu_cores_per_worker: Annotated[int | None, Field(ge=1)] = None
    tool_call_parser: Annotated[str | None, Field(pattern=r"^[A-Za-z0-9_.-]+$")] = "hermes"


class PoolConfig(_Section):
    """Budgets of the tier pool.

    ``memory_budget_gb``: the store (counted once) plus every replica's KV cache and engine overhead
    never exceed it; ``null``: no limit. ``queue_depth_target``: requests waiting per replica above
    which a size scales up. ``idle_timeout_s``: a size with nothing in flight for this long gives
    back a replica (down to ``min_replicas``). ``scale_interval_s``: how often the scaler looks.
    """

    memory_budget_gb: Annotated[float | None, Field(gt=0)] = None
    queue_depth_target: Annotated[int, Field(ge=1)] = 4
    idle_timeout_s: Annotated[float, Field(gt=0)] = 300.0
    scale_interval_s: Annotated[float, Field(gt=0)] = 1.0
