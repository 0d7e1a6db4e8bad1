"""The holder's `tty` for launch and enter (plain backend, no root): the master comes back
after the pidfd, the command has the pty as controlling terminal and stdio, the holder
captures nothing, and a bad `tty` (or a tty with stdio fds) is refused, changing nothing."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from agent.holder.client import HolderClient
from agent.holder.errors import BadRequest
from tests.unit.holder.harness import ENV, collect, exits_of, lines_of


def _read_until(fd: int, marker: bytes, timeout_s: float = 10) -> bytes:
    data = b""
    deadline = time.monotonic() + timeout_s
    while marker not in data:
        assert time.monotonic() < deadline, data
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            chunk = b""
        assert chunk, data
        data += chunk
    return data


async def test_launch_and_enter_with_a_tty_hand_back_its_master(client: HolderClient) -> None:
    await client.subscribe()
    script = "echo \"tty=$(tty) size=$(stty size)\"; : </dev/tty && echo ctty; exec sleep 60"
    launched = await client.launch({"dyno_id": "d-tty", "argv": ["sh", "-c", script],
                                    "env": ENV}, tty=(30, 100))
    assert launched.tty_master is not None
    try:
        out = await asyncio.to_thread(_read_until, launched.tty_master, b"ctty")
        assert b"tty=/dev/pts/" in out and b"size=30 100" in out
        entered = await client.enter("d-tty", ["sh", "-c", "read x; echo got-$x; exit 4"], ENV,
                                     0, 0, "/", [], None, tty=(20, 60))
        assert entered.tty_master is not None
        os.write(entered.tty_master, b"hi\n")
        assert b"got-hi" in await asyncio.to_thread(_read_until, entered.tty_master, b"got-hi")
        events = await collect(client, lambda ev: bool(exits_of(ev)))
        assert [(e.pid, e.status) for e in exits_of(events)] == [(entered.pid, 4)]
        assert not lines_of(events)  # the caller relays a pty; the holder captured nothing
        os.close(entered.tty_master)
        os.close(entered.pidfd)
    finally:
        signal.pidfd_send_signal(launched.pidfd, signal.SIGKILL)
        os.close(launched.pidfd)
        os.close(launched.tty_master)


@pytest.mark.parametrize("tty", [[0], [1, 2, 3], ["24", 80], [24, 70000], [True, 80], "24x80"])
async def test_a_bad_tty_is_refused(client: HolderClient, tty: object) -> None:
    with pytest.raises(BadRequest):
        await client.request("launch", {"dyno_id": "d-bad", "argv": ["true"], "env": ENV,
                                        "tty": tty})
    with pytest.raises(BadRequest):
        await client.request("enter", {"dyno_id": "d-bad", "argv": ["true"], "env": ENV,
                                       "tty": tty})
    assert (await client.ping())["held"] == 0


async def test_a_tty_with_stdio_fds_is_refused(client: HolderClient) -> None:
    r, w = os.pipe()
    try:
        with pytest.raises(BadRequest):
            await client.launch({"dyno_id": "d-both", "argv": ["true"], "env": ENV},
                                stdio=(r, w, w), tty=(24, 80))
    finally:
        os.close(r)
        os.close(w)
    assert (await client.ping())["held"] == 0
