"""The agent's root: set-up per mode, delegation, adoption listing, sweeping, destroy."""

from __future__ import annotations

import pytest

from cgroups.discovery import AGENT_LEAF, HOLDER_LEAF, Layout
from cgroups.errors import CgroupError, NotEmpty
from cgroups.limits import Limits
from cgroups.tree import Tree
from tests.unit.cgroups.fakekernel import FakeHost


def test_ensure_v2_enables_controllers_top_down_once(v2_host: FakeHost) -> None:
    tree = Tree(v2_host.layout())
    tree.ensure()
    assert v2_host.writes() == [("cgroup.subtree_control", "+memory +cpu +pids"),
                                ("dt-unit/cgroup.subtree_control", "+memory +cpu +pids")]
    before = len(v2_host.writes())
    tree.ensure()
    assert len(v2_host.writes()) == before  # idempotent: nothing left to enable


def test_ensure_v2_only_enables_what_is_missing(v2_host: FakeHost) -> None:
    v2_host.layout()
    (v2_host.cg("unified") / "cgroup.subtree_control").write_text("cpu memory\n")
    Tree(v2_host.layout()).ensure()
    assert v2_host.writes()[0] == ("cgroup.subtree_control", "+pids")


def test_ensure_hybrid_makes_root_everywhere_and_writes_nothing(hybrid_host: FakeHost) -> None:
    Tree(hybrid_host.layout()).ensure()
    assert hybrid_host.writes() == []
    for name in ("unified", "memory", "cpu", "cpuacct", "pids"):
        assert hybrid_host.cg(name, "dt-unit").is_dir()
    assert not hybrid_host.cg("freezer", "dt-unit").exists()


def test_nested_root_name(host: FakeHost) -> None:
    tree = Tree(host.layout(root_name="tests/dt-a"))
    tree.ensure()
    tree.create_group("x.scope", Limits())
    assert host.cg("unified", "tests/dt-a/x.scope").is_dir()
    tree.group("x.scope").remove()
    tree.destroy()
    assert not host.cg("unified", "tests").exists()


def _delegated(host: FakeHost) -> Layout:
    host.layout()
    (host.base / "proc/self/cgroup").write_text("0::/system.slice/dynoagent.service\n")
    service = host.cg("unified", "system.slice/dynoagent.service")
    service.mkdir(parents=True)
    (service / "cgroup.controllers").write_text("cpu memory pids\n")
    (service / "cgroup.subtree_control").write_text("")
    (service / "cgroup.procs").write_text("4321\n")
    return host.layout(delegation_check=lambda path: path == service)


def test_delegated_v2_agent_moves_to_leaf_then_enables_only_its_own_cgroup(
        v2_host: FakeHost) -> None:
    layout = _delegated(v2_host)
    tree = Tree(layout)
    leaf = tree.enter_agent_leaf(pid=4321)
    assert leaf.rel == f"system.slice/dynoagent.service/{AGENT_LEAF}"
    assert leaf.pids() == [4321]
    tree.ensure()
    written = [p for p, _ in v2_host.writes() if p.endswith("subtree_control")]
    assert written == ["system.slice/dynoagent.service/cgroup.subtree_control"]
    g = tree.create_group("app-a.slice/dyno-1.scope", Limits(pids_max=5))
    assert g.rel == "system.slice/dynoagent.service/app-a.slice/dyno-1.scope"
    assert tree.list_groups() == ["app-a.slice/dyno-1.scope"]  # the agent's leaf is not listed
    g.remove()
    assert "app-a.slice" in tree.sweep_empty()
    assert leaf.exists()  # never swept
    tree.destroy()
    assert v2_host.cg("unified", "system.slice/dynoagent.service").is_dir()  # systemd's


def test_holder_leaf_of_a_scope_root_is_neither_listed_nor_swept(v2_host: FakeHost) -> None:
    layout = _delegated(v2_host)
    tree = Tree(layout)
    leaf = tree.enter_holder_leaf(pid=4321)
    assert leaf.rel == f"system.slice/dynoagent.service/{HOLDER_LEAF}"
    assert leaf.pids() == [4321]
    tree.ensure()  # the root is free of processes: controllers can be enabled
    g = tree.create_group("app-a.slice/dyno-1.scope", Limits(pids_max=5))
    assert tree.list_groups() == ["app-a.slice/dyno-1.scope"]  # not the holder's leaf
    g.attach(4321)  # the holder's leaf now empty (as when the holder died): still kept
    assert leaf.pids() == []
    assert HOLDER_LEAF not in tree.sweep_empty()
    assert leaf.exists()


