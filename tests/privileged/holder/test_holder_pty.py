"""The holder with the real launcher: a dyno's PID 1 and an entered command get a pty made in
the dyno's own devpts (never a terminal of the host); its master comes back to the caller."""

from __future__ import annotations

import asyncio
import os
import re
import select
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest

from agent.holder.client import HolderClient
from agent.holder.errors import BadRequest
from tests.privileged.holder.conftest import TINI
from tests.unit.holder.harness import HolderProc, collect, exits_of, lines_of

pytestmark = pytest.mark.skipif(not os.path.exists(TINI), reason=f"needs tini at {TINI}")

# Prints, in the dyno: its terminal, the device of the dyno's devpts, the owner of the
# terminal, the terminal's size, and whether it is the controlling terminal (/dev/tty opens).
PROBE = ("echo \"T=$(tty) D=$(stat -c %d /dev/pts) U=$(stat -c %u \"$(tty)\") "
         "S=$(stty size) C=$( : </dev/tty && echo yes)\"")


def _read_until(fd: int, pattern: bytes, timeout_s: float = 30) -> re.Match[bytes]:
    data = b""
    deadline = time.monotonic() + timeout_s
    while not (found := re.search(pattern, data)):
        left = deadline - time.monotonic()
        assert left > 0, f"{pattern!r} not in {data!r}"
        if select.select([fd], [], [], left)[0]:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                chunk = b""
            assert chunk, f"EOF before {pattern!r}: {data!r}"
            data += chunk
    return found


def _check_probe(found: re.Match[bytes], master: int, uid: int) -> None:
    host_devpts = os.stat("/dev/pts").st_dev
    terminal, devpts, owner, size, controlling = found.groups()
    assert terminal.startswith(b"/dev/pts/")
    # The dyno's own devpts instance, the one the master came from; not the host's.
    assert int(devpts) == os.fstat(master).st_dev != host_devpts
    assert int(owner) == uid
    assert size == b"30 100"
    assert controlling == b"yes"


async def test_a_launch_with_a_tty_gets_a_pty_of_its_own_devpts(
        isolated_holder: HolderProc, request_factory: Callable[..., dict[str, Any]]) -> None:
    req = request_factory(f"{PROBE}; read line; echo got-$line; exit 3")
    async with await HolderClient.connect(isolated_holder.socket) as client:
        await client.subscribe()
        launched = await client.launch(req, tty=(30, 100))
        assert launched.tty_master is not None
        master = launched.tty_master
        try:
            found = await asyncio.to_thread(
                _read_until, master,
                rb"T=(\S+) D=(\d+) U=(\d+) S=(\d+ \d+) C=(\w*)")
            _check_probe(found, master, req["uid"])
            os.write(master, b"hello\n")
            await asyncio.to_thread(_read_until, master, rb"got-hello")
            events = await collect(client, lambda ev: bool(exits_of(ev)), timeout_s=30)
            assert not lines_of(events)  # the holder captured nothing: it is the caller's
            [exit_event] = exits_of(events)
            assert exit_event.status == 3
        finally:
            os.close(master)
            os.close(launched.pidfd)


async def test_an_entered_command_gets_a_pty_and_a_session_of_its_own(
        isolated_holder: HolderProc, request_factory: Callable[..., dict[str, Any]]) -> None:
    req = request_factory("exec sleep 60")
    async with await HolderClient.connect(isolated_holder.socket) as client:
        await client.subscribe()
        launched = await client.launch(req)
        try:
            entered = await client.enter(
                req["dyno_id"], ["sh", "-c", f"{PROBE}; read x; exit 6"],
                [("PATH", "/usr/bin:/bin")], req["uid"], req["gid"], "/app",
                req["cgroup_procs"], None, tty=(30, 100))
            assert entered.tty_master is not None
            try:
                found = await asyncio.to_thread(
                    _read_until, entered.tty_master,
                    rb"T=(\S+) D=(\d+) U=(\d+) S=(\d+ \d+) C=(\w*)")
                _check_probe(found, entered.tty_master, req["uid"])
                assert os.getsid(entered.pid) == entered.pid  # a session leader
                os.write(entered.tty_master, b"\n")
                exits = exits_of(await collect(client, lambda ev: bool(exits_of(ev)), 30))
                assert [(e.kind, e.status) for e in exits] == [("enter", 6)]
            finally:
                os.close(entered.tty_master)
                os.close(entered.pidfd)
            with pytest.raises(BadRequest):  # a tty and stdio fds: one or the other
                await client.enter(req["dyno_id"], ["true"], [], req["uid"], req["gid"], "/app",
                                   req["cgroup_procs"], (0, 1, 2), tty=(30, 100))
        finally:
            signal.pidfd_send_signal(launched.pidfd, signal.SIGKILL)
            os.close(launched.pidfd)
