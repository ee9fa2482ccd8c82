"""The services one app owns: the family, its tokenizer, the engines by size, the router, the
metrics, the drain. Created by ``create_app``, kept on ``app.state.services``, reached by routes
through :data:`ServicesDep`. Nothing here is module-level state."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, Request

from boomerang_core.errors import BoomerangError
from boomerang_core.family import Family, FamilySize
from server.config import DeployConfig
from server.engines.base import Engine, EngineError
from server.engines.factory import EngineFactory
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


@dataclass
class Services:
    """What the routes need, ready once :meth:`bring_up` has run: :meth:`ready` gives the family
    and router or raises :class:`NotServing`."""

    config: DeployConfig
    metrics: GatewayMetrics
    family: Family | None = None
    tokenizer: Any = None
    engines: dict[str, Engine] = field(default_factory=dict)  # size name -> engine serving it
    router: Router | None = None
    failure: str | None = None  # why bring-up failed, for /health
    drain: Drain = field(default_factory=Drain)  # SIGTERM: in-flight requests, and whether we drain

    def __post_init__(self) -> None:
        self.drain.grace_s = self.config.server.shutdown_grace_s

    async def bring_up(self, load: FamilyLoader, make_engine: EngineFactory) -> None:
        """Load the family off the event loop, start the engines, then start routing."""
        try:
            family = await _in_daemon_thread(load, self.config)
            if family.store.tokenizer is None:
                raise ValueError("the family has no tokenizer: the teacher directory must hold its tokenizer files")
            tiers = tier_table(family, self.config)
            sizes = sorted(set(tiers.values()), key=lambda n: family.by_name(n).params)
            engine = make_engine(family, sizes, self.config)
            await engine.start()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.failure = f"{type(exc).__name__}: {exc}"
            # one line for what the operator got wrong (paths, sizes, budgets); a traceback for bugs
            log.error("bring-up failed: %s", self.failure, exc_info=not isinstance(exc, USER_ERRORS))
            return
        self.family, self.tokenizer = family, family.store.tokenizer
        self.engines = dict.fromkeys(sizes, engine)
        self.router = Router(
            family,
            tiers,
            self.engines,
            self.config.routing,
            max_batch_size=self.config.engines.local.max_batch_size,
            typical_tokens=self.config.routing.typical_tokens,
            on_decision=self.metrics.decision,
        )
        self.metrics.set_weights(family.store.resident_bytes(), {s.name: s.bytes for s in family.sizes})
        log.info("serving %s: sizes %s", family.name, ", ".join(f"{n} ({family.by_name(n).label})" for n in sizes))

    async def close(self) -> None:
        for engine in {id(e): e for e in self.engines.values()}.values():
            try:
                await engine.stop()
            except Exception:
                log.exception("engine stop failed")
        self.engines.clear()

    # --- readiness ----------------------------------------------------------------------------

    def problems(self) -> list[str]:
        """Why the services cannot serve now (empty: healthy)."""
        if self.failure is not None:
            return [f"bring-up failed: {self.failure}"]
        if self.router is None:
            return ["loading the model family"]
        dead = sorted(size for size, engine in self.engines.items() if not engine.healthy())
        return [f"engine for {', '.join(dead)} is not healthy"] if dead else []

    def ready(self) -> tuple[Family, Router]:
        problems = self.problems()
        if problems or self.family is None or self.router is None:
            raise NotServing("the server is not ready: " + "; ".join(problems), code="not_ready")
        return self.family, self.router

    def engine_for(self, size: FamilySize) -> Engine:
        engine = self.engines.get(size.name)
        if engine is None or not engine.healthy():
            raise NotServing(f"no healthy engine serves size {size.name}", code="engine_unavailable")
        return engine

    def served_name(self, size: FamilySize) -> str:
        assert self.family is not None
        return f"{self.family.name}:{size.name}"


async def _in_daemon_thread(load: FamilyLoader, config: DeployConfig) -> Family:
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
            result = load(config)
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
