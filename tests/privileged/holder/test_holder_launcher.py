"""The holder with the real launcher: isolated dynos started, captured and entered through it."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest

from agent.holder.client import HolderClient, OutputEvent
from tests.privileged.holder.conftest import TINI
from tests.unit.holder.harness import HolderProc, collect, exits_of, lines_of

pytestmark = pytest.mark.skipif(not os.path.exists(TINI), reason=f"needs tini at {TINI}")


async def test_isolated_launch_output_and_exit(isolated_holder: HolderProc,
                                               request_factory: Callable[..., dict[str, Any]]
                                               ) -> None:
    req = request_factory("id -u; hostname; echo to-stderr >&2; ps -eo comm= | sort; exit 4")
    async with await HolderClient.connect(isolated_holder.socket) as client:
        await client.subscribe()
        launched = await client.launch(req)
        os.close(launched.pidfd)
        assert {"fork", "mounts"} <= set(launched.timings_ms)
        events = await collect(client, lambda ev: bool(exits_of(ev)), timeout_s=30)
    lines = [x.decode() for x in lines_of(events)]
    assert lines[0] == str(req["uid"]) != "0"
    assert lines[1] == req["hostname"]
    assert lines[2] == "to-stderr"
    assert lines[3:] == ["ps", "sh", "sort", "tini"], "only the dyno's processes"
    [exit_event] = exits_of(events)
    assert (exit_event.pid, exit_event.status) == (launched.pid, 4)


async def test_dyno_outlives_its_client_and_nothing_is_lost(
        isolated_holder: HolderProc, request_factory: Callable[..., dict[str, Any]]) -> None:
    req = request_factory("i=0; while :; do echo n$i; i=$((i+1)); sleep 0.01; done")
    first = await HolderClient.connect(isolated_holder.socket)
    await first.subscribe()
    launched = await first.launch(req)
    early = await collect(first, lambda ev: len(lines_of(ev)) >= 5, timeout_s=30)
    first.close()  # the daemon goes away mid-stream
    await asyncio.sleep(0.3)  # the dyno keeps printing into the holder's buffer meanwhile
    second = await HolderClient.connect(isolated_holder.socket)
    try:
        await second.subscribe()
        began = time.monotonic()
        later = await collect(second, lambda ev: len(lines_of(ev)) >= 40, timeout_s=30)
        signal.pidfd_send_signal(launched.pidfd, signal.SIGKILL)
        os.close(launched.pidfd)
        tail = await collect(second, lambda ev: bool(exits_of(ev)), timeout_s=30)
    finally:
        second.close()
    outputs = [e for e in later if isinstance(e, OutputEvent)]
    assert outputs[0].seq <= len(lines_of(early)), "resumes at the first unacked line"
    assert all(e.dropped == 0 for e in outputs)
    numbers = [int(x[1:]) for x in lines_of(later) + lines_of(tail)]
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers))), "no gap, no repeat"
    assert time.monotonic() - began < 30
    [exit_event] = exits_of(tail)
    assert (exit_event.status, exit_event.signal) == (137, 9)


async def test_enter_a_running_isolated_dyno(isolated_holder: HolderProc,
                                             request_factory: Callable[..., dict[str, Any]]
                                             ) -> None:
    req = request_factory("echo ready; exec sleep 60")
    r, w = os.pipe()
    null = os.open(os.devnull, os.O_RDONLY)
    async with await HolderClient.connect(isolated_holder.socket) as client:
        await client.subscribe()
        launched = await client.launch(req)
        try:
            await collect(client, lambda ev: lines_of(ev) == [b"ready"], timeout_s=30)
            entered = await client.enter(
                req["dyno_id"], ["sh", "-c", "hostname; id -u; exit 6"],
                [("PATH", "/usr/bin:/bin")], req["uid"], req["gid"], "/app",
                req["cgroup_procs"], (null, w, w))
            os.close(w)
            w = -1
            out = await asyncio.to_thread(_read_all, r)
            assert out.decode().split() == [req["hostname"], str(req["uid"])]
            exits = exits_of(await collect(client, lambda ev: bool(exits_of(ev)), 30))
            assert [(e.kind, e.pid, e.status) for e in exits] == [("enter", entered.pid, 6)]
            os.close(entered.pidfd)
        finally:
            os.close(r)
            os.close(null)
            if w >= 0:
                os.close(w)
            signal.pidfd_send_signal(launched.pidfd, signal.SIGKILL)
            os.close(launched.pidfd)


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 4096):
        chunks.append(chunk)
    return b"".join(chunks)


async def test_launcher_refusal_is_a_typed_error(isolated_holder: HolderProc,
                                                 request_factory: Callable[..., dict[str, Any]]
                                                 ) -> None:
    from agent.holder.errors import BadRequest, LaunchFailed

    async with await HolderClient.connect(isolated_holder.socket) as client:
        with pytest.raises(BadRequest):
            await client.launch({**request_factory("true"), "uid": 0})
        with pytest.raises(BadRequest):
            await client.launch({**request_factory("true"), "bogus": 1})
        with pytest.raises(LaunchFailed) as err:
            await client.launch({**request_factory("true"), "reaper": "/nonexistent/tini"})
        assert err.value.errno == 2
        assert (await client.ping())["held"] == 0
