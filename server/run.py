"""``serve(config_path, host, port)``: what ``boomerang serve`` runs."""

from __future__ import annotations

import logging

import uvicorn

from server.app import create_app
from server.config import load_config


def serve(config_path: str | None, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve the family the deploy file names (the demo family without one) until interrupted.
    A bad deploy file raises :class:`server.config.ConfigError` before anything loads."""
    settings = load_config(config_path)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(settings), host=host, port=port, log_level="info", timeout_graceful_shutdown=5)


if __name__ == "__main__":  # python -m server.run [CONFIG] [--host H] [--port P], for tests and debugging
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("config", nargs="?")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    serve(args.config, args.host, args.port)
