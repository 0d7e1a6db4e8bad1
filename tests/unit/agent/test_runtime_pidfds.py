"""The runtime holds the pidfd of each dyno's PID 1 from a real holder while the process runs:
kills go through it, it is closed once the process has exited (the agent's fds stay bounded
however many dynos come and go), and signals to the other processes of a dyno never reach a
pid that left its cgroup meanwhile."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from agent.holder.client import HolderClient, Launched
from agent.spec import DynoSpec, parse_spec
from agent.supervision.pidfds import Pidfds
from agent.supervision.records import Placement
from agent.supervision.runtime import HostRuntime, Launch, _signal_members
from tests.support.wait import async_wait_for
from tests.unit.holder.harness import ENV, HolderProc, start_holder, stop_holder

ROUNDS = 20
BATCH = 5


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def real_holder(tmp_path: Path) -> Iterator[HolderProc]:
    short = Path("/tmp") / f"dtp{os.getpid()}-{tmp_path.name[-12:]}"
    short.mkdir()
    h = HolderProc(str(short / "h.sock"), str(short / "state"))
    start_holder(h)
    try:
        yield h
    finally:
        stop_holder(h)
        subprocess.run(["rm", "-rf", str(short)], check=False)


class SleepingHolder:
    """The daemon's holder client, launching `sleep` for every dyno (the plain backend has
    no isolation to give a launch request)."""

    def __init__(self, client: HolderClient) -> None:
        self.client = client

    async def launch(self, request: Any, **_stdio: Any) -> Launched:
        return await self.client.launch({"dyno_id": request.dyno_id,
                                         "argv": ["sleep", "60"], "env": ENV})


def runtime_on(holder: Any, tmp_path: Path) -> HostRuntime:
    group = SimpleNamespace(procs_paths=lambda: ("/procs",), exists=lambda: False)
    tree = SimpleNamespace(group=lambda rel: group)
    return HostRuntime(tree=cast(Any, tree), network=cast(Any, None), uids=cast(Any, None),
                       slugs=cast(Any, None), holder=cast(Any, holder), state_dir=tmp_path,
                       run_dir=tmp_path, hide_paths=(),
                       slug_roots=cast(Any, SimpleNamespace(resolve=lambda path: path)))


def spec(dyno_id: str) -> DynoSpec:
    return parse_spec({"id": dyno_id, "app": "a", "name": "worker.1", "command": "sleep 60",
                       "release": {"version": 1, "slug": {"path": "/"}}})


def placement(dyno_id: str) -> Placement:
    return Placement(cgroup=f"app-a.slice/dyno-{dyno_id}.scope", netns=f"dyno-{dyno_id}",
                     netns_path=f"/run/netns/dyno-{dyno_id}", space="a", ip="10.1.2.3",
                     uid=0, gid=0, slug_dir="/", dyno_dir=f"/run/dynos/{dyno_id}")


@pytest.mark.timeout(60)
async def test_pidfds_of_many_dynos_are_held_while_they_run_and_closed_after(
        real_holder: HolderProc, tmp_path: Path) -> None:
    client = await HolderClient.connect(real_holder.socket, 5.0)
    try:
        runtime = runtime_on(SleepingHolder(client), tmp_path)
        env: Mapping[str, str] = {}
        before = fd_count()
        for round_ in range(ROUNDS):
            ids = [f"d{round_}-{n}" for n in range(BATCH)]
            launched = [await runtime.launch(spec(i), placement(i), env) for i in ids]
            assert len(runtime.pidfds) == BATCH
            assert all(runtime.pid_alive(p.pid, p.start_time) for p in launched)
            for dyno_id in ids:
                # The fake tree kills nothing: only the pidfd's SIGKILL ends the process.
                await runtime.kill_async(placement(dyno_id))

            async def all_closed() -> bool:
                return len(runtime.pidfds) == 0
            await async_wait_for(all_closed, 10, what="the pidfds of exited dynos closed")

            async def all_gone(launched: list[Launch] = launched) -> bool:
                # Reaped by the holder (a zombie still has its /proc entry).
                return not any(runtime.pid_alive(p.pid, p.start_time) for p in launched)
            await async_wait_for(all_gone, 10, what="the dynos' processes reaped")
            # The holder's answers and exits: a few fds of slack, never one per dyno.
            assert fd_count() <= before + 3, (round_, fd_count(), before)
    finally:
        client.close()


async def test_a_held_pid_with_another_start_time_is_another_process(tmp_path: Path) -> None:
    proc = subprocess.Popen(["sleep", "60"])  # noqa: ASYNC220 - a fork, nothing awaited
    try:
        pidfds = Pidfds()
        pidfds.hold("d", proc.pid, 111, os.pidfd_open(proc.pid))
        assert pidfds.alive(proc.pid, 111) is True
        assert pidfds.alive(proc.pid, 222) is False  # the recorded process is gone
        assert pidfds.alive(proc.pid + 1_000_000, 1) is None  # not held: ask /proc
        assert pidfds.signal("d", signal.SIGKILL) == 1
        proc.wait(5)

        async def closed() -> bool:
            return len(pidfds) == 0
        await async_wait_for(closed, 5, what="the pidfd closed on exit")
        assert pidfds.signal("d", signal.SIGKILL) == 0
    finally:
        proc.kill()
        proc.wait()


def test_a_process_that_left_the_cgroup_before_the_signal_is_not_signalled() -> None:
    reaper, member, gone = (subprocess.Popen(["sleep", "60"]) for _ in range(3))
    try:
        listings = [[reaper.pid, member.pid, gone.pid], [reaper.pid, member.pid]]
        group = SimpleNamespace(rel="g", pids=lambda: listings.pop(0))
        count = _signal_members(cast(Any, group), signal.SIGTERM, frozenset({reaper.pid}))
        assert count == 1
        assert member.wait(5) == -signal.SIGTERM
        # Listed first, but not any more once pinned: its pid may be another's by now.
        assert reaper.poll() is None and gone.poll() is None
    finally:
        for proc in (reaper, member, gone):
            proc.kill()
            proc.wait()


async def test_the_sync_kill_never_blocks_and_a_launch_waits_for_it(tmp_path: Path) -> None:
    started = asyncio.Event()
    release = asyncio.Event()
    loop = asyncio.get_running_loop()

    def slow_kill() -> None:
        loop.call_soon_threadsafe(started.set)
        asyncio.run_coroutine_threadsafe(release.wait(), loop).result(5)

    group = SimpleNamespace(procs_paths=lambda: ("/procs",), exists=lambda: True,
                            kill=slow_kill)
    runtime = runtime_on(None, tmp_path)
    runtime.tree = cast(Any, SimpleNamespace(group=lambda rel: group))
    runtime.kill(placement("d"))  # returns at once: the cgroup's kill runs on a thread
    await asyncio.wait_for(started.wait(), 5)
    waiting = asyncio.ensure_future(runtime._kills_done(placement("d")))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    release.set()
    await asyncio.wait_for(waiting, 5)


async def test_a_dyno_is_not_empty_while_a_kill_of_its_cgroup_is_under_way(
        tmp_path: Path) -> None:
    """A kill's thread may still be writing cgroup.kill (or signalling pid by pid) after
    the cgroup emptied: until it is done, the next process launched there would go too."""
    release = threading.Event()
    group = SimpleNamespace(procs_paths=lambda: ("/procs",), exists=lambda: True,
                            populated=lambda: False, kill=lambda: release.wait(5))
    runtime = runtime_on(None, tmp_path)
    runtime.tree = cast(Any, SimpleNamespace(group=lambda rel: group))
    runtime.kill(placement("k1"))
    assert not runtime.emptied(placement("k1"))
    waiting = asyncio.create_task(runtime.wait_empty(placement("k1"), 5))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    release.set()
    assert await asyncio.wait_for(waiting, 5)
    assert runtime.emptied(placement("k1"))
