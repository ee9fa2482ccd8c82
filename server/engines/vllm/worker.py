"""``engine: vllm`` (process mode): each replica of a size is its own vLLM OpenAI server process.

A :class:`VllmWorker` writes the size's folder (``config.json`` with the size's layer count, the
generation config, tokenizer files), starts ``python -m vllm.entrypoints.openai.api_server`` on a
free loopback port with the ``boomerang_store`` load format, whose parameters are views of the
gateway's shared store (:mod:`boomerang_core.shared_store`: the same pages on CPU, the owner's
CUDA allocation on CUDA), and then talks to it as a :class:`RemoteEngine` (requests, forwarding,
health). It owns the process: the worker's output goes to this log with the replica's name as
prefix; a worker that exits (a crash, ``kill -9``) or misses ``health_misses`` health checks in a
row (hung) is unhealthy, and :class:`~server.pool.tiers.TierPool` replaces it; stop is SIGTERM,
a grace period, then SIGKILL, to the worker's whole process group (vLLM's engine core included);
a hung worker gets SIGKILL at once, before its open streams are closed on this side, so that they
fail (and the pool retries those that had no token yet).

On CPU, each worker binds its OpenMP threads to its own share of the cores (:class:`CpuCores`);
the KV cache is ``--kv-cache-memory-bytes`` (exact bytes: ``VLLM_CPU_KVCACHE_SPACE`` takes whole
GiB only, and is removed from the worker's environment so that it cannot override the setting).
On CUDA, the worker is pinned to the store's GPU and its ``--gpu-memory-utilization`` covers the
store once plus its own KV cache and runtime (:func:`worker_memory_utilization`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import logging
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from boomerang_core.assemble import size_config
from boomerang_core.family import Family
from boomerang_core.shared_store import SharedStore
from server.engines.base import EngineError
from server.engines.remote import RemoteEngine
from server.engines.vllm.loader import LOAD_FORMAT
from server.engines.vllm.replica import VllmSettings

log = logging.getLogger(__name__)
# What a worker holds besides the shared weights and its KV cache (GB, 1e9 bytes): its three processes
# (API server, engine core, model worker), each with Python, torch and vLLM loaded. Measured with
# vllm-cpu 0.32 on the tiny test family: PSS of the whole worker 1.448 GB with a 0.02 GB KV cache.
WORKER_RUNTIME_GB = 1.5
# Cores no worker's compute threads bind to: the gateway's and the workers' own API servers and
# schedulers run there. Without it, on 2 cores, a worker's OpenMP threads spun on both cores against
# them (vLLM's automatic binding reserves a core per engine for its scheduler the same way). Kept only
# where the other cores still give every worker one of its own (see :func:`worker_cores`).
RESERVED_CORES = 1
_worker_ids = itertools.count()
_GB = 1e9


class CpuCores:
    """The cores workers may bind to, cut into equal shares: ``per_worker`` cores each, default the
    cores divided by ``max_workers`` (at least one). A worker takes the least used share (:meth:`take`),
    so no core runs two workers unless more workers run than there are shares."""

    def __init__(self, cores: Sequence[int], max_workers: int, per_worker: int | None = None) -> None:
        cores = sorted(cores)
        size = per_worker or max(1, len(cores) // max(1, max_workers))
        self.shares = [tuple(cores[i : i + size]) for i in range(0, len(cores) - size + 1, size)] or [tuple(cores)]
        self._users = [0] * len(self.shares)
        if max_workers > len(self.shares):
            log.warning(
                "%d vLLM workers may run on %d cores in shares of %d: some will share cores",
                max_workers, len(cores), size,
            )  # fmt: skip

    @classmethod
    def of_this_process(cls, max_workers: int, per_worker: int | None = None) -> CpuCores:
        """The cores this process may run on, as :func:`worker_cores` leaves them to workers."""
        cores = (
            sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
        )
        return cls(worker_cores(cores, max_workers, per_worker), max_workers, per_worker)

    def take(self) -> tuple[int, ...]:
        """The least used share; among equals the last, so the first cores, where the gateway and
        the system usually run, are taken last."""
        index = min(range(len(self.shares)), key=lambda i: (self._users[i], -i))
        self._users[index] += 1
        return self.shares[index]

    def give(self, share: tuple[int, ...]) -> None:
        index = self.shares.index(share)
        self._users[index] = max(0, self._users[index] - 1)


def worker_cores(cores: Sequence[int], max_workers: int, per_worker: int | None = None) -> list[int]:
    """The cores workers' compute threads may bind to: ``cores`` less :data:`RESERVED_CORES` for the
    gateway and the workers' API servers and schedulers (which vLLM's own automatic binding also keeps
    off its compute threads), when the rest still give each of ``max_workers`` its ``per_worker``
    cores (default one). Otherwise all of them: two workers' compute threads on one core would halve
    both, where the API servers, mostly idle, cost little beside one. On 2 cores with 2 workers of
    the demo's smallest and largest size, 4 + 4 streams together: 59 to 67 output tokens/s with a core
    each against 42 to 43 with both on one core (``bench/results/vllm_mix_bench.md``)."""
    cores = sorted(cores)
    if len(cores) - RESERVED_CORES >= (per_worker or 1) * max(1, max_workers):
        return cores[RESERVED_CORES:]
    return cores


def worker_memory_utilization(device_bytes: int, store_bytes: int, kv_bytes: int, runtime_bytes: int) -> float:
    """vLLM's ``gpu_memory_utilization`` for one worker on a CUDA device of ``device_bytes``.

    vLLM requests ``utilization x total`` and, with weights held outside the engine (the loader
    reports the shared store through ``get_external_weight_memory``), checks only that what is
    left after them (``kv_bytes + runtime_bytes`` here) is free. So every worker names the store
    once in its share and needs free memory only for its own KV cache and runtime.
    """
    need = store_bytes + kv_bytes + runtime_bytes
    if need > device_bytes:
        raise ValueError(f"a worker needs {need / _GB:.2f} GB of a {device_bytes / _GB:.2f} GB device")
    return math.ceil(need / device_bytes * 1e4) / 1e4  # rounded up to 0.01% so the share is never short


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class VllmWorker(RemoteEngine):
    """One vLLM server process for one size; :meth:`start` takes ~25 s on CPU (two processes import
    vLLM). Health: a check every ``health_interval_s``, answered within ``health_timeout_s``;
    ``health_misses`` failed checks in a row make a live process unhealthy (hung)."""

    def __init__(
        self,
        family: Family,
        size: str,
        settings: VllmSettings,
        shared: SharedStore,
        *,
        cores: CpuCores | None = None,
        start_timeout_s: float = 600.0,
        health_interval_s: float = 2.0,
        health_timeout_s: float = 5.0,
        health_misses: int = 3,
        stop_grace_s: float = 20.0,
    ) -> None:
        self.family = family
        self.size_plan = family.by_name(size)
        self.settings = settings
        self.shared = shared
        self.cores = cores
        self.replica_id = f"{size}-w{next(_worker_ids)}"
        self.port = free_port()
        self.health_misses = health_misses
        self.stop_grace_s = stop_grace_s
        super().__init__(f"http://127.0.0.1:{self.port}", size, start_timeout_s=start_timeout_s,
                         health_interval_s=health_interval_s, health_timeout_s=health_timeout_s)  # fmt: skip
        self.proc: asyncio.subprocess.Process | None = None
        self._dir: Path | None = None
        self._share: tuple[int, ...] | None = None
        self._misses = 0
        self._exit: str | None = None
        self._tail: collections.deque[str] = collections.deque(maxlen=40)
        self._tasks: list[asyncio.Task[None]] = []

    # --- process ------------------------------------------------------------------------------

    def command(self) -> list[str]:
        """The worker's command line (the size's folder must exist)."""
        assert self._dir is not None
        s, store = self.settings, self.family.store
        extra = {"manifest": str(self.shared.manifest), "plan": self.size_plan.plan.to_dict()}
        argv = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(self._dir),
            "--served-model-name", f"{self.family.name}:{self.size}",
            "--load-format", LOAD_FORMAT,
            "--model-loader-extra-config", json.dumps(extra),
            "--dtype", str(store.dtype).removeprefix("torch."),
            "--max-model-len", str(s.max_model_len),
            "--max-num-seqs", str(s.max_num_seqs),
            "--kv-cache-memory-bytes", str(int(s.kv_cache_gb * _GB)),
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--seed", "0",
            "--disable-uvicorn-access-log",
        ]  # fmt: skip
        if s.enforce_eager:
            argv.append("--enforce-eager")
        if s.tool_call_parser is not None:
            argv += ["--enable-auto-tool-choice", "--tool-call-parser", s.tool_call_parser]
        if store.device.type == "cuda":
            total = torch.cuda.get_device_properties(store.device).total_memory
            kv, runtime = int(s.kv_cache_gb * _GB), int(s.overhead_gb * _GB)
            share = worker_memory_utilization(total, self.shared.nbytes, kv, runtime)
            argv += ["--gpu-memory-utilization", f"{share:.4f}"]
        return argv

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"  # its log lines reach this log as they are written
        env.pop("VLLM_CPU_KVCACHE_SPACE", None)  # whole GiB only; it would override --kv-cache-memory-bytes
        root = str(Path(__file__).resolve().parents[3])  # the loader's package, for vLLM's plugin entry point
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        if self._share is not None:
            env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(str(c) for c in self._share)
        if self.family.store.device.type == "cuda":
            uuid = str(torch.cuda.get_device_properties(self.family.store.device).uuid)
            env["CUDA_VISIBLE_DEVICES"] = f"GPU-{uuid}"  # the store's GPU, whatever its index here
        return env

    def _write_size_dir(self) -> Path:
        store = self.family.store
        if store.tokenizer is None:
            raise EngineError(f"family '{self.family.name}' has no tokenizer")
        folder = Path(tempfile.mkdtemp(prefix=f"boomerang-{self.replica_id}-"))
        (folder / "config.json").write_text(size_config(store, self.size_plan.plan).to_json_string())
        if store.generation_config is not None:
            store.generation_config.save_pretrained(folder)
        store.tokenizer.save_pretrained(folder)
        return folder

    async def start(self) -> None:
        self._dir = self._write_size_dir()
        if self.cores is not None and self.family.store.device.type == "cpu":
            self._share = self.cores.take()
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *self.command(), env=self.environment(), stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
            log.info("[%s] started pid %d on port %d%s", self.replica_id, self.proc.pid, self.port,
                     f", cores {self._share}" if self._share else "")  # fmt: skip
            self._tasks = [asyncio.create_task(self._pump_log()), asyncio.create_task(self._watch_exit())]
            await self._wait_healthy()
            await super().start()
        except BaseException:
            await self.stop()
            raise

    async def _wait_healthy(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.start_timeout_s
        while not await super()._check():
            if self._exit is not None:
                tail = "\n".join(list(self._tail)[-15:])
                raise EngineError(f"the vLLM worker for size {self.size} exited at start ({self._exit}):\n{tail}")
            if loop.time() >= deadline:
                raise EngineError(f"the vLLM worker for size {self.size} did not answer /health "
                                  f"within {self.start_timeout_s:g} s")  # fmt: skip
            await asyncio.sleep(0.5)

    async def _pump_log(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        async for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            if line:
                self._tail.append(line)
                log.info("[%s] %s", self.replica_id, line)

    async def _watch_exit(self) -> None:
        """Notice the worker's exit at once. ``proc.wait()`` would not: it also waits for the output
        pipe to close, which vLLM's engine core (a child) holds open after the API server is killed."""
        assert self.proc is not None
        while (code := self.proc.returncode) is None:
            await asyncio.sleep(0.2)
        self._exit = f"signal {-code}" if code < 0 else f"exit code {code}"
        self._healthy = False
        log.warning("[%s] the vLLM worker process ended (%s)", self.replica_id, self._exit)

    async def _check(self) -> bool:
        """Health as :class:`RemoteEngine` sees it, but a live process stays healthy until it misses
        ``health_misses`` checks in a row (a busy worker may answer one late; a hung one never does)."""
        if self._exit is not None:
            self._healthy = False
            return False
        was = self._healthy
        ok = await super()._check()
        self._misses = 0 if ok else self._misses + 1
        if not ok and was and self._misses < self.health_misses:
            self._healthy = True
        return self._healthy

    def healthy(self) -> bool:
        alive = self.proc is not None and self.proc.returncode is None
        return alive and self._exit is None and super().healthy()

    @property
    def hung(self) -> bool:
        """The process runs but has missed ``health_misses`` health checks in a row."""
        alive = self.proc is not None and self.proc.returncode is None
        return alive and self._exit is None and self._misses >= self.health_misses

    @property
    def failure(self) -> str | None:
        if self._exit is not None:
            return f"the process ended ({self._exit})"
        return None if self.healthy() else self._last_error

    async def stop(self) -> None:
        if self.proc is not None and self.hung:
            # no grace for a hung worker (a stopped process never handles SIGTERM), and killed before the
            # client closes, so that the streams still open on it end as failed and the pool retries the
            # ones that got no token yet
            log.warning("[%s] hung (%d health checks missed); killing it", self.replica_id, self._misses)
            await self._end_process(self.proc, grace_s=0.0)
        with contextlib.suppress(Exception):
            await super().stop()
        if self.proc is not None:
            await self._end_process(self.proc)
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        if self._share is not None and self.cores is not None:
            self.cores.give(self._share)
            self._share = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    async def _end_process(self, proc: asyncio.subprocess.Process, grace_s: float | None = None) -> None:
        """SIGTERM to the worker's process group, ``grace_s`` (default ``stop_grace_s``; 0: none) to
        exit, then SIGKILL (the group: vLLM's engine core outlives a killed API server otherwise)."""
        grace_s = self.stop_grace_s if grace_s is None else grace_s
        if proc.returncode is None and grace_s > 0:
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), timeout=grace_s)
            except TimeoutError:
                log.warning("[%s] did not stop in %g s; killing it", self.replica_id, grace_s)
        _signal_group(proc.pid, signal.SIGKILL)  # whatever is left of the group
        with contextlib.suppress(ProcessLookupError):
            await proc.wait()


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)  # the worker leads its own session: its group id is its pid
