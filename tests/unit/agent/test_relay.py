"""The attach frames and the agent's relay on real pipes, ptys and a socketpair: bytes both
ways, credit for stdin, bounded buffers with backpressure both ways, EOF, window size,
signals, and the drain at the end."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import signal
import socket
import struct
import termios
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from agent.api import attachwire as wire
from agent.api import relay as relay_mod
from agent.api.relay import Ends, Pipes, Relay, pty_ends
from tests.support.wait import async_wait_for

F_GETPIPE_SZ = 1032

# -- frames ------------------------------------------------------------------------------------


def test_frames_round_trip_split_anywhere() -> None:
    stream = (wire.encode(wire.STDOUT, bytes(range(256)) * 3) + wire.credit(70000)
              + wire.control({"event": "exit", "status": 7}) + wire.encode(wire.STDERR))
    for step in (1, 2, 5, 4096):
        decoder = wire.FrameDecoder(wire.AGENT_KINDS)
        frames = []
        for i in range(0, len(stream), step):
            frames += decoder.feed(stream[i:i + step])
        assert frames == [(wire.STDOUT, bytes(range(256)) * 3),
                          (wire.CREDIT, (70000).to_bytes(4, "big")),
                          (wire.CONTROL, b'{"event":"exit","status":7}'), (wire.STDERR, b"")]
        assert decoder.pending_bytes == 0
    assert wire.parse_credit(frames[1][1]) == 70000
    assert wire.parse_control(frames[2][1]) == {"event": "exit", "status": 7}
    [(kind, payload)] = wire.FrameDecoder(wire.CALLER_KINDS).feed(wire.window(50, 132))
    assert kind == wire.WINDOW and wire.parse_window(payload) == (50, 132)


@pytest.mark.parametrize("bad", [
    b"x\x00\x00\x00\x00",                                   # unknown kind
    wire.HEADER.pack(wire.STDIN, wire.MAX_PAYLOAD + 1),     # longer than any frame may be
    wire.encode(wire.STDOUT, b"agent kind from a caller"),  # a kind of the other direction
])
def test_a_bad_frame_is_refused_before_its_payload_arrives(bad: bytes) -> None:
    with pytest.raises(wire.FrameError):
        wire.FrameDecoder(wire.CALLER_KINDS).feed(bad)


def test_malformed_payloads_are_refused() -> None:
    with pytest.raises(wire.FrameError):
        wire.parse_window(b"\x00")
    with pytest.raises(wire.FrameError):
        wire.parse_credit(b"")
    with pytest.raises(wire.FrameError):
        wire.parse_control(b"[1]")
    with pytest.raises(wire.FrameError):
        wire.encode(wire.STDIN, bytes(wire.MAX_PAYLOAD + 1))


# -- the relay ---------------------------------------------------------------------------------

@dataclass
class Caller:
    """The test's end of the attach socket, as dynoctl would use it."""

    sock: socket.socket
    decoder: wire.FrameDecoder = field(default_factory=lambda: wire.FrameDecoder(
        wire.AGENT_KINDS))
    frames: list[tuple[bytes, bytes]] = field(default_factory=list)
    credit: int = 0

    async def send(self, frame: bytes) -> None:
        await asyncio.get_running_loop().sock_sendall(self.sock, frame)

    async def read_some(self) -> bool:
        data = await asyncio.get_running_loop().sock_recv(self.sock, 1 << 16)
        for kind, payload in self.decoder.feed(data):
            if kind == wire.CREDIT:
                self.credit += wire.parse_credit(payload)
            self.frames.append((kind, payload))
        return bool(data)

    async def until(self, predicate: Any, timeout_s: float = 10) -> None:
        async with asyncio.timeout(timeout_s):
            while not predicate():
                assert await self.read_some(), "the relay closed the connection"

    def data(self, kind: bytes) -> bytes:
        return b"".join(p for k, p in self.frames if k == kind)

    def controls(self) -> list[dict[str, Any]]:
        return [wire.parse_control(p) for k, p in self.frames if k == wire.CONTROL]


@dataclass
class Session:
    relay: Relay
    caller: Caller
    signals: list[signal.Signals]


@contextlib.asynccontextmanager
async def session(initial: bytes = b"") -> AsyncIterator[Session]:
    agent_end, caller_end = socket.socketpair()
    agent_end.setblocking(False)
    caller_end.setblocking(False)
    signals: list[signal.Signals] = []
    relay = Relay(agent_end, signals.append, initial)
    relay.start()
    try:
        yield Session(relay, Caller(caller_end), signals)
    finally:
        relay.close()
        agent_end.close()
        caller_end.close()


