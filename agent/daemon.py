"""The daemon's lifecycle: ordered start-up with deadlines, the serving loop, reverse shutdown.

Signal handlers only set flags: the first SIGTERM/SIGINT starts a graceful shutdown, a second
one forces it (shorter deadlines, no waiting for dynos); SIGHUP reloads what can be reloaded.
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
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from agent import __version__, logsetup, notify
from agent import config as config_mod
from agent.api import build_app
from agent.config import Config
from agent.errors import ConfigError
from agent.peercred import group_id, peer_credentials

log = logging.getLogger(__name__)

START_STEP_TIMEOUT_S = 30.0
STOP_STEP_TIMEOUT_S = 60.0
FORCED_STOP_STEP_TIMEOUT_S = 3.0


class StartupError(Exception):
    """A start-up step failed; the message is meant for the operator's terminal."""


@dataclass(frozen=True)
class Step:
    """One start-up step: an async context manager whose exit is the matching shutdown step."""

    name: str
    run: Callable[[], contextlib.AbstractAsyncContextManager[None]]
    start_timeout_s: float = START_STEP_TIMEOUT_S


def detect_cgroup_mode(mountinfo: Path = Path("/proc/self/mountinfo")) -> str:
    """`v2` when /sys/fs/cgroup is the unified hierarchy, `hybrid` when v1 holds controllers."""
    fstypes = {}
    for line in mountinfo.read_text().splitlines():
        left, _, right = line.partition(" - ")
        fstypes[left.split()[4]] = right.split()[0]
    if fstypes.get("/sys/fs/cgroup") == "cgroup2":
        return "v2"
    return "hybrid" if "cgroup" in fstypes.values() else "unsupported"


def _read_or_create_agent_id(state_dir: Path) -> str:
    path = state_dir / "agent-id"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        agent_id = uuid.uuid4().hex
        tmp = path.with_suffix(".tmp")
        tmp.write_text(agent_id + "\n")
        os.replace(tmp, path)
        return agent_id


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


