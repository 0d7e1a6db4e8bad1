"""`dynoagent` command line: `serve` (the daemon) and `up` (standalone mode)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from agent import __version__, logsetup
from agent import config as config_mod
from agent.daemon import Daemon, StartupError
from agent.errors import ConfigError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dynoagent", description="Per-host dyno manager.")
    parser.add_argument("--version", action="version", version=f"dynoagent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = sub.add_parser("serve", help="run the daemon (what systemd runs)")
    serve.add_argument("--config", type=Path, default=None,
                       help="TOML config (default: $DYNOAGENT_CONFIG or /etc/dynoagent/agent.toml)")
    return parser


def serve(config_path: Path | None) -> int:
    try:
        config = config_mod.load(config_path)
    except ConfigError as exc:
        print(f"dynoagent: {exc}", file=sys.stderr)
        return 2
    logsetup.configure(config.log_level)
    try:
        return asyncio.run(Daemon(config, config_path).run())
    except StartupError as exc:
        print(f"dynoagent: {exc}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return serve(args.config)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
