"""Groups on a fake cgroupfs in both modes: create (and undo), attach, limits, stats, kill,
freeze, remove, and every kernel error on the way."""

from __future__ import annotations

import errno

import pytest

import cgroups
import cgroups.group as group_mod
from cgroups.errors import (
    AlreadyExists,
    Busy,
    ControllerMissing,
    InvalidValue,
    NoSpace,
    NotEmpty,
    NotFound,
    Timeout,
)
from cgroups.group import Group
from cgroups.limits import Limits, Mode
from cgroups.tree import Tree
from tests.unit.cgroups.fakekernel import FakeHost

FULL = Limits(memory_high_bytes=32 << 20, memory_max_bytes=64 << 20, cpu_weight=100,
              cpu_max_cpus=0.2, pids_max=20)
NAME = "app-a.slice/dyno-1.scope"


def _tree(host: FakeHost) -> Tree:
    tree = Tree(host.layout())
    tree.ensure()
    return tree


def _exists_anywhere(host: FakeHost, rel: str) -> list[str]:
    names = ["unified"] if host.mode == "v2" else ["unified", "memory", "cpu", "cpuacct", "pids"]
    return [n for n in names if host.cg(n, rel).exists()]


def test_create_applies_limits_in_every_hierarchy(host: FakeHost) -> None:
    tree = _tree(host)
    g = tree.create_group(NAME, FULL)
    assert g.rel == f"dt-unit/{NAME}"
    assert len(_exists_anywhere(host, g.rel)) == (1 if host.mode == "v2" else 5)
    if host.mode == "v2":
        d = host.cg("unified", g.rel)
        assert (d / "memory.max").read_text() == f"{64 << 20}\n"
        assert (d / "memory.high").read_text() == f"{32 << 20}\n"
        assert (d / "memory.oom.group").read_text() == "1\n"
        assert (d / "memory.swap.max").read_text() == "0\n"
        assert (d / "cpu.max").read_text() == "20000 100000\n"
        assert (d / "pids.max").read_text() == "20\n"
        parent = host.cg("unified", "dt-unit/app-a.slice") / "cgroup.subtree_control"
        assert parent.read_text().split() == ["cpu", "memory", "pids"]
    else:
        assert (host.cg("memory", g.rel) / "memory.limit_in_bytes").read_text() == \
            f"{64 << 20}\n"
        assert (host.cg("memory", g.rel) / "memory.memsw.limit_in_bytes").read_text() == \
            f"{64 << 20}\n"
        assert (host.cg("cpu", g.rel) / "cpu.cfs_quota_us").read_text() == "20000\n"
        assert (host.cg("cpu", g.rel) / "cpu.shares").read_text() == "1024\n"
        assert (host.cg("pids", g.rel) / "pids.max").read_text() == "20\n"


def test_create_existing_group_is_already_exists_and_keeps_it(host: FakeHost) -> None:
    tree = _tree(host)
    g = tree.create_group(NAME, Limits())
    with pytest.raises(AlreadyExists):
        tree.create_group(NAME, Limits())
    assert g.exists()


def test_create_without_root_says_so(host: FakeHost) -> None:
    tree = Tree(host.layout())
    with pytest.raises(NotFound, match="ensure"):
        tree.create_group(NAME, Limits())


def test_create_refuses_missing_controller_before_touching_anything(host: FakeHost) -> None:
    Tree(host.layout()).ensure()
    if host.mode == "v2":
        (host.cg("unified") / "cgroup.controllers").write_text("memory cpu\n")
        layout = host.layout()
    else:
        layout = host.layout(v1_controllers=("memory", "cpu", "cpuacct"))  # no pids mounted
    before = len(host.log)
    with pytest.raises(ControllerMissing) as info:
        Tree(layout).create_group(NAME, Limits(pids_max=5))
    assert info.value.controller == "pids"
    assert host.log[before:] == []
    assert not _exists_anywhere(host, "dt-unit/app-a.slice")


