"""Under systemd: the dyno holder and the dynos in a transient scope unit of their own.

On a pure cgroup v2 host, a service with Delegate=yes cannot hold its dynos below its own
cgroup: once that cgroup hands controllers down to children, v2's "no internal processes"
rule stops systemd from attaching a new main process to it (EBUSY), so every restart of the
unit fails with status=219/CGROUP (DelegateSubgroup=, which solves this, is systemd 254+).
So the agent keeps its own cgroup free of controllers: it asks systemd (StartTransientUnit over
D-Bus, through busctl) for a scope with Delegate=yes around the holder's pid, named after the
unit (`dynoagent.service` -> `dynoagent-dynos.scope`, in the unit's slice). The scope's cgroup
is the agent's cgroup root: the holder in its leaf `<scope>/holder`, the dynos' groups beside
it. A restarted agent finds its holder already there (reuse); a holder started again while the
scope lives on (its dynos still running) is moved into the leaf; otherwise the scope is made.
"""

from __future__ import annotations

import enum
import logging
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cgroups
from cgroups.discovery import HOLDER_LEAF, relative_to_mount
from cgroups.fs import normalise
from cgroups.limits import Mode

log = logging.getLogger(__name__)

SCOPE_SUFFIX = "-dynos.scope"
# systemd's own bus socket (root only): for hosts without a D-Bus system bus.
PRIVATE_BUS = "unix:path=/run/systemd/private"
SCOPE_WAIT_S = 30.0


class ScopeError(Exception):
    """The holder could not be put into the dynos' scope."""


@dataclass(frozen=True)
class ScopePlan:
    """The scope of a unit's dynos: unit name, the slice it goes in, its cgroup (relative to
    the v2 mount)."""

    unit: str
    slice: str
    cgroup: str

    @property
    def holder_leaf(self) -> str:
        return f"{self.cgroup}/{HOLDER_LEAF}"


class Action(enum.Enum):
    REUSE = "reuse"  # the holder is in the scope's leaf already
    MOVE = "move"  # the scope exists (or holds the holder): move the holder into the leaf
    CREATE = "create"  # no scope: StartTransientUnit around the holder, then into the leaf


def plan_for(own_cgroup: str) -> ScopePlan | None:
    """The scope for a service whose cgroup is `own_cgroup`; None if that is no service in a
    slice."""
    own = normalise(own_cgroup)
    parent, _, base = own.rpartition("/")
    if not base.endswith(".service") or base == ".service":
        return None
    slice_ = parent.rpartition("/")[2] if parent else "-.slice"
    if not slice_.endswith(".slice"):
        return None
    unit = base[:-len(".service")] + SCOPE_SUFFIX
    return ScopePlan(unit, slice_, f"{parent}/{unit}" if parent else unit)


def systemd_mode(layout: cgroups.Layout) -> ScopePlan | None:
    """The scope to use when systemd delegated the agent's own service cgroup on pure v2;
    None elsewhere (hybrid hosts, a configured root, no systemd): nothing changes there."""
    if layout.mode is not Mode.V2 or not layout.delegated or not layout.own_path:
        return None
    if normalise(layout.own_path) != layout.root:
        return None
    return plan_for(layout.own_path)


def choose(plan: ScopePlan, holder_cgroup: str | None, scope_exists: bool) -> Action:
    """What to do with a holder now in `holder_cgroup` (relative to the v2 mount)."""
    where = normalise(holder_cgroup) if holder_cgroup is not None else None
    if where == plan.holder_leaf:
        return Action.REUSE
    if scope_exists or (where is not None and (
            where == plan.cgroup or where.startswith(plan.cgroup + "/"))):
        return Action.MOVE
    return Action.CREATE


