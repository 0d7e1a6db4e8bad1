"""`dynoagent stack build|ls|rm`: stacks in `<state_dir>/stacks` (state_dir from --state-dir, else
the config that `serve` reads)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from agent import config as config_mod
from agent.errors import ConfigError
from agent.spec import HOST_STACK
from agent.stacks import recipe as rc
from agent.stacks.build import HostMachine, StackBuildError, build
from agent.stacks.store import StackStore, dynos_using, link_stacks

STACKS = "stacks"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    stack = sub.add_parser("stack", help="build, list and remove stacks (root filesystems for "
                                         "dynos)",
                           description="Stacks are read-only root filesystems for dynos, made "
                                       "from Debian packages, in <state_dir>/stacks/NAME.")
    actions = stack.add_subparsers(dest="stack_command", required=True, metavar="ACTION")
    build_p = actions.add_parser(
        "build", help="build a stack (nothing to do when one from the same inputs exists)",
        description="Build stack NAME with mmdebstrap (as root). A stack built from the same "
                    "inputs (suite, packages, mirrors, tools) is kept as it is.")
    build_p.add_argument("name", metavar="NAME")
    build_p.add_argument("--suite", default=rc.DEFAULT_SUITE,
                         help=f"Debian suite (default {rc.DEFAULT_SUITE})")
    build_p.add_argument("--packages", default=None, metavar="A,B,...",
                         help="every package to install besides the minimal base (default: "
                              f"{','.join(rc.DEFAULT_PACKAGES)})")
    build_p.add_argument("--mirror", default=rc.DEFAULT_MIRROR, metavar="URL",
                         help=f"Debian archive (default {rc.DEFAULT_MIRROR})")
    build_p.add_argument("--security-mirror", default=rc.DEFAULT_SECURITY_MIRROR,
                         metavar="URL|none",
                         help=f"security archive (default {rc.DEFAULT_SECURITY_MIRROR})")
    build_p.add_argument("--rebuild", action="store_true",
                         help="build even when the stack is up to date (newer packages)")
    ls_p = actions.add_parser("ls", help="list the stacks")
    ls_p.add_argument("--json", action="store_true", help="print JSON")
    rm_p = actions.add_parser("rm", help="remove a stack no dyno of this agent uses")
    rm_p.add_argument("name", metavar="NAME")
    for parser in (build_p, ls_p, rm_p):
        parser.add_argument("--config", type=Path, default=None,
                            help="agent config whose state_dir holds the stacks (default: "
                                 "$DYNOAGENT_CONFIG or /etc/dynoagent/agent.toml)")
        parser.add_argument("--state-dir", type=Path, default=None,
                            help="the state dir instead of the config's")


def main(args: argparse.Namespace) -> int:
    prog = f"dynoagent stack {args.stack_command}"
    try:
        state_dir = (args.state_dir if args.state_dir is not None
                     else config_mod.load(args.config).state_dir)
        store = StackStore(state_dir / STACKS)
        if args.stack_command == "build":
            recipe = _recipe(args)
            rc.check_name(args.name)
        elif args.stack_command == "rm":
            rc.check_name(args.name)
    except (ConfigError, rc.StackUsageError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    if args.stack_command == "ls":
        return _ls(store, args.json)
    if os.geteuid() != 0:
        print(f"{prog}: must run as root (stacks belong to root, like the agent's state)",
              file=sys.stderr)
        return 1
    try:
        if args.stack_command == "build":
            build(store, args.name, recipe, HostMachine(), sys.stdout, rebuild=args.rebuild,
                  in_use=lambda: dynos_using(state_dir, args.name))
            return 0
        return _rm(store, state_dir, args.name)
    except StackBuildError as exc:
        print(f" !     {prog}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f" !     {prog}: {exc}", file=sys.stderr)
        return 1


def _recipe(args: argparse.Namespace) -> rc.Recipe:
    packages = (rc.parse_packages(args.packages) if args.packages is not None
                else rc.DEFAULT_PACKAGES)
    security = None if args.security_mirror == "none" else args.security_mirror
    epoch_text = os.environ.get("SOURCE_DATE_EPOCH")
    try:
        epoch = int(epoch_text) if epoch_text else rc.DEFAULT_SOURCE_DATE_EPOCH
    except ValueError:
        raise rc.StackUsageError(f"SOURCE_DATE_EPOCH={epoch_text!r} is not a number") from None
    return rc.Recipe(suite=args.suite, packages=packages, mirror=args.mirror,
                     security_mirror=security, source_date_epoch=epoch)


def _ls(store: StackStore, as_json: bool) -> int:
    rows = []
    for name in store.names():
        info = store.info(name)
        rows.append({"name": name, "path": str(store.root(name)),
                     **(info.to_json() if info is not None else {"key": None})})
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no stacks in {store.dir}")
        return 0
    print(f"{'NAME':<20} {'SUITE':<10} {'PACKAGES':>8} {'SIZE':>8}  {'PYTHON':<8} BUILT")
    for row in rows:
        inputs = row.get("inputs") or {}
        size = f"{row['size_bytes'] / 1e6:.0f} MB" if row.get("size_bytes") else "?"
        print(f"{row['name']:<20} {inputs.get('suite', '?'):<10} "
              f"{len(row.get('packages') or []):>8} {size:>8}  {row.get('python') or '-':<8} "
              f"{row.get('built_at') or '(no metadata)'}")
    return 0


def _rm(store: StackStore, state_dir: Path, name: str) -> int:
    with store.locked(lambda: print(f"-----> Waiting for another build or removal in "
                                    f"{store.dir}")):
        if not store.exists(name) and not store.meta_path(name).exists():
            print(f"dynoagent stack rm: no stack {name} in {store.dir}", file=sys.stderr)
            return 1
        users = dynos_using(state_dir, name)
        if users:
            print(f"dynoagent stack rm: stack {name} is in use by dyno(s) {', '.join(users)}: "
                  "delete them first", file=sys.stderr)
            return 1
        store.remove(name)
    print(f"-----> Removed stack {name} from {store.dir}")
    return 0


class UpStackError(Exception):
    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def stack_for_up(name: str | None, state_dir: Path, private: bool) -> str:
    """The stack of `dynoagent up --stack NAME`, checked to be installed. An agent on
    `private` directories (no --config) runs the stacks of the host's agent config, which is
    where `dynoagent stack build` puts them by default."""
    if name is None or name == HOST_STACK:
        return HOST_STACK
    try:
        rc.check_name(name)
        if private:
            link_stacks(state_dir, config_mod.load(None).state_dir / STACKS)
    except (rc.StackUsageError, ConfigError) as exc:
        raise UpStackError(str(exc), 2) from None
    except OSError as exc:
        raise UpStackError(f"cannot reach the stacks from {state_dir}: {exc}", 1) from None
    store = StackStore(state_dir / STACKS)
    if not store.exists(name):
        raise UpStackError(f"stack {name} is not installed in {store.dir.resolve()}: build it "
                           f"with `dynoagent stack build {name}`", 1)
    return name