def _steps(host: FakeHost) -> list[tuple[str, str]]:
    """Every (op, basename) create_group performs, to fail each one in turn."""
    tree = _tree(host)
    start = len(host.log)
    tree.create_group(NAME, FULL)
    steps = [(op, p.rsplit("/", 1)[-1]) for op, p, _ in host.log[start:]]
    tree.group(NAME).remove()
    tree.sweep_empty()
    return steps


@pytest.mark.parametrize("err", [errno.EINVAL, errno.ENOSPC, errno.EACCES])
def test_failure_at_every_step_removes_what_was_made(host: FakeHost, err: int) -> None:
    steps = _steps(host)
    assert len(steps) >= 6
    tree = Tree(host.layout())
    seen: set[tuple[str, str]] = set()
    for index, (op, name) in enumerate(steps):
        if (op, name) in seen:
            continue  # the same file again (memsw): the first failure already covers it
        seen.add((op, name))
        host.faults.planned.clear()
        host.faults.add(op, name, err)
        with pytest.raises(Exception) as info:
            tree.create_group(NAME, FULL)
        assert getattr(info.value, "errno", None) == err, (index, op, name)
        assert _exists_anywhere(host, f"dt-unit/{NAME}") == [], (index, op, name)
        assert _exists_anywhere(host, "dt-unit/app-a.slice") == [], (index, op, name)
        assert _exists_anywhere(host, "dt-unit") != []  # the root is not ours to undo
    host.faults.planned.clear()
    assert tree.create_group(NAME, FULL).exists()


def test_kernel_rejecting_a_value_names_file_and_value(host: FakeHost) -> None:
    tree = _tree(host)
    host.faults.add("write", "pids.max", errno.EINVAL)
    with pytest.raises(InvalidValue) as info:
        tree.create_group(NAME, Limits(pids_max=20))
    assert (info.value.file, info.value.value) == ("pids.max", "20")


def test_existing_parent_is_kept_when_create_fails(host: FakeHost) -> None:
    tree = _tree(host)
    tree.create_group("app-a.slice/dyno-0.scope", Limits())
    host.faults.add("write", "pids.max", errno.ENOSPC)
    with pytest.raises(NoSpace):
        tree.create_group(NAME, Limits(pids_max=3))
    assert _exists_anywhere(host, "dt-unit/app-a.slice")
    assert not _exists_anywhere(host, f"dt-unit/{NAME}")


def test_procs_paths_and_attach_order(host: FakeHost) -> None:
    g = _tree(host).create_group(NAME, Limits())
    paths = g.procs_paths()
    assert paths[-1] == str(host.cg("unified", g.rel) / "cgroup.procs")
    assert all(p.endswith(f"/{g.rel}/cgroup.procs") for p in paths)
    assert len(paths) == (1 if host.mode == "v2" else 5)
    start = len(host.log)
    g.attach(4242)
    assert [p for op, p, v in host.log[start:] if op == "write"] == list(paths)
    assert g.pids() == [4242]
    assert g.populated()


def test_attach_of_bad_pid(host: FakeHost) -> None:
    g = _tree(host).create_group(NAME, Limits())
    with pytest.raises(InvalidValue):
        g.attach(-1)


def test_remove_refuses_while_tasks_remain(host: FakeHost) -> None:
    g = _tree(host).create_group(NAME, Limits())
    g.attach(77)
    with pytest.raises(NotEmpty) as info:
        g.remove(timeout_s=0.1)
    assert "77" in (info.value.value or "")
    assert g.exists()


def test_remove_retries_ebusy_until_it_goes(host: FakeHost) -> None:
    g = _tree(host).create_group(NAME, Limits())
    host.faults.add("rmdir", "dyno-1.scope", errno.EBUSY, times=3)
    g.remove(timeout_s=2)
    assert not _exists_anywhere(host, g.rel)
    assert host.faults.planned[("rmdir", "dyno-1.scope")] == []


