"""cgroups on the real kernel, in whatever mode this host has (hybrid here, pure v2 in the VM):
OOM kill + notification, pids.max, CPU max, whole-group kill, removal, adoption listing."""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.sizes import Size
from agent.supervision.runtime import dyno_limits
from cgroups import (
    CgroupFS,
    EventKind,
    Group,
    Limits,
    Mode,
    NotEmpty,
    NotFound,
    Tree,
    detect,
)
from tests.privileged.cgroups.conftest import leftovers, spawn, teardown_tree
from tests.support.names import unique
from tests.support.wait import async_wait_for, wait_for

MiB = 1 << 20
PY = sys.executable


def _reap(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)


async def test_oom_kill_over_64mib_is_notified_within_1s(tree: Tree) -> None:
    group = tree.create_group("app-t.slice/oom.scope", Limits(memory_max_bytes=64 * MiB))
    hog = ("b = bytearray(256 << 20)\n"
           "for i in range(0, len(b), 4096): b[i] = 1\n")
    async with group.watch() as watch:
        proc = spawn(group, [PY, "-c", hog])
        try:
            status = await asyncio.to_thread(proc.wait, 30)
            exited_at = time.monotonic()
            event = await watch.wait_for(EventKind.OOM_KILL, timeout_s=5)
        finally:
            _reap(proc)
    assert status == -signal.SIGKILL
    # Negative when the notification beat our own wait() on the child.
    lag_s = event.at_monotonic - exited_at
    print(f"oom_kill notification at {lag_s * 1000:+.1f} ms relative to the observed exit "
          f"(mode {tree.layout.mode.value})")
    assert lag_s < 1.0
    assert event.count >= 1
    stats = group.stats()
    assert stats.oom_kill_events is not None and stats.oom_kill_events >= 1
    assert stats.memory_peak_bytes is None or stats.memory_peak_bytes <= 64 * MiB


def test_fork_loop_under_pids_max_20_gets_eagain(tree: Tree) -> None:
    group = tree.create_group("app-t.slice/pids.scope", Limits(pids_max=20))
    script = (
        "import os, time\n"
        "kids = []\n"
        "try:\n"
        "    while len(kids) < 1000:\n"
        "        pid = os.fork()\n"
        "        if pid == 0:\n"
        "            time.sleep(60); os._exit(0)\n"
        "        kids.append(pid)\n"
        "    print('no-limit', len(kids), flush=True)\n"
        "except OSError as e:\n"
        "    print(e.errno, len(kids), flush=True)\n"
        "for k in kids: os.kill(k, 9)\n"
        "for k in kids: os.waitpid(k, 0)\n")
    proc = spawn(group, [PY, "-c", script], stdout=subprocess.PIPE)
    try:
        out, _ = proc.communicate(timeout=60)
    finally:
        _reap(proc)
    code, count = out.decode().split()
    assert int(code) == errno.EAGAIN
    # 20 tasks: the parent and 19 children.
    assert int(count) == 19
    assert group.stats().pids_limit == 20


def test_busy_loop_under_20_percent_cpu_max(tree: Tree) -> None:
    group = tree.create_group("app-t.slice/cpu.scope",
                              Limits(cpu_weight=10_000, cpu_max_cpus=0.2))
    _favour(tree, [tree.root, f"{tree.root}/app-t.slice"])
    proc = spawn(group, [PY, "-c", "while True: pass"])
    try:
        wait_for(lambda: group.pids(), timeout_s=5, what="busy loop in the group")
        before = group.stats()
        t0 = time.monotonic()
        # The measurement interval itself (not a wait for a condition).
        time.sleep(3)
        after = group.stats()
        wall_usec = (time.monotonic() - t0) * 1e6
    finally:
        _reap(proc)
    assert before.cpu_usage_usec is not None and after.cpu_usage_usec is not None
    share = (after.cpu_usage_usec - before.cpu_usage_usec) / wall_usec
    print(f"busy loop under cpu max 0.2: {share * 100:.1f}% of a CPU over 3 s "
          f"(mode {tree.layout.mode.value})")
    assert 0.15 <= share <= 0.25
    assert after.cpu_nr_throttled is not None and after.cpu_nr_throttled > 0


def _favour(tree: Tree, parents: list[str]) -> None:
    """Top CPU weight on the test's ancestors, so other work on a loaded machine cannot push
    the busy loop below its 20% cap: the test measures the cap, not the host's contention."""
    cpu = tree.layout.hierarchy_for("cpu").fs
    for rel in parents:
        if tree.layout.mode is Mode.V2:
            cpu.write(rel, "cpu.weight", "10000")
        else:
            cpu.write(rel, "cpu.shares", "262144")


