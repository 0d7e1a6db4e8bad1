"""The attach socket: `dynoctl run` and `dynoctl exec` start a command and relay its stdio.

No fd of the caller ever enters a dyno (a process of the dyno could take it with pidfd_getfd
and keep the operator's terminal): the command gets its own pipes, or its own pty made in the
dyno when the caller has a terminal, and the agent relays bytes, window size and signals.

Wire format: the client sends one JSON object ending in "\\n" and no fds: {"v": 2, "op":
"run"|"exec", ..., "tty": bool, "window": [rows, columns], "detached": bool (run),
"config_vars": {KEY: value} (run: they override the app's for the one-off)}. From then on both
directions carry the frames of `agent.api.attachwire`: the agent sends control frames
({"event": "started", ...}, {"event": "exit", "status": N} or {"error": {"code", "message"}}),
stdout and stderr data and stdin credit; the caller sends stdin within that credit, stdin EOF,
window sizes and signals. A request without "v": 2, or with fds (an older dynoctl), gets one
JSON error line. Closing the connection early stops what was started.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import socket
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import cgroups
from agent import errors
from agent.api import attachwire as wire
from agent.api.relay import Pipes, Relay, close_all, pty_ends
from agent.decoding import json_loads
from agent.holder import ExitEvent, HolderClient, HolderError
from agent.launcher.launch import stat_fields
from agent.peercred import PeerCredError, is_allowed, peer_credentials
from agent.sizes import DEFAULT_SIZE
from agent.spec import DEFAULT_PORT, ENV_KEY, DynoSpec, dyno_env
from agent.startup import entered_argv
from agent.supervision.events import EventFollower
from agent.supervision.records import Placement
from agent.tasks import OwnedTasks
from agent.unixsocket import listen

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 256 * 1024
REQUEST_TIMEOUT_S = 10.0
# A signal from the caller of a one-off the agent does not know to run yet (the holder's
# answer to its launch is on its way) is tried again this often, for this long.
SIGNAL_RETRY_S = 0.01
SIGNAL_WAIT_S = 5.0
# Exits of entered processes that arrived before anyone waited for them (a command that ends
# before `enter` has even returned); bounded, as nobody may ever claim some of them.
MAX_UNCLAIMED_EXITS = 1024
# Variables of the caller's terminal that a one-off or entered command gets.
TERMINAL_ENV = frozenset({"TERM", "COLUMNS", "LINES", "COLORTERM"})
DEFAULT_WINDOW = (24, 80)


def attach_path(socket_path: Path) -> Path:
    """The attach socket next to the operator socket (`x.sock` → `x.attach.sock`)."""
    return socket_path.with_name(f"{socket_path.stem}.attach{socket_path.suffix or '.sock'}")


class AttachError(errors.AgentError):
    """A run/exec request could not be carried out (the message says why)."""


def _close_all(fds: tuple[int, ...] | list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class Dynos(Protocol):
    """What the attach socket needs of the supervisor (agent.supervision.supervisor's
    `Supervisor` is one)."""

    def specs(self, app: str | None = None) -> list[DynoSpec]: ...

    def running(self, ref: str, app: str | None = None) -> tuple[DynoSpec, Placement]:
        """The spec and placement of a dyno (id, or name) that has a running process; raises
        NotFound, or Conflict when there is no process."""
        ...

    def subscribe_events(self) -> EventFollower: ...

    async def create_dyno(self, body: Any) -> dict[str, Any]: ...

    async def wait_ended(self, dyno_id: str, follower: EventFollower) -> int: ...

    async def delete_dyno(self, ref: str, app: str | None = None) -> None: ...


class DynoProcesses(Protocol):
    """The kernel side of a dyno that attach uses (`HostRuntime` is one)."""

    def group(self, placement: Placement) -> cgroups.Group: ...

    def signal_all(self, placement: Placement, sig: signal.Signals) -> int: ...


@dataclass
class OneOffStdio:
    """What the launch of an attached one-off takes from its session: the dyno's ends of the
    session's pipes, or the size of a pty to make in the dyno, whose master the launch
    delivers to the session through `master`. A `LaunchStdio` of the runtime."""

    pipes: tuple[int, int, int] | None = None
    tty: tuple[int, int] | None = None
    master: asyncio.Future[int] | None = None

    def deliver_pty(self, master: int) -> None:
        if self.master is not None and not self.master.done():
            self.master.set_result(master)
        else:
            os.close(master)  # the session has gone

    def close(self) -> None:
        if self.pipes is not None:
            _close_all(self.pipes)
            self.pipes = None
        if self.master is not None:
            self.master.cancel()  # no-op once delivered


class StdioRegistry:
    """The stdio of one-off dynos waiting for their launch; owns the pipe ends until taken.
    The runtime's `StdioSource`, given to it at construction."""

    def __init__(self) -> None:
        self._entries: dict[str, OneOffStdio] = {}

    def put_pipes(self, dyno_id: str, fds: tuple[int, int, int]) -> None:
        self.discard(dyno_id)
        self._entries[dyno_id] = OneOffStdio(pipes=fds)

    def put_tty(self, dyno_id: str, rows: int, cols: int) -> asyncio.Future[int]:
        self.discard(dyno_id)
        master: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._entries[dyno_id] = OneOffStdio(tty=(rows, cols), master=master)
        return master

    def take(self, dyno_id: str) -> OneOffStdio | None:
        return self._entries.pop(dyno_id, None)

    def discard(self, dyno_id: str) -> None:
        entry = self._entries.pop(dyno_id, None)
        if entry is not None:
            entry.close()

    def __contains__(self, dyno_id: object) -> bool:
        return dyno_id in self._entries