async def test_remove_async_retries_ebusy(host: FakeHost) -> None:
    g = _tree(host).create_group(NAME, Limits())
    host.faults.add("rmdir", "dyno-1.scope", errno.EBUSY, times=3)
    await g.remove_async(timeout_s=2)
    assert not _exists_anywhere(host, g.rel)


def test_remove_gives_up_at_the_deadline(host: FakeHost) -> None:
    g = _tree(host).create_group(NAME, Limits())
    host.faults.add("rmdir", "dyno-1.scope", errno.EBUSY, times=10_000)
    with pytest.raises(Busy):
        g.remove(timeout_s=0.05)


async def test_remove_async_gives_up_at_the_deadline(host: FakeHost) -> None:
    g = _tree(host).create_group(NAME, Limits())
    host.faults.add("rmdir", "dyno-1.scope", errno.EBUSY, times=10_000)
    with pytest.raises(Busy):
        await g.remove_async(timeout_s=0.05)


def test_remove_of_half_removed_group_finishes(host: FakeHost) -> None:
    g = _tree(host).create_group(NAME, Limits())
    host.cg("unified", g.rel).joinpath("cgroup.procs").write_text("")
    if host.mode == "hybrid":
        host.filesystems[str(host.cg("memory"))].rmdir(g.rel)
    g.remove()
    assert not _exists_anywhere(host, g.rel)


def test_kill_uses_cgroup_kill(host: FakeHost, monkeypatch: pytest.MonkeyPatch) -> None:
    g = _tree(host).create_group(NAME, Limits())
    g.attach(11)
    signalled: list[int] = []
    monkeypatch.setattr(group_mod, "_sigkill", signalled.append)
    g.kill()
    assert ("cgroup.kill", "1") in [(p.rsplit("/", 1)[-1], v) for p, v in host.writes()]
    assert signalled == []
    assert not g.populated()


def test_kill_fallback_freezes_kills_each_pid_and_always_thaws(
        host: FakeHost, monkeypatch: pytest.MonkeyPatch) -> None:
    host.without.add("cgroup.kill")  # kernel < 5.14
    g = _tree(host).create_group(NAME, Limits())
    for pid in (11, 12, 13):
        g.attach(pid)
    order: list[str] = []

    def fake_kill(pid: int) -> None:
        assert g.events()["frozen"] == 1, "killed while not frozen"
        order.append(f"kill {pid}")
        if pid == 12:
            raise ProcessLookupError  # exited meanwhile: not an error

    monkeypatch.setattr(group_mod, "_sigkill", fake_kill)
    g.kill()
    freezes = [v for p, v in host.writes() if p.endswith("cgroup.freeze")]
    assert freezes == ["1", "0"]
    assert order == ["kill 11", "kill 12", "kill 13"]


def test_kill_fallback_thaws_even_when_a_kill_fails(
        host: FakeHost, monkeypatch: pytest.MonkeyPatch) -> None:
    host.without.add("cgroup.kill")
    g = _tree(host).create_group(NAME, Limits())
    g.attach(11)

    def failing_kill(pid: int) -> None:
        raise PermissionError(errno.EPERM, "nope")

    monkeypatch.setattr(group_mod, "_sigkill", failing_kill)
    with pytest.raises(PermissionError):
        g.kill()
    assert [v for p, v in host.writes() if p.endswith("cgroup.freeze")] == ["1", "0"]


def test_kill_fallback_without_freezer_repeats_until_no_new_pids(
        host: FakeHost, monkeypatch: pytest.MonkeyPatch) -> None:
    host.without.update({"cgroup.kill", "cgroup.freeze"})  # kernel < 5.2
    g = _tree(host).create_group(NAME, Limits())
    g.attach(11)
    killed: list[int] = []

    def fake_kill(pid: int) -> None:
        killed.append(pid)
        if pid == 11:
            g.attach(12)  # forked before it died

    monkeypatch.setattr(group_mod, "_sigkill", fake_kill)
    g.kill(timeout_s=1)
    # Unfrozen, the child forked during the first pass is caught by a second one.
    assert killed[0] == 11
    assert 12 in killed