class Daemon:
    """Owns the agent's process-wide resources and their order of creation and release."""

    def __init__(self, config: Config, config_path: Path | None) -> None:
        self.config = config
        self.config_path = config_path
        self.started_at = time.time()
        self.state = "starting"
        self.agent_id = ""
        self.cgroup_mode = "unknown"
        self._socket_gid: int | None = None
        self._stop = asyncio.Event()
        self._forced = False
        self._reload_requested = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    # -- what the operator API reads -------------------------------------------------------
    @property
    def socket_gid(self) -> int | None:
        return self._socket_gid

    def info(self) -> dict[str, Any]:
        return {
            "version": __version__,
            "agent_id": self.agent_id,
            "host": socket.gethostname(),
            "boot_id": _boot_id(),
            "pid": os.getpid(),
            "state": self.state,
            "started_at": self.started_at,
            "uptime_s": round(time.time() - self.started_at, 3),
            "cgroup_mode": self.cgroup_mode,
            "capacity": {
                "cpus": os.cpu_count() or 1,
                "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
            },
            "coordinator": {"state": "disabled" if self.config.coordinator_url is None
                            else "disconnected", "url": self.config.coordinator_url},
            "dynos": {"total": 0, "by_state": {}},
            "socket": str(self.config.socket_path),
        }

    # -- signals ---------------------------------------------------------------------------
    def request_stop(self, signame: str) -> None:
        if self._stop.is_set():
            if not self._forced:
                log.warning("second %s: forcing shutdown", signame)
                self._forced = True
            return
        log.info("%s: shutting down gracefully (send it again to force)", signame)
        self._stop.set()

    def _install_signal_handlers(self, loop: asyncio.AbstractEventLoop) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, sig.name)
        loop.add_signal_handler(signal.SIGHUP, self._reload_requested.set)

    def _spawn(self, coro: Awaitable[None], name: str) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task %s failed", task.get_name(), exc_info=task.exception())

    async def _reload_loop(self) -> None:
        while True:
            await self._reload_requested.wait()
            self._reload_requested.clear()
            self.reload()

    def reload(self) -> None:
        with notify.reloading_done():
            try:
                new = config_mod.load(self.config_path)
            except ConfigError as exc:
                log.error("reload refused, keeping the running configuration: %s", exc)
                return
            self.config, ignored = config_mod.reload_changes(self.config, new)
            logsetup.set_level(self.config.log_level)
            if ignored:
                log.warning("reload: these keys need a restart and were not applied: %s",
                            ", ".join(ignored))
            log.info("configuration reloaded")

    # -- start-up steps ----------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def _directories(self) -> AsyncIterator[None]:
        for path, mode in ((self.config.state_dir, 0o700), (self.config.run_dir, 0o755),
                           (self.config.socket_path.parent, 0o755)):
            try:
                path.mkdir(mode=mode, parents=True, exist_ok=True)
            except OSError as exc:
                raise StartupError(f"cannot create {path}: {exc.strerror}") from None
        self.agent_id = _read_or_create_agent_id(self.config.state_dir)
        yield

    @contextlib.asynccontextmanager
    async def _instance_lock(self) -> AsyncIterator[None]:
        """One agent per socket: an flock next to the socket, held for the agent's life."""
        lock_path = self.config.socket_path.with_name(self.config.socket_path.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                raise StartupError(
                    f"another dynoagent (pid {owner}) is already serving "
                    f"{self.config.socket_path}; refusing to start") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            yield
        finally:
            os.close(fd)

    @contextlib.asynccontextmanager
    async def _cgroups(self) -> AsyncIterator[None]:
        self.cgroup_mode = detect_cgroup_mode()
        if self.cgroup_mode == "unsupported":
            raise StartupError("no cgroup hierarchy with controllers is mounted")
        yield

    def _bind_socket(self) -> socket.socket:
        path = self.config.socket_path
        if path.exists() or path.is_symlink():
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.settimeout(1.0)
                probe.connect(str(path))
            except OSError as exc:
                if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTSOCK):
                    raise StartupError(f"cannot probe {path}: {exc.strerror}") from None
                log.info("removing stale socket %s", path)
                path.unlink(missing_ok=True)
            else:
                cred = peer_credentials(probe)
                raise StartupError(f"{path} is in use by pid {cred.pid}; refusing to start")
            finally:
                probe.close()
        # Bind under a temporary name and rename into place, so the socket is never
        # reachable with the wrong mode or group.
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(tmp))
            os.chmod(tmp, 0o660)
            self._socket_gid = group_id(self.config.socket_group)
            if self._socket_gid is not None:
                os.chown(tmp, -1, self._socket_gid)
            sock.listen(128)
            os.replace(tmp, path)
        except OSError as exc:
            sock.close()
            tmp.unlink(missing_ok=True)
            raise StartupError(f"cannot bind {path}: {exc.strerror}") from None
        sock.setblocking(False)
        return sock

    @contextlib.asynccontextmanager
    async def _operator_socket(self) -> AsyncIterator[None]:
        sock = self._bind_socket()
        identity = os.stat(self.config.socket_path)
        runner = web.AppRunner(build_app(self), handle_signals=False, access_log=None,
                               shutdown_timeout=2.0)
        try:
            await runner.setup()
            await web.SockSite(runner, sock).start()
            yield
        finally:
            await runner.cleanup()
            with contextlib.suppress(FileNotFoundError):
                current = os.stat(self.config.socket_path)
                # Remove only our own socket, never one a successor already bound.
                if (current.st_ino, current.st_dev) == (identity.st_ino, identity.st_dev):
                    os.unlink(self.config.socket_path)

    def steps(self) -> list[Step]:
        return [
            Step("directories", self._directories),
            Step("instance lock", self._instance_lock),
            Step("cgroups", self._cgroups),
            Step("operator socket", self._operator_socket),
        ]

    # -- the whole life ----------------------------------------------------------------------
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._install_signal_handlers(loop)
        async with contextlib.AsyncExitStack() as stack:
            for step in self.steps():
                notify.status(f"starting: {step.name}")
                started = time.monotonic()
                try:
                    await asyncio.wait_for(stack.enter_async_context(_StepGuard(self, step)),
                                           step.start_timeout_s)
                except TimeoutError:
                    raise StartupError(f"start-up step '{step.name}' did not finish within "
                                       f"{step.start_timeout_s:g}s") from None
                log.debug("started %s in %.1f ms", step.name,
                          (time.monotonic() - started) * 1000)
                if self._stop.is_set():
                    log.info("stop requested during start-up")
                    break
            else:
                self.state = "ready"
                self._spawn(self._reload_loop(), "reload")
                interval = notify.watchdog_interval_s()
                if interval is not None:
                    self._spawn(notify.watchdog_loop(interval), "watchdog")
                notify.ready(f"serving {self.config.socket_path}")
                log.info("dynoagent %s ready on %s", __version__, self.config.socket_path,
                         extra=logsetup.extra(cgroup_mode=self.cgroup_mode))
                await self._stop.wait()
            self.state = "stopping"
            notify.stopping("shutting down")
            await self._cancel_tasks()
        log.info("dynoagent stopped")
        return 0

    async def _cancel_tasks(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    @property
    def stop_step_timeout_s(self) -> float:
        return FORCED_STOP_STEP_TIMEOUT_S if self._forced else STOP_STEP_TIMEOUT_S


class _StepGuard(contextlib.AbstractAsyncContextManager[None]):
    """Runs a step's shutdown half under the daemon's current stop deadline."""

    def __init__(self, daemon: Daemon, step: Step) -> None:
        self._daemon = daemon
        self._step = step
        self._cm = step.run()

    async def __aenter__(self) -> None:
        await self._cm.__aenter__()

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        timeout = self._daemon.stop_step_timeout_s
        try:
            return await asyncio.wait_for(self._cm.__aexit__(*exc_info), timeout)
        except TimeoutError:
            log.error("shutdown step '%s' did not finish within %gs", self._step.name, timeout)
            return None