@contextlib.contextmanager
def pipes() -> Any:
    made = Pipes.make()
    try:
        yield made
    finally:
        relay_mod.close_all(made.dyno)


async def test_bytes_pass_both_ways_with_credit_and_eof() -> None:
    with pipes() as p:
        async with session() as s:
            s.relay.attach(p.agent)
            await s.caller.until(lambda: s.caller.credit > 0)
            assert s.caller.credit == relay_mod.STDIN_WINDOW_BYTES
            blob = os.urandom(200_000)
            for i in range(0, len(blob), wire.MAX_PAYLOAD):
                chunk = blob[i:i + wire.MAX_PAYLOAD]
                s.caller.credit -= len(chunk)
                await s.caller.send(wire.encode(wire.STDIN, chunk))
            await s.caller.send(wire.encode(wire.STDIN_EOF))
            stdin_r, stdout_w, stderr_w = p.dyno
            received = await asyncio.to_thread(_read_to_eof, stdin_r)
            assert received == blob  # and EOF: the relay closed the command's stdin
            os.write(stdout_w, b"\x00out\xff")
            os.write(stderr_w, b"err")
            await s.caller.until(lambda: s.caller.data(wire.STDERR) == b"err"
                                 and s.caller.data(wire.STDOUT) == b"\x00out\xff")
            # Credit came back for what the command took.
            await s.caller.until(lambda: s.caller.credit == relay_mod.STDIN_WINDOW_BYTES)


def _fill(fd: int) -> None:
    os.set_blocking(fd, False)
    with contextlib.suppress(BlockingIOError):
        while True:
            os.write(fd, bytes(1 << 16))