def start_scope_argv(plan: ScopePlan, pid: int, address: str | None = None) -> list[str]:
    """busctl's StartTransientUnit of the scope around `pid`: delegated, collected once empty
    (failed included), in the service's slice."""
    props = [
        ("Description", "s", f"dyno holder and dynos of {plan.unit[:-len(SCOPE_SUFFIX)]}"
                              ".service"),
        ("Slice", "s", plan.slice),
        ("Delegate", "b", "true"),
        ("CollectMode", "s", "inactive-or-failed"),
        ("PIDs", "au", "1", str(pid)),
    ]
    argv = ["busctl"]
    if address is not None:
        argv.append(f"--address={address}")
    argv += ["call", "org.freedesktop.systemd1", "/org/freedesktop/systemd1",
             "org.freedesktop.systemd1.Manager", "StartTransientUnit", "ssa(sv)a(sa(sv))",
             plan.unit, "fail", str(len(props))]
    for prop in props:
        argv.extend(prop)
    argv.append("0")
    return argv


def cgroup_of(pid: int, mount_root: str = "/", proc_root: Path = Path("/proc")) -> str | None:
    """The v2 cgroup of `pid`, relative to a mount of `mount_root`; None if it is gone."""
    try:
        text = (proc_root / str(pid) / "cgroup").read_text()
    except OSError:
        return None
    path = cgroups.parse_proc_cgroup(text).get("")
    return None if path is None else relative_to_mount(path, mount_root)


Runner = Callable[[list[str]], subprocess.CompletedProcess[str]]


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=SCOPE_WAIT_S,
                          check=False, stdin=subprocess.DEVNULL)


def start_scope(plan: ScopePlan, pid: int, run: Runner = _run) -> None:
    """StartTransientUnit through the system bus, or systemd's private socket without one."""
    errors = []
    for address in (None, PRIVATE_BUS):
        try:
            done = run(start_scope_argv(plan, pid, address))
        except (OSError, subprocess.TimeoutExpired) as exc:
            errors.append(str(exc))
            continue
        if done.returncode == 0:
            return
        errors.append((done.stderr or done.stdout).strip()[-300:])
    raise ScopeError(f"cannot start {plan.unit}: {'; '.join(errors)}")


def place_holder(tree: cgroups.Tree, plan: ScopePlan, pid: int, *, run: Runner = _run,
                 proc_root: Path = Path("/proc"), wait_s: float = SCOPE_WAIT_S) -> Action:
    """Put the holder (`pid`) into `<scope>/holder`, starting the scope if there is none.
    `tree` is rooted at the scope's cgroup. Blocking (subprocess, polling): run in a thread."""
    unified = tree.layout.unified
    where = cgroup_of(pid, unified.mount_root, proc_root)
    if where is None:
        raise ScopeError(f"the holder (pid {pid}) is gone")
    action = choose(plan, where, unified.fs.exists(plan.cgroup))
    if action is Action.REUSE:
        return action
    if action is Action.CREATE:
        try:
            start_scope(plan, pid, run)
        except ScopeError:
            if not unified.fs.exists(plan.cgroup):
                raise
            action = Action.MOVE  # made meanwhile (a unit of that name exists): join it
        else:
            _wait_in_scope(plan, pid, unified.mount_root, proc_root, wait_s)
    try:
        tree.enter_holder_leaf(pid)
    except cgroups.CgroupError as exc:
        raise ScopeError(f"cannot move the holder (pid {pid}) into {plan.holder_leaf}: "
                         f"{exc}") from None
    return action


def _wait_in_scope(plan: ScopePlan, pid: int, mount_root: str, proc_root: Path,
                   wait_s: float) -> None:
    # The job that starts the scope runs after busctl returns: the holder is in the scope once
    # its /proc/<pid>/cgroup says so.
    deadline = time.monotonic() + wait_s
    while True:
        where = cgroup_of(pid, mount_root, proc_root)
        if where is not None and (where == plan.cgroup or where.startswith(plan.cgroup + "/")):
            return
        if time.monotonic() > deadline:
            raise ScopeError(f"the holder (pid {pid}) is not in {plan.cgroup} "
                             f"{wait_s:g}s after starting {plan.unit} (in {where})")
        time.sleep(0.05)
