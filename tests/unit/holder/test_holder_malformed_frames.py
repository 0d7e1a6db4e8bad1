"""Malformed holder frames: the fds of a frame decoded just before a malformed one are closed
by the holder, and a malformed event ends the client's connection without losing the response
read with it."""

from __future__ import annotations

import array
import asyncio
import contextlib
import os
import socket
import time

from agent.holder.client import HolderClient
from agent.holder.errors import ConnectionLost, HolderTimeout
from agent.holder.protocol import HEADER, encode
from tests.unit.holder.harness import HolderProc


def _eof_within(fd: int, timeout_s: float) -> bool:
    """True once `fd` (a pipe's read end) reports end of file: every write end is closed."""
    os.set_blocking(fd, False)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if os.read(fd, 4096) == b"":
                return True
        except BlockingIOError:
            pass
        time.sleep(0.01)
    return False


# Before its fix: FrameDecoder.messages() pops the fds of frames decoded before a
# malformed one and then raises, so the holder's close path (take_stray_fds) never sees them:
# the fds leak in the holder for good
def test_fds_of_a_frame_before_a_malformed_one_are_closed(holder: HolderProc) -> None:
    read_fd, write_fd = os.pipe()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(10)
        sock.connect(holder.socket)
        good = encode({"t": "req", "id": 1, "m": "ping", "p": {}, "nfd": 1})
        bad = HEADER.pack(3) + b"\xc1\xc1\xc1"  # 0xc1 is never valid msgpack
        sock.sendmsg([good + bad], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                     array.array("i", [write_fd]))])
        # The holder closes a connection that sent a malformed frame.
        while sock.recv(65536):
            pass
    finally:
        sock.close()
        os.close(write_fd)
    try:
        # Our copy of the write end is closed; the pipe ends only if the holder closed its copy.
        assert _eof_within(read_fd, 3.0), "the holder still holds the fd it was sent"
    finally:
        os.close(read_fd)


# Before its fix: HolderClient._on_readable does not catch the ProtocolError that
# decode_event raises for a malformed event: it escapes the reader callback, the rest of that
# read (here the ping's response) is dropped, and the request hangs until its timeout instead of
# failing at once
async def test_a_malformed_event_ends_the_connection_instead_of_losing_responses() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.setblocking(False)
    theirs.setblocking(False)
    client = HolderClient(ours, "socketpair")
    loop = asyncio.get_running_loop()
    try:
        ping = asyncio.create_task(client.ping(timeout_s=3.0))
        await loop.sock_recv(theirs, 65536)  # the ping request
        malformed = encode({"t": "evt", "m": "output", "p": {
            "dyno_id": "d1", "pid": 1, "seq": 0, "dropped": 0,
            "blocks": [[1.0, 2, b"one line, not two"]]}})
        response = encode({"t": "res", "id": 1, "p": {"version": 2}})
        await loop.sock_sendall(theirs, malformed + response)
        outcome: object
        try:
            outcome = await ping
        except ConnectionLost:
            outcome = "connection lost"  # also acceptable: the stream is broken
        except HolderTimeout:
            outcome = "timed out"
        assert outcome != "timed out", "the response read with the malformed event was lost"
    finally:
        client.close()
        with contextlib.suppress(OSError):
            theirs.close()