def test_list_groups_finds_leaves_in_any_hierarchy(host: FakeHost) -> None:
    tree = Tree(host.layout())
    tree.ensure()
    tree.create_group("app-a.slice/dyno-1.scope", Limits())
    tree.create_group("app-b.slice/dyno-2.scope", Limits())
    if host.mode == "hybrid":
        # A crash between the v1 and unified mkdirs leaves a v1-only group: still found.
        host.cg("memory", "dt-unit/app-c.slice/dyno-3.scope").mkdir(parents=True)
    expected = ["app-a.slice/dyno-1.scope", "app-b.slice/dyno-2.scope"]
    if host.mode == "hybrid":
        expected.append("app-c.slice/dyno-3.scope")
    assert tree.list_groups(".scope") == expected


def test_list_groups_of_missing_root_is_empty(host: FakeHost) -> None:
    assert Tree(host.layout()).list_groups() == []


def test_sweep_keeps_populated_and_kept_groups(host: FakeHost) -> None:
    tree = Tree(host.layout())
    tree.ensure()
    busy = tree.create_group("app-a.slice/busy.scope", Limits())
    busy.attach(999)
    tree.create_group("app-a.slice/idle.scope", Limits())
    tree.create_group("app-b.slice/kept.scope", Limits())
    tree.create_group("app-c.slice/gone.scope", Limits())
    removed = tree.sweep_empty(keep=lambda rel: rel == "app-b.slice/kept.scope")
    assert removed == ["app-a.slice/idle.scope", "app-c.slice", "app-c.slice/gone.scope"]
    assert tree.list_groups() == ["app-a.slice/busy.scope", "app-b.slice/kept.scope"]


def test_destroy_refuses_while_a_group_has_processes(host: FakeHost) -> None:
    tree = Tree(host.layout())
    tree.ensure()
    tree.create_group("app-a.slice/busy.scope", Limits()).attach(5)
    with pytest.raises(NotEmpty) as info:
        tree.destroy()
    assert "busy.scope" in str(info.value)
    assert host.cg("unified", "dt-unit").is_dir()


def test_destroy_removes_everything(host: FakeHost) -> None:
    tree = Tree(host.layout())
    tree.ensure()
    for i in range(3):
        tree.create_group(f"app-a.slice/d{i}.scope", Limits())
    tree.destroy()
    names = ["unified"] if host.mode == "v2" else ["unified", "memory", "cpu", "cpuacct", "pids"]
    assert [n for n in names if host.cg(n, "dt-unit").exists()] == []


def test_create_group_needs_a_name(host: FakeHost) -> None:
    tree = Tree(host.layout())
    tree.ensure()
    with pytest.raises(CgroupError):
        tree.create_group("/", Limits())


def test_create_enables_controllers_on_a_parent_left_half_made(v2_host: FakeHost) -> None:
    tree = Tree(v2_host.layout())
    tree.ensure()
    tree.layout.unified.fs.mkdir("dt-unit/app-a.slice")  # a crash right after this mkdir
    g = tree.create_group("app-a.slice/dyno-1.scope", Limits(memory_max_bytes=4096))
    assert v2_host.cg("unified", g.rel).joinpath("memory.max").read_text() == "4096\n"


def test_delegated_hybrid_makes_the_root_in_v1_hierarchies(hybrid_host: FakeHost) -> None:
    layout = _delegated(hybrid_host)
    assert layout.delegated and layout.mode.value == "hybrid"
    tree = Tree(layout)
    tree.enter_agent_leaf(pid=4321)
    tree.ensure()
    for name in ("memory", "cpu", "cpuacct", "pids"):
        assert hybrid_host.cg(name, "system.slice/dynoagent.service").is_dir()
    assert all(not p.endswith("subtree_control") for p, _ in hybrid_host.writes())
    g = tree.create_group("app-a.slice/dyno-1.scope", Limits(pids_max=4))
    assert hybrid_host.cg("pids", g.rel).joinpath("pids.max").read_text() == "4\n"
