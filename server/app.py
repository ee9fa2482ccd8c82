"""``create_app(settings)``: the FastAPI app, its lifespan, its guards and its API description.

The lifespan starts bring-up (loading the family, starting the engines) in the background so that
``/health`` answers 503 while the model loads, and closes the engines in ``finally``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from starlette.middleware.cors import CORSMiddleware

from server.api import admin, chat, completions, health, models, tokenize
from server.api.forward import Forwarder
from server.api.guards import DrainGuard, RequestGuard
from server.api.request_id import RequestIdHeader
from server.config import ConfigError, DeployConfig, load_config
from server.engines.factory import EngineFactory
from server.errors import install_error_handlers
from server.metrics import GatewayMetrics
from server.services import FamilyLoader, ReloadRefused, Services, load_family

log = logging.getLogger("boomerang.server")


def create_app(
    settings: DeployConfig,
    *,
    family_loader: FamilyLoader = load_family,
    engine_factory: EngineFactory | None = None,
    config_path: str | None = None,
) -> FastAPI:
    """The gateway app. ``family_loader`` and ``engine_factory`` are seams for tests; the defaults
    load the configured family (building it in the background while its teacher serves, when it is
    not built yet) and build the engines its deploy file names (:func:`build_engine`). ``config_path``:
    the deploy file a reload (SIGHUP, ``POST /admin/reload``) reads again; None: ``settings`` again."""
    services = Services(
        config=settings,
        metrics=GatewayMetrics(),
        load=family_loader,
        make_engine=engine_factory,
        config_source=(lambda: load_config(config_path)) if config_path is not None else None,
        builds=family_loader is load_family,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.services = services
        redactor = QueryRedactor()
        logging.getLogger("uvicorn.access").addFilter(redactor)
        bring_up = asyncio.create_task(services.bring_up())
        hangup = _on_sighup(services)
        try:
            yield
        finally:
            hangup()
            logging.getLogger("uvicorn.access").removeFilter(redactor)
            bring_up.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await bring_up
            await services.close()

    app = FastAPI(title="boomerang", version="0.1.0", lifespan=lifespan)
    app.state.services = services
    install_error_handlers(app)
    for module in (chat, completions, tokenize, models, health, admin):
        app.include_router(module.router)
    app.openapi = functools.partial(openapi_schema, app, keyed=settings.auth.resolved_key() is not None)  # type: ignore[method-assign]
    app.add_middleware(Forwarder, services=services)  # inside the guards: requests it forwards are checked first
    app.add_middleware(RequestGuard, config=settings, metrics=services.metrics)
    if settings.server.cors_allow_origins:  # outside the guard: preflights carry no key, and 401s get CORS headers
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.server.cors_allow_origins),
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type"],
        )
    app.add_middleware(DrainGuard, drain=services.drain)  # counts requests in flight, answers while draining
    app.add_middleware(RequestIdHeader)  # outermost: every response, the guards' too, carries X-Request-Id
    return app


def _on_sighup(services: Services) -> Callable[[], None]:
    """SIGHUP reloads the family live (as ``POST /admin/reload``); returns the undo. Only where the
    loop runs in the main thread (``boomerang serve``), as signal handlers must."""
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()

    async def reload() -> None:
        if services.live is None:
            log.warning("SIGHUP ignored: the server is not serving yet")
            return
        with contextlib.suppress(ReloadRefused, ConfigError):  # logged on one line by the reload
            await services.reload("SIGHUP")

    def handle() -> None:
        task = loop.create_task(reload())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    try:
        loop.add_signal_handler(signal.SIGHUP, handle)
    except (ValueError, RuntimeError, NotImplementedError):  # not the main thread (an in-process test client)
        return lambda: None

    def undo() -> None:
        loop.remove_signal_handler(signal.SIGHUP)

    return undo


STREAM_CHUNKS = (chat.ChatCompletionChunk, completions.CompletionChunk)


class QueryRedactor(logging.Filter):
    """Access-log lines without their query string: a client that sends its key in the URL
    (``?api_key=...``) must not have it written to the log. No route of this API reads the query."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        # uvicorn's access line: (client, method, path with query, HTTP version, status)
        if isinstance(args, tuple) and len(args) == 5 and isinstance(args[2], str) and "?" in args[2]:
            record.args = (*args[:2], args[2].split("?", 1)[0] + "?[query not logged]", *args[3:])
        return True


def openapi_schema(app: FastAPI, *, keyed: bool) -> dict[str, Any]:
    """FastAPI's schema without its 422 responses (validation errors are 400s here, declared on each
    route with the OpenAI error body) and, when a key is configured, with the bearer scheme on ``/v1``."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        for path, operations in schema["paths"].items():
            for operation in operations.values():
                operation["responses"].pop("422", None)
                if keyed and path.startswith("/v1/"):
                    operation["security"] = [{"bearer": []}]
        components = schema.setdefault("components", {})
        for name in ("HTTPValidationError", "ValidationError"):
            components.get("schemas", {}).pop(name, None)
        for chunk in STREAM_CHUNKS:  # referenced from the text/event-stream entries, not from a route's model
            chunk_schema = chunk.model_json_schema(ref_template="#/components/schemas/{model}")
            components["schemas"].update({**chunk_schema.pop("$defs", {}), chunk.__name__: chunk_schema})
        if keyed:
            components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        app.openapi_schema = schema
    return app.openapi_schema