async def _kill_fifty(tree: Tree, group: Group) -> float:
    proc = spawn(group, ["/bin/sh", "-c", "for i in $(seq 50); do sleep 300 & done; wait"])
    try:
        await async_wait_for(lambda: _count(group, 51), timeout_s=10,
                             what="51 processes in the group")
        async with group.watch() as watch:
            assert watch.populated
            t0 = time.monotonic()
            await asyncio.to_thread(group.kill)
            event = await watch.wait_for(EventKind.EMPTY, timeout_s=5)
            elapsed = event.at_monotonic - t0
        assert group.pids() == []
        assert not group.populated()
    finally:
        _reap(proc)
    await group.remove_async(timeout_s=5)
    assert not group.exists()
    return elapsed


async def _count(group: Group, n: int) -> bool:
    return len(group.pids()) >= n


async def test_kill_empties_a_group_of_50_and_empty_is_notified(tree: Tree) -> None:
    group = tree.create_group("app-t.slice/kill.scope", Limits(pids_max=100))
    elapsed = await _kill_fifty(tree, group)
    print(f"cgroup.kill of 51 processes -> EMPTY in {elapsed * 1000:.1f} ms")


class NoKillFS(CgroupFS):
    """The unified tree as an older kernel (< 5.14) shows it: no cgroup.kill."""

    def exists(self, rel: str, file: str | None = None) -> bool:
        return file != "cgroup.kill" and super().exists(rel, file)


async def test_kill_fallback_freeze_kill_thaw_empties_50(tree: Tree) -> None:
    unified = tree.layout.unified.fs.mount
    layout = detect(root_name=tree.layout.root, use_delegation=False,
                    fs_factory=lambda mount: NoKillFS(mount) if mount == unified
                    else CgroupFS(mount))
    assert isinstance(layout.unified.fs, NoKillFS)
    group = Tree(layout).create_group("app-t.slice/fallback.scope", Limits(pids_max=100))
    elapsed = await _kill_fifty(tree, group)
    assert group.layout.unified.fs.exists("", "cgroup.kill") is False
    print(f"freeze/kill/thaw of 51 processes -> EMPTY in {elapsed * 1000:.1f} ms")


def test_remove_refuses_a_populated_group_and_attach_reaches_every_hierarchy(
        tree: Tree) -> None:
    group = tree.create_group("app-t.slice/busy.scope", Limits(memory_max_bytes=64 * MiB))
    proc = subprocess.Popen(["sleep", "60"])
    try:
        group.attach(proc.pid)
        membership = Path(f"/proc/{proc.pid}/cgroup").read_text()
        lines = membership.splitlines()
        assert any(line.startswith("0::") and line.endswith("/" + group.rel) for line in lines)
        if tree.layout.mode is Mode.HYBRID:
            for h in tree.layout.v1:
                controller = sorted(h.controllers)[0]
                assert any(controller in line.split(":")[1].split(",")
                           and line.endswith("/" + group.rel) for line in lines), controller
        with pytest.raises(NotEmpty):
            group.remove(timeout_s=0.1)
        assert group.exists()
    finally:
        _reap(proc)
    group.remove(timeout_s=5)


async def test_oom_kill_of_a_child_takes_the_group_on_v2_and_only_the_child_on_v1(
        tree: Tree) -> None:
    """What the kernel does when a process that is not the group's first one is the hog: on
    v2 memory.oom.group (set by the limits plan) ends every process of the group; a v1
    hierarchy has no such file and kills only the victim, which is why the agent kills the
    rest of a dyno itself when it hears of the kill (tests/e2e/test_memory_kill.py)."""
    group = tree.create_group("app-t.slice/oomgroup.scope", Limits(memory_max_bytes=64 * MiB))
    parent = ("import subprocess, sys, time\n"
              "hog = subprocess.Popen([sys.executable, '-c', 'b = bytearray(256 << 20)\\n"
              "for i in range(0, len(b), 4096): b[i] = 1\\n'])\n"
              "print(hog.wait(), flush=True)\n"
              "time.sleep(60)\n")
    async with group.watch() as watch:
        proc = spawn(group, [PY, "-c", parent], stdout=subprocess.PIPE)
        try:
            await watch.wait_for(EventKind.OOM_KILL, timeout_s=30)
            if tree.layout.mode is Mode.V2:
                status = await asyncio.to_thread(proc.wait, 10)
                assert status == -signal.SIGKILL, "the small parent died with its child"
                await watch.wait_for(EventKind.EMPTY, timeout_s=10)
            else:
                assert proc.stdout is not None
                line = await asyncio.to_thread(proc.stdout.readline)
                assert line.strip() == str(-signal.SIGKILL).encode(), line
                assert proc.poll() is None, "v1 killed only the hog; its parent runs on"
                assert group.populated()
        finally:
            _reap(proc)
            if proc.stdout is not None:
                proc.stdout.close()
    group.remove(timeout_s=5)


