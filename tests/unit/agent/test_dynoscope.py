"""Under systemd: the holder and the dynos in a scope of their own (agent.daemon.dynoscope).
The pure pieces: names, the choice reuse/move/create, busctl's argv, placement on a fake tree."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from agent.daemon import dynoscope
from agent.daemon.dynoscope import Action, ScopeError, ScopePlan
from cgroups.discovery import HOLDER_LEAF
from cgroups.tree import Tree
from tests.unit.cgroups.fakekernel import FakeHost

PLAN = ScopePlan("dynoagent-dynos.scope", "system.slice", "system.slice/dynoagent-dynos.scope")
SERVICE = "system.slice/dynoagent.service"
HOLDER_PID = 777


@pytest.fixture
def v2_host(tmp_path: Path) -> FakeHost:
    return FakeHost(tmp_path / "v2", "v2")


@pytest.fixture
def hybrid_host(tmp_path: Path) -> FakeHost:
    return FakeHost(tmp_path / "hybrid", "hybrid")


def test_plan_is_named_after_the_unit_in_its_slice() -> None:
    assert dynoscope.plan_for("/system.slice/dynoagent.service") == PLAN
    other = dynoscope.plan_for("/system.slice/system-dyno.slice/dyno-b.service")
    assert other == ScopePlan("dyno-b-dynos.scope", "system-dyno.slice",
                              "system.slice/system-dyno.slice/dyno-b-dynos.scope")
    assert dynoscope.plan_for("/user.slice/session-3.scope") is None
    assert dynoscope.plan_for("/dynoagent") is None


def test_systemd_mode_only_for_a_delegated_service_on_v2(v2_host: FakeHost,
                                                          hybrid_host: FakeHost) -> None:
    v2_host.layout()
    (v2_host.base / "proc/self/cgroup").write_text(f"0::/{SERVICE}\n")
    service = v2_host.cg("unified", SERVICE)
    service.mkdir(parents=True)
    (service / "cgroup.controllers").write_text("cpu memory pids\n")
    assert dynoscope.systemd_mode(v2_host.layout(delegation_check=lambda p: p == service)) == PLAN
    assert dynoscope.systemd_mode(v2_host.layout(delegation_check=lambda p: False)) is None
    hybrid_host.layout()
    (hybrid_host.base / "proc/self/cgroup").write_text(
        f"4:memory:/{SERVICE}\n1:name=systemd:/{SERVICE}\n0::/{SERVICE}\n")
    for name in ("unified", "memory", "cpu,cpuacct", "pids"):
        hybrid_host.cg(name, SERVICE).mkdir(parents=True, exist_ok=True)
    hybrid = hybrid_host.layout(delegation_check=lambda p: True)
    assert hybrid.delegated and dynoscope.systemd_mode(hybrid) is None


@pytest.mark.parametrize(("holder_cgroup", "exists", "expected"), [
    (f"/{PLAN.cgroup}/{HOLDER_LEAF}", True, Action.REUSE),
    (f"{PLAN.cgroup}/{HOLDER_LEAF}", True, Action.REUSE),
    (f"/{SERVICE}", True, Action.MOVE),  # a holder started again, its dynos still running
    (f"/{PLAN.cgroup}", True, Action.MOVE),  # the scope made, the agent gone before the move
    (f"/{SERVICE}/agent.scope", False, Action.CREATE),
    (f"/{SERVICE}", False, Action.CREATE),
    (f"/{PLAN.cgroup}-other", False, Action.CREATE),
])
def test_choose(holder_cgroup: str, exists: bool, expected: Action) -> None:
    assert dynoscope.choose(PLAN, holder_cgroup, exists) is expected


def test_start_scope_argv() -> None:
    assert dynoscope.start_scope_argv(PLAN, 4242) == [
        "busctl", "call", "org.freedesktop.systemd1", "/org/freedesktop/systemd1",
        "org.freedesktop.systemd1.Manager", "StartTransientUnit", "ssa(sv)a(sa(sv))",
        "dynoagent-dynos.scope", "fail", "5",
        "Description", "s", "dyno holder and dynos of dynoagent.service",
        "Slice", "s", "system.slice",
        "Delegate", "b", "true",
        "CollectMode", "s", "inactive-or-failed",
        "PIDs", "au", "1", "4242",
        "0"]
    private = dynoscope.start_scope_argv(PLAN, 1, dynoscope.PRIVATE_BUS)
    assert private[:2] == ["busctl", "--address=unix:path=/run/systemd/private"]


def _scope_host(host: FakeHost, *, scope: bool, holder_in: str) -> Tree:
    host.layout()
    (host.base / "proc/self/cgroup").write_text(f"0::/{SERVICE}\n")
    host.cg("unified", SERVICE).mkdir(parents=True)
    if scope:
        _make_scope(host)
    _holder_in(host, holder_in)
    # As before the scope exists: not (yet) delegated (the daemon detects again once placed).
    layout = host.layout(root=PLAN.cgroup, delegation_check=lambda p: p.is_dir())
    return Tree(layout)


def _make_scope(host: FakeHost) -> None:
    directory = host.cg("unified", PLAN.cgroup)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "cgroup.controllers").write_text("cpu memory pids\n")
    for name in ("cgroup.procs", "cgroup.subtree_control"):
        (directory / name).touch()


def _holder_in(host: FakeHost, cgroup: str) -> None:
    proc = host.base / "proc" / str(HOLDER_PID)
    proc.mkdir(parents=True, exist_ok=True)
    (proc / "cgroup").write_text(f"0::/{cgroup}\n")


class FakeSystemd:
    """busctl as systemd answers it: the scope made, the pid moved into it."""

    def __init__(self, host: FakeHost, fail: bool = False) -> None:
        self.host = host
        self.fail = fail
        self.calls: list[list[str]] = []

    def __call__(self, argv: list[str]) -> subprocess.CompletedProcess[str]:
        self.calls.append(argv)
        if self.fail:
            return subprocess.CompletedProcess(argv, 1, "", "Unit dynoagent-dynos.scope "
                                               "already exists.")
        _make_scope(self.host)
        _holder_in(self.host, PLAN.cgroup)
        return subprocess.CompletedProcess(argv, 0, "o \"/org/freedesktop/systemd1/job/9\"", "")


def _place(tree: Tree, host: FakeHost, systemd: FakeSystemd) -> Action:
    return dynoscope.place_holder(tree, PLAN, HOLDER_PID, run=systemd,
                                  proc_root=host.base / "proc", wait_s=1)


def _leaf_procs(host: FakeHost) -> list[str]:
    return (host.cg("unified", f"{PLAN.cgroup}/{HOLDER_LEAF}") / "cgroup.procs") \
        .read_text().split()


def test_place_creates_the_scope_then_moves_the_holder_into_its_leaf(v2_host: FakeHost) -> None:
    tree = _scope_host(v2_host, scope=False, holder_in=SERVICE)
    systemd = FakeSystemd(v2_host)
    assert _place(tree, v2_host, systemd) is Action.CREATE
    assert systemd.calls == [dynoscope.start_scope_argv(PLAN, HOLDER_PID)]
    assert _leaf_procs(v2_host) == [str(HOLDER_PID)]
    # Detected again (delegated now), as the daemon does: the scope holds no process itself,
    # so it takes controllers.
    Tree(v2_host.layout(root=PLAN.cgroup, delegation_check=lambda p: p.is_dir())).ensure()
    assert (v2_host.cg("unified", PLAN.cgroup) / "cgroup.subtree_control").read_text().split() \
        == ["cpu", "memory", "pids"]


def test_place_moves_a_new_holder_into_a_scope_that_lives_on(v2_host: FakeHost) -> None:
    tree = _scope_host(v2_host, scope=True, holder_in=SERVICE)
    systemd = FakeSystemd(v2_host)
    assert _place(tree, v2_host, systemd) is Action.MOVE
    assert systemd.calls == []  # StartTransientUnit would fail: the unit exists
    assert _leaf_procs(v2_host) == [str(HOLDER_PID)]


def test_place_reuses_a_holder_already_in_its_leaf(v2_host: FakeHost) -> None:
    tree = _scope_host(v2_host, scope=True, holder_in=f"{PLAN.cgroup}/{HOLDER_LEAF}")
    systemd = FakeSystemd(v2_host)
    before = len(v2_host.writes())
    assert _place(tree, v2_host, systemd) is Action.REUSE
    assert systemd.calls == [] and len(v2_host.writes()) == before


def test_place_fails_when_systemd_refuses_and_there_is_no_scope(v2_host: FakeHost) -> None:
    tree = _scope_host(v2_host, scope=False, holder_in=SERVICE)
    systemd = FakeSystemd(v2_host, fail=True)
    with pytest.raises(ScopeError, match="already exists"):
        _place(tree, v2_host, systemd)
    assert len(systemd.calls) == 2  # the system bus, then systemd's private socket


def test_place_fails_for_a_holder_that_is_gone(v2_host: FakeHost, tmp_path: Path) -> None:
    tree = _scope_host(v2_host, scope=True, holder_in=SERVICE)
    with pytest.raises(ScopeError, match="gone"):
        dynoscope.place_holder(tree, PLAN, 999999, run=FakeSystemd(v2_host),
                               proc_root=tmp_path / "noproc")
