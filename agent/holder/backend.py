"""How the holder starts processes: the isolating launcher (`agent.launcher`) or a plain fork/exec.

The holder calls a Backend from its single thread; the pid it returns must be the holder's
own child. `IsolatedBackend` is production; `PlainBackend` runs the command without any
isolation and exists so the holder itself can be tested, and used, without root.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import importlib
import os
import signal
import struct
import termios
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from agent.holder.errors import BadRequest, EnterFailed, LaunchFailed, RequestFailed
from agent.launcher.launch import proc_start_time
from agent.launcher.report import Steps, run_to_end


@dataclass(frozen=True)
class LaunchOutcome:
    pid: int
    start_time: int
    timings_ms: Mapping[str, float]
    pty_master: int | None = None  # launched with a tty: its master, owned by the holder


@dataclass(frozen=True)
class EnterOutcome:
    pid: int
    pty_master: int | None = None


# (rows, columns) of a pty the command gets instead of the given stdio.
TtySize = tuple[int, int]


class Backend(Protocol):
    """`launch` may come with `launch_steps`, the same launch as report.Steps, which the
    holder prefers: it forks before its first wait, so launches overlap while children set
    themselves up."""

    name: str

    def launch(self, params: Mapping[str, Any], stdin_fd: int, stdout_fd: int,
               stderr_fd: int, tty: TtySize | None = None) -> LaunchOutcome: ...

    def enter(self, target_pid: int, params: Mapping[str, Any], stdin_fd: int, stdout_fd: int,
              stderr_fd: int, tty: TtySize | None = None) -> EnterOutcome: ...


def _str_seq(params: Mapping[str, Any], key: str, required: bool = True) -> tuple[str, ...]:
    value = params.get(key)
    if value is None and not required:
        return ()
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise BadRequest(f"{key}: a list of strings is required, got {value!r}")
    return tuple(value)


def _env(params: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    value = params.get("env", [])
    pairs: list[tuple[str, str]] = []
    if not isinstance(value, list | tuple):
        raise BadRequest(f"env: a list of [name, value] pairs is required, got {value!r}")
    for pair in value:
        if (not isinstance(pair, list | tuple) or len(pair) != 2
                or not all(isinstance(v, str) for v in pair)):
            raise BadRequest(f"env: bad pair {pair!r}")
        pairs.append((pair[0], pair[1]))
    return tuple(pairs)


def _opt_int(params: Mapping[str, Any], key: str) -> int | None:
    value = params.get(key)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
        raise BadRequest(f"{key}: an integer is required, got {value!r}")
    return value


class IsolatedBackend:
    """Adapter to `agent.launcher.launch`/`enter`, imported on first use."""

    name = "isolated"

    def __init__(self, module: str = "agent.launcher") -> None:
        self._module_name = module
        self._module: Any = None

    def _launcher(self) -> Any:
        if self._module is None:
            self._module = importlib.import_module(self._module_name)
        return self._module

    def launch(self, params: Mapping[str, Any], stdin_fd: int, stdout_fd: int,
               stderr_fd: int, tty: TtySize | None = None) -> LaunchOutcome:
        return run_to_end(self.launch_steps(params, stdin_fd, stdout_fd, stderr_fd, tty))

    def launch_steps(self, params: Mapping[str, Any], stdin_fd: int, stdout_fd: int,
                     stderr_fd: int, tty: TtySize | None = None) -> Steps[LaunchOutcome]:
        launcher = self._launcher()
        request = self._request(launcher.LaunchRequest, params)
        pty = None if tty is None else launcher.PtyRequest(*tty)
        try:
            result = yield from launcher.launch_steps(request, stdin_fd, stdout_fd, stderr_fd,
                                                      pty=pty)
        except Exception as exc:
            raise _launcher_failure(LaunchFailed, exc) from exc
        return LaunchOutcome(int(result.pid), int(result.start_time),
                             {str(k): float(v) for k, v in result.timings_ms.items()},
                             result.pty_master)

    def enter(self, target_pid: int, params: Mapping[str, Any], stdin_fd: int, stdout_fd: int,
              stderr_fd: int, tty: TtySize | None = None) -> EnterOutcome:
        launcher = self._launcher()
        env = _env(params)
        argv = _str_seq(params, "argv")
        uid, gid = _opt_int(params, "uid"), _opt_int(params, "gid")
        cwd = str(params.get("cwd") or "/app")
        cgroup_procs = _str_seq(params, "cgroup_procs", required=False)
        # The size's open-files limit, as the dyno's app got it; the launcher's default if
        # the agent did not say.
        nofile = _opt_int(params, "nofile_limit")
        limits = {} if nofile is None else {"nofile_limit": nofile}
        try:
            if tty is not None:
                pid, master = launcher.enter_pty(target_pid, argv, env, uid, gid, cwd,
                                                 cgroup_procs, launcher.PtyRequest(*tty),
                                                 **limits)
                return EnterOutcome(int(pid), master)
            pid = launcher.enter(target_pid, argv, env, uid, gid, cwd,
                                 stdin_fd, stdout_fd, stderr_fd, cgroup_procs, **limits)
        except Exception as exc:
            raise _launcher_failure(EnterFailed, exc) from exc
        return EnterOutcome(int(pid))

    @staticmethod
    def _request(cls: Any, params: Mapping[str, Any]) -> Any:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(params) - known
        if unknown:
            raise BadRequest(f"unknown launch fields: {sorted(unknown)}")
        kwargs: dict[str, Any] = {}
        for key, value in params.items():
            if key == "env":
                kwargs[key] = _env(params)
            elif key == "binds" and isinstance(value, list):
                kwargs[key] = tuple(tuple(b) if isinstance(b, list) else b for b in value)
            elif isinstance(value, list):
                kwargs[key] = tuple(value)
            else:
                kwargs[key] = value
        try:
            return cls(**kwargs)
        except TypeError as exc:
            raise BadRequest(f"launch request: {exc}") from exc


def _launcher_failure(cls: type[LaunchFailed] | type[EnterFailed],
                      exc: Exception) -> RequestFailed:
    errno = getattr(exc, "errno", None)
    # The launcher's RequestError is a refused field, not a failed launch.
    if type(exc).__name__ == "RequestError":
        return BadRequest(str(exc))
    return cls(str(exc), errno if isinstance(errno, int) and errno else None)


class PlainBackend:
    """fork + exec, no isolation: cwd, uid/gid (when root) and cgroup.procs writes only."""

    name = "plain"

    def launch(self, params: Mapping[str, Any], stdin_fd: int, stdout_fd: int,
               stderr_fd: int, tty: TtySize | None = None) -> LaunchOutcome:
        began = time.perf_counter()
        cwd = params.get("cwd") or params.get("dyno_dir") or "/"
        if not isinstance(cwd, str) or not os.path.isdir(cwd):
            cwd = "/"
        pid, master = _spawn_maybe_pty(
            _str_seq(params, "argv"), _env(params), cwd, _opt_int(params, "uid"),
            _opt_int(params, "gid"), _str_seq(params, "cgroup_procs", required=False),
            (stdin_fd, stdout_fd, stderr_fd), tty, LaunchFailed)
        timings = {"fork_exec": (time.perf_counter() - began) * 1000.0}
        return LaunchOutcome(pid, proc_start_time(pid), timings, master)

    def enter(self, target_pid: int, params: Mapping[str, Any], stdin_fd: int, stdout_fd: int,
              stderr_fd: int, tty: TtySize | None = None) -> EnterOutcome:
        cwd = params.get("cwd") or "/"
        if not isinstance(cwd, str) or not os.path.isdir(cwd):
            cwd = "/"
        pid, master = _spawn_maybe_pty(
            _str_seq(params, "argv"), _env(params), cwd, _opt_int(params, "uid"),
            _opt_int(params, "gid"), _str_seq(params, "cgroup_procs", required=False),
            (stdin_fd, stdout_fd, stderr_fd), tty, EnterFailed)
        return EnterOutcome(pid, master)


def _spawn_maybe_pty(argv: Sequence[str], env: Sequence[tuple[str, str]], cwd: str,
                     uid: int | None, gid: int | None, cgroup_procs: Sequence[str],
                     stdio: tuple[int, int, int], tty: TtySize | None,
                     failure: type[LaunchFailed] | type[EnterFailed]) -> tuple[int, int | None]:
    """The plain backend's pty: the host's devpts (it isolates nothing anyway)."""
    if tty is None:
        return _spawn(argv, env, cwd, uid, gid, cgroup_procs, stdio, failure), None
    master, peer = os.openpty()
    try:
        fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", tty[0], tty[1], 0, 0))
        pid = _spawn(argv, env, cwd, uid, gid, cgroup_procs, (peer, peer, peer), failure,
                     controlling_tty=True)
    except BaseException:
        os.close(master)
        raise
    finally:
        os.close(peer)
    os.set_inheritable(master, False)
    return pid, master


# Dispositions the holder changes for itself; a child must start with the defaults.
_RESET_SIGNALS = (signal.SIGPIPE, signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGCHLD)


def _spawn(argv: Sequence[str], env: Sequence[tuple[str, str]], cwd: str, uid: int | None,
           gid: int | None, cgroup_procs: Sequence[str], stdio: tuple[int, int, int],
           failure: type[LaunchFailed] | type[EnterFailed], controlling_tty: bool = False) -> int:
    if not argv:
        raise BadRequest("argv: empty command")
    # exec failure travels back on a close-on-exec pipe: EOF means exec succeeded.
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    try:
        pid = os.fork()
    except OSError as exc:
        os.close(err_r)
        os.close(err_w)
        raise failure(f"fork: {exc.strerror}", exc.errno) from exc
    if pid == 0:  # pragma: no cover - the child never returns into Python's test machinery
        code = 127
        try:
            os.close(err_r)
            os.setsid()
            for path in cgroup_procs:
                fd = os.open(path, os.O_WRONLY)
                try:
                    os.write(fd, b"0")
                finally:
                    os.close(fd)
            for target, fd in enumerate(stdio):
                os.dup2(fd, target, inheritable=True)
            if controlling_tty:
                fcntl.ioctl(0, termios.TIOCSCTTY, 0)
            os.chdir(cwd)
            if uid is not None and gid is not None and os.geteuid() == 0 and uid != 0:
                os.setgroups([])
                os.setgid(gid)
                os.setuid(uid)
            for signum in _RESET_SIGNALS:
                signal.signal(signum, signal.SIG_DFL)
            os.execvpe(argv[0], list(argv), dict(env))
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.write(err_w, f"{exc.errno or 0}:{exc}".encode())
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.write(err_w, f"0:{exc!r}".encode())
        finally:
            os._exit(code)
    os.close(err_w)
    chunks = []
    try:
        while chunk := os.read(err_r, 4096):
            chunks.append(chunk)
    finally:
        os.close(err_r)
    if chunks:
        os.waitpid(pid, 0)
        errno_text, _, message = b"".join(chunks).decode(errors="replace").partition(":")
        errno = int(errno_text) if errno_text.isdigit() and int(errno_text) else None
        raise failure(f"{argv[0]}: {message}", errno)
    return pid