async def test_a_dyno_past_its_quota_reaches_the_kill_point_and_is_killed(tree: Tree) -> None:
    """The limits the agent gives a dyno (agent.runtime.dyno_limits; here a 32 MiB quota,
    killed at 2x): a hog that goes on allocating must reach the kill point and be OOM-killed
    promptly, in every mode. Over the quota a dyno runs on (R14); at the kill point it ends
    (R15); it must never be held in between. (With memory.high at the quota, v2 throttled
    such a hog for the whole 60 s without killing it: there is no swap to reclaim into.)"""
    size = Size("t", 32 * MiB, 64, 100, None, 2.0)
    group = tree.create_group("app-t.slice/oomhigh.scope", dyno_limits(size, tree.layout.mode))
    hog = ("b = bytearray(256 << 20)\n"
           "for i in range(0, len(b), 4096): b[i] = 1\n")
    async with group.watch() as watch:
        started = time.monotonic()
        proc = spawn(group, [PY, "-c", hog])
        try:
            status = await asyncio.to_thread(proc.wait, 60)
            took_s = time.monotonic() - started
            await watch.wait_for(EventKind.OOM_KILL, timeout_s=5)
        finally:
            _reap(proc)
    print(f"hog OOM-killed after {took_s:.2f} s (mode {tree.layout.mode.value})")
    assert status == -signal.SIGKILL
    assert group.stats().memory_limit_bytes == 64 * MiB
    group.remove(timeout_s=5)


def test_stats_and_limits_read_back(tree: Tree) -> None:
    limits = Limits(memory_high_bytes=48 * MiB, memory_max_bytes=64 * MiB, cpu_weight=200,
                    cpu_max_cpus=0.5, pids_max=33)
    group = tree.create_group("app-t.slice/stats.scope", limits)
    proc = spawn(group, ["sleep", "60"])
    try:
        wait_for(lambda: group.pids(), timeout_s=5, what="sleep in group")
        stats = group.stats()
    finally:
        _reap(proc)
    assert stats.memory_limit_bytes == 64 * MiB
    assert stats.pids_limit == 33
    assert stats.pids_current == 1
    assert stats.memory_current_bytes is not None
    assert stats.cpu_usage_usec is not None
    assert "cpu" in stats.pressure or not Path("/proc/pressure").exists()
    if tree.layout.mode is Mode.V2:
        fs = tree.layout.unified.fs
        assert fs.read(group.rel, "memory.high").strip() == str(48 * MiB)
        assert fs.read(group.rel, "cpu.max").split() == ["50000", "100000"]
        assert fs.read(group.rel, "memory.oom.group").strip() == "1"
    else:
        cpu = tree.layout.hierarchy_for("cpu").fs
        assert cpu.read(group.rel, "cpu.cfs_quota_us").strip() == "50000"
        assert cpu.read(group.rel, "cpu.shares").strip() == "2048"


def test_list_sweep_and_nothing_left_under_the_root() -> None:
    layout = detect(root_name=unique("dt", 8), use_delegation=False)
    tree = Tree(layout)
    tree.ensure()
    try:
        for i in range(3):
            tree.create_group(f"app-a.slice/d{i}.scope", Limits(pids_max=10))
        tree.create_group("app-b.slice/d9.scope", Limits())
        assert tree.list_groups(".scope") == [
            "app-a.slice/d0.scope", "app-a.slice/d1.scope", "app-a.slice/d2.scope",
            "app-b.slice/d9.scope"]
        proc = spawn(tree.group("app-a.slice/d1.scope"), ["sleep", "60"])
        try:
            wait_for(lambda: tree.group("app-a.slice/d1.scope").pids(), timeout_s=5,
                     what="sleep in d1")
            removed = tree.sweep_empty()
            # The populated group and its parent stay; everything else went.
            assert tree.list_groups() == ["app-a.slice/d1.scope"]
            assert "app-b.slice" in removed and "app-a.slice/d0.scope" in removed
        finally:
            _reap(proc)
    finally:
        teardown_tree(tree)
    assert leftovers(layout) == []


