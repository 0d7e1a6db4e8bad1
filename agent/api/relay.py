"""The agent's half of an attached `run` or `exec`: bytes between the caller's attach socket
and the command's own pipes or pty (the caller's fds never enter a dyno), window size and
signals, with bounded buffers and backpressure both ways.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import signal
import socket
import struct
import termios
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent.api import attachwire as wire
from agent.signals import parse_signal

log = logging.getLogger(__name__)

READ_BYTES = wire.MAX_PAYLOAD
# Stdin the caller may have in flight: the most the agent ever buffers for a command that
# does not read its stdin.
STDIN_WINDOW_BYTES = 256 * 1024
# Output waiting for a caller that reads slowly: above HIGH the agent stops reading the
# command's output (so the command blocks on its writes), below LOW it reads again.
OUT_HIGH_BYTES = 256 * 1024
OUT_LOW_BYTES = 64 * 1024
# After the command ended: a pty is done once silent this long (its output reaches the master
# through the kernel's flush work, not at once); a pipe at its first empty read (what the
# command wrote is in the pipe when it exits).
PTY_QUIET_S = 0.2
# ...and whatever still holds the output open (a process that escaped the session) gets no
# more than this.
DRAIN_MAX_S = 10.0
FLUSH_MAX_S = 10.0
FORWARDED_SIGNALS = frozenset({"INT"})


@dataclass(frozen=True)
class Ends:
    """The agent's ends of a command's stdio: `stdin` to write, `outputs` to read, with the
    frame kind each becomes. For a pty the master is both (`pty` names it)."""

    stdin: int
    outputs: tuple[tuple[int, bytes], ...]
    pty: int | None = None

    @property
    def fds(self) -> set[int]:
        return {self.stdin, *(fd for fd, _ in self.outputs)}


@dataclass(frozen=True)
class Pipes:
    """Three pipes for a command: `dyno` goes to the holder (and is closed here once it has
    them), `agent` to the relay."""

    dyno: tuple[int, int, int]
    agent: Ends

    @classmethod
    def make(cls) -> Pipes:
        made: list[int] = []
        try:
            for _ in range(3):
                made.extend(os.pipe2(os.O_CLOEXEC))
        except OSError:
            close_all(made)
            raise
        in_r, in_w, out_r, out_w, err_r, err_w = made
        return cls((in_r, out_w, err_w),
                   Ends(in_w, ((out_r, wire.STDOUT), (err_r, wire.STDERR))))


def pty_ends(master: int) -> Ends:
    return Ends(master, ((master, wire.STDOUT),), pty=master)


def close_all(fds: Any) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def set_window(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


class Relay:
    """One session's relay. `start()` reads the caller at once (its frames: window, signal,
    and stdin within credit); `attach(ends)` adds the command's stdio once it exists;
    `finish(status)` drains the output and sends the exit; `close()` releases everything.
    `left` completes when the caller goes away or breaks the protocol."""

    def __init__(self, conn: socket.socket, on_signal: Callable[[signal.Signals], None],
                 initial: bytes = b"") -> None:
        self._conn = conn
        self._on_signal = on_signal
        self._loop = asyncio.get_running_loop()
        self._decoder = wire.FrameDecoder(wire.CALLER_KINDS)
        self._initial = initial
        self.left: asyncio.Future[None] = self._loop.create_future()
        self._outq: deque[memoryview] = deque()
        self._out_bytes = 0
        self._writing = False
        self._flushed: asyncio.Future[None] | None = None
        self._ends: Ends | None = None
        self._stdin: int | None = None
        self._stdin_buf = bytearray()
        self._stdin_eof = False
        self._credit_out = 0  # granted to the caller, not yet used
        self._grant = 0       # written to the command, not yet granted again
        self._outputs: dict[int, bytes] = {}
        self._paused = False
        self._window: tuple[int, int] | None = None
        self._finishing = False
        self._quiet: dict[int, asyncio.TimerHandle] = {}
        self._drained: asyncio.Future[None] | None = None
        self._reading_conn = False
        self._closed = False

    # -- the caller ---------------------------------------------------------------------
    def start(self) -> None:
        self._loop.add_reader(self._conn.fileno(), self._on_conn)
        self._reading_conn = True
        if self._initial:
            data, self._initial = self._initial, b""
            self._handle_caller(data)

    def send_control(self, message: dict[str, Any]) -> None:
        self._queue(wire.control(message))

    def _on_conn(self) -> None:
        try:
            data = self._conn.recv(READ_BYTES + wire.HEADER.size)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._gone("read failed")
            return
        if not data:
            self._gone("closed the connection")
            return
        self._handle_caller(data)

    def _handle_caller(self, data: bytes) -> None:
        try:
            frames = self._decoder.feed(data)
            for kind, payload in frames:
                self._on_frame(kind, payload)
        except wire.FrameError as exc:
            self._gone(f"broke the protocol: {exc}")

    def _on_frame(self, kind: bytes, payload: bytes) -> None:
        if kind == wire.STDIN:
            if len(payload) > self._credit_out:
                raise wire.FrameError(f"{len(payload)} stdin bytes with credit for "
                                      f"{self._credit_out}")
            self._credit_out -= len(payload)
            if self._stdin is not None and not self._stdin_eof:
                self._stdin_buf += payload
                self._write_stdin()
            # else: the command's stdin is closed; the bytes go nowhere and earn no credit.
        elif kind == wire.STDIN_EOF:
            self._stdin_eof = True
            if self._ends is not None and self._ends.pty is None and not self._stdin_buf:
                self._close_stdin()
            # A pty has no end of input (^D is a byte the line discipline interprets).
        elif kind == wire.WINDOW:
            rows, cols = wire.parse_window(payload)
            self._window = (rows, cols)
            if self._ends is not None and self._ends.pty is not None:
                with contextlib.suppress(OSError):
                    set_window(self._ends.pty, rows, cols)
        elif kind == wire.SIGNAL:
            name = payload.decode("ascii", "replace")
            if name in FORWARDED_SIGNALS:
                self._on_signal(parse_signal(name))

    def _gone(self, why: str) -> None:
        if not self.left.done():
            log.info("attach caller %s", why)
            self.left.set_result(None)
        self._stop_reading_conn()
        self._outq.clear()
        self._out_bytes = 0
        if self._writing:
            self._loop.remove_writer(self._conn.fileno())
            self._writing = False
        self._wake(self._flushed)
        self._wake(self._drained)

    def _stop_reading_conn(self) -> None:
        if self._reading_conn:
            self._loop.remove_reader(self._conn.fileno())
            self._reading_conn = False

    # -- to the caller ------------------------------------------------------------------
    def _queue(self, frame: bytes) -> None:
        if self.left.done() or self._closed:
            return
        self._outq.append(memoryview(frame))
        self._out_bytes += len(frame)
        if not self._writing:
            self._flush()
        if self._out_bytes >= OUT_HIGH_BYTES:
            self._pause_outputs()

    def _flush(self) -> None:
        while self._outq:
            head = self._outq[0]
            try:
                sent = self._conn.send(head, socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._gone("stopped reading (write failed)")
                return
            self._out_bytes -= sent
            if sent < len(head):
                self._outq[0] = head[sent:]
                break
            self._outq.popleft()
        want = bool(self._outq)
        if want and not self._writing:
            self._loop.add_writer(self._conn.fileno(), self._flush)
        elif not want and self._writing:
            self._loop.remove_writer(self._conn.fileno())
        self._writing = want
        if self._paused and self._out_bytes <= OUT_LOW_BYTES:
            self._resume_outputs()
        if not self._outq:
            self._maybe_grant()
            self._wake(self._flushed)

    # -- the command --------------------------------------------------------------------
    def attach(self, ends: Ends) -> None:
        """Relay `ends` from now on (the relay owns them and closes them)."""
        if self._closed:
            close_all(ends.fds)
            return
        self._ends = ends
        for fd in ends.fds:
            os.set_blocking(fd, False)
        if ends.pty is not None and self._window is not None:
            with contextlib.suppress(OSError):
                set_window(ends.pty, *self._window)
        self._stdin = ends.stdin
        self._outputs = dict(ends.outputs)
        if not self._paused:
            for fd in self._outputs:
                self._loop.add_reader(fd, self._on_output, fd)
        if self._stdin_eof and ends.pty is None:
            self._close_stdin()
        else:
            self._grant_credit(STDIN_WINDOW_BYTES)

    def _maybe_grant(self) -> None:
        # Credit goes back in few frames: once a quarter window is free or all was written,
        # and only while the caller keeps up with reading (else it waits, summed up, in
        # `_grant`: a caller that sends stdin in tiny frames and reads nothing must not grow
        # the queue with a credit frame per byte).
        if self._grant and not self._outq and (
                not self._stdin_buf or self._grant >= STDIN_WINDOW_BYTES // 4):
            grant, self._grant = self._grant, 0
            self._grant_credit(grant)

    def _grant_credit(self, count: int) -> None:
        if count > 0:
            self._credit_out += count
            self._queue(wire.credit(count))

    def _write_stdin(self) -> None:
        fd = self._stdin
        if fd is None:
            return
        while self._stdin_buf:
            try:
                written = os.write(fd, self._stdin_buf[:READ_BYTES])
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                # EPIPE: the command closed its stdin; EIO: the pty's other side is gone.
                self._close_stdin()
                return
            del self._stdin_buf[:written]
            self._grant += written
        waiting = bool(self._stdin_buf)
        if waiting:
            self._loop.add_writer(fd, self._write_stdin)
        else:
            self._loop.remove_writer(fd)
        self._maybe_grant()
        if not waiting and self._stdin_eof and self._ends is not None \
                and self._ends.pty is None:
            self._close_stdin()

    def _close_stdin(self) -> None:
        fd = self._stdin
        if fd is None:
            return
        self._stdin = None
        self._stdin_buf.clear()
        self._loop.remove_writer(fd)
        if fd not in self._outputs:
            os.close(fd)

    def _on_output(self, fd: int) -> None:
        # One read per readiness while the command runs (fair to other sessions); once it
        # has ended, read until the output is empty, to know when the drain is done.
        while True:
            kind = self._outputs.get(fd)
            if kind is None:
                return
            try:
                data = os.read(fd, READ_BYTES)
            except (BlockingIOError, InterruptedError):
                self._on_empty(fd)
                return
            except OSError as exc:
                # EIO from a pty master: every holder of the pty's other side closed it.
                if exc.errno != errno.EIO:
                    log.info("reading the command's output failed: %s", exc)
                data = b""
            if not data:
                self._end_output(fd)
                return
            quiet = self._quiet.pop(fd, None)
            if quiet is not None:
                quiet.cancel()
            self._queue(wire.encode(kind, data))
            if not self._finishing or self._paused:
                return

    def _on_empty(self, fd: int) -> None:
        if not self._finishing:
            return
        if self._ends is not None and fd == self._ends.pty:
            if fd not in self._quiet:
                self._quiet[fd] = self._loop.call_later(PTY_QUIET_S, self._end_output, fd)
        else:
            self._end_output(fd)

    def _end_output(self, fd: int) -> None:
        if self._outputs.pop(fd, None) is None:
            return
        quiet = self._quiet.pop(fd, None)
        if quiet is not None:
            quiet.cancel()
        self._loop.remove_reader(fd)
        if fd != self._stdin:
            os.close(fd)
        if not self._outputs:
            self._wake(self._drained)

    def _pause_outputs(self) -> None:
        if self._paused:
            return
        self._paused = True
        for fd in self._outputs:
            self._loop.remove_reader(fd)

    def _resume_outputs(self) -> None:
        self._paused = False
        for fd in list(self._outputs):
            self._loop.add_reader(fd, self._on_output, fd)
            if self._finishing:
                self._on_output(fd)  # one probe: an empty pipe is done

    # -- the end ------------------------------------------------------------------------
    async def finish(self, status: int) -> None:
        """The command ended with `status`: send what it wrote, then the exit."""
        self._finishing = True
        self._close_stdin()
        if self._outputs and not self.left.done():
            self._drained = self._loop.create_future()
            if not self._paused:
                for fd in list(self._outputs):
                    self._on_output(fd)
            if self._outputs:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(DRAIN_MAX_S):
                        await self._drained
        for fd in list(self._outputs):
            self._end_output(fd)
        self.send_control({"event": "exit", "status": status})
        if self._outq and not self.left.done():
            self._flushed = self._loop.create_future()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(FLUSH_MAX_S):
                    await self._flushed

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop_reading_conn()
        if self._writing:
            self._loop.remove_writer(self._conn.fileno())
            self._writing = False
        for handle in self._quiet.values():
            handle.cancel()
        self._quiet.clear()
        # Only fds still owned: a number closed earlier may belong to someone else by now.
        owned = set(self._outputs) | ({self._stdin} if self._stdin is not None else set())
        for fd in owned:
            self._loop.remove_reader(fd)
            self._loop.remove_writer(fd)
        close_all(owned)
        self._outputs.clear()
        self._stdin = None
        self._wake(self._flushed)
        self._wake(self._drained)

    @staticmethod
    def _wake(future: asyncio.Future[None] | None) -> None:
        if future is not None and not future.done():
            future.set_result(None)

    # -- for tests and logs ---------------------------------------------------------------
    @property
    def output_paused(self) -> bool:
        """The caller is behind: the command's output is not read until it catches up."""
        return self._paused

    @property
    def buffered_bytes(self) -> int:
        """What the relay holds in memory: output for the caller and stdin for the command."""
        return self._out_bytes + len(self._stdin_buf)
