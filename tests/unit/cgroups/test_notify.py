"""Async notifications on a fake tree: inotify on cgroup.events / memory.events (v2) and the v1
OOM eventfd (hybrid), with counters compared against the values at start."""

from __future__ import annotations

import asyncio
import os
import re
import shutil

import pytest

from cgroups import notify
from cgroups.errors import CgroupError, Timeout
from cgroups.group import Group
from cgroups.limits import Limits
from cgroups.notify import EventKind
from cgroups.tree import Tree
from tests.unit.cgroups.fakekernel import FakeHost


def _group(host: FakeHost) -> Group:
    tree = Tree(host.layout())
    tree.ensure()
    return tree.create_group("app-a.slice/dyno-1.scope", Limits(memory_max_bytes=1 << 26))


async def test_populated_then_empty(host: FakeHost) -> None:
    g = _group(host)
    async with g.watch() as w:
        assert not w.populated
        host.set("unified", g.rel, "cgroup.events", "populated 1\nfrozen 0\n")
        assert (await w.next(2)).kind is EventKind.POPULATED
        host.set("unified", g.rel, "cgroup.events", "populated 0\nfrozen 0\n")
        event = await w.next(2)
        assert event.kind is EventKind.EMPTY
        assert event.group == g.rel and event.count == 0


async def test_wait_for_empty_returns_at_once_when_already_empty(host: FakeHost) -> None:
    g = _group(host)
    async with g.watch() as w:
        event = await w.wait_for(EventKind.EMPTY, timeout_s=0.01)
    assert event.kind is EventKind.EMPTY


async def test_next_times_out(host: FakeHost) -> None:
    g = _group(host)
    async with g.watch() as w:
        with pytest.raises(Timeout):
            await w.next(0.02)
        host.set("unified", g.rel, "cgroup.events", "populated 1\nfrozen 0\n")
        with pytest.raises(Timeout):
            await w.wait_for(EventKind.OOM_KILL, timeout_s=0.05)


async def test_v2_memory_events(v2_host: FakeHost) -> None:
    g = _group(v2_host)
    # Counts from before the watch are history, not events.
    v2_host.set("unified", g.rel, "memory.events", "high 5\nmax 0\noom 1\noom_kill 1\n")
    async with g.watch() as w:
        assert w.counters == {"oom": 1, "oom_kill": 1, "high": 5}
        v2_host.set("unified", g.rel, "memory.events", "high 9\nmax 1\noom 1\noom_kill 1\n")
        high = await w.next(2)
        assert (high.kind, high.count) == (EventKind.HIGH, 9)
        v2_host.set("unified", g.rel, "memory.events", "high 9\nmax 2\noom 2\noom_kill 3\n")
        first, second = await w.next(2), await w.next(2)
        assert (first.kind, first.count) == (EventKind.OOM, 2)
        assert (second.kind, second.count) == (EventKind.OOM_KILL, 3)
        assert second.oom_kill_events == 3


async def test_removed_group_ends_the_watch(host: FakeHost) -> None:
    g = _group(host)
    async with g.watch() as w:
        for d in g.directories().values():
            shutil.rmtree(d)
        event = await w.next(2)
        assert event.kind is EventKind.REMOVED
        with pytest.raises(CgroupError, match="closed"):
            await w.next(0.1)


async def test_watch_of_missing_group_fails_and_leaks_nothing(host: FakeHost) -> None:
    tree = Tree(host.layout())
    tree.ensure()
    notify._inotify_of(asyncio.get_running_loop())  # the loop's one instance is no leak
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(CgroupError):
        async with tree.group("nope.scope").watch():
            pass
    assert set(os.listdir("/proc/self/fd")) == before


async def test_queue_is_bounded_and_keeps_the_newest(v2_host: FakeHost) -> None:
    g = _group(v2_host)
    w = g.watch()
    w._queue = type(w._queue)(maxlen=2)
    async with w:
        for n in (1, 2, 3):
            v2_host.set("unified", g.rel, "memory.events", f"high {n}\noom 0\noom_kill 0\n")
            notify._inotify_of(asyncio.get_running_loop())._on_readable()  # one event per write
        assert [(await w.next(1)).count for _ in range(2)] == [2, 3]


async def test_hybrid_registers_oom_eventfd(hybrid_host: FakeHost) -> None:
    g = _group(hybrid_host)
    async with g.watch():
        text = (hybrid_host.cg("memory", g.rel) / "cgroup.event_control").read_text()
    assert re.fullmatch(r"\d+ \d+\n", text)


