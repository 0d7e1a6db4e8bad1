"""`dynoagent` command line: `serve` (the daemon), `up` (standalone mode) and `stack`."""

from __future__ import annotations

import argparse
import asyncio
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from agent import __version__, journal
from agent import config as config_mod
from agent.cli import stack as stack_cli
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
    up.add_argument("-b", "--buildpack", action="append", default=[], metavar="BUILDPACK",
                    help="build with these buildpacks (default: the built-in ones, when one "
                         "detects the app)")
    up.add_argument("--no-build", action="store_true",
                    help="run the directory as it is, without building it first")
    up.add_argument("--stack", default=None, metavar="NAME",
                    help="run the dynos on stack NAME (`dynoagent stack build NAME`; default: "
                         "the host's own root, for development only)")
    stack_cli.add_parser(sub)
    _build_parser(sub)
    return parser


def _build_parser(sub: Any) -> None:
    build = sub.add_parser("build", help="compile an app's source into a slug with buildpacks",
                           description="Build DIR into a slug in an isolated build dyno with "
                                       "Heroku's buildpack API (built-in Python and Node.js "
                                       "buildpacks unless -b names others), streaming the "
                                       "build's output. The slug is kept in the build cache; "
                                       "an unchanged source is not built again.")
    build.add_argument("dir", nargs="?", default=".", type=Path, metavar="DIR",
                       help="the app's source")
    build.add_argument("-o", "--output", type=Path, default=None, metavar="SLUG.tgz",
                       help="also write the slug (a gzip tarball of /app) here")
    build.add_argument("-b", "--buildpack", action="append", default=[], metavar="BUILDPACK",
                       help="python, nodejs, a directory, or an http(s) tarball URL with "
                            "#sha256=HEX; repeat for several, run in order")
    build.add_argument("-e", "--env", action="append", default=[], metavar="KEY=VAL",
                       help="a config var for the build (over DIR/.env's)")
    build.add_argument("--env-file", type=Path, default=None,
                       help="config vars file (default: DIR/.env when it exists)")
    build.add_argument("-a", "--app", default=None, help="app name (default: DIR's name)")
    build.add_argument("-s", "--stack", default="host",
                       help="the stack to build on (default: host)")
    build.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                       help="stop the build after this long (default: 1500, Heroku's 25 min)")
    build.add_argument("--no-cache", action="store_true",
                       help="build even when a slug of the same inputs exists")
    build.add_argument("--json", action="store_true",
                       help="print the result as JSON on stdout (the build's output on stderr)")
    build.add_argument("--config", type=Path, default=None,
                       help="agent config (default: private directories for this build)")


def parse_env_items(items: list[str]) -> dict[str, str]:
    """`KEY=VAL` arguments as config vars; a bad one is a usage error (ValueError)."""
    from agent.spec import ENV_KEY

    env: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not ENV_KEY.fullmatch(key):
            raise ValueError(f"-e {item!r}: expected KEY=VALUE with KEY matching "
                             f"{ENV_KEY.pattern}")
        env[key] = value
    return env


