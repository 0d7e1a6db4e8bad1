"""The holder process: one single-threaded selector loop that starts dynos, reaps them, owns output.

It is every dyno's parent (PR_SET_CHILD_SUBREAPER also makes it the reaper of orphans that
`enter` leaves behind), keeps exit statuses until the daemon releases them, and buffers
output, bounded, while no daemon is connected or the daemon reads slowly. It never blocks
on a client: every client socket is non-blocking with a bounded outgoing queue.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import logging
import os
import selectors
import signal
import socket
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agent import __version__
from agent.errors import excerpt
from agent.holder.backend import Backend, LaunchOutcome
from agent.holder.errors import (
    BadRequest,
    Conflict,
    HolderAlreadyRunning,
    HolderError,
    NotFound,
    ProtocolError,
    RequestFailed,
)
from agent.holder.output import BufferLimits, ByteTally, LineSplitter, OutputBuffer
from agent.holder.protocol import (
    ANCILLARY_BYTES,
    MAX_FDS_PER_FRAME,
    MAX_REQUEST_BYTES,
    PROTOCOL_VERSION,
    FrameDecoder,
    Message,
    chunks_with_fds,
    encode,
    fds_from_ancillary,
    rights,
)
from agent.launcher.launch import proc_start_time
from agent.launcher.report import Steps, Wait
from agent.peercred import PeerCredError, peer_credentials
from agent.signals import exit_status_from_wait
from agent.unixsocket import UnixListener, listen, live_peer

log = logging.getLogger(__name__)

PR_SET_CHILD_SUBREAPER = 36
F_SETPIPE_SZ = 1031
# A bigger pipe lets a dyno write 1 MiB ahead while the holder is busy launching another.
PIPE_BYTES = 1 << 20
# One read takes up to a quarter of a full pipe: few reads (and blocks) per burst, while one
# chatty dyno still yields to the others between reads.
READ_CHUNK = 1 << 18
# Stop moving lines into a client's queue past this; the rest wait in the per-dyno buffers,
# which are bounded, so a slow daemon costs drops, never holder memory or a blocked dyno.
SINK_HIGH_WATER = 1 << 20
# An output event carries at most this much. The line bound caps the daemon's work per event
# (a few ms, and it yields to its loop between events); bytes bind for lines over 128 bytes.
# (Issue 17: 8,192 made a `seq` burst reach a follower at ~2 M lines/s instead of ~1.2 M,
# but the API's answers took twice as long meanwhile.)
BATCH_LINES = 2048
BATCH_BYTES = 256 << 10
# The kernel keeps this much of a sink's queue, so the holder refills it less often.
SINK_SNDBUF_BYTES = 1 << 20
MAX_CLIENTS = 32
# A client that sends requests but never reads the answers is cut off past this backlog.
MAX_CLIENT_BACKLOG = 16 << 20


@dataclass(frozen=True)
class HolderConfig:
    socket_path: str
    state_dir: str
    limits: BufferLimits = field(default_factory=BufferLimits)


@dataclass
class Held:
    """One process the holder started: a dyno's PID 1 (`launch`) or an `enter`ed process."""

    handle: int
    dyno_id: str
    kind: str
    pid: int
    start_time: int
    pidfd: int
    buffer: OutputBuffer
    pipe_fd: int | None = None
    splitter: LineSplitter | None = None
    status: int | None = None
    signal: int | None = None
    exited_at: float | None = None
    exit_sent: bool = False

    @property
    def running(self) -> bool:
        return self.status is None

    def summary(self) -> dict[str, Any]:
        return {"dyno_id": self.dyno_id, "kind": self.kind, "pid": self.pid,
                "start_time": self.start_time,
                "state": "running" if self.running else "exited", "status": self.status,
                "signal": self.signal, "buffered_lines": self.buffer.lines,
                "buffered_bytes": self.buffer.bytes, "dropped": self.buffer.dropped_total}


@dataclass
class Deferred:
    """A request answered later, from the loop: a launch whose child is still setting itself
    up, or a `list` waiting for the launches under way to end."""

    client: Client
    request_id: int = -1


@dataclass
class PendingLaunch(Deferred):
    """A launch forked and waiting for its child's report (`steps` resumes it)."""

    dyno_id: str = ""
    steps: Steps[LaunchOutcome] | None = None
    wait: Wait | None = None
    pipe_r: int | None = None  # the dyno's output pipe, once it runs
    pidfd: int = -1  # on wait.pid, opened before anything could reap it
    reaped: dict[int, int] = field(default_factory=dict)  # pid → wait status, reaped meanwhile
    keep: list[int] = field(default_factory=list)  # the child's stdio: closed once it ends


