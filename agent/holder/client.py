"""The daemon's asyncio client of the holder: requests with deadlines, an event stream with acks.

One connection carries both. Output events are acked once handled, i.e. when the consumer asks
for the next event, several in one ack frame while more are queued (so a daemon killed while
handling a batch gets it again from the holder). Output stays in its wire form (joined blocks)
until the consumer takes the event. When the consumer falls far behind, reading pauses; the
holder then keeps lines in its bounded per-dyno buffers, so memory stays bounded on both sides.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import logging
import os
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import chain, repeat
from typing import Any, NoReturn

from agent.holder.errors import (
    ConnectionLost,
    HolderTimeout,
    HolderUnavailable,
    ProtocolError,
    error_for_code,
)
from agent.holder.protocol import (
    ANCILLARY_BYTES,
    MAX_RESPONSE_BYTES,
    FrameDecoder,
    Message,
    encode,
    fds_from_ancillary,
    rights,
)

log = logging.getLogger(__name__)

EXIT_ALREADY_RUNNING = 3  # agent.holder.__main__ (not imported: it pulls in the server)
READ_CHUNK = 1 << 18
# Reading pauses when a slow consumer has this many events, or output bytes, queued; it
# resumes below half of both. Bytes bind for output (an event carries up to 256 KiB).
EVENT_QUEUE_PAUSE = 256
OUTPUT_QUEUE_PAUSE_BYTES = 4 << 20
# Handled output is acked at the latest after this many events (or when the queue runs dry).
ACK_EVERY_EVENTS = 16
# Frames queued in one turn of the loop leave in one sendmsg, up to this many.
FRAMES_PER_WRITE = 64


class OutputEvent:
    """Lines of one held process from `seq` on, after `dropped` lost ones. `blocks` are as the
    holder sent them, (read time, line count, the lines joined by b"\\n"); `lines`, one
    (time, bytes) per line, is made from them on first use. Made from `lines` alone, each
    line is a block of one."""

    __slots__ = ("_lines", "blocks", "count", "dropped", "dyno_id", "pid", "seq")

    def __init__(self, dyno_id: str, pid: int, seq: int, dropped: int,
                 lines: tuple[tuple[float, bytes], ...] = (),
                 blocks: tuple[tuple[float, int, bytes], ...] | None = None) -> None:
        self.dyno_id = dyno_id
        self.pid = pid
        self.seq = seq
        self.dropped = dropped
        self._lines: tuple[tuple[float, bytes], ...] | None
        if blocks is None:
            self._lines = tuple(lines)
            blocks = tuple((ts, 1, data) for ts, data in self._lines)
        else:
            self._lines = None
        self.blocks = blocks
        self.count = sum(block[1] for block in blocks)

    @property
    def lines(self) -> tuple[tuple[float, bytes], ...]:
        if self._lines is None:
            self._lines = tuple(chain.from_iterable(
                zip(repeat(ts), data.split(b"\n")) for ts, _count, data in self.blocks))
        return self._lines

    def __repr__(self) -> str:
        return (f"OutputEvent({self.dyno_id!r}, {self.pid}, seq={self.seq}, "
                f"dropped={self.dropped}, count={self.count})")


@dataclass(frozen=True)
class ExitEvent:
    dyno_id: str
    kind: str
    pid: int
    status: int
    signal: int | None
    exited_at: float


@dataclass(frozen=True)
class Superseded:
    """Another connection subscribed; this one receives no more events."""


HolderEvent = OutputEvent | ExitEvent | Superseded


@dataclass(frozen=True)
class ReceivedOutput:
    """An output event as received: checked, but its lines still joined (cheap to queue)."""

    dyno_id: str
    pid: int
    seq: int
    dropped: int
    blocks: tuple[tuple[float, int, bytes], ...]
    size: int

    def event(self) -> OutputEvent:
        return OutputEvent(self.dyno_id, self.pid, self.seq, self.dropped,
                           blocks=self.blocks)


@dataclass(frozen=True)
class Launched:
    pid: int
    start_time: int
    timings_ms: Mapping[str, float]
    pidfd: int  # owned by the caller
    tty_master: int | None = None  # launched with a tty: its master, owned by the caller


@dataclass(frozen=True)
class Entered:
    pid: int
    start_time: int
    pidfd: int  # owned by the caller
    tty_master: int | None = None  # entered with a tty: its master, owned by the caller


@dataclass(frozen=True)
class HeldProcess:
    dyno_id: str
    kind: str
    pid: int
    start_time: int
    running: bool
    status: int | None
    signal: int | None
    buffered_lines: int
    buffered_bytes: int
    dropped: int
    pidfd: int | None  # only when listed with pidfds=True and running; owned by the caller


_LOST = object()


class HolderClient:
    """A connection to the holder. Create with `connect` or `ensure_running`; `close` when done."""

    def __init__(self, sock: socket.socket, socket_path: str) -> None:
        self._sock = sock
        self._path = socket_path
        self._loop = asyncio.get_running_loop()
        self._decoder = FrameDecoder(MAX_RESPONSE_BYTES)
        self._outq: deque[tuple[memoryview, list[int]]] = deque()
        self._writing = False
        self._flush_pending = False
        self._pending: dict[int, tuple[str, asyncio.Future[tuple[Message, list[int]]]]] = {}
        self._next_id = 1
        self._events: deque[object] = deque()
        self._event_waiter: asyncio.Future[None] | None = None
        self._paused = False
        self._queued_bytes = 0
        self._unacked: OutputEvent | None = None
        self._acks: dict[tuple[str, int], int] = {}
        self._closed = False
        self._lost_reason: str | None = None
        self._loop.add_reader(sock.fileno(), self._on_readable)

    # -- connecting --------------------------------------------------------------------

    @classmethod
    async def connect(cls, socket_path: str, timeout_s: float = 5.0) -> HolderClient:
        sock = socket.socket(socket.AF_UNIX,
                             socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.get_running_loop().sock_connect(sock, socket_path)
        except TimeoutError:
            sock.close()
            raise HolderUnavailable("connect timed out", socket_path) from None
        except OSError as exc:
            sock.close()
            raise HolderUnavailable("cannot connect", socket_path, exc.errno) from exc
        return cls(sock, socket_path)

    @classmethod
    async def ensure_running(cls, socket_path: str, state_dir: str, *,
                             backend: str = "isolated", timeout_s: float = 10.0,
                             python: str = sys.executable,
                             extra_args: Sequence[str] = ()) -> HolderClient:
        """Connect; if nobody answers, start a detached holder (log in `state_dir`) and connect."""
        deadline = time.monotonic() + timeout_s
        with contextlib.suppress(HolderUnavailable):
            return await cls.connect(socket_path, min(timeout_s, 2.0))
        os.makedirs(state_dir, exist_ok=True)
        log_path = os.path.join(state_dir, "holder.log")
        argv = [python, "-m", "agent.holder", "--socket", socket_path, "--state-dir", state_dir,
                "--backend", backend, "--log-file", log_path, "--detach", *extra_args]
        log.info("starting holder", extra={"SOCKET": socket_path, "STATE_DIR": state_dir})
        # The launcher process exits as soon as the socket is bound (--detach), so waiting
        # for it is short; it runs in a thread because subprocess waits block.
        try:
            done = await asyncio.to_thread(
                subprocess.run, argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE, start_new_session=True, close_fds=True,
                timeout=max(0.1, deadline - time.monotonic()), check=False)
        except subprocess.TimeoutExpired:
            raise HolderUnavailable("holder did not start in time", socket_path) from None
        if done.returncode not in (0, EXIT_ALREADY_RUNNING):
            stderr = done.stderr.decode(errors="replace").strip()[-500:]
            raise HolderUnavailable(f"holder exited with {done.returncode} (see {log_path}): "
                                    f"{stderr}", socket_path)
        last: HolderUnavailable | None = None
        while time.monotonic() < deadline:
            try:
                return await cls.connect(socket_path, max(0.05, deadline - time.monotonic()))
            except HolderUnavailable as exc:
                last = exc  # lost a race with a holder that is still binding: retry
                await asyncio.sleep(0.02)
        raise last or HolderUnavailable("holder did not answer", socket_path)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def socket_path(self) -> str:
        return self._path

    @property
    def queued_output_bytes(self) -> int:
        """Output bytes received but not yet taken by the consumer (bounded: reading pauses)."""
        return self._queued_bytes

    def close(self) -> None:
        self._lost("closed by client")

    async def __aenter__(self) -> HolderClient:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        self.close()

    # -- requests ----------------------------------------------------------------------

    async def request(self, method: str, params: Mapping[str, Any], fds: Sequence[int] = (),
                      timeout_s: float = 10.0) -> tuple[Message, list[int]]:
        """Send one request; its result map and any fds it carries (the caller owns them)."""
        if self._closed:
            raise ConnectionLost(f"holder connection closed: {self._lost_reason}")
        request_id = self._next_id
        self._next_id += 1
        message: Message = {"t": "req", "id": request_id, "m": method, "p": dict(params)}
        if fds:
            message["nfd"] = len(fds)
        future: asyncio.Future[tuple[Message, list[int]]] = self._loop.create_future()
        self._pending[request_id] = (method, future)
        self._send(message, list(fds))
        try:
            async with asyncio.timeout(timeout_s):
                response, rfds = await future
        except TimeoutError:
            raise HolderTimeout(method, timeout_s) from None
        finally:
            self._pending.pop(request_id, None)
        error = response.get("e")
        if error is not None:
            _close_all(rfds)
            raise error_for_code(str(error.get("code")), str(error.get("message")),
                                 error.get("errno"))
        result = response.get("p")
        if not isinstance(result, dict):
            _close_all(rfds)
            raise ProtocolError(f"{method}: response without a result map", response)
        return result, rfds

    async def ping(self, timeout_s: float = 5.0) -> dict[str, Any]:
        result, _ = await self.request("ping", {}, timeout_s=timeout_s)
        return result

    async def subscribe(self, timeout_s: float = 5.0) -> bool:
        """Become the holder's event sink; True if another connection was the sink before."""
        result, _ = await self.request("subscribe", {}, timeout_s=timeout_s)
        return bool(result.get("superseded"))

    async def launch(self, request: Mapping[str, Any] | Any, *, stdin: int | None = None,
                     stdio: tuple[int, int, int] | None = None,
                     tty: tuple[int, int] | None = None,
                     timeout_s: float = 30.0) -> Launched:
        """Start a dyno (a LaunchRequest or its fields); without `stdio` or `tty` (rows,
        columns of a pty made in the dyno, whose master comes back) the holder owns output."""
        params = _fields(request)
        fds: list[int] = list(stdio) if stdio is not None else (
            [stdin] if stdin is not None else [])
        if tty is not None:
            params["tty"] = list(tty)
        result, rfds = await self.request("launch", params, fds, timeout_s)
        pidfd, master = _result_fds(rfds, "launch", tty is not None)
        return Launched(int(result["pid"]), int(result["start_time"]),
                        dict(result.get("timings_ms") or {}), pidfd, master)

    async def enter(self, dyno_id: str, argv: Sequence[str], env: Sequence[tuple[str, str]],
                    uid: int, gid: int, cwd: str, cgroup_procs: Sequence[str],
                    stdio: tuple[int, int, int] | None, timeout_s: float = 30.0,
                    tty: tuple[int, int] | None = None,
                    nofile_limit: int | None = None) -> Entered:
        """Run a command in a running dyno with `stdio`, or with a pty made in the dyno
        (`tty`: rows, columns), whose master comes back. `nofile_limit`: the open files of
        the dyno's size (the launcher's default when None)."""
        params: dict[str, Any] = {
            "dyno_id": dyno_id, "argv": list(argv), "env": [list(kv) for kv in env],
            "uid": uid, "gid": gid, "cwd": cwd, "cgroup_procs": list(cgroup_procs)}
        if nofile_limit is not None:
            params["nofile_limit"] = nofile_limit
        if tty is not None:
            params["tty"] = list(tty)
        result, rfds = await self.request("enter", params, list(stdio or ()), timeout_s)
        pidfd, master = _result_fds(rfds, "enter", tty is not None)
        return Entered(int(result["pid"]), int(result["start_time"]), pidfd, master)

    async def list_processes(self, pidfds: bool = False,
                             timeout_s: float = 10.0) -> list[HeldProcess]:
        result, rfds = await self.request("list", {"pidfds": pidfds}, timeout_s=timeout_s)
        procs: list[HeldProcess] = []
        for entry in result.get("procs", []):
            index = entry.get("pidfd_index")
            procs.append(HeldProcess(
                entry["dyno_id"], entry["kind"], entry["pid"], entry["start_time"],
                entry["state"] == "running", entry["status"], entry["signal"],
                entry["buffered_lines"], entry["buffered_bytes"], entry["dropped"],
                rfds[index] if isinstance(index, int) and index < len(rfds) else None))
        return procs

    async def release(self, dyno_id: str, pid: int | None = None,
                      timeout_s: float = 5.0) -> int:
        params: dict[str, Any] = {"dyno_id": dyno_id}
        if pid is not None:
            params["pid"] = pid
        result, _ = await self.request("release", params, timeout_s=timeout_s)
        return int(result["released"])

    # -- events ------------------------------------------------------------------------

    async def events(self) -> AsyncGenerator[HolderEvent, None]:
        """Events until the connection ends (then ConnectionLost). Subscribe first.

        An output event is acked when the next one is requested, i.e. once handled; acks of
        consecutive events go out together, at the latest when the queue runs dry, before a
        non-output event, every ACK_EVERY_EVENTS events, or when the consumer stops iterating.
        """
        try:
            while True:
                if self._unacked is not None and self._events:
                    # More is queued, so the consumer would not suspend here: give the loop a
                    # turn between output events, or a backlog of them starves every other task.
                    await asyncio.sleep(0)
                self._note_handled()
                if (not self._events or len(self._acks) >= ACK_EVERY_EVENTS
                        or not isinstance(self._events[0], ReceivedOutput)):
                    self._send_acks()
                while not self._events:
                    if self._closed:
                        raise ConnectionLost(f"holder connection closed: {self._lost_reason}")
                    self._event_waiter = self._loop.create_future()
                    try:
                        await self._event_waiter
                    finally:
                        self._event_waiter = None
                item = self._events.popleft()
                if item is _LOST:
                    raise ConnectionLost(f"holder connection closed: {self._lost_reason}")
                if isinstance(item, ReceivedOutput):
                    self._queued_bytes -= item.size
                    item = item.event()
                    self._unacked = item
                if self._paused and len(self._events) < EVENT_QUEUE_PAUSE // 2 and (
                        self._queued_bytes < OUTPUT_QUEUE_PAUSE_BYTES // 2):
                    self._paused = False
                    self._loop.add_reader(self._sock.fileno(), self._on_readable)
                assert isinstance(item, OutputEvent | ExitEvent | Superseded)
                yield item
        finally:
            # Only what the consumer asked past is acked: the event in hand stays unacked.
            self._send_acks()

    async def dispatch_events(
            self, handler: Callable[[HolderEvent], Awaitable[None] | None]) -> NoReturn:
        """Call `handler` (plain or async) for each event, acking each once it returns.

        Runs until the connection ends, then raises ConnectionLost: run it as a task owned by
        whoever reconnects.
        """
        async for event in self.events():
            result = handler(event)
            if inspect.isawaitable(result):
                await result
        raise ConnectionLost(f"holder connection closed: {self._lost_reason}")

    def _note_handled(self) -> None:
        event = self._unacked
        if event is None:
            return
        self._unacked = None
        self._acks[(event.dyno_id, event.pid)] = event.seq + event.count

    def _send_acks(self) -> None:
        if not self._acks or self._closed:
            return
        acks = [[dyno_id, pid, next_seq] for (dyno_id, pid), next_seq in self._acks.items()]
        self._acks.clear()
        self._send({"t": "ack", "p": {"a": acks}}, [])

    # -- transport ---------------------------------------------------------------------

    def _send(self, message: Message, fds: list[int]) -> None:
        self._outq.append((memoryview(encode(message)), fds))
        if not self._writing and not self._flush_pending:
            # Written at the end of this turn of the loop, with whatever else it queues: a
            # mass delete releases hundreds of processes at once, and a syscall each would
            # hold the loop (every one gives the GIL away to the busy threads).
            self._flush_pending = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_pending = False
        if not self._writing:
            self._on_writable()

    def _on_writable(self) -> None:
        while self._outq and not self._closed:
            # Frames go out together; one that carries fds only at the head of a write (the
            # kernel attaches them to its first byte).
            fds = self._outq[0][1]
            buffers: list[memoryview] = []
            for data, frame_fds in self._outq:
                if (buffers and frame_fds) or len(buffers) >= FRAMES_PER_WRITE:
                    break
                buffers.append(data)
            try:
                sent = self._sock.sendmsg(buffers, rights(fds), socket.MSG_NOSIGNAL)
            except BlockingIOError:
                break
            except OSError as exc:
                self._lost(f"write failed: {exc}")
                return
            partial = sent < sum(len(data) for data in buffers)
            while sent:
                data, _frame_fds = self._outq[0]
                if sent < len(data):
                    self._outq[0] = (data[sent:], [])  # its fds went with its first byte
                    break
                sent -= len(data)
                self._outq.popleft()
            if partial:
                break
        want = bool(self._outq) and not self._closed
        if want and not self._writing:
            self._loop.add_writer(self._sock.fileno(), self._on_writable)
        elif not want and self._writing:
            self._loop.remove_writer(self._sock.fileno())
        self._writing = want

    def _on_readable(self) -> None:
        while not self._closed:
            try:
                data, ancdata, flags, _ = self._sock.recvmsg(
                    READ_CHUNK, ANCILLARY_BYTES, socket.MSG_CMSG_CLOEXEC)
            except BlockingIOError:
                return
            except OSError as exc:
                self._lost(f"read failed: {exc}")
                return
            try:
                fds = fds_from_ancillary(ancdata, flags)
                if not data and not fds:
                    self._lost("holder closed the connection")
                    return
                self._decoder.feed(data, fds)
                messages = self._decoder.messages()
            except ProtocolError as exc:
                self._lost(f"protocol error: {exc.message}")
                return
            for index, (message, mfds) in enumerate(messages):
                try:
                    self._on_message(message, mfds)
                except ProtocolError as exc:
                    # A malformed event: the stream cannot be trusted past it. Close what the
                    # rest of this read carried and end the connection, so pending requests
                    # fail at once instead of waiting out their deadlines.
                    for _message, rest in messages[index + 1:]:
                        _close_all(rest)
                    self._lost(f"protocol error: {exc.message}")
                    return
            if not self._paused and (len(self._events) >= EVENT_QUEUE_PAUSE
                                     or self._queued_bytes >= OUTPUT_QUEUE_PAUSE_BYTES):
                self._paused = True
                self._loop.remove_reader(self._sock.fileno())
                return

    def _on_message(self, message: Message, fds: list[int]) -> None:
        kind = message.get("t")
        if kind == "res":
            entry = self._pending.get(message.get("id", -1))
            if entry is None or entry[1].done():
                _close_all(fds)  # the request timed out; nobody will own these
                return
            entry[1].set_result((message, fds))
            return
        _close_all(fds)
        if kind != "evt":
            return
        event = decode_event(message)
        if event is None:
            log.warning("unknown holder event", extra={"EVENT": message.get("m")})
            return
        if isinstance(event, ReceivedOutput):
            self._queued_bytes += event.size
        self._events.append(event)
        if self._event_waiter is not None and not self._event_waiter.done():
            self._event_waiter.set_result(None)

    def _lost(self, reason: str) -> None:
        if self._closed:
            return
        self._closed = True
        self._lost_reason = reason
        fd = self._sock.fileno()
        self._loop.remove_reader(fd)
        if self._writing:
            self._loop.remove_writer(fd)
            self._writing = False
        self._sock.close()
        _close_all(self._decoder.take_stray_fds())
        for method, future in list(self._pending.values()):
            if not future.done():
                future.set_exception(ConnectionLost(f"{method}: holder connection {reason}"))
        self._events.append(_LOST)
        if self._event_waiter is not None and not self._event_waiter.done():
            self._event_waiter.set_result(None)


