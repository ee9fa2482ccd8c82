"""``serve(config_path, host, port)``: what ``boomerang serve`` runs.

The process drains on SIGTERM (see :mod:`server.lifecycle`) and exits 0; it exits 1 when bring-up
fails (the family cannot load, a tier names a size the family lacks, an engine cannot start), after
one log line saying why, instead of staying up with ``/health`` at 503.
"""

from __future__ import annotations

import logging
from typing import cast

import uvicorn

from server.app import create_app
from server.config import DeployConfig, load_config
from server.lifecycle import GatewayServer, protocol_class

POST_DRAIN_CLOSE_S = 3  # after the drain: how long open connections get to close before uvicorn cancels them


def uvicorn_config(app: object, settings: DeployConfig, host: str, port: int) -> uvicorn.Config:
    """uvicorn's settings from the deploy file's ``server`` section."""
    s = settings.server
    return uvicorn.Config(
        app,  # type: ignore[arg-type]
        host=host,
        port=port,
        log_level="info",
        http=protocol_class(s.header_timeout_s),
        timeout_keep_alive=cast(int, s.keep_alive_s),  # any number of seconds works (loop.call_later)
        limit_concurrency=s.max_connections,
        timeout_graceful_shutdown=POST_DRAIN_CLOSE_S,
    )


def serve(config_path: str | None, host: str = "127.0.0.1", port: int = 8000) -> int:
    """Serve the family the deploy file names (the demo family without one) until SIGTERM or SIGINT;
    returns the exit code. A bad deploy file raises :class:`server.config.ConfigError` before anything loads."""
    settings = load_config(config_path)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings, config_path=config_path)
    services = app.state.services
    server = GatewayServer(
        uvicorn_config(app, settings, host, port), services.drain, lambda: services.failure is not None
    )
    server.run()
    return server.exit_code


if __name__ == "__main__":  # python -m server.run [CONFIG] [--host H] [--port P], for tests and debugging
    import argparse
    import sys

    from server.config import ConfigError

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("config", nargs="?")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    try:
        code = serve(args.config, args.host, args.port)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    sys.exit(code)
