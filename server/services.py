"""The services one app owns: the family, its tokenizer, the engines by size, the router, the
metrics, the drain. Created by ``create_app``, kept on ``app.state.services``, reached by routes
through :data:`ServicesDep`. Nothing here is module-level state."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, Request

from boomerang_core.errors import BoomerangError
from boomerang_core.family import Family, FamilySize
from server.building import FamilyBuild, pending_build, teacher_family
from server.config import DeployConfig
from server.engines.base import Engine, EngineError, GenerationRequest, SamplingParams
from server.engines.factory import EngineFactory, build_engine
from server.lifecycle import Drain
from server.metrics import GatewayMetrics
from server.routing import Router

log = logging.getLogger("boomerang.server")

# Bring-up failures that are the deploy's fault (a missing path, a size the family lacks, a budget
# too small, an engine that cannot start): reported in one line, without a traceback.
USER_ERRORS: tuple[type[Exception], ...] = (BoomerangError, EngineError, OSError, ValueError)


class NotServing(Exception):
    """The gateway cannot serve now: still loading, bring-up failed, or the engine for the size is
    dead. ``code``: ``not_ready`` or ``engine_unavailable``."""

    def __init__(self, message: str, *, code: str = "not_ready") -> None:
        super().__init__(message)
        self.code = code


FamilyLoader = Callable[[DeployConfig], Family]
RETIRE_IDLE_S = 300.0  # see Services._retire


def load_family(config: DeployConfig) -> Family:
    """The family the config names, or the demo family when it names none. Blocking (seconds)."""
    fc = config.family
    if fc is None:
        return Family.open()
    return Family.open(
        fc.teacher,
        fc.student,
        family_file=fc.family_file,
        default_order=fc.patch_order,
        device=fc.device,
        dtype=fc.dtype,
        name=fc.name,
    )


def tier_table(family: Family, config: DeployConfig) -> dict[str, str]:
    """Tier name -> size name. No tiers in the config: every non-dominated size, named as itself."""
    if not config.tiers:
        return {s.name: s.name for s in family.servable}
    return {t.name: family.resolve(t.size).name for t in config.tiers}


class ReloadRefused(Exception):
    """A reload whose new family failed to load or failed its checks; the old family keeps serving."""


@dataclass(eq=False)
class Live:
    """One loaded family and everything that serves it. A request takes the current one when it
    starts (:meth:`Services.ready`) and uses it to its end, so that a reload never mixes two families;
    ``active`` counts those requests, and a retired family's engines stop when it reaches 0."""

    config: DeployConfig
    metrics: GatewayMetrics
    family: Family
    tokenizer: Any
    engines: dict[str, Engine]  # size name -> engine serving it
    router: Router
    generation: int = 0  # 0 for the first family the process loaded, then one more per reload
    active: int = 0

    def engine_for(self, size: FamilySize) -> Engine:
        engine = self.engines.get(size.name)
        if engine is None or not engine.healthy():
            raise NotServing(f"no healthy engine serves size {size.name}", code="engine_unavailable")
        return engine

    def served_name(self, size: FamilySize) -> str:
        return f"{self.family.name}:{size.name}"

    def enter(self) -> Callable[[], None]:
        """Count a request in; the returned callable counts it out (once, however often it is called)."""
        self.active += 1
        done = False

        def leave() -> None:
            nonlocal done
            if not done:
                done = True
                self.active -= 1

        return leave

    async def stop(self) -> None:
        for engine in {id(e): e for e in self.engines.values()}.values():
            try:
                await engine.stop()
            except Exception:
                log.exception("engine stop failed")


