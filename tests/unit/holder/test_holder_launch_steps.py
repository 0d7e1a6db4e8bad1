"""Launches in steps: while one launch's child sets itself up, the holder serves the others;
a launch that never finishes times out with its child killed; an exit reaped before its
launch ended is still reported; a `list` includes every launch asked for before it; a
child forked in a later step still has its stdio."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from agent.holder.client import HolderClient
from agent.holder.errors import LaunchFailed
from tests.support.wait import async_wait_for
from tests.unit.holder.harness import (
    ENV,
    HolderProc,
    collect,
    exits_of,
    lines_of,
    start_holder,
    stop_holder,
)


class GatedHolder(HolderProc):
    def argv(self, *extra: str) -> list[str]:
        return [sys.executable, "-m", "tests.unit.holder.gated_backend", *super().argv(*extra)[3:]]


@pytest.fixture
def gated_holder(short_dir: str) -> Iterator[GatedHolder]:
    h = GatedHolder(os.path.join(short_dir, "g.sock"), os.path.join(short_dir, "g-state"))
    start_holder(h)
    yield h
    stop_holder(h)


@pytest.fixture
async def gated(gated_holder: GatedHolder,
                short_dir: str) -> AsyncIterator[tuple[HolderClient, Path]]:
    client = await HolderClient.connect(gated_holder.socket, 5.0)
    await client.subscribe()
    yield client, Path(short_dir)
    client.close()


def _fifo(directory: Path, name: str) -> Path:
    path = directory / name
    os.mkfifo(path)
    return path


async def _open_gate(path: Path) -> None:
    def write() -> None:
        with open(path, "wb") as f:
            f.write(b"x")
    await asyncio.to_thread(write)


def _params(dyno_id: str, script: str, **extra: object) -> dict[str, object]:
    return {"dyno_id": dyno_id, "argv": ["sh", "-c", script], "env": ENV, **extra}


async def test_a_slow_launch_does_not_hold_up_the_others(
        gated: tuple[HolderClient, Path]) -> None:
    client, tmp = gated
    gate = _fifo(tmp, "gate")
    slow = asyncio.ensure_future(client.launch(_params("d-slow", "exec sleep 60",
                                                       gate=str(gate))))
    await asyncio.sleep(0.2)
    assert not slow.done()
    # Answered while the slow one's child still waits at its gate.
    quick = await asyncio.wait_for(client.launch(_params("d-quick", "exec sleep 60")), 5)
    assert not slow.done()
    await _open_gate(gate)
    launched = await asyncio.wait_for(slow, 5)
    assert launched.pid != quick.pid
    for one in (quick, launched):
        os.close(one.pidfd)


async def test_a_launch_past_its_deadline_fails_and_its_child_is_killed(
        gated: tuple[HolderClient, Path]) -> None:
    client, tmp = gated
    gate = _fifo(tmp, "never")
    pid_file = tmp / "pid"
    began = time.monotonic()
    # The child writes its pid, then waits at a gate nobody opens.
    with pytest.raises(LaunchFailed, match="did not exec"):
        await asyncio.wait_for(client.launch(_params(
            "d-stuck", "true", gate=str(gate), timeout_s=0.5,
            argv=["sh", "-c", f"echo $$ > {pid_file}; exec cat {gate}"])), 5)
    assert time.monotonic() - began < 3
    # (The gate is read by the child before exec, so it never got to run the script.)
    assert not pid_file.exists()
    # The holder serves on, and the dyno id is free again.
    launched = await client.launch(_params("d-stuck", "exec sleep 60"))
    os.close(launched.pidfd)


async def test_an_exit_reaped_before_its_launch_ended_is_reported(
        gated: tuple[HolderClient, Path]) -> None:
    client, tmp = gated
    resume = _fifo(tmp, "resume")
    pid_file = tmp / "pid"
    launching = asyncio.ensure_future(client.launch(_params(
        "d-brief", f"echo $$ > {pid_file}; echo bye; exit 7", resume=str(resume))))
    # The dyno has run and exited, and the holder has reaped it (no zombie left), while its
    # launch still waits.
    async def written() -> bool:
        return pid_file.exists() and pid_file.read_text().strip() != ""

    await async_wait_for(written, 5)
    pid = int(pid_file.read_text())

    async def reaped() -> bool:
        return not await asyncio.to_thread(os.path.exists, f"/proc/{pid}")

    await async_wait_for(reaped, 5)
    assert not launching.done()
    await _open_gate(resume)
    launched = await asyncio.wait_for(launching, 5)
    assert launched.pid == pid
    os.close(launched.pidfd)
    events = await collect(client, lambda got: bool(exits_of(got)))
    (exit_event,) = exits_of(events)
    assert (exit_event.dyno_id, exit_event.status) == ("d-brief", 7)
    held = {p.dyno_id: p for p in await client.list_processes()}
    assert not held["d-brief"].running and held["d-brief"].status == 7


async def test_a_list_waits_for_the_launches_asked_for_before_it(
        gated: tuple[HolderClient, Path]) -> None:
    client, tmp = gated
    gate = _fifo(tmp, "gate")
    launching = asyncio.ensure_future(client.launch(_params("d-late", "exec sleep 60",
                                                            gate=str(gate))))
    await asyncio.sleep(0.2)
    listing = asyncio.ensure_future(client.list_processes())
    await asyncio.sleep(0.3)
    assert not listing.done()
    await _open_gate(gate)
    procs = await asyncio.wait_for(listing, 5)
    assert [(p.dyno_id, p.running) for p in procs] == [("d-late", True)]
    os.close((await launching).pidfd)


async def test_a_child_forked_in_a_later_step_still_has_its_stdio(
        gated: tuple[HolderClient, Path]) -> None:
    # Before its fix: the holder closed the output pipe's write end (and the caller's stdin)
    # right after the first step, so a child forked again later (the launcher does, when the
    # kernel kills a child cloned into a once-killed cgroup at birth) had no stdout: its
    # first line failed and a Python app exited 120.
    client, _tmp = gated
    stdin_r, stdin_w = os.pipe()
    try:
        os.write(stdin_w, b"from stdin\n")
        os.close(stdin_w)
        stdin_w = -1
        launched = await client.launch(_params("d-refork", "read line; echo \"got $line\"",
                                               refork=True), stdin=stdin_r)
    finally:
        os.close(stdin_r)
        if stdin_w >= 0:
            os.close(stdin_w)
    os.close(launched.pidfd)
    events = await collect(client, lambda got: bool(exits_of(got)))
    assert lines_of(events, "d-refork") == [b"got from stdin"]
    assert [e.status for e in exits_of(events)] == [0]


async def test_a_child_no_step_named_is_held_all_the_same(
        gated: tuple[HolderClient, Path]) -> None:
    """The child forked again after one killed at birth may have exec'd before its report
    is first read: the launch ends in the step that forked it, and no step named it. The
    holder still holds it (it failed such a launch: "launch returned pid N, not its child
    M", and a dyno crashed for it)."""
    client, _tmp = gated
    launched = await client.launch(_params("d-unseen", "echo unseen", refork=True,
                                           unseen=True))
    os.close(launched.pidfd)
    events = await collect(client, lambda got: bool(exits_of(got)))
    assert lines_of(events, "d-unseen") == [b"unseen"]
    assert [e.status for e in exits_of(events)] == [0]
