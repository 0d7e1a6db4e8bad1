"""cgroups.listens on the real kernel: a process of a watched group that starts to listen is
heard at once, with its port; other groups are not heard; a closed watch hears nothing more
and leaves no program attached; a program left by a watcher that died is detached by the next
watch of its group."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cgroups import Limits, Tree
from cgroups.listens import ListenWatch, ListenWatchUnavailable, attached_listen_programs
from tests.privileged.cgroups.conftest import spawn

ROOT = Path(__file__).resolve().parents[3]

# Listens on an ephemeral port after reading a line, prints the port, then waits.
LISTENER = """\
import socket, sys
sys.stdin.readline()
s = socket.socket(socket.AF_INET6)
s.bind(("::1", 0))
s.listen()
print(s.getsockname()[1], flush=True)
sys.stdin.readline()
"""


def _unified_dir(tree: Tree, rel: str) -> str:
    return str(tree.layout.unified.fs.path(tree.group(rel).rel))


async def _listen_in(tree: Tree, rel: str) -> tuple[int, float]:
    """(port, monotonic time just after listen returned) of a listener started in `rel`."""
    proc = spawn(tree.group(rel), [sys.executable, "-c", LISTENER], stdin=-1, stdout=-1)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        line = await asyncio.to_thread(proc.stdout.readline)
        return int(line), time.monotonic()
    finally:
        proc.stdin.close()
        proc.wait(10)
        proc.stdout.close()


async def test_a_listen_in_the_group_is_heard_with_its_port_and_no_other(tree: Tree) -> None:
    tree.create_group("app-l.slice/web.scope", Limits(pids_max=20))
    tree.create_group("app-l.slice/other.scope", Limits(pids_max=20))
    watch = ListenWatch()
    heard: list[tuple[int, float]] = []
    try:
        listens = watch.watch(_unified_dir(tree, "app-l.slice/web.scope"),
                              lambda port: heard.append((port, time.monotonic())))
    except ListenWatchUnavailable as exc:
        pytest.skip(f"needs BPF sock_ops programs on cgroup v2 (CAP_BPF): {exc}")
    try:
        other_port, _ = await _listen_in(tree, "app-l.slice/other.scope")
        port, listened_at = await _listen_in(tree, "app-l.slice/web.scope")
        await asyncio.sleep(0.05)  # any event of the other group would be in by now
        assert [p for p, _ in heard] == [port]
        assert other_port != port
        # Heard on the loop within milliseconds of listen(2), not at a polling interval.
        assert heard[0][1] - listened_at < 0.5
    finally:
        listens.close()
    # Closed: detached, and the ring buffer is gone with the last watch.
    await _listen_in(tree, "app-l.slice/web.scope")
    await asyncio.sleep(0.05)
    assert len(heard) == 1
    assert watch._ring_fd == -1


async def test_watches_of_many_groups_tell_them_apart(tree: Tree) -> None:
    watch = ListenWatch()
    heard: dict[str, list[int]] = {}
    opened = []
    try:
        for n in range(3):
            rel = f"app-l.slice/web{n}.scope"
            tree.create_group(rel, Limits(pids_max=20))
            try:
                opened.append(watch.watch(_unified_dir(tree, rel),
                                          lambda port, rel=rel: heard.setdefault(rel, [])
                                          .append(port)))
            except ListenWatchUnavailable as exc:
                pytest.skip(f"needs BPF sock_ops programs on cgroup v2 (CAP_BPF): {exc}")
        ports = {}
        for n in (2, 0, 1):
            rel = f"app-l.slice/web{n}.scope"
            ports[rel] = [(await _listen_in(tree, rel))[0]]
        await asyncio.sleep(0.05)
        assert heard == ports
    finally:
        for one in opened:
            one.close()


# Attaches a watch to the group named in argv, says so, and dies without closing it, as an
# agent killed while its web dyno booted does.
WATCH_AND_DIE = """\
import asyncio, os, sys
from cgroups.listens import ListenWatch

async def main():
    ListenWatch().watch(sys.argv[1], lambda port: None)
    print("attached", flush=True)
    os._exit(0)

asyncio.run(main())
"""


def _listen_programs(unified_dir: str) -> int:
    fd = os.open(unified_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        programs = attached_listen_programs(fd)
        for program in programs:
            os.close(program)
        return len(programs)
    finally:
        os.close(fd)


async def test_a_program_left_by_a_killed_watcher_is_detached_by_the_next_watch(
        tree: Tree) -> None:
    rel = "app-l.slice/web-again.scope"
    tree.create_group(rel, Limits(pids_max=20))
    unified = _unified_dir(tree, rel)
    dead = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", WATCH_AND_DIE, unified], capture_output=True,
        text=True, timeout=30, check=False, cwd=ROOT)
    if "attached" not in dead.stdout:
        if "ListenWatchUnavailable" in dead.stderr:
            pytest.skip(f"needs BPF sock_ops programs on cgroup v2 (CAP_BPF): {dead.stderr}")
        pytest.fail(f"the watcher did not attach: {dead.stderr}")
    assert _listen_programs(unified) == 1  # its watcher is gone; the program is not
    heard: list[int] = []
    listens = ListenWatch().watch(unified, heard.append)
    try:
        assert _listen_programs(unified) == 1  # this watch's own, and nothing else
        port, _ = await _listen_in(tree, rel)
        await asyncio.sleep(0.05)
        assert heard == [port]
    finally:
        listens.close()
    assert _listen_programs(unified) == 0
