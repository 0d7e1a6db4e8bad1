"""Forking a child straight into a pid namespace, and the common child epilogue.

The caller (the holder) stays the direct parent: it points its pid_for_children at the
target namespace for exactly one fork, then points it back, so no double fork is needed.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from collections.abc import Callable
from typing import NoReturn

from agent.launcher import cgroupjoin
from agent.launcher import report as rep
from agent.launcher import syscalls as sc
from agent.launcher.errors import LaunchError

_own_pidns_fd: int | None = None


def own_pidns_fd() -> int:
    """An fd on the caller's own pid namespace, opened once (the holder never changes it)."""
    global _own_pidns_fd
    if _own_pidns_fd is None:
        _own_pidns_fd = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    return _own_pidns_fd


def fork_into(enter_pidns: Callable[[], None], child: Callable[[int], NoReturn],
              timeout_s: float, into_cgroup: tuple[str, str] | None = None,
              ) -> tuple[int, rep.Report]:
    """Fork with `enter_pidns()` in effect, run `child(report_fd)` in the child, and wait for
    its report (EOF = exec done). With `into_cgroup` (a cgroup v2 directory and its
    cgroup.procs) the child is born in that cgroup, or joins it first thing where it cannot
    be (no clone3, or a group once killed). Returns (host pid, report); raises LaunchError
    on failure after reaping the child."""
    return rep.run_to_end(fork_into_steps(enter_pidns, child, timeout_s, into_cgroup))


def fork_into_steps(enter_pidns: Callable[[], None], child: Callable[[int], NoReturn],
                    timeout_s: float, into_cgroup: tuple[str, str] | None = None,
                    forked: Callable[[int], None] = lambda pid: None,
                    ) -> rep.Steps[tuple[int, rep.Report]]:
    """`fork_into` as steps (report.Steps): the fork happens before the first wait, the
    report is read as it comes. `forked(pid)` runs in the parent right after each fork,
    while the child cannot have been reaped by anyone (a failure kills it)."""
    clone = into_cgroup is not None and into_cgroup[0] not in _killed_groups
    pid, pidfd, report = yield from _attempt(enter_pidns, child, timeout_s, into_cgroup, clone,
                                             forked)
    if clone and report is not None and report.messages == 0 and report.error is None:
        # Born dead, before running a line: the kernel (6.18) SIGKILLs every child cloned
        # into a cgroup v2 group that was ever written cgroup.kill (a restart after a
        # kill), while a migration into it is fine. That group is joined the slow way now.
        assert into_cgroup is not None
        _reap(pidfd, kill=True)
        os.close(pidfd)
        _killed_groups[into_cgroup[0]] = None
        if len(_killed_groups) > _KILLED_GROUPS_KEPT:
            del _killed_groups[next(iter(_killed_groups))]
        pid, pidfd, report = yield from _attempt(enter_pidns, child, timeout_s, into_cgroup,
                                                 False, forked)
    try:
        if report is None:
            _reap(pidfd, kill=True)
            raise LaunchError("timeout", 0, f"child {pid} did not exec within {timeout_s}s")
        if report.error is not None:
            _reap(pidfd, kill=False)
            raise report.error
    finally:
        os.close(pidfd)
    return pid, report


# cgroup v2 directories not to clone into (insertion-ordered, oldest forgotten first).
_killed_groups: dict[str, None] = {}
_KILLED_GROUPS_KEPT = 4096


def _attempt(enter_pidns: Callable[[], None], child: Callable[[int], NoReturn],
             timeout_s: float, into_cgroup: tuple[str, str] | None,
             clone: bool, forked: Callable[[int], None],
             ) -> rep.Steps[tuple[int, int, rep.Report | None]]:
    """(pid, a pidfd on it, its report or None on timeout). The pidfd is what the child is
    killed through: a holder that reaps every child may have reaped it while this waited,
    and its pid may be someone else's by then."""
    home = own_pidns_fd()
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    try:
        try:
            enter_pidns()
        except OSError as e:
            raise LaunchError("fork", e.errno or 0, f"entering pid namespace: {e.strerror}",
                              e.filename) from e
        try:
            pid, must_join = _fork(into_cgroup, clone)
        except LaunchError:
            sc.setns(home, sc.CLONE_NEWPID)
            raise
        if pid == 0:
            # Never let the child return into the caller's stack, whatever happens.
            try:
                os.close(read_fd)
                if must_join is not None:
                    try:
                        cgroupjoin.join((must_join,))
                    except BaseException as e:
                        fail(write_fd, "cgroup", e)
                child(write_fd)
            finally:
                os._exit(127)
        sc.setns(home, sc.CLONE_NEWPID)
        os.close(write_fd)
        write_fd = -1
        # Not reaped yet (nothing reaps between the fork and here), so this cannot fail.
        pidfd = os.pidfd_open(pid)
        try:
            forked(pid)
            report = yield from rep.read_steps(read_fd, timeout_s, pid)
        except BaseException:
            _reap(pidfd, kill=True)  # failed, or abandoned half way (the holder stopping)
            os.close(pidfd)
            raise
        return pid, pidfd, report
    finally:
        os.close(read_fd)
        if write_fd >= 0:
            os.close(write_fd)


_clone3_missing = False


def _fork(into_cgroup: tuple[str, str] | None, clone: bool) -> tuple[int, str | None]:
    """(pid as os.fork returns it, the cgroup.procs the child must still write itself)."""
    global _clone3_missing
    if into_cgroup is not None and clone and not _clone3_missing:
        directory = into_cgroup[0]
        try:
            fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise LaunchError("cgroup", e.errno or 0, f"cannot open: {e.strerror}",
                              directory) from e
        try:
            return sc.fork_into_cgroup(fd), None
        except OSError as e:
            if e.errno != errno.ENOSYS:
                raise LaunchError("cgroup", e.errno or 0, f"clone into cgroup: {e.strerror}",
                                  directory) from e
            _clone3_missing = True
        finally:
            os.close(fd)
    try:
        return os.fork(), None if into_cgroup is None else into_cgroup[1]
    except OSError as e:
        raise LaunchError("fork", e.errno or 0, f"fork: {e.strerror}") from e


def kill_and_reap(pid: int) -> None:
    """For a child that exec'd but whose launch failed after all (not yet reaped by anyone
    else: the caller has not given its loop a turn since the launch)."""
    try:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    except (ChildProcessError, ProcessLookupError):
        pass


def _reap(pidfd: int, *, kill: bool) -> None:
    try:
        if kill:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        os.waitid(os.P_PIDFD, pidfd, os.WEXITED)
    except (ChildProcessError, ProcessLookupError):
        pass  # a caller's own SIGCHLD reaping may have beaten us to it


def fail(write_fd: int, phase: str, exc: BaseException) -> NoReturn:
    """Report an exception from the child and exit without running any caller cleanup."""
    try:
        if isinstance(exc, OSError):
            msg = rep.encode_error(phase, exc.errno or 0, exc.strerror or str(exc), exc.filename)
        else:
            msg = rep.encode_error(phase, 0, f"{type(exc).__name__}: {exc}", None)
    except BaseException:
        # A report that cannot be encoded must still be a report: EOF alone means success.
        msg = rep.encode_error(phase, 0, "unreportable child error", None)
    try:
        os.write(write_fd, msg)
    finally:
        os._exit(127)


def mark() -> int:
    return time.monotonic_ns()