def test_group_removed_right_after_its_process_exits(tree: Tree) -> None:
    # A group whose process we started and that exits by itself: removal right after exit
    # only ever sees the transient EBUSY, which remove() retries.
    group = tree.create_group("app-t.slice/exit.scope", Limits())
    proc = spawn(group, ["/bin/true"])
    assert proc.wait(timeout=10) == 0
    wait_for(lambda: not group.populated(), timeout_s=5, what="group empty after exit")
    group.remove(timeout_s=5)
    assert not group.exists()
    assert os.path.exists(tree.layout.unified.fs.path(tree.root))


async def test_memory_high_breach_is_notified(tree: Tree) -> None:
    if tree.layout.mode is not Mode.V2:
        pytest.skip("needs cgroup v2 memory.high (v1 has no high limit; the VM tier runs this)")
    group = tree.create_group("app-t.slice/high.scope",
                              Limits(memory_high_bytes=16 * MiB, memory_max_bytes=256 * MiB))
    # A modest overage: without swap, anon memory over memory.high can only be throttled, and
    # the throttling grows with the overage (up to 2 s per allocation in the kernel). 20 MiB
    # on its own, whatever the interpreter's own size (12 MiB and a Python that started
    # without importing pathlib stayed under the limit, its file pages reclaimed).
    grow = ("b = bytearray(20 << 20)\n"
            "for i in range(0, len(b), 4096): b[i] = 1\n")
    async with group.watch() as watch:
        proc = spawn(group, [PY, "-c", grow])
        try:
            event = await watch.wait_for(EventKind.HIGH, timeout_s=30)
            status = await asyncio.to_thread(proc.wait, 60)
        finally:
            _reap(proc)
    assert event.count >= 1
    assert status == 0  # over the quota is throttled and reclaimed, not killed
    stats = group.stats()
    assert stats.high_events is not None and stats.high_events >= event.count
    assert stats.oom_kill_events == 0


async def test_destroy_of_a_running_group_of_20(tree: Tree) -> None:
    group = tree.create_group("app-t.slice/destroy.scope", Limits(memory_max_bytes=64 * MiB))
    proc = spawn(group, ["/bin/sh", "-c", "for i in $(seq 20); do sleep 300 & done; wait"])
    try:
        await async_wait_for(lambda: _count(group, 21), timeout_s=10,
                             what="21 processes in the group")
        t0 = time.monotonic()
        final = await group.destroy(timeout_s=10)
        elapsed = time.monotonic() - t0
    finally:
        _reap(proc)
    print(f"destroy (kill, EMPTY, stats, rmdir) of 21 processes: {elapsed * 1000:.1f} ms")
    assert final is not None and final.memory_limit_bytes == 64 * MiB
    assert not group.exists()
    assert all(not h.fs.exists(group.rel) for h in tree.layout.hierarchies)


def test_sample_files_follow_the_kernel_and_answer_not_found_once_removed(tree: Tree) -> None:
    """SampleFiles (a sample through fds kept open, one pread each) reads what sample() reads,
    sees memory charged after it was opened, and answers NotFound (ENODEV) once the group is
    removed: the kernel formats a control file afresh on each read from offset 0."""
    group = tree.create_group("app-t.slice/sampled.scope", Limits(memory_max_bytes=256 * MiB))
    files = group.sample_files()
    try:
        idle = files.read()
        assert idle.memory_current_bytes == group.sample().memory_current_bytes
        proc = spawn(group, [PY, "-c", "import time; b = b\"x\" * (48 << 20); "
                             "print(flush=True); time.sleep(60)"], stdout=subprocess.PIPE)
        try:
            assert proc.stdout is not None and proc.stdout.readline() == b"\n"
            busy = files.read()
            plain = group.sample()
            assert busy.pids_current == plain.pids_current == 1
            assert busy.memory_rss_bytes is not None and busy.memory_rss_bytes >= 40 * MiB
            assert abs(busy.memory_rss_bytes - (plain.memory_rss_bytes or 0)) < 8 * MiB
            assert busy.cpu_usage_usec is not None
        finally:
            _reap(proc)
            if proc.stdout is not None:
                proc.stdout.close()
        wait_for(lambda: not group.populated(), timeout_s=5, what="group empty")
        group.remove(timeout_s=5)
        with pytest.raises(NotFound):
            files.read()
    finally:
        files.close()