def decode_event(message: Message) -> ReceivedOutput | ExitEvent | Superseded | None:
    name = message.get("m")
    p = message.get("p") or {}
    try:
        if name == "output":
            return _output_of(p)
        if name == "exit":
            return ExitEvent(p["dyno_id"], p["kind"], p["pid"], p["status"], p["signal"],
                             p["exited_at"])
        if name == "superseded":
            return Superseded()
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"malformed {name} event: {exc}", p) from exc
    return None


def _output_of(p: dict[str, Any]) -> ReceivedOutput:
    """Check an output event's shape and block counts now, so taking it later cannot fail."""
    dyno_id, pid, seq, dropped = p["dyno_id"], p["pid"], p["seq"], p["dropped"]
    if not (isinstance(dyno_id, str) and isinstance(pid, int) and isinstance(seq, int)
            and isinstance(dropped, int)):
        raise TypeError("dyno_id must be a string, pid, seq and dropped integers")
    blocks: list[tuple[float, int, bytes]] = []
    size = 0
    if "blocks" in p:
        for ts, count, data in p["blocks"]:
            if not isinstance(data, bytes) or not isinstance(count, int) or (
                    data.count(b"\n") != count - 1 or count < 1):
                raise ValueError(f"block of {count!r} lines does not match its data")
            blocks.append((float(ts), count, data))
            size += len(data)
    else:
        # Protocol 1 (a holder started by an older agent): one [ts, bytes] per line.
        for ts, data in p["lines"]:
            if not isinstance(data, bytes) or b"\n" in data:
                raise ValueError("a line must be bytes without a newline")
            blocks.append((float(ts), 1, data))
            size += len(data)
    return ReceivedOutput(dyno_id, pid, seq, dropped, tuple(blocks), size)


# Newer fields (build dynos' app_dir and binds, a space's nameserver) go only when set.
_BUILD_ONLY_FIELDS = ("app_dir", "binds", "nameserver")


def _fields(request: Mapping[str, Any] | Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(request) and not isinstance(request, type):
        fields = dataclasses.asdict(request)
        # Fields only some dynos use go only when set: a holder started by an older agent
        # then still takes every other launch.
        for key in _BUILD_ONLY_FIELDS:
            if fields.get(key) in (None, ()):
                fields.pop(key, None)
        return fields
    if isinstance(request, Mapping):
        return dict(request)
    raise TypeError(f"launch takes a LaunchRequest or a mapping, not {type(request).__name__}")


def _result_fds(fds: list[int], method: str, tty: bool) -> tuple[int, int | None]:
    """A pidfd, and with a tty the pty's master after it."""
    want = 2 if tty else 1
    if len(fds) != want:
        _close_all(fds)
        raise ProtocolError(f"{method}: expected {want} fds, got {len(fds)}", len(fds))
    return fds[0], (fds[1] if tty else None)


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
