"""The one engine factory: from the deploy file, the engines that serve a family's sizes.

Every tier ``local`` (or no tiers): one in-process engine on the store for all sizes. Some tier
``vllm`` or ``remote``: the tier pool, with ``vllm`` tiers as worker processes over the shared store
(``engines.vllm.mode: process``, the default) or as in-process replicas on one stepper thread
(``in_process``), ``remote`` tiers by URL, and the ``local`` ones on one in-process engine.
:data:`EngineFactory` is the signature ``create_app`` takes (tests pass a scripted engine through it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from boomerang_core.demo import cache_root
from boomerang_core.family import Family
from boomerang_core.shared_store import SharedStore, share_store, shared_dir
from server.config import DeployConfig, TierConfig
from server.engines.base import Engine
from server.engines.remote import RemoteEngine
from server.engines.vllm.replica import VllmReplica, VllmSettings
from server.engines.vllm.stepper import VllmStepper
from server.engines.vllm.worker import WORKER_RUNTIME_GB, CpuCores, VllmWorker
from server.pool.metrics import PoolMetrics
from server.pool.tiers import TierPool, TierSpec

EngineFactory = Callable[[Family, Sequence[str], DeployConfig], Engine]
_GB = 1e9


def build_engine(
    family: Family, sizes: Sequence[str], config: DeployConfig, *, metrics: PoolMetrics | None = None
) -> Engine:
    """The engine serving ``sizes`` (size names) as the deploy file says: one in-process engine when
    every tier is ``local``, else the tier pool. ``metrics``: the pool's metrics (one set per registry:
    every family a process loads reports to the same series)."""
    if uses_pool(config):
        return pool_engine(family, sizes, config, metrics=metrics)
    return local_engine(family, sizes, config)


def local_engine(family: Family, sizes: Sequence[str], config: DeployConfig) -> Engine:
    """The in-process engine on the family's store, for every size in ``sizes``."""
    from server.engines.local.engine import LocalEngine

    engine_config = config.engines.local
    return LocalEngine(
        family, sizes=list(sizes), max_batch_size=engine_config.max_batch_size, max_queue=engine_config.max_queue
    )


def uses_pool(config: DeployConfig) -> bool:
    """True when some tier needs an engine other than the in-process one."""
    return any(t.engine != "local" for t in config.tiers)


def vllm_settings(config: DeployConfig) -> VllmSettings:
    v = config.engines.vllm
    runtime = v.runtime_gb
    if runtime is None:
        runtime = WORKER_RUNTIME_GB if v.mode == "process" else VllmSettings.overhead_gb
    return VllmSettings(
        max_model_len=v.max_model_len, max_num_seqs=v.max_num_seqs, enforce_eager=v.enforce_eager,
        kv_cache_gb=v.kv_cache_gb, overhead_gb=runtime, tool_call_parser=v.tool_call_parser,
    )  # fmt: skip


def pool_engine(
    family: Family, sizes: Sequence[str], config: DeployConfig, *, metrics: PoolMetrics | None = None
) -> Engine:
    """The engine for ``sizes`` (size names): a :class:`TierPool` over every tier kind, its ``local``
    sizes on one in-process engine."""
    by_size: dict[str, TierConfig] = {}
    for configured in config.tiers:
        size = family.resolve(configured.size).name
        if size in by_size and by_size[size].engine != configured.engine:
            raise ValueError(f"size {size} is given two engine kinds ({by_size[size].engine}, {configured.engine})")
        by_size.setdefault(size, configured)
    settings = vllm_settings(config)
    vllm_tiers = [by_size[s] for s in sizes if s in by_size and by_size[s].engine == "vllm"]
    make_vllm, on_stop = (
        _vllm_makers(family, settings, config, sum(t.max_replicas for t in vllm_tiers)) if vllm_tiers else (None, [])
    )
    process = config.engines.vllm.mode == "process"
    specs: list[TierSpec] = []
    local_sizes: list[str] = []
    for size in sizes:
        tier = by_size.get(size)
        if tier is None or tier.engine == "local":
            local_sizes.append(size)
        elif tier.engine == "vllm":
            assert make_vllm is not None
            specs.append(
                TierSpec(size, "vllm", make_vllm(size), settings.replica_bytes, tier.min_replicas, tier.max_replicas,
                         forwards=process)
            )  # fmt: skip
        else:
            assert tier.url is not None  # the schema requires it
            specs.append(
                TierSpec(size, "remote", _remote_maker(tier.url, size), 0, max(1, tier.min_replicas), 1, forwards=True)
            )
    local = local_engine(family, local_sizes, config) if local_sizes else None
    pool = config.pool
    return TierPool(
        specs,
        base_bytes=family.store.resident_bytes(),
        budget_bytes=None if pool.memory_budget_gb is None else int(pool.memory_budget_gb * _GB),
        queue_depth_target=pool.queue_depth_target,
        idle_timeout_s=pool.idle_timeout_s,
        scale_interval_s=pool.scale_interval_s,
        slo_s=config.routing.slo_ms / 1e3,
        metrics=metrics or PoolMetrics(),
        local=local,
        local_sizes=local_sizes,
        on_stop=on_stop,
    )


def _vllm_makers(
    family: Family, settings: VllmSettings, config: DeployConfig, max_workers: int
) -> tuple[Callable[[str], Callable[[], Engine]], list[Callable[[], None]]]:
    """Per size, the maker of its vLLM replicas, and what the pool calls when it stops. ``process``
    mode moves the store into shared memory here (once, before any engine binds it)."""
    v = config.engines.vllm
    if v.mode == "in_process":
        stepper = VllmStepper()
        return (lambda size: lambda: VllmReplica(family, size, settings, stepper)), [stepper.stop]
    shared: SharedStore = share_store(family.store, shared_dir(v.shared_dir, cache_root()))
    cores = CpuCores.of_this_process(max_workers, v.cpu_cores_per_worker)
    return (lambda size: lambda: VllmWorker(family, size, settings, shared, cores=cores)), [shared.remove]


def _remote_maker(url: str, size: str) -> Callable[[], Engine]:
    return lambda: RemoteEngine(url, size)