async def test_hybrid_oom_then_kill_counter_seen_by_follow_up(hybrid_host: FakeHost) -> None:
    g = _group(hybrid_host)
    async with g.watch() as w:
        os.eventfd_write(w._eventfd, 1)  # what the kernel does on OOM, before the kill
        oom = await w.next(2)
        assert (oom.kind, oom.count) == (EventKind.OOM, 1)
        hybrid_host.set("memory", g.rel, "memory.oom_control",
                        "oom_kill_disable 0\nunder_oom 0\noom_kill 1\n")
        kill = await w.wait_for(EventKind.OOM_KILL, timeout_s=2)
        assert kill.count == 1 and kill.oom_kill_events == 1


async def test_on_event_hears_each_event_as_it_is_queued(hybrid_host: FakeHost) -> None:
    g = _group(hybrid_host)
    heard: list[tuple[EventKind, int]] = []
    async with g.watch(on_event=lambda e: heard.append((e.kind, e.count))) as w:
        os.eventfd_write(w._eventfd, 1)
        hybrid_host.set("memory", g.rel, "memory.oom_control",
                        "oom_kill_disable 0\nunder_oom 0\noom_kill 1\n")
        await w.wait_for(EventKind.OOM_KILL, timeout_s=2)
    assert heard == [(EventKind.OOM, 1), (EventKind.OOM_KILL, 1)]


async def test_hybrid_eventfd_on_removal_reports_removed(hybrid_host: FakeHost) -> None:
    g = _group(hybrid_host)
    async with g.watch() as w:
        shutil.rmtree(hybrid_host.cg("memory", g.rel))
        os.eventfd_write(w._eventfd, 1)  # v1 signals every registered eventfd on rmdir
        event = await w.next(2)
        assert event.kind is EventKind.REMOVED


async def test_close_is_idempotent(host: FakeHost) -> None:
    g = _group(host)
    w = g.watch()
    w.start()
    w.close()
    w.close()


def _inotify_instances() -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:inotify"
        except OSError:
            continue
    return count


async def test_every_watch_of_a_loop_shares_one_inotify_instance(host: FakeHost) -> None:
    # fs.inotify.max_user_instances (128) counts instances per user, host-wide: an instance
    # per watch stopped a host at about a hundred dynos.
    tree = Tree(host.layout())
    tree.ensure()
    groups = [tree.create_group(f"app-a.slice/dyno-{n}.scope", Limits()) for n in range(200)]
    before = _inotify_instances()
    watches = [group.watch() for group in groups]
    for watch in watches:
        watch.start()
    try:
        assert _inotify_instances() - before <= 1
        host.set("unified", groups[7].rel, "cgroup.events", "populated 1\nfrozen 0\n")
        event = await watches[7].next(5)
        assert (event.kind, event.group) == (EventKind.POPULATED, groups[7].rel)
        assert all(not w._queue for n, w in enumerate(watches) if n != 7)
    finally:
        for watch in watches:
            watch.close()


async def test_two_watches_of_one_group_each_hear_it_and_close_apart(host: FakeHost) -> None:
    g = _group(host)
    first, second = g.watch(), g.watch()
    first.start()
    second.start()
    try:
        first.close()  # the same inotify descriptor: the other watch must keep it
        host.set("unified", g.rel, "cgroup.events", "populated 1\nfrozen 0\n")
        assert (await second.next(5)).kind is EventKind.POPULATED
    finally:
        second.close()


async def test_a_descriptor_left_by_its_last_watch_is_removed_later_unless_watched_again(
        host: FakeHost) -> None:
    g = _group(host)
    first = g.watch()
    first.start()
    [wd, *_] = first._wds
    inotify = notify._inotify_of(asyncio.get_running_loop())
    first.close()
    # No syscall at the close: a group is mostly removed right after (a mass delete).
    assert wd in inotify._retiring
    again = g.watch()
    again.start()
    try:
        assert again._wds[0] == wd and wd not in inotify._retiring  # the same file, kept
        inotify._remove_retired()
        host.set("unified", g.rel, "cgroup.events", "populated 1\nfrozen 0\n")
        assert (await again.next(5)).kind is EventKind.POPULATED
    finally:
        again.close()
    inotify._remove_retired()
    assert not inotify._retiring
    assert notify._libc.inotify_rm_watch(inotify.fd, wd) == -1  # removed by the sweep
