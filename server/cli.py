"""The ``boomerang`` console script: the method's commands plus ``serve`` and ``config``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from boomerang_core.cli import build_parser, run


def cmd_serve(args: argparse.Namespace) -> int:
    from server.config_cli import refuse_bad_file

    refuse_bad_file(args.config)  # what `config check` fails: refused in a second, before torch or the web stack load
    from server.run import serve

    return serve(args.config, args.host, args.port)


def main(argv: Sequence[str] | None = None) -> int:
    from server.config import ConfigError
    from server.config_cli import add_config_command

    parser, sub = build_parser()
    p = sub.add_parser("serve", help="serve a family over an OpenAI-compatible API")
    p.add_argument("--config", help="deploy YAML (default: the demo family on CPU)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.set_defaults(func=cmd_serve)
    add_config_command(sub)
    return run(parser, argv, user_errors=(ConfigError,))


if __name__ == "__main__":
    sys.exit(main())