def build(args: argparse.Namespace) -> int:
    from agent.builds import BuildRequest
    from agent.builds.builder import DEFAULT_TIMEOUT_S
    from agent.spec import APP
    from agent.standalone import build as local
    from agent.standalone import procfile as pf
    from agent.standalone import up as standalone

    directory: Path = args.dir
    try:
        extra = parse_env_items(args.env)
    except ValueError as exc:
        print(f"dynoagent build: {exc}", file=sys.stderr)
        return 2
    try:
        if not directory.is_dir():
            raise pf.AppDirError(f"{directory} is not a directory", value=str(directory))
        directory = directory.resolve()
        app = args.app if args.app is not None else pf.app_name(directory)
        if not APP.fullmatch(app):
            raise pf.AppDirError(f"app name {app!r} must match {APP.pattern}", value=app)
        env_path = args.env_file if args.env_file is not None else directory / ".env"
        env = {**pf.load_env_file(env_path, required=args.env_file is not None), **extra}
        base = config_mod.load(args.config) if args.config is not None else None
        config, defaults = standalone.standalone_config(app, base)
        if defaults:
            config = local.build_config(app, config)
        # The source is the build dyno's slug (it is copied, never changed).
        config = replace(config, slug_roots=(*config.effective_slug_roots, directory))
        stack = stack_cli.stack_for_up(args.stack, config.state_dir, defaults)
    except pf.AppDirError as exc:
        print(f"dynoagent build: {exc}", file=sys.stderr)
        return 1
    except ConfigError as exc:
        print(f"dynoagent build: {exc}", file=sys.stderr)
        return 2
    except stack_cli.UpStackError as exc:
        print(f"dynoagent build: {exc}", file=sys.stderr)
        return exc.exit_code
    request = BuildRequest(app=app, source=directory, buildpacks=tuple(args.buildpack),
                           env=env, stack=stack,
                           timeout_s=args.timeout if args.timeout is not None
                           else DEFAULT_TIMEOUT_S, use_cache=not args.no_cache)
    journal.configure(config.log_level)
    output = args.output.resolve() if args.output is not None else None
    daemon = local.BuildDaemon(config, request, out=sys.stdout, output=output,
                               as_json=args.json, remove_run_dir=defaults,
                               cache_base=local.CACHE_BASE if defaults else None)
    try:
        return asyncio.run(daemon.run())
    except StartupError as exc:
        print(f"dynoagent build: {exc}", file=sys.stderr)
        return 1


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
    from agent.standalone import build as local
    from agent.standalone import procfile as pf
    from agent.standalone import up as standalone
    from agent.standalone.proxy import ProxyError, bind_listener

    directory: Path = args.dir
    building = not args.no_build
    if args.no_build and args.buildpack:
        print("dynoagent up: --no-build and -b contradict each other", file=sys.stderr)
        return 2
    try:
        if building and directory.is_dir() and not (directory / "Procfile").exists():
            # A buildpack's bin/release may name the process types: known after the build.
            procfile = pf.Procfile(())
        else:
            procfile = pf.load_procfile(directory)
        directory = directory.resolve()
        app = args.app if args.app is not None else pf.app_name(directory)
        if not APP.fullmatch(app):
            raise pf.AppDirError(f"app name {app!r} must match {APP.pattern}", value=app)
        env_path = args.env_file if args.env_file is not None else directory / ".env"
        env = pf.load_env_file(env_path, required=args.env_file is not None)
        base = config_mod.load(args.config) if args.config is not None else None
        config, defaults = standalone.standalone_config(app, base)
        # The app directory is the slug of every dyno of `up` (or of its build dyno, whose
        # slug then is); built slugs are kept in the machine's build cache by default.
        cache_base = local.CACHE_BASE if defaults else None
        built = (local.app_slugs(app, cache_base),) if building and cache_base else ()
        config = replace(config, slug_roots=(*config.effective_slug_roots, directory, *built))
        items = pf.parse_formation_items([args.formation]) if args.formation else []
        formation = (standalone.initial_formation(procfile, items, config.sizes)
                     if procfile.types else {})
    except pf.AppDirError as exc:
        print(f"dynoagent up: {exc}", file=sys.stderr)
        return 1
    except ConfigError as exc:
        print(f"dynoagent up: {exc}", file=sys.stderr)
        return 2
    try:
        stack = stack_cli.stack_for_up(args.stack, config.state_dir, defaults)
    except stack_cli.UpStackError as exc:
        print(f"dynoagent up: {exc}", file=sys.stderr)
        return exc.exit_code
    try:
        listener = bind_listener("127.0.0.1", args.port)
    except ProxyError as exc:
        print(f"dynoagent up: {exc}", file=sys.stderr)
        return 1
    journal.configure(config.log_level)
    source = standalone.AppSource(directory, app, procfile, env, env_path,
                                  env_required=args.env_file is not None)
    options = standalone.UpOptions(source, formation, listener, out=sys.stdout,
                                   colour=sys.stdout.isatty(), remove_run_dir=defaults,
                                   stack=stack, items=items,
                                   build=standalone.UpBuild(tuple(args.buildpack), cache_base)
                                   if building else None)
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
    if args.command == "build":
        return build(args)
    if args.command == "stack":
        return stack_cli.main(args)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