def test_freeze_waits_for_frozen_and_times_out_without_it(
        host: FakeHost, monkeypatch: pytest.MonkeyPatch) -> None:
    g = _tree(host).create_group(NAME, Limits())
    g.attach(5)
    g.freeze(timeout_s=1)
    assert g.events()["frozen"] == 1
    g.thaw()
    assert g.events()["frozen"] == 0
    # A kernel that never confirms (a task stuck in the kernel): the wait ends at the deadline.
    fs = g.layout.unified.fs
    events = fs.path(g.rel, "cgroup.events")
    original = fs._raw_write

    def write_but_never_frozen(path: str, data: bytes) -> None:
        original(path, data)
        events.write_text("populated 1\nfrozen 0\n")

    monkeypatch.setattr(fs, "_raw_write", write_but_never_frozen)
    with pytest.raises(Timeout) as info:
        g.freeze(timeout_s=0.05)
    assert info.value.file == "cgroup.events"


def test_freeze_unsupported_is_controller_missing(host: FakeHost) -> None:
    host.without.add("cgroup.freeze")
    g = _tree(host).create_group(NAME, Limits())
    with pytest.raises(ControllerMissing) as info:
        g.freeze()
    assert info.value.controller == "freezer"


def test_stats_reads_both_modes(host: FakeHost) -> None:
    g = _tree(host).create_group(NAME, FULL)
    if host.mode == "v2":
        host.set("unified", g.rel, "memory.current", "4096\n")
        host.set("unified", g.rel, "memory.events", "high 2\nmax 0\noom 1\noom_kill 1\n")
    else:
        host.set("memory", g.rel, "memory.usage_in_bytes", "4096\n")
        host.set("memory", g.rel, "memory.oom_control",
                 "oom_kill_disable 0\nunder_oom 0\noom_kill 1\n")
    s = g.stats()
    assert s.memory_current_bytes == 4096
    assert s.memory_limit_bytes == 64 << 20
    assert s.oom_kill_events == 1
    assert s.pids_limit == 20
    assert s.high_events == (2 if host.mode == "v2" else None)
    assert set(s.pressure) == {"cpu", "memory", "io"}


def test_counters_read_the_oom_kills_and_peak_alone(host: FakeHost) -> None:
    """What an exit needs, read on the agent's loop: never memory.stat (its read flushes
    every CPU's statistics) or any other file of `stats`."""
    g = _tree(host).create_group(NAME, FULL)
    if host.mode == "v2":
        host.set("unified", g.rel, "memory.events", "high 0\nmax 0\noom 1\noom_kill 1\n")
        host.set("unified", g.rel, "memory.peak", "8192\n")
        memory = "unified"
    else:
        host.set("memory", g.rel, "memory.oom_control",
                 "oom_kill_disable 0\nunder_oom 0\noom_kill 1\n")
        host.set("memory", g.rel, "memory.max_usage_in_bytes", "8192\n")
        memory = "memory"
    for file in ("memory.stat", "memory.current", "cpu.stat", "pids.current"):
        host.faults.add("read", file, errno.EIO, times=2)
    c = g.counters()
    assert (c.oom_kill_events, c.memory_peak_bytes) == (1, 8192)
    assert c == cgroups.Stats(oom_kill_events=1, memory_peak_bytes=8192,
                              oom_events=1 if memory == "unified" else None,
                              high_events=0 if memory == "unified" else None)
    with pytest.raises(NotFound):
        _tree(host).group("nope.scope").counters()