def _read_to_eof(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


async def test_stdin_beyond_the_credit_ends_the_session() -> None:
    with pipes() as p:
        async with session() as s:
            _fill(p.agent.stdin)  # the command reads nothing: no credit comes back
            s.relay.attach(p.agent)
            await s.caller.until(lambda: s.caller.credit > 0)
            frames = s.caller.credit // wire.MAX_PAYLOAD
            assert frames * wire.MAX_PAYLOAD == s.caller.credit
            await s.caller.send(wire.encode(wire.STDIN, bytes(wire.MAX_PAYLOAD)) * frames)
            assert not s.relay.left.done()
            await s.caller.send(wire.encode(wire.STDIN, b"one too many"))
            async with asyncio.timeout(5):
                await s.relay.left
    with pipes() as p:
        # Before the command exists there is no credit at all.
        async with session(initial=wire.encode(wire.STDIN, b"x")) as s:
            assert s.relay.left.done()


async def test_a_command_that_reads_no_stdin_costs_at_most_the_window() -> None:
    with pipes() as p:
        async with session() as s:
            s.relay.attach(p.agent)
            await s.caller.until(lambda: s.caller.credit > 0)
            sent = 0
            # The caller sends what the credit allows, then has to wait: nothing is read.
            while s.caller.credit:
                n = min(s.caller.credit, wire.MAX_PAYLOAD)
                s.caller.credit -= n
                sent += n
                await s.caller.send(wire.encode(wire.STDIN, bytes(n)))
            # Once the relay has taken it all in: what the pipe holds, the rest in memory.
            await async_wait_for(
                _async(lambda: _in_pipe(p.dyno[0]) + s.relay.buffered_bytes == sent), 5)
            assert sent == relay_mod.STDIN_WINDOW_BYTES
            assert s.relay.buffered_bytes == sent - _in_pipe(p.dyno[0])
            assert not s.relay.left.done()


async def test_stdin_in_tiny_frames_from_a_caller_that_reads_nothing_costs_no_memory() -> None:
    with pipes() as p:
        async with session() as s:
            s.relay.attach(p.agent)
            await s.caller.until(lambda: s.caller.credit > 0)
            count = 1 << 16  # more credit frames than the socket's buffer holds
            await s.caller.send(wire.encode(wire.STDIN, b"x") * count)
            await async_wait_for(_async(lambda: _in_pipe(p.dyno[0]) == count), 10)
            # The credit owed is summed up, not queued frame by frame for a caller that
            # does not read.
            assert s.relay.buffered_bytes <= wire.HEADER.size + 4
            await s.caller.until(lambda: s.caller.credit == relay_mod.STDIN_WINDOW_BYTES, 30)


async def test_a_caller_that_reads_nothing_stops_the_output_not_the_agent() -> None:
    with pipes() as p:
        async with session() as s:
            s.relay.attach(p.agent)
            stdout_w = p.dyno[1]
            os.set_blocking(stdout_w, False)
            written = 0
            capacity = fcntl.fcntl(stdout_w, F_GETPIPE_SZ)
            # The command writes; the relay reads until its own queue is over the high-water
            # mark (the caller never reads), then stops, and the command's pipe fills up.
            while not s.relay.output_paused:
                assert written <= 16 * relay_mod.OUT_HIGH_BYTES, "the relay never stopped"
                try:
                    written += os.write(stdout_w, bytes(1 << 16))
                except BlockingIOError:
                    await async_wait_for(_async(lambda: s.relay.output_paused
                                                or _in_pipe(stdout_w) < capacity), 5)
            with contextlib.suppress(BlockingIOError):
                while True:
                    written += os.write(stdout_w, bytes(1 << 16))
            assert _in_pipe(stdout_w) == capacity and s.relay.output_paused
            limit = relay_mod.OUT_HIGH_BYTES + wire.MAX_PAYLOAD + wire.HEADER.size
            assert 0 < s.relay.buffered_bytes <= limit
            # Once the caller reads, everything arrives, in order.
            await s.caller.until(lambda: len(s.caller.data(wire.STDOUT)) == written, 30)


async def test_finish_sends_what_the_command_wrote_then_the_exit() -> None:
    with pipes() as p:
        async with session() as s:
            s.relay.attach(p.agent)
            os.write(p.dyno[1], b"last words\n")
            # A process that escaped keeps the pipe open: the drain ends all the same, at
            # the first empty read.
            async with asyncio.timeout(relay_mod.DRAIN_MAX_S / 2):
                await s.relay.finish(3)
            await s.caller.until(lambda: any(c.get("event") == "exit"
                                             for c in s.caller.controls()))
            assert s.caller.data(wire.STDOUT) == b"last words\n"
            assert s.caller.controls()[-1] == {"event": "exit", "status": 3}
            kinds = [k for k, _ in s.caller.frames]
            assert kinds.index(wire.STDOUT) < len(kinds) - 1


async def test_signal_frames_reach_the_command_and_unknown_ones_do_not() -> None:
    async with session() as s:
        await s.caller.send(wire.encode(wire.SIGNAL, b"INT") + wire.encode(wire.SIGNAL, b"KILL"))
        await s.caller.send(wire.encode(wire.SIGNAL, b"INT"))
        await async_wait_for(_async(lambda: len(s.signals) >= 2), 5)
        assert s.signals == [signal.SIGINT, signal.SIGINT]


async def test_a_pty_follows_the_window_and_ends_when_silent() -> None:
    master, slave = os.openpty()
    try:
        # A size sent before the pty exists is applied when it arrives.
        async with session(initial=wire.window(40, 120)) as s:
            s.relay.attach(pty_ends(master))
            master = -1  # the relay owns it
            assert _size(slave) == (40, 120)
            await s.caller.send(wire.window(33, 111))
            await async_wait_for(_async(lambda: _size(slave) == (33, 111)), 5)
            await s.caller.until(lambda: s.caller.credit > 0)
            await s.caller.send(wire.encode(wire.STDIN, b"typed\n"))
            assert await async_wait_for(_async(lambda: _read_now(slave)), 5) == b"typed\n"
            os.write(slave, b"shown\n")
            # The slave stays open (as if a process escaped the session): finish still ends.
            async with asyncio.timeout(relay_mod.PTY_QUIET_S + 5):
                await s.relay.finish(0)
            await s.caller.until(lambda: {"event": "exit", "status": 0} in s.caller.controls())
            assert s.caller.data(wire.STDOUT).replace(b"\r", b"").endswith(b"shown\n")
    finally:
        os.close(slave)
        if master >= 0:
            os.close(master)


def _async(predicate: Any) -> Any:
    async def check() -> Any:
        return predicate()
    return check


def _in_pipe(fd: int) -> int:
    count: int = struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, bytes(4)))[0]
    return count


def _read_now(fd: int) -> bytes | None:
    os.set_blocking(fd, False)
    try:
        return os.read(fd, 100)
    except BlockingIOError:
        return None


def _size(fd: int) -> tuple[int, int]:
    rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, bytes(8)))
    return rows, cols


async def test_close_releases_every_fd_it_owns() -> None:
    made = Pipes.make()
    try:
        async with session() as s:
            s.relay.attach(made.agent)
        for fd in made.agent.fds:
            with pytest.raises(OSError):
                os.fstat(fd)
    finally:
        relay_mod.close_all(made.dyno)


def test_ends_of_a_pty_are_one_fd() -> None:
    ends = pty_ends(9)
    assert ends == Ends(9, ((9, wire.STDOUT),), pty=9) and ends.fds == {9}