class _ExitWatch:
    """Exit statuses of entered processes, from the holder's event stream."""

    def __init__(self) -> None:
        self._waiters: dict[tuple[str, int], asyncio.Future[int]] = {}
        self._unclaimed: OrderedDict[tuple[str, int], int] = OrderedDict()

    def on_event(self, event: object) -> None:
        if not isinstance(event, ExitEvent) or event.kind != "enter":
            return
        key = (event.dyno_id, event.pid)
        status = event.status  # the holder's, already 128 + signal after a signal death
        waiter = self._waiters.pop(key, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(status)
            return
        self._unclaimed[key] = status
        while len(self._unclaimed) > MAX_UNCLAIMED_EXITS:
            self._unclaimed.popitem(last=False)

    def wait(self, dyno_id: str, pid: int) -> asyncio.Future[int]:
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        status = self._unclaimed.pop((dyno_id, pid), None)
        if status is not None:
            future.set_result(status)
        else:
            self._waiters[(dyno_id, pid)] = future
        return future

    def forget(self, dyno_id: str, pid: int) -> None:
        self._waiters.pop((dyno_id, pid), None)


async def _readable(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    future: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not future.done():
            future.set_result(None)

    loop.add_reader(sock.fileno(), ready)
    try:
        await future
    finally:
        loop.remove_reader(sock.fileno())


async def _receive_request(sock: socket.socket) -> tuple[dict[str, Any], list[int], bytes]:
    """The JSON request line, the fds that came with it (the caller owns them: they are
    refused) and the bytes that followed the line (the client's first frames)."""
    data = b""
    fds: list[int] = []
    space = socket.CMSG_SPACE(4 * array.array("i").itemsize)
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT_S):
            while b"\n" not in data:
                await _readable(sock)
                try:
                    chunk, ancdata, _flags, _ = sock.recvmsg(65536, space,
                                                             socket.MSG_CMSG_CLOEXEC)
                except BlockingIOError:
                    continue
                for level, kind, raw in ancdata:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        got = array.array("i")
                        got.frombytes(raw[:len(raw) - len(raw) % got.itemsize])
                        fds.extend(got)
                if not chunk:
                    raise errors.BadRequest("connection closed before a complete request")
                data += chunk
                if len(data) > MAX_REQUEST_BYTES:
                    raise errors.BadRequest(f"request over {MAX_REQUEST_BYTES} bytes")
    except TimeoutError:
        _close_all(fds)
        raise errors.BadRequest(f"no complete request within {REQUEST_TIMEOUT_S:g}s") from None
    except BaseException:
        _close_all(fds)
        raise
    line, _, rest = data.partition(b"\n")
    try:
        request = json_loads(line)
    except ValueError as exc:
        _close_all(fds)
        raise errors.BadRequest(f"request is not JSON: {exc}") from None
    if not isinstance(request, dict):
        _close_all(fds)
        raise errors.BadRequest("request must be a JSON object")
    return request, fds, rest


def _kill_session(pids: list[int], sid: int) -> None:
    """SIGKILL the processes among `pids` (a dyno's) whose session is `sid`. A session id is
    not given to a new process while any member lives, and each process is pinned by a pidfd
    before its session is read, so this hits nobody else."""
    for pid in pids:
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            continue
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
            if int(stat_fields(stat)[3]) == sid:  # field 6, the session
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        except (OSError, ValueError, IndexError):
            continue
        finally:
            os.close(pidfd)


def _stdio_mode(request: dict[str, Any]) -> tuple[int, int] | None:
    """The (rows, columns) of the pty the caller wants, or None for pipes."""
    tty = request.get("tty", False)
    if not isinstance(tty, bool):
        raise errors.BadRequest("tty must be true or false")
    if not tty:
        return None
    window = request.get("window")
    if window is None:
        return DEFAULT_WINDOW
    if (not isinstance(window, list) or len(window) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 0xFFFF
                       for v in window)):
        raise errors.BadRequest("window must be [rows, columns], each 0..65535")
    return window[0], window[1]