def test_sample_reads_no_limits_or_pressure(host: FakeHost) -> None:
    """A periodic sample (every dyno, every 20 s) reads what its runtime-metrics line, the
    memory checks and the per-dyno metrics need, and none of the limits or pressure files."""
    g = _tree(host).create_group(NAME, FULL)
    if host.mode == "v2":
        host.set("unified", g.rel, "memory.current", "4096\n")
        host.set("unified", g.rel, "memory.events", "high 0\nmax 0\noom 1\noom_kill 1\n")
    else:
        host.set("memory", g.rel, "memory.usage_in_bytes", "4096\n")
        host.set("memory", g.rel, "memory.oom_control",
                 "oom_kill_disable 0\nunder_oom 0\noom_kill 1\n")
    for file in ("memory.max", "memory.limit_in_bytes", "pids.max", "cpu.pressure",
                 "memory.pressure", "io.pressure"):
        host.faults.add("read", file, errno.EIO, times=2)
    s = g.sample()
    assert (s.memory_current_bytes, s.oom_kill_events) == (4096, 1)
    assert s.memory_limit_bytes is None and s.pids_limit is None and not s.pressure
    with pytest.raises(cgroups.CgroupError):
        g.stats()  # the faults are real: stats() would have read those files
    with pytest.raises(NotFound):
        _tree(host).group("nope.scope").sample()


def test_stats_of_missing_group(host: FakeHost) -> None:
    tree = _tree(host)
    with pytest.raises(NotFound):
        tree.group("nope.scope").stats()


def test_group_at_top_is_refused(host: FakeHost) -> None:
    with pytest.raises(Exception, match="top"):
        Group(host.layout(), "/")


def test_apply_again_changes_limits(host: FakeHost) -> None:
    g = _tree(host).create_group(NAME, FULL)
    g.apply(Limits(memory_max_bytes=128 << 20, pids_max=40))
    if host.layout().mode is Mode.V2:
        assert host.cg("unified", g.rel).joinpath("memory.max").read_text() == f"{128 << 20}\n"
    else:
        assert host.cg("memory", g.rel).joinpath("memory.limit_in_bytes").read_text() == \
            f"{128 << 20}\n"
    assert g.stats().pids_limit == 40


async def test_destroy_kills_waits_for_empty_reads_stats_then_removes(host: FakeHost) -> None:
    g = _tree(host).create_group(NAME, FULL)
    g.attach(31)
    if host.mode == "v2":
        host.set("unified", g.rel, "memory.events", "high 0\nmax 0\noom 1\noom_kill 1\n")
    else:
        host.set("memory", g.rel, "memory.oom_control",
                 "oom_kill_disable 0\nunder_oom 0\noom_kill 1\n")
    final = await g.destroy(timeout_s=5)
    assert final is not None and final.oom_kill_events == 1  # read before the group went
    assert ("cgroup.kill", "1") in [(p.rsplit("/", 1)[-1], v) for p, v in host.writes()]
    assert not _exists_anywhere(host, g.rel)
    assert await g.destroy() is None  # already gone: nothing to do


async def test_destroy_of_empty_group_does_not_kill(host: FakeHost) -> None:
    g = _tree(host).create_group(NAME, Limits())
    assert await g.destroy() is not None
    assert all(not p.endswith("cgroup.kill") for p, _ in host.writes())


async def test_destroy_times_out_when_the_group_never_empties(
        host: FakeHost, monkeypatch: pytest.MonkeyPatch) -> None:
    g = _tree(host).create_group(NAME, Limits())
    g.attach(31)
    monkeypatch.setattr(g, "kill", lambda timeout_s=5.0: None)  # a task stuck in D state
    with pytest.raises(Timeout):
        await g.destroy(timeout_s=0.05)
    assert g.exists()


def test_stats_skip_files_the_kernel_does_not_support(host: FakeHost) -> None:
    g = _tree(host).create_group(NAME, Limits())
    host.faults.add("read", "cpu.pressure", errno.EOPNOTSUPP)  # booted with psi=0
    assert "cpu" not in g.stats().pressure