@dataclass(eq=False)
class Services:
    """What the routes need. :meth:`ready` gives the family being served now (a :class:`Live`) or
    raises :class:`NotServing`. :meth:`reload` loads a family beside it, checks it, and swaps."""

    config: DeployConfig
    metrics: GatewayMetrics
    load: FamilyLoader = field(default=lambda config: load_family(config))  # the seam tests replace
    make_engine: EngineFactory | None = None
    config_source: Callable[[], DeployConfig] | None = None  # re-read on reload; None: ``config`` again
    builds: bool = False  # run a family's background build (the default loader only)
    live: Live | None = None
    failure: str | None = None  # why bring-up failed, for /health
    build: FamilyBuild | None = None
    last_reload: dict[str, Any] | None = None
    drain: Drain = field(default_factory=Drain)  # SIGTERM: in-flight requests, and whether we drain
    _generation: int = 0
    _removed: dict[str, tuple[int, str]] = field(default_factory=dict)  # sizes reloads removed: layers, why
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _reload_lock: asyncio.Lock | None = None

    def __post_init__(self) -> None:
        self.drain.grace_s = self.config.server.shutdown_grace_s

    # --- what the routes read -----------------------------------------------------------------

    @property
    def family(self) -> Family | None:
        return self.live.family if self.live is not None else None

    @property
    def router(self) -> Router | None:
        return self.live.router if self.live is not None else None

    @property
    def tokenizer(self) -> Any:
        return self.live.tokenizer if self.live is not None else None

    @property
    def engines(self) -> dict[str, Engine]:
        return self.live.engines if self.live is not None else {}

    # --- bring-up, reload, close --------------------------------------------------------------

    async def bring_up(self) -> None:
        """Load the family off the event loop, start the engines, then start routing. A family that
        is not built yet (:func:`server.building.pending_build`) serves its teacher while it builds."""
        job = pending_build(self.config) if self.builds else None
        try:
            if job is not None:
                family = await _in_daemon_thread(lambda: teacher_family(self.config, job))
                self.live = await self._open(self.config, family)
            else:
                self.live = await self._open(self.config)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.failure = f"{type(exc).__name__}: {exc}"
            # one line for what the operator got wrong (paths, sizes, budgets); a traceback for bugs
            log.error("bring-up failed: %s", self.failure, exc_info=not isinstance(exc, USER_ERRORS))
            return
        self._announce(self.live, "serving")
        if job is not None:
            self.build = FamilyBuild(
                job, self.metrics, lambda: self.reload("the family build finished"), on_interim=self._interim
            )
            self.build.start()

    async def _interim(self, directory: Path) -> None:
        """Serve the interim sizes the build wrote (teacher-only layer drops over the teacher's store
        already resident), unless the built family serves already."""
        teacher = self.live
        if teacher is None or not teacher.family.info.get("building"):
            return
        try:
            family = await _in_daemon_thread(lambda: Family.load(directory, teacher.family.store))
        except Exception as exc:
            log.error("the interim sizes in %s could not be read (%s); the teacher serves alone", directory, exc)
            return
        family.name = teacher.family.name
        family.info["building"] = True
        with contextlib.suppress(ReloadRefused):
            await self.reload("interim sizes while the family builds", family=family, replacing=teacher)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def reload(self, reason: str, family: Family | None = None, *, replacing: Live | None = None) -> Live:
        """Re-read the deploy file and the family (or take ``family``), start and check its engines
        beside the ones serving now, then swap: new requests get the new family, requests in flight
        finish on the old one, whose engines stop (and memory goes) when its last request ends.
        Raises :class:`ReloadRefused`, with the old family still serving, when anything fails.
        ``replacing``: swap only if that family still serves (else nothing happens)."""
        if self._reload_lock is None:
            self._reload_lock = asyncio.Lock()
        async with self._reload_lock:
            if replacing is not None and self.live is not replacing:
                assert self.live is not None
                return self.live
            try:
                if family is not None:
                    config = self.live.config if self.live is not None else self.config
                else:
                    config = self.config_source() if self.config_source is not None else self.config
                new = await self._open(config, family)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                why = f"{type(exc).__name__}: {exc}"
                self.metrics.reloads.labels("refused").inc()
                self.last_reload = {"result": "refused", "reason": reason, "error": why, "at": time.time()}
                log.error("reload refused (%s): %s; the current family keeps serving", reason, why,
                          exc_info=not isinstance(exc, USER_ERRORS))  # fmt: skip
                raise ReloadRefused(why) from exc
            self._generation += 1
            new.generation = self._generation
            old, self.live = self.live, new
            self.metrics.reloads.labels("swapped").inc()
            self.last_reload = {"result": "swapped", "reason": reason, "generation": new.generation, "at": time.time()}
            if old is not None:
                kept = {s.name for s in new.family.sizes}
                gone = [s for s in old.family.sizes if s.name not in kept]
                for name in kept:
                    self._removed.pop(name, None)
                when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
                self._removed.update({s.name: (s.num_layers, f"a reload at {when} removed it") for s in gone})
                self.metrics.forget_sizes([s.name for s in gone])
                self._spawn(self._retire(old), f"boomerang-retire-{old.generation}")
            self._announce(new, f"reloaded ({reason}): serving")
            return new

    async def _open(self, config: DeployConfig, family: Family | None = None) -> Live:
        """A family (loaded off the event loop unless given) with its engines started and checked."""
        if family is None:
            family = await _in_daemon_thread(lambda: self.load(config))
        if family.store.tokenizer is None:
            raise ValueError("the family has no tokenizer: the teacher directory must hold its tokenizer files")
        tiers = tier_table(family, config)
        sizes = sorted(set(tiers.values()), key=lambda n: family.by_name(n).params)
        make = self.make_engine or (lambda f, s, c: build_engine(f, s, c, metrics=self.metrics.pool))
        engine = make(family, sizes, config)
        await engine.start()
        engines = dict.fromkeys(sizes, engine)
        router = Router(
            family,
            tiers,
            engines,
            config.routing,
            max_batch_size=config.engines.local.max_batch_size,
            typical_tokens=config.routing.typical_tokens,
            on_decision=self.metrics.decision,
            absent=self.absent_sizes,
        )
        live = Live(config, self.metrics, family, family.store.tokenizer, engines, router)
        if self.live is not None:  # a reload: the new engines must answer before anything is swapped
            try:
                await check_serves(live)
            except BaseException:
                await live.stop()
                raise
        return live

    async def _retire(self, old: Live) -> None:
        """Stop ``old``'s engines once its last request has ended. A request counted in that never
        got to count itself out (a client gone before its stream began) holds it at most
        ``RETIRE_IDLE_S`` after its engines ran their last request."""
        waited = time.monotonic()
        idle_since: float | None = None
        while old.active > 0:
            await asyncio.sleep(0.05)
            busy = any(e.load(size).running + e.load(size).waiting for size, e in old.engines.items())
            idle_since = None if busy else (idle_since or time.monotonic())
            if idle_since is not None and time.monotonic() - idle_since > RETIRE_IDLE_S:
                log.warning("retiring family generation %d with %d request(s) counted in but its engines idle "
                            "for %g s", old.generation, old.active, RETIRE_IDLE_S)  # fmt: skip
                break
        await old.stop()
        log.info("retired family generation %d after %.1f s (its last request ended)", old.generation,
                 time.monotonic() - waited)  # fmt: skip

    def _announce(self, live: Live, what: str) -> None:
        family = live.family
        self.metrics.set_weights(family.store.resident_bytes(), {s.name: s.bytes for s in family.sizes})
        names = ", ".join(f"{n} ({family.by_name(n).label})" for n in sorted(set(live.router.tiers.values())))
        log.info("%s %s: sizes %s", what, family.name, names)

    async def close(self) -> None:
        if self.build is not None:
            await self.build.stop()
        for task in list(self._tasks):
            task.cancel()
        retired = [self.live] if self.live is not None else []
        self.live = None
        for live in retired:
            await live.stop()

    def absent_sizes(self) -> dict[str, tuple[int, str]]:
        """Size names the family does not serve now -> (their layers, why): sizes a build has still to
        make, and sizes a reload removed. The router serves them by the nearest size, or 404s."""
        out = dict(self._removed)
        if self.build is not None and self.build.running:
            state = self.build.public()
            eta = state.get("eta_s")
            left = f", about {eta / 60:.0f} min left" if isinstance(eta, int | float) else ""
            served = {s.name for s in self.live.family.sizes} if self.live is not None else set()
            for name in state["pending_sizes"]:
                if name not in served and (m := re.fullmatch(r"l(\d+)", name)) is not None:
                    out[name] = (int(m.group(1)), f"the family is still building ({state['stage']}{left})")
        return out

    # --- readiness ----------------------------------------------------------------------------

    def problems(self) -> list[str]:
        """Why the services cannot serve now (empty: healthy)."""
        if self.failure is not None:
            return [f"bring-up failed: {self.failure}"]
        if self.live is None:
            return ["loading the model family"]
        dead = sorted(size for size, engine in self.live.engines.items() if not engine.healthy())
        return [f"engine for {', '.join(dead)} is not healthy"] if dead else []

    def ready(self) -> Live:
        problems = self.problems()
        if problems or self.live is None:
            raise NotServing("the server is not ready: " + "; ".join(problems), code="not_ready")
        return self.live


async def check_serves(live: Live) -> None:
    """Every size of a freshly loaded family generates a token (greedy, from its BOS or first token)
    before it may take traffic."""
    tokenizer = live.tokenizer
    first = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.encode("Hello")[0]
    for name, engine in live.engines.items():
        greedy = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
        request = GenerationRequest(f"reload-check-{name}", name, (int(first),), greedy)
        got = 0
        async for event in engine.generate(request):
            got += len(event.token_ids)
        if got != 1:
            raise EngineError(f"size {name} generated {got} tokens for a 1-token check")


async def _in_daemon_thread(load: Callable[[], Family]) -> Family:
    """Run a (possibly minutes-long: the demo distils on first use) load off the event loop in a
    daemon thread, so that stopping the server while it loads does not wait for it to finish."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[Family] = loop.create_future()

    def settle(result: Family | None, error: BaseException | None) -> None:
        if done.cancelled():
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)  # type: ignore[arg-type]

    def work() -> None:
        result: Family | None = None
        error: BaseException | None = None
        try:
            result = load()
        except BaseException as exc:
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop closed while we loaded: nobody waits
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=work, name="boomerang-bring-up", daemon=True).start()
    return await done


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]