def _terminal_env(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise errors.BadRequest("env must be an object")
    env = {}
    for key, item in value.items():
        if key in TERMINAL_ENV and isinstance(item, str) and ENV_KEY.fullmatch(key) \
                and "\x00" not in item and len(item) < 256:
            env[key] = item
    return env


def one_off_env(template: DynoSpec, request: dict[str, Any]) -> dict[str, str]:
    """A one-off's config vars: its app's, the caller's terminal variables, and then the
    request's `config_vars` (`dynoctl run -e KEY=VALUE`), which override both for this dyno
    only. The spec's own checks (total size) follow when the dyno is created."""
    given = request.get("config_vars")
    if given is None:
        given = {}
    if not isinstance(given, dict):
        raise errors.BadRequest("config_vars must be an object of KEY: value strings")
    for key, value in given.items():
        if not ENV_KEY.fullmatch(key):
            raise errors.BadRequest(f"config_vars: key {errors.excerpt(key)} must match "
                                    f"{ENV_KEY.pattern}")
        if not isinstance(value, str) or "\x00" in value:
            raise errors.BadRequest(f"config_vars.{key} must be a string without NUL")
    return {**template.env, **_terminal_env(request.get("env")), **given}


class AttachServer:
    """Serves the attach socket: one task per connection, owned and cancelled here."""

    def __init__(self, dynos: Dynos, processes: DynoProcesses,
                 holder: Callable[[], HolderClient], registry: StdioRegistry,
                 socket_gid: int | None) -> None:
        self.dynos = dynos
        self.processes = processes
        self._holder = holder
        self.registry = registry
        self.socket_gid = socket_gid
        self.exits = _ExitWatch()
        self._tasks = OwnedTasks()

    def on_holder_event(self, event: object) -> None:
        self.exits.on_event(event)

    @contextlib.asynccontextmanager
    async def serving(self, path: Path) -> AsyncIterator[None]:
        # The agent's instance lock is held: a socket already here is a dead agent's.
        listener = listen(path, mode=0o660, gid=self.socket_gid, backlog=64)
        self._tasks.spawn(self._accept_loop(listener.sock), "attach-accept")
        try:
            yield
        finally:
            await self._tasks.cancel_all()
            listener.sock.close()
            listener.unlink()

    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(listener)
            conn.setblocking(False)
            self._tasks.spawn(self._session(conn), f"attach-session-{conn.fileno()}")

    async def _send(self, conn: socket.socket, message: dict[str, Any], framed: bool) -> None:
        """A message before the relay runs: a control frame, or for an older client (which
        is refused) a JSON line it can read."""
        data = (wire.control(message) if framed
                else (json.dumps(message, separators=(",", ":")) + "\n").encode())
        with contextlib.suppress(OSError):
            await asyncio.get_running_loop().sock_sendall(conn, data)

    async def _session(self, conn: socket.socket) -> None:
        fds: list[int] = []
        framed = False
        try:
            try:
                cred = peer_credentials(conn)
            except PeerCredError as exc:
                raise errors.Forbidden(f"the peer cannot be identified: {exc.strerror}") \
                    from None
            if not is_allowed(cred, self.socket_gid):
                raise errors.Forbidden(f"uid {cred.uid} is neither root nor in the socket's "
                                       "group")
            request, fds, rest = await _receive_request(conn)
            framed = request.get("v") == wire.VERSION
            if fds:
                # Whatever they are, they never go near a dyno.
                _close_all(fds)
                fds = []
                raise errors.BadRequest("the attach socket takes no file descriptors: the "
                                        "agent relays the command's stdio (update dynoctl)")
            if not framed:
                raise errors.BadRequest(f"attach protocol {wire.VERSION} is required "
                                        "(update dynoctl)")
            op = request.get("op")
            if op == "run":
                await self._run(conn, request, rest)
            elif op == "exec":
                await self._exec(conn, request, rest)
            else:
                raise errors.BadRequest(f'op must be "run" or "exec", got {errors.excerpt(op)}')
        except errors.AgentError as exc:
            await self._send(conn, {"error": {"code": exc.code, "message": exc.message}},
                             framed)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("attach session failed")
            await self._send(conn, {"error": {"code": "internal",
                                              "message": "internal error; see the agent's log"}},
                             framed)
        finally:
            _close_all(fds)
            conn.close()

    # -- run ---------------------------------------------------------------------------------
    def _template(self, app: str | None) -> DynoSpec:
        """A dyno of the app whose release, config vars and space a one-off reuses."""
        if app is None:
            apps = sorted({spec.app for spec in self.dynos.specs()})
            if len(apps) != 1:
                raise errors.BadRequest("name the app with -a APP (this agent runs "
                                        + (", ".join(apps) if apps else "no app") + ")")
            app = apps[0]
        candidates = self.dynos.specs(app)
        if not candidates:
            raise errors.NotFound(f"no dyno of app {errors.excerpt(app)} on this agent to take its "
                                  "release from")
        return min(candidates, key=lambda spec: (spec.is_one_shot, spec.name))

    async def _signal_once_running(self, dyno_id: str, sig: signal.Signals) -> None:
        """Signal the one-off's processes once the agent knows them: they may have started
        and written before the holder's answer came; not at all if it has ended by then."""
        deadline = asyncio.get_running_loop().time() + SIGNAL_WAIT_S
        while asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(SIGNAL_RETRY_S)
            try:
                _, placement = self.dynos.running(dyno_id)
            except errors.NotFound:
                return  # gone
            except errors.AgentError:
                continue  # not running yet, or ended (then the session ends meanwhile)
            self.processes.signal_all(placement, sig)
            return

    def _one_off_name(self, app: str) -> str:
        used = {spec.name for spec in self.dynos.specs(app)}
        while True:
            name = f"run.{1000 + secrets.randbelow(9000)}"  # Heroku's run.NNNN
            if name not in used:
                return name

    async def _run(self, conn: socket.socket, request: dict[str, Any], rest: bytes) -> None:
        command = request.get("command")
        if not isinstance(command, str) or not command.strip():
            raise errors.BadRequest("command must be a non-empty string")
        app = request.get("app")
        if app is not None and not isinstance(app, str):
            raise errors.BadRequest("app must be a string")
        detached = request.get("detached", False)
        if not isinstance(detached, bool):
            raise errors.BadRequest("detached must be true or false")
        window = None if detached else _stdio_mode(request)
        template = self._template(app)
        size = request.get("size") or DEFAULT_SIZE
        dyno_id = str(uuid.uuid4())
        name = self._one_off_name(template.app)
        body = {"id": dyno_id, "app": template.app, "name": name, "command": command,
                "env": one_off_env(template, request),
                "release": template.release.to_dict(), "size": size,
                "space": template.space, "restart": "never"}
        pipes: Pipes | None = None
        master: asyncio.Future[int] | None = None
        if window is not None:
            master = self.registry.put_tty(dyno_id, *window)
        elif not detached:
            pipes = Pipes.make()
            self.registry.put_pipes(dyno_id, pipes.dyno)  # the registry owns these now
        follower = self.dynos.subscribe_events()
        handed_off = False  # to the task that removes a detached one-off once complete
        relay: Relay | None = None
        master_attached = False
        ended: asyncio.Future[int] | None = None
        try:
            status = await self.dynos.create_dyno(body)
            started = {"event": "started", "id": dyno_id, "name": name, "app": template.app,
                       "size": status.get("size"),
                       "attached": not detached, "tty": window is not None}
            if detached:
                await self._send(conn, started, True)
                # Output goes to the logs; the dyno is removed once it completes.
                self._tasks.spawn(self._reap_later(dyno_id, follower), f"attach-reap-{dyno_id}")
                handed_off = True
                return

            def forward(sig: signal.Signals) -> None:
                try:
                    _, placement = self.dynos.running(dyno_id)
                except errors.AgentError:
                    # The command can write (and its caller press Ctrl-C) before the agent
                    # has heard back from the holder that it runs: the signal goes then.
                    self._tasks.spawn(self._signal_once_running(dyno_id, sig),
                                      f"attach-signal-{dyno_id}")
                    return
                self.processes.signal_all(placement, sig)

            relay = Relay(conn, forward, rest)
            relay.send_control(started)
            relay.start()
            if pipes is not None:
                relay.attach(pipes.agent)
                pipes = None
            ended = asyncio.ensure_future(self.dynos.wait_ended(dyno_id, follower))
            waits: set[asyncio.Future[Any]] = {ended, relay.left}
            if master is not None:
                waits.add(master)
            while True:
                done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                if master is None or master not in done:
                    break
                waits.discard(master)
                if not master.cancelled():
                    relay.attach(pty_ends(master.result()))
                    master_attached = True
            if ended.done() and not ended.cancelled() and ended.exception() is None:
                await relay.finish(ended.result())
            else:
                log.info("the caller of %s went away; stopping it", name)
        finally:
            if ended is not None:
                ended.cancel()
                await asyncio.gather(ended, return_exceptions=True)
            # cancel() is False once the launch delivered the master: then it is ours.
            if master is not None and not master.cancel() and not master.cancelled() \
                    and not master_attached:
                os.close(master.result())
            if relay is not None:
                relay.close()
            if pipes is not None:
                close_all(pipes.agent.fds)
            if not handed_off:
                follower.close()
                self.registry.discard(dyno_id)
                await self._remove(dyno_id)

    async def _reap_later(self, dyno_id: str, follower: EventFollower) -> None:
        try:
            with follower:
                await self.dynos.wait_ended(dyno_id, follower)
        finally:
            await self._remove(dyno_id)

    async def _remove(self, dyno_id: str) -> None:
        # Shielded: a session cancelled at shutdown must still not leave a half-deleted dyno.
        # One already gone (NotFound) is what was wanted.
        with contextlib.suppress(errors.AgentError, asyncio.CancelledError):
            await asyncio.shield(self.dynos.delete_dyno(dyno_id))

    # -- exec --------------------------------------------------------------------------------
    async def _exec(self, conn: socket.socket, request: dict[str, Any], rest: bytes) -> None:
        window = _stdio_mode(request)
        argv = request.get("argv")
        if (not isinstance(argv, list) or not argv
                or not all(isinstance(a, str) and "\x00" not in a for a in argv)):
            raise errors.BadRequest("argv must be a non-empty list of strings")
        ref = request.get("dyno")
        app = request.get("app")
        if not isinstance(ref, str) or (app is not None and not isinstance(app, str)):
            raise errors.BadRequest("dyno (and app, if given) must be strings")
        spec, placement = self.dynos.running(ref, app)
        env = {**dyno_env(spec, placement.ip, DEFAULT_PORT),
               **_terminal_env(request.get("env"))}
        group = self.processes.group(placement)
        holder = self._holder()
        pipes = None if window is not None else Pipes.make()
        try:
            entered = await holder.enter(
                spec.id, entered_argv(argv), tuple(env.items()), placement.uid, placement.gid,
                "/app",
                group.procs_paths(), None if pipes is None else pipes.dyno,
                tty=window, nofile_limit=spec.size.nofile)
        except BaseException as exc:
            if pipes is not None:
                close_all(pipes.agent.fds)
            if isinstance(exc, HolderError):
                raise AttachError(f"cannot enter {spec.name}: {exc}") from None
            raise
        finally:
            if pipes is not None:
                close_all(pipes.dyno)  # the command has its own copies
        if pipes is not None:
            ends = pipes.agent
        else:
            assert entered.tty_master is not None
            ends = pty_ends(entered.tty_master)
        exited = self.exits.wait(spec.id, entered.pid)

        def forward(sig: signal.Signals) -> None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(entered.pid, sig)

        def end_leftovers() -> None:
            # The command's process group; with a pty its whole session, as a shell with job
            # control puts each job in a group of its own.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(entered.pid, signal.SIGKILL)
            if window is not None:
                with contextlib.suppress(cgroups.CgroupError):
                    _kill_session(group.pids(), entered.pid)

        relay = Relay(conn, forward, rest)
        try:
            relay.send_control({"event": "started", "id": spec.id, "name": spec.name,
                                "pid": entered.pid, "tty": window is not None})
            relay.start()
            relay.attach(ends)
            waits: list[asyncio.Future[Any]] = [exited, relay.left]
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            if not exited.done():
                # The caller left: end what it started.
                # By pidfd: the pid alone could have been reused once the holder reaped it.
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(entered.pidfd, signal.SIGKILL)
                # And its whole process group (the launcher gives it one of its own): a group
                # id stays unused by new processes while any member lives, so this cannot hit
                # a stranger.
                end_leftovers()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(5.0):
                        await asyncio.shield(exited)
            else:
                # The session is over: what it left running in the background goes with it
                # (and lets go of the output, so the drain ends at once).
                end_leftovers()
                await relay.finish(exited.result())
        finally:
            relay.close()
            os.close(entered.pidfd)
            self.exits.forget(spec.id, entered.pid)
            with contextlib.suppress(HolderError):
                await self._holder().release(spec.id, entered.pid)
