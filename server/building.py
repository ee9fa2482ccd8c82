"""A family that is not built yet is served while it builds.

When the deploy file names the demo family and it is not in the cache yet, or a family whose student
is to be distilled from a ``family.distill`` recipe, the gateway serves the teacher (its one size,
``l<layers>``) as soon as it is loaded and runs the build (:mod:`boomerang_core.build`: distil, order,
search) in a child process at a lower CPU priority (``build.nice``). :class:`FamilyBuild` watches
that process through its status file: one log line per stage, the ``boomerang_family_build_*``
metrics, the state ``/health`` and ``/v1/models`` show, and, once the family is ready, a live
reload that replaces the teacher-only family with the built one (requests in flight finish on the
plan they started with). A build that fails leaves the teacher serving and says why. The child's own
output (progress bars) goes to ``build.log`` next to the status file, not to the server's log.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from boomerang_core import demo
from boomerang_core.build import family_ready, read_status
from boomerang_core.family import Family
from server.config import DeployConfig
from server.metrics import GatewayMetrics

log = logging.getLogger("boomerang.server")
POLL_S = 1.0  # how often the status file is read
STOP_GRACE_S = 10.0  # SIGTERM to SIGKILL when the server stops during a build


@dataclass(frozen=True)
class BuildJob:
    """What the server runs in the background: ``command`` writes ``status_file``."""

    command: tuple[str, ...]
    status_file: Path
    log_file: Path
    teacher: str
    demo: bool


def pending_build(config: DeployConfig) -> BuildJob | None:
    """The build the family of ``config`` still needs, or None when it is ready to load. Cheap
    (a few file checks)."""
    fc = config.family
    settings = config.build
    base = [sys.executable, "-m", "boomerang_core.build", "--nice", str(settings.nice)]
    if settings.threads:
        base += ["--threads", str(settings.threads)]
    if settings.interim_max_ppl_ratio is not None:
        base += ["--interim-ratio", str(settings.interim_max_ppl_ratio)]
    if fc is None:
        if demo.demo_ready():
            return None
        home = demo.demo_dir()
        status = Path(settings.status_file) if settings.status_file else home / "build-status.json"
        command = (*base, "--demo", "--status", str(status))
        return BuildJob(command, status, status.with_name("build.log"), str(home / "teacher"), demo=True)
    if fc.distill is None or fc.student is None:
        return None
    student = Path(fc.student).expanduser()
    if family_ready(student):
        return None
    status = Path(settings.status_file) if settings.status_file else student.with_name(student.name + ".build.json")
    command = (
        *base, "--teacher", fc.teacher, "--student", str(student), "--recipe", json.dumps(fc.distill),
        "--name", fc.name, "--metric", fc.search_metric, "--status", str(status),
    )  # fmt: skip
    return BuildJob(command, status, status.with_name(student.name + ".build.log"), fc.teacher, demo=False)


def teacher_family(config: DeployConfig, job: BuildJob) -> Family:
    """The family served while ``job`` builds: the teacher alone, its size named ``l<layers>`` as the
    built family names its sizes. Blocking (the demo's first use converts its GGUF, ~30 s)."""
    fc = config.family
    if job.demo:
        teacher = demo.ensure_teacher(progress=True)
        family = Family.open(str(teacher), device="cpu", dtype="float32", name=demo.DEMO_NAME)
    else:
        assert fc is not None
        family = Family.open(fc.teacher, device=fc.device, dtype=fc.dtype, name=fc.name)
    family.sizes = [replace(s, name=f"l{s.num_layers}") for s in family.sizes]
    family.info["building"] = True
    return family


class FamilyBuild:
    """Runs ``job`` and follows its status file until it ends; ``on_ready`` (the live reload) runs
    once the family is built."""

    def __init__(
        self,
        job: BuildJob,
        metrics: GatewayMetrics,
        on_ready: Callable[[], Awaitable[Any]],
        on_interim: Callable[[Path], Awaitable[Any]] | None = None,
    ) -> None:
        self.job = job
        self.metrics = metrics
        self.on_ready = on_ready
        self.on_interim = on_interim  # the build wrote interim sizes (a family.json in that directory)
        self._interim_seen = False
        self.state: dict[str, Any] = {"stage": "starting", "progress": 0.0, "eta_s": None, "pending_sizes": []}
        self.error: str | None = None
        self.finished = False
        self._process: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="boomerang-family-build")

    @property
    def running(self) -> bool:
        return not self.finished

    def public(self) -> dict[str, Any]:
        """What ``/health`` and ``/v1/models`` show."""
        s = self.state
        out: dict[str, Any] = {
            "stage": "failed" if self.error else s.get("stage", "starting"),
            "progress": s.get("progress", 0.0),
            "eta_s": s.get("eta_s"),
            "pending_sizes": [] if self.finished else list(s.get("pending_sizes", [])),
            "log": str(self.job.log_file),
        }
        if self.error:
            out["error"] = self.error
        return out

    async def _run(self) -> None:
        job = self.job
        job.status_file.unlink(missing_ok=True)  # a stale file of an earlier run says nothing about this one
        job.log_file.parent.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        log.info("building the family in the background (log: %s)", job.log_file)
        try:
            with job.log_file.open("ab") as out:
                # the build makes itself a process group (a terminal's Ctrl-C is the server's to handle,
                # and a stop reaches the whole build) but stays in the server's session: where the kernel
                # shares CPU time out by session (autogroup), a new session would be a peer of the server
                # and its nice value moot
                self._process = await asyncio.create_subprocess_exec(
                    *job.command, stdout=out, stderr=out, stdin=asyncio.subprocess.DEVNULL
                )
            code = await self._follow(self._process)
        except asyncio.CancelledError:
            await self._terminate()
            raise
        except Exception as exc:
            await self._terminate()
            self._failed(f"the build could not run: {type(exc).__name__}: {exc}")
            return
        self._read()
        if code != 0 or self.state.get("stage") != "done":
            why = self.state.get("error") or f"the build process exited with code {code}"
            self._failed(f"{why} (log: {job.log_file})")
            return
        log.info("family built in %.0f s; loading it live", time.monotonic() - started)
        try:
            await self.on_ready()
        except Exception as exc:  # refused: the reload logged why, and the current family keeps serving
            self.error = f"the built family could not be loaded: {exc}"
            self.metrics.build("failed", list(self.state.get("stages", [])), 1.0, None)
        finally:
            self.finished = True

    async def _follow(self, process: asyncio.subprocess.Process) -> int:
        stage = None
        while True:
            with contextlib.suppress(TimeoutError):
                return await asyncio.wait_for(process.wait(), POLL_S)
            self._read()
            interim = self.state.get("interim_dir")
            if interim and not self._interim_seen and self.on_interim is not None:
                self._interim_seen = True
                await self.on_interim(Path(interim))
            if self.state.get("stage") != stage:
                stage = self.state.get("stage")
                eta = self.state.get("eta_s")
                log.info(
                    "family build: %s%s", self.state.get("message") or stage,
                    f" (about {eta / 60:.0f} min left)" if isinstance(eta, int | float) else "",
                )  # fmt: skip

    def _read(self) -> None:
        status = read_status(self.job.status_file)
        if status is None:
            return
        self.state = status
        stage = str(status.get("stage", "starting"))
        self.metrics.build(
            stage, list(status.get("stages", [])), float(status.get("progress", 0.0)), status.get("eta_s")
        )

    def _failed(self, why: str) -> None:
        self.error, self.finished = why, True
        self.metrics.build("failed", list(self.state.get("stages", [])), float(self.state.get("progress", 0.0)), None)
        log.error("the family build failed: %s; the teacher keeps serving", why)

    async def stop(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _terminate(self) -> None:
        """Stop the build (it resumes from its last checkpoint on the next start)."""
        process = self._process
        if process is None or process.returncode is not None:
            return
        _signal_group(process, signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), STOP_GRACE_S)
        except TimeoutError:
            _signal_group(process, signal.SIGKILL)
            await process.wait()


def _signal_group(process: asyncio.subprocess.Process, sig: int) -> None:
    """``sig`` to the build's process group (it makes one at its start), or to the process alone if
    it has not made it yet."""
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(sig)
