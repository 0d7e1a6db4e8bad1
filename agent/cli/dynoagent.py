"""`dynoagent` command line: `serve` (the daemon) and `up` (standalone mode)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from dataclasses import replace
from pathlib import Path

from agent import __version__, journal
from agent import config as config_mod
from agent.daemon.service import Daemon, StartupError
from agent.errors import ConfigError

DEFAULT_UP_PORT = 5000


def _port(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be 1-65535, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dynoagent", description="Per-host dyno manager.")
    parser.add_argument("--version", action="version", version=f"dynoagent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = sub.add_parser("serve", help="run the daemon (what systemd runs)")
    serve.add_argument("--config", type=Path, default=None,
                       help="TOML config (default: $DYNOAGENT_CONFIG or /etc/dynoagent/agent.toml)")
    up = sub.add_parser("up", help="run a Procfile app with full isolation (standalone mode)",
                        description="Run DIR's Procfile with full isolation, like heroku local: "
                                    "logs on the terminal, web dynos on 127.0.0.1:PORT, Ctrl-C "
                                    "stops everything.")
    up.add_argument("dir", nargs="?", default=".", type=Path, metavar="DIR",
                    help="the app directory (its Procfile; the directory is the slug)")
    up.add_argument("-f", "--formation", default=None, metavar="TYPE=N[:SIZE],...",
                    help="dynos per type (default: one of each type except release)")
    up.add_argument("-p", "--port", type=_port, default=DEFAULT_UP_PORT,
                    help=f"port of the web proxy on 127.0.0.1 (default {DEFAULT_UP_PORT})")
    up.add_argument("-e", "--env-file", type=Path, default=None,
                    help="config vars file (default: DIR/.env when it exists)")
    up.add_argument("-a", "--app", default=None, help="app name (default: DIR's name)")
    up.add_argument("--config", type=Path, default=None,
                    help="agent config (default: private directories for this app)")
    return parser


def serve(config_path: Path | None) -> int:
    try:
        config = config_mod.load(config_path)
    except ConfigError as exc:
        print(f"dynoagent: {exc}", file=sys.stderr)
        return 2
    journal.configure(config.log_level)
    try:
        return asyncio.run(Daemon(config, config_path).run())
    except StartupError as exc:
        print(f"dynoagent: {exc}", file=sys.stderr)
        return 1


def up(args: argparse.Namespace) -> int:
    # Imported here: `serve` should not pay for the standalone modules.
    from agent.spec import APP
    from agent.standalone import procfile as pf
    from agent.standalone import up as standalone
    from agent.standalone.proxy import ProxyError, bind_listener

    directory: Path = args.dir
    try:
        procfile = pf.load_procfile(directory)
        directory = directory.resolve()
        app = args.app if args.app is not None else pf.app_name(directory)
        if not APP.fullmatch(app):
            raise pf.AppDirError(f"app name {app!r} must match {APP.pattern}", value=app)
        env_path = args.env_file if args.env_file is not None else directory / ".env"
        env = pf.load_env_file(env_path, required=args.env_file is not None)
        base = config_mod.load(args.config) if args.config is not None else None
        config, defaults = standalone.standalone_config(app, base)
        # The app directory is the slug of every dyno of `up`.
        config = replace(config, slug_roots=(*config.effective_slug_roots, directory))
        items = pf.parse_formation_items([args.formation]) if args.formation else []
        formation = standalone.initial_formation(procfile, items, config.sizes)
    except pf.AppDirError as exc:
        print(f"dynoagent up: {exc}", file=sys.stderr)
        return 1
    except ConfigError as exc:
        print(f"dynoagent up: {exc}", file=sys.stderr)
        return 2
    try:
        listener = bind_listener("127.0.0.1", args.port)
    except ProxyError as exc:
        print(f"dynoagent up: {exc}", file=sys.stderr)
        return 1
    journal.configure(config.log_level)
    source = standalone.AppSource(directory, app, procfile, env)
    options = standalone.UpOptions(source, formation, listener, out=sys.stdout,
                                   colour=sys.stdout.isatty(), remove_run_dir=defaults)
    try:
        return asyncio.run(standalone.StandaloneDaemon(config, options).run())
    except StartupError as exc:
        print(f"dynoagent up: {exc}", file=sys.stderr)
        return 1
    finally:
        listener.close()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return serve(args.config)
    if args.command == "up":
        return up(args)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