@dataclass
class ListRequest(Deferred):
    params: dict[str, Any] = field(default_factory=dict)


class Client:
    """One connection: incoming frame decoder and an outgoing queue of (bytes, fds to pass)."""

    def __init__(self, sock: socket.socket, number: int) -> None:
        self.sock = sock
        self.number = number
        self.decoder = FrameDecoder(MAX_REQUEST_BYTES)
        self.outq: deque[tuple[memoryview, list[int]]] = deque()
        self.out_bytes = 0
        self.closed = False

    def queue(self, message: Message, fds: list[int] | None = None) -> None:
        frame = encode(message)
        self.outq.extend(chunks_with_fds(frame, fds or []))
        self.out_bytes += len(frame)


def _set_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(err)}")


class Holder:
    """The fork server. `bind()` claims the socket (or refuses), `run()` serves until stopped."""

    def __init__(self, config: HolderConfig, backend: Backend,
                 clock: Callable[[], float] = time.time) -> None:
        self._config = config
        self._backend = backend
        self._clock = clock
        self._sel = selectors.DefaultSelector()
        self._bound: UnixListener | None = None
        self._listener: socket.socket | None = None
        self._lock_fd: int | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._clients: dict[int, Client] = {}
        self._client_seq = 0
        self._sink: Client | None = None
        self._held: dict[int, Held] = {}
        self._by_key: dict[tuple[str, int], Held] = {}
        self._tally = ByteTally()
        self._running_by_pid: dict[int, Held] = {}
        self._by_pipe: dict[int, Held] = {}
        self._launches: dict[int, PendingLaunch] = {}  # by the fd its wait is on
        self._launching_pids: dict[int, PendingLaunch] = {}
        self._lists: list[ListRequest] = []  # waiting for self._launches to empty
        self._handle_seq = 0
        self._stop = False
        self._started_at = clock()
        self._devnull = -1

    # -- lifecycle ---------------------------------------------------------------------

    def bind(self) -> None:
        """Claim the socket: refuse if a live holder owns it, replace it if stale."""
        path = self._config.socket_path
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        os.makedirs(self._config.state_dir, exist_ok=True)
        # The lock closes the race of two holders both finding a stale socket; it is
        # close-on-exec, so a dyno can never inherit it and block the next holder.
        lock_fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            raise HolderAlreadyRunning(path) from None
        try:
            try:
                live = live_peer(path)
            except OSError as exc:
                raise HolderError(f"cannot probe {path}: {exc}") from exc
            if live is not None:
                raise HolderAlreadyRunning(path)
            if os.path.lexists(path):
                log.info("removing stale holder socket", extra={"SOCKET": path})
            bound = listen(path, mode=0o600, backlog=16)
        except BaseException:
            os.close(lock_fd)
            raise
        self._lock_fd = lock_fd
        self._bound = bound
        self._listener = bound.sock

    def run(self) -> None:
        """Serve until SIGTERM/SIGINT or `stop()`; held processes keep running after it returns."""
        if self._listener is None:
            self.bind()
        assert self._listener is not None
        _set_subreaper()
        with open(os.path.join(self._config.state_dir, "holder.pid"), "w") as f:
            f.write(f"{os.getpid()}\n")
        self._devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        # Sockets are written with MSG_NOSIGNAL, so the default SIGPIPE can stay (children
        # inherit dispositions until exec, and an ignored SIGPIPE would survive exec).
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        old_wakeup = signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        handlers = {s: signal.signal(s, self._on_signal)
                    for s in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT)}
        self._sel.register(self._listener, selectors.EVENT_READ, self._accept)
        self._sel.register(self._wake_r, selectors.EVENT_READ, self._on_wakeup)
        log.info("holder serving", extra={"SOCKET": self._config.socket_path,
                                          "BACKEND": self._backend.name})
        try:
            self._reap()  # children that exited before the handler was installed
            while not self._stop:
                for key, mask in self._sel.select(self._launch_timeout()):
                    key.data(key, mask)
                self._expire_launches()
                self._pump()
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
            self._shutdown()

    def stop(self) -> None:
        self._stop = True

    def _on_signal(self, signum: int, _frame: object) -> None:
        # Only a flag: the real work happens in the loop after the wakeup fd fires.
        if signum in (signal.SIGTERM, signal.SIGINT):
            self._stop = True

    def _shutdown(self) -> None:
        log.info("holder stopping", extra={"HELD": len(self._running_by_pid),
                                           "LAUNCHING": len(self._launches)})
        # A launch half way through is abandoned: its child is killed (closing the steps).
        for pending in list(self._launches.values()):
            self._end_launch(pending)
            if pending.steps is not None:
                pending.steps.close()
            _close_all([*pending.keep, *(fd for fd in (pending.pidfd, pending.pipe_r)
                                         if fd is not None and fd >= 0)])
        for client in list(self._clients.values()):
            self._close_client(client)
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(self._listener)  # type: ignore[arg-type]
        if self._listener is not None:
            self._listener.close()
        if self._bound is not None:
            with contextlib.suppress(OSError):
                self._bound.unlink()
        for held in list(self._held.values()):
            self._forget(held)
        for sock in (self._wake_r, self._wake_w):
            if sock is not None:
                with contextlib.suppress(KeyError, ValueError):
                    self._sel.unregister(sock)
                sock.close()
        if self._devnull >= 0:
            os.close(self._devnull)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
        self._sel.close()

    # -- clients -----------------------------------------------------------------------

    def _accept(self, _key: selectors.SelectorKey, _mask: int) -> None:
        assert self._listener is not None
        while True:
            try:
                sock, _ = self._listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                log.warning("accept failed", extra={"ERRNO": exc.errno})
                return
            if not _peer_is_root(sock):
                # The socket is 0600 in the agent's run dir; this holds if its mode is widened
                # by hand: only root (the agent) may launch or enter dynos.
                sock.close()
                continue
            if len(self._clients) >= MAX_CLIENTS:
                log.warning("too many clients, refusing one", extra={"MAX": MAX_CLIENTS})
                sock.close()
                continue
            sock.setblocking(False)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SINK_SNDBUF_BYTES)
            self._client_seq += 1
            client = Client(sock, self._client_seq)
            self._clients[sock.fileno()] = client
            self._sel.register(sock, selectors.EVENT_READ, self._on_client)
            log.debug("client connected", extra={"CLIENT": client.number})

    def _on_client(self, key: selectors.SelectorKey, mask: int) -> None:
        client = self._clients.get(key.fd)
        if client is None:
            return
        if mask & selectors.EVENT_WRITE:
            self._flush(client)
        if mask & selectors.EVENT_READ and not client.closed:
            self._read_client(client)

    def _read_client(self, client: Client) -> None:
        try:
            data, ancdata, flags, _ = client.sock.recvmsg(
                READ_CHUNK, ANCILLARY_BYTES, socket.MSG_CMSG_CLOEXEC)
        except BlockingIOError:
            return
        except OSError as exc:
            log.info("client read failed", extra={"CLIENT": client.number, "ERRNO": exc.errno})
            self._close_client(client)
            return
        try:
            fds = fds_from_ancillary(ancdata, flags)
        except ProtocolError as exc:
            log.warning("client protocol error", extra={"CLIENT": client.number,
                                                        "ERROR": exc.message})
            self._close_client(client)
            return
        if not data and not fds:
            self._close_client(client)
            return
        client.decoder.feed(data, fds)
        try:
            messages = client.decoder.messages()
        except ProtocolError as exc:
            log.warning("client protocol error", extra={"CLIENT": client.number,
                                                        "ERROR": exc.message})
            self._close_client(client)
            return
        for message, mfds in messages:
            if client.out_bytes > MAX_CLIENT_BACKLOG:
                log.warning("client does not read its responses, closing",
                            extra={"CLIENT": client.number, "BACKLOG": client.out_bytes})
                _close_all(mfds)
                self._close_client(client)
            if client.closed:
                _close_all(mfds)
                continue
            self._dispatch(client, message, mfds)

    def _dispatch(self, client: Client, message: Message, fds: list[int]) -> None:
        kind = message["t"]
        if kind == "ack":
            _close_all(fds)
            self._on_ack(message.get("p"))
            return
        request_id = message.get("id")
        method = message.get("m")
        params = message.get("p", {})
        if kind != "req" or not isinstance(request_id, int) or not isinstance(method, str):
            _close_all(fds)
            log.warning("bad frame from client", extra={"CLIENT": client.number, "T": kind})
            self._close_client(client)
            return
        handler = self._methods.get(method)
        try:
            if handler is None:
                raise BadRequest(f"unknown method {excerpt(method)}")
            if not isinstance(params, dict):
                raise BadRequest("p must be a map")
            if len(fds) > MAX_FDS_PER_FRAME:
                raise BadRequest(f"at most {MAX_FDS_PER_FRAME} fds per request")
            result, out_fds = handler(self, client, params, fds)
        except Exception as exc:
            self._answer(client, request_id, method, exc)
        else:
            if isinstance(result, Deferred):
                result.request_id = request_id
                if isinstance(result, PendingLaunch):
                    result.keep += fds  # the caller's stdio, until the launch ends
                    fds = []
            else:
                self._answer(client, request_id, method, (result, out_fds))
        finally:
            _close_all(fds)
        self._flush(client)

    def _answer(self, client: Client, request_id: int, method: str,
                outcome: tuple[dict[str, Any], list[int]] | Exception) -> None:
        if client.closed:
            if not isinstance(outcome, Exception):
                _close_all(outcome[1])
            return
        if isinstance(outcome, RequestFailed):
            client.queue({"t": "res", "id": request_id, "e": {
                "code": outcome.code, "message": outcome.message, "errno": outcome.errno}})
        elif isinstance(outcome, Exception):
            # Task root: a bug in one request must not end the holder.
            log.error("request failed", exc_info=outcome, extra={"METHOD": method})
            client.queue({"t": "res", "id": request_id,
                          "e": {"code": "internal", "message": repr(outcome), "errno": None}})
        else:
            result, out_fds = outcome
            response: Message = {"t": "res", "id": request_id, "p": result}
            if out_fds:
                response["nfd"] = len(out_fds)
            client.queue(response, out_fds)

    def _close_client(self, client: Client) -> None:
        if client.closed:
            return
        client.closed = True
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(client.sock)
        self._clients.pop(client.sock.fileno(), None)
        for _, fds in client.outq:
            _close_all(fds)
        client.outq.clear()
        _close_all(client.decoder.take_stray_fds())
        client.sock.close()
        if self._sink is client:
            self._sink = None
            log.info("event sink disconnected", extra={"CLIENT": client.number})

    def _flush(self, client: Client) -> None:
        """Send what the socket takes now; watch for writability if anything is left."""
        while client.outq and not client.closed:
            data, fds = client.outq[0]
            try:
                sent = client.sock.sendmsg([data], rights(fds),
                                           socket.MSG_NOSIGNAL | socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            except OSError as exc:
                log.info("client write failed", extra={"CLIENT": client.number,
                                                       "ERRNO": exc.errno})
                self._close_client(client)
                return
            client.out_bytes -= sent
            # The fds went with the first byte; the kernel holds its own references now.
            _close_all(fds)
            if sent < len(data):
                client.outq[0] = (data[sent:], [])
                break
            client.outq.popleft()
        if client.closed:
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if client.outq else 0)
        with contextlib.suppress(KeyError, ValueError):
            if self._sel.get_key(client.sock).events != events:
                self._sel.modify(client.sock, events, self._on_client)

    # -- requests ----------------------------------------------------------------------

    def _m_ping(self, _client: Client, _p: dict[str, Any],
                _fds: list[int]) -> tuple[dict[str, Any], list[int]]:
        return {"version": PROTOCOL_VERSION, "holder_version": __version__, "pid": os.getpid(),
                "started_at": self._started_at, "held": len(self._held),
                "backend": self._backend.name}, []

    def _m_subscribe(self, client: Client, _p: dict[str, Any],
                     _fds: list[int]) -> tuple[dict[str, Any], list[int]]:
        previous = self._sink
        if previous is not None and previous is not client:
            previous.queue({"t": "evt", "m": "superseded", "p": {}})
            self._flush(previous)
        self._sink = client
        for held in self._held.values():
            held.buffer.rewind()
            held.exit_sent = False
        log.info("event sink subscribed", extra={"CLIENT": client.number,
                                                 "HELD": len(self._held)})
        return {"superseded": previous is not None and previous is not client}, []

    def _m_launch(self, client: Client, p: dict[str, Any],
                  fds: list[int]) -> tuple[dict[str, Any] | Deferred, list[int]]:
        dyno_id = p.get("dyno_id")
        if not isinstance(dyno_id, str) or not dyno_id:
            raise BadRequest("dyno_id: a non-empty string is required")
        for held in self._running_by_pid.values():
            if held.dyno_id == dyno_id and held.kind == "launch":
                raise Conflict(f"dyno {dyno_id} is already running as pid {held.pid}")
        if any(pending.dyno_id == dyno_id for pending in self._launches.values()):
            raise Conflict(f"dyno {dyno_id} is being launched")
        tty = _tty_of(p.pop("tty", None), fds)
        if len(fds) not in (0, 1, 3):
            raise BadRequest(f"launch takes 0, 1 or 3 fds, got {len(fds)}")
        pipe_r: int | None = None
        pipe_w: int | None = None
        if len(fds) == 3:
            stdio = (fds[0], fds[1], fds[2])
        elif tty is not None:
            # The pty is the command's stdio; its output is the caller's to relay.
            stdio = (self._devnull, self._devnull, self._devnull)
        else:
            # One pipe for stdout and stderr keeps the order the dyno wrote them in.
            pipe_r, pipe_w = os.pipe2(os.O_CLOEXEC)
            with contextlib.suppress(OSError):
                fcntl.fcntl(pipe_w, F_SETPIPE_SZ, PIPE_BYTES)
            stdio = (fds[0] if fds else self._devnull, pipe_w, pipe_w)
        steps_of = getattr(self._backend, "launch_steps", None)
        steps: Steps[LaunchOutcome] | None = None
        wait: Wait | None = None
        try:
            if steps_of is None:
                outcome = self._backend.launch(p, *stdio, tty=tty)
            else:
                # Up to the fork now; the child sets itself up while the loop serves others.
                steps = steps_of(p, *stdio, tty=tty)
                try:
                    wait = next(steps)
                except StopIteration as stop:
                    outcome = stop.value
        except BaseException:
            _close_all([fd for fd in (pipe_r, pipe_w) if fd is not None])
            raise
        if wait is not None:
            assert steps is not None
            # The stdio stays open until the launch ends: a child the kernel kills at birth
            # (see launcher.process) is forked again, in a later step, with the same fds.
            pending = PendingLaunch(client, dyno_id=dyno_id, steps=steps, pipe_r=pipe_r,
                                    keep=[] if pipe_w is None else [pipe_w])
            self._await_launch(pending, wait)
            return pending, []
        if pipe_w is not None:
            os.close(pipe_w)
        return self._launched(dyno_id, outcome, pipe_r)

    def _launched(self, dyno_id: str, outcome: LaunchOutcome, pipe_r: int | None,
                  pidfd: int | None = None, reaped: int | None = None,
                  ) -> tuple[dict[str, Any], list[int]]:
        """Hold a launched dyno (`reaped`: its wait status, if it was reaped already)."""
        held = self._track(dyno_id, "launch", outcome.pid, outcome.start_time, pidfd)
        if pipe_r is not None:
            os.set_blocking(pipe_r, False)
            held.pipe_fd = pipe_r
            held.splitter = LineSplitter()
            self._by_pipe[pipe_r] = held
            self._sel.register(pipe_r, selectors.EVENT_READ, self._on_pipe)
        log.info("launched", extra={"DYNO_ID": dyno_id, "PID": outcome.pid,
                                    "TIMINGS_MS": dict(outcome.timings_ms)})
        if reaped is not None:
            del self._running_by_pid[held.pid]
            self._exited(held, reaped)
        out_fds = [os.dup(held.pidfd)]
        if outcome.pty_master is not None:
            out_fds.append(outcome.pty_master)  # closed here once sent
        return {"pid": outcome.pid, "start_time": outcome.start_time,
                "timings_ms": dict(outcome.timings_ms)}, out_fds

    def _m_enter(self, client: Client, p: dict[str, Any],
                 fds: list[int]) -> tuple[dict[str, Any], list[int]]:
        dyno_id = p.get("dyno_id")
        tty = _tty_of(p.pop("tty", None), fds)
        if tty is None and len(fds) != 3:
            raise BadRequest(f"enter takes 3 stdio fds or a tty, got {len(fds)} fds")
        target = next((h for h in self._running_by_pid.values()
                       if h.dyno_id == dyno_id and h.kind == "launch"), None)
        if target is None:
            raise NotFound(f"no running dyno {excerpt(dyno_id)} to enter")
        stdio = (fds[0], fds[1], fds[2]) if tty is None else (self._devnull,) * 3
        outcome = self._backend.enter(target.pid, p, *stdio, tty=tty)
        pid = outcome.pid
        try:
            held = self._track(str(dyno_id), "enter", pid, _start_time_or_zero(pid))
        except BaseException:
            if outcome.pty_master is not None:
                os.close(outcome.pty_master)
            raise
        log.info("entered", extra={"DYNO_ID": dyno_id, "PID": pid, "TARGET": target.pid})
        out_fds = [os.dup(held.pidfd)]
        if outcome.pty_master is not None:
            out_fds.append(outcome.pty_master)  # closed here once sent
        return {"pid": pid, "start_time": held.start_time}, out_fds

    def _m_list(self, client: Client, p: dict[str, Any],
                _fds: list[int]) -> tuple[dict[str, Any] | Deferred, list[int]]:
        if self._launches:
            # Every launch asked for before the list is in it: a daemon that lists to learn
            # what runs must not miss a dyno that was still setting itself up.
            waiting = ListRequest(client, params=p)
            self._lists.append(waiting)
            return waiting, []
        return self._list(p)

    def _list(self, p: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        procs: list[dict[str, Any]] = []
        out_fds: list[int] = []
        for held in self._held.values():
            entry = held.summary()
            entry["pidfd_index"] = None
            if p.get("pidfds") and held.running:
                entry["pidfd_index"] = len(out_fds)
                out_fds.append(os.dup(held.pidfd))
            procs.append(entry)
        return {"procs": procs}, out_fds

    def _m_release(self, _client: Client, p: dict[str, Any],
                   _fds: list[int]) -> tuple[dict[str, Any], list[int]]:
        dyno_id = p.get("dyno_id")
        pid = p.get("pid")
        matches = [h for h in self._held.values()
                   if h.dyno_id == dyno_id and (pid is None or h.pid == pid)]
        if not matches:
            raise NotFound(f"no held process for dyno {excerpt(dyno_id)}"
                           + (f" pid {pid}" if pid is not None else ""))
        running = [h.pid for h in matches if h.running]
        if running and pid is not None:
            raise Conflict(f"dyno {dyno_id} pid {pid} is still running")
        released = 0
        for held in matches:
            if not held.running:
                self._forget(held)
                released += 1
        return {"released": released, "running": running}, []

    _methods: Mapping[str, Callable[[Holder, Client, dict[str, Any], list[int]],
                                    tuple[dict[str, Any] | Deferred, list[int]]]] = {
        "ping": _m_ping, "subscribe": _m_subscribe, "launch": _m_launch,
        "enter": _m_enter, "list": _m_list, "release": _m_release,
    }

    def _on_ack(self, p: Any) -> None:
        acks = p.get("a") if isinstance(p, dict) else None
        if not isinstance(acks, list):
            return
        for item in acks:
            if not isinstance(item, list) or len(item) != 3:
                continue
            dyno_id, pid, next_seq = item
            if not isinstance(dyno_id, str) or not isinstance(pid, int):
                continue
            held = self._by_key.get((dyno_id, pid))
            if held is not None and isinstance(next_seq, int):
                held.buffer.ack(next_seq)

    # -- launches under way -----------------------------------------------------------

    def _await_launch(self, pending: PendingLaunch, wait: Wait) -> None:
        if pending.wait is None or wait.pid != pending.wait.pid:
            # A new child (the first, or a second attempt): a pidfd on it before this loop
            # can reap it, so the dyno is held through one even if it has exited by then.
            if pending.pidfd >= 0:
                os.close(pending.pidfd)
            self._launching_pids.pop(pending.wait.pid if pending.wait else -1, None)
            pending.pidfd = os.pidfd_open(wait.pid)
            self._launching_pids[wait.pid] = pending
        pending.wait = wait
        self._launches[wait.fd] = pending
        self._sel.register(wait.fd, selectors.EVENT_READ, self._on_launch_ready)

    def _end_launch(self, pending: PendingLaunch) -> None:
        """No longer waiting on anything (its fd may be closed by the next step)."""
        if pending.wait is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(pending.wait.fd)
            self._launches.pop(pending.wait.fd, None)

    def _on_launch_ready(self, key: selectors.SelectorKey, _mask: int) -> None:
        pending = self._launches.get(key.fd)
        if pending is not None:
            self._step_launch(pending)

    def _launch_timeout(self) -> float | None:
        if not self._launches:
            return None
        soonest = min(p.wait.deadline for p in self._launches.values() if p.wait is not None)
        return max(0.0, soonest - time.monotonic())

    def _expire_launches(self) -> None:
        now = time.monotonic()
        for pending in [p for p in self._launches.values()
                        if p.wait is not None and p.wait.deadline <= now]:
            self._step_launch(pending)  # the steps see their deadline passed

    def _step_launch(self, pending: PendingLaunch) -> None:
        assert pending.steps is not None and pending.wait is not None
        self._end_launch(pending)
        outcome: tuple[dict[str, Any], list[int]] | Exception
        try:
            wait = pending.steps.send(None)
        except StopIteration as stop:
            launched: LaunchOutcome = stop.value
            self._launching_pids.pop(pending.wait.pid, None)
            pidfd, pending.pidfd = pending.pidfd, -1
            failed: Exception | None = None
            if launched.pid != pending.wait.pid:
                # A child forked again in this very step (after one the kernel killed at
                # birth) whose report was whole at its first read, so no Wait named it.
                # Nothing reaps between its fork and here (reaping waits for the loop), so a
                # pidfd taken now holds it even if it has exited.
                os.close(pidfd)
                try:
                    pidfd = os.pidfd_open(launched.pid)
                except OSError as exc:
                    failed = RequestFailed(f"launch returned pid {launched.pid}, not a child "
                                           f"of this launch ({exc.strerror})")
            if failed is not None:
                outcome = failed
            else:
                try:
                    outcome = self._launched(pending.dyno_id, launched, pending.pipe_r, pidfd,
                                             pending.reaped.get(launched.pid))
                    pending.pipe_r = None
                except Exception as exc:
                    os.close(pidfd)
                    outcome = exc
        except Exception as exc:
            self._launching_pids.pop(pending.wait.pid, None)
            outcome = exc
        else:
            self._await_launch(pending, wait)
            return
        _close_all(pending.keep)
        pending.keep = []
        if pending.pidfd >= 0:
            os.close(pending.pidfd)
            pending.pidfd = -1
        if pending.pipe_r is not None:
            os.close(pending.pipe_r)
            pending.pipe_r = None
        self._answer(pending.client, pending.request_id, "launch", outcome)
        self._flush(pending.client)
        if not self._launches:
            lists, self._lists = self._lists, []
            for waiting in lists:
                try:
                    listed: tuple[dict[str, Any], list[int]] | Exception = \
                        self._list(waiting.params)
                except Exception as exc:
                    listed = exc
                self._answer(waiting.client, waiting.request_id, "list", listed)
                self._flush(waiting.client)

    # -- processes ---------------------------------------------------------------------

    def _track(self, dyno_id: str, kind: str, pid: int, start_time: int,
               pidfd: int | None = None) -> Held:
        if pidfd is None:
            try:
                # Only this loop reaps, and it has not had a turn since the backend forked, so
                # a child that already exited is still a zombie here and pidfd_open succeeds;
                # failure means the backend returned a pid that is not ours.
                pidfd = os.pidfd_open(pid)
            except ProcessLookupError:
                raise RequestFailed(f"pid {pid} is not a child the holder can hold") from None
        self._handle_seq += 1
        held = Held(self._handle_seq, dyno_id, kind, pid, start_time, pidfd,
                    OutputBuffer(self._config.limits, self._tally))
        self._held[held.handle] = held
        self._by_key[(dyno_id, pid)] = held
        self._running_by_pid[pid] = held
        return held

    def _forget(self, held: Held) -> None:
        self._close_pipe(held)
        os.close(held.pidfd)
        held.buffer.forget()
        self._held.pop(held.handle, None)
        if self._by_key.get((held.dyno_id, held.pid)) is held:
            del self._by_key[(held.dyno_id, held.pid)]
        if self._running_by_pid.get(held.pid) is held:
            del self._running_by_pid[held.pid]

    def _on_wakeup(self, _key: selectors.SelectorKey, _mask: int) -> None:
        assert self._wake_r is not None
        with contextlib.suppress(BlockingIOError):
            while self._wake_r.recv(4096):
                pass
        self._reap()

    def _reap(self) -> None:
        while True:
            try:
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            held = self._running_by_pid.pop(pid, None)
            if held is None:
                pending = self._launching_pids.get(pid)
                if pending is not None:
                    # Its launch has not ended yet; that settles what the status means.
                    pending.reaped[pid] = wait_status
                    continue
                # An orphan re-parented to us (we are a subreaper); reaping it is the point.
                log.debug("reaped orphan", extra={"PID": pid})
                continue
            self._exited(held, wait_status)

    def _exited(self, held: Held, wait_status: int) -> None:
        """A held process was reaped (no longer in _running_by_pid)."""
        held.status = exit_status_from_wait(wait_status)
        held.signal = os.WTERMSIG(wait_status) if os.WIFSIGNALED(wait_status) else None
        held.exited_at = self._clock()
        # Everything the dyno wrote before its PID 1 was reaped is in the pipe now (a pid
        # namespace's init is reapable only after its other processes are gone): read it
        # so the exit event follows the last line.
        if held.pipe_fd is not None:
            self._read_pipe(held, drain=True)
        log.info("process exited", extra={"DYNO_ID": held.dyno_id, "PID": held.pid,
                                          "KIND": held.kind, "STATUS": held.status})

    def _on_pipe(self, key: selectors.SelectorKey, _mask: int) -> None:
        held = self._by_pipe.get(key.fd)
        if held is not None:
            self._read_pipe(held, drain=False)

    def _read_pipe(self, held: Held, drain: bool) -> None:
        assert held.pipe_fd is not None and held.splitter is not None
        while True:
            try:
                data = os.read(held.pipe_fd, READ_CHUNK)
            except BlockingIOError:
                return
            except OSError as exc:
                log.warning("output pipe read failed", extra={"DYNO_ID": held.dyno_id,
                                                              "ERRNO": exc.errno})
                data = b""
            now = self._clock()
            if not data:
                for line in held.splitter.flush():
                    held.buffer.push(now, line)
                self._close_pipe(held)
                self._enforce_total()
                return
            chunk = held.splitter.feed_chunk(data)
            if chunk is not None:
                held.buffer.push(now, *chunk)
                self._enforce_total()
            # One chunk per readiness event keeps a chatty dyno from starving the others.
            if not drain:
                return

    def _enforce_total(self) -> None:
        """Over the holder-wide bound, the biggest buffer loses its oldest lines first."""
        cap = self._config.limits.total_bytes
        while self._tally.bytes > cap:
            biggest = max(self._held.values(), key=lambda h: h.buffer.bytes)
            if biggest.buffer.lines == 0:
                return
            biggest.buffer.evict(self._tally.bytes - cap)

    def _close_pipe(self, held: Held) -> None:
        if held.pipe_fd is None:
            return
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(held.pipe_fd)
        self._by_pipe.pop(held.pipe_fd, None)
        os.close(held.pipe_fd)
        held.pipe_fd = None

    # -- events ------------------------------------------------------------------------

    def _pump(self) -> None:
        """Move buffered output and exits into the sink's queue, fairly, up to its high water."""
        sink = self._sink
        if sink is None or sink.closed:
            return
        progress = True
        while progress and sink.out_bytes < SINK_HIGH_WATER:
            progress = False
            for held in list(self._held.values()):
                if sink.out_bytes >= SINK_HIGH_WATER:
                    break
                # Drops with no line left to follow them (the holder-wide bound emptied the
                # buffer) still go out, in an event without lines.
                if held.buffer.unsent or held.buffer.dropped_unreported:
                    batch = held.buffer.take(BATCH_LINES, BATCH_BYTES)
                    sink.queue({"t": "evt", "m": "output", "p": {
                        "dyno_id": held.dyno_id, "pid": held.pid, "seq": batch.seq,
                        "dropped": batch.dropped,
                        "blocks": [[b.ts, b.count, b.data] for b in batch.blocks]}})
                    progress = True
                elif not held.running and not held.exit_sent:
                    held.exit_sent = True
                    sink.queue({"t": "evt", "m": "exit", "p": {
                        "dyno_id": held.dyno_id, "kind": held.kind, "pid": held.pid,
                        "status": held.status, "signal": held.signal,
                        "exited_at": held.exited_at}})
                    progress = True
        self._flush(sink)


def _tty_of(value: Any, fds: list[int]) -> tuple[int, int] | None:
    """A request's `tty` ([rows, columns]): the command gets a pty, so no stdio fds come."""
    if value is None:
        return None
    if (not isinstance(value, list | tuple) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 0xFFFF
                       for v in value)):
        raise BadRequest(f"tty: [rows, columns] of 0..65535 is required, got "
                         f"{excerpt(value)}")
    if fds:
        raise BadRequest("a request with a tty takes no stdio fds")
    return int(value[0]), int(value[1])


def _start_time_or_zero(pid: int) -> int:
    try:
        return proc_start_time(pid)
    except OSError:
        return 0


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _peer_is_root(sock: socket.socket) -> bool:
    """The client is root or the holder's own user; unreadable credentials are a refusal."""
    try:
        cred = peer_credentials(sock)
    except PeerCredError as exc:
        log.warning("refusing a client whose credentials cannot be read: %s", exc)
        return False
    if cred.uid in (0, os.geteuid()):
        return True
    log.warning("refusing a client that is not root", extra={"PEER_UID": cred.uid,
                                                             "PEER_PID": cred.pid})
    return False
