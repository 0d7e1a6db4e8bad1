"""Turning the forked root child into the dyno's unprivileged user, and resetting what a
process inherits from the holder (stdio, signal dispositions, stray fds, resource limits)."""

from __future__ import annotations

import fcntl
import os
import resource
import signal

from agent.launcher import syscalls as sc


def drop_to(uid: int, gid: int, last_cap: int) -> None:
    """No capabilities in any set, no way back (no_new_privs), only uid/gid and no groups."""
    # The bounding set can only be shrunk while we still hold CAP_SETPCAP, i.e. before setuid.
    for cap in range(last_cap + 1):
        sc.prctl(sc.PR_CAPBSET_DROP, cap)
    sc.prctl(sc.PR_CAP_AMBIENT, sc.PR_CAP_AMBIENT_CLEAR_ALL)
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    # setuid away from 0 empties permitted and effective but leaves inheritable alone.
    sc.clear_capabilities()
    sc.prctl(sc.PR_SET_NO_NEW_PRIVS, 1)


def install_stdio(stdin_fd: int, stdout_fd: int, stderr_fd: int) -> None:
    """Put the three fds on 0, 1, 2 and make every other fd close on exec."""
    # Duplicate above 2 first so that e.g. stdout_fd == 0 is not clobbered by the first dup2.
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3) for fd in (stdin_fd, stdout_fd, stderr_fd)]
    for target, fd in enumerate(high):
        os.dup2(fd, target, inheritable=True)
    sc.cloexec_from(3)


def reset_signals() -> None:
    """Python ignores SIGPIPE and SIGXFSZ and exec keeps SIG_IGN; a dyno must start clean."""
    signal.set_wakeup_fd(-1)
    for signum in signal.valid_signals():
        if signum in (signal.SIGKILL, signal.SIGSTOP):
            continue
        try:
            if signal.getsignal(signum) is signal.SIG_IGN:
                signal.signal(signum, signal.SIG_DFL)
        except (OSError, ValueError):
            continue  # realtime signals glibc reserves for itself
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def reset_process_attributes() -> None:
    """A dyno must not inherit the holder's umask or its protection from the OOM killer."""
    os.umask(0o022)
    # A holder protected by a negative oom_score_adj would pass that on to every dyno;
    # raising it back to 0 needs no privilege (lowering would need CAP_SYS_RESOURCE).
    fd = os.open("/proc/self/oom_score_adj", os.O_RDWR | os.O_CLOEXEC)
    try:
        if int(os.read(fd, 16)) < 0:
            os.write(fd, b"0")
    finally:
        os.close(fd)


def set_rlimits(nofile: int) -> None:
    """Open files soft = hard = `nofile` (Heroku's dynos: 10000); no core dumps.

    Must run before drop_to: once unprivileged the app may lower but never raise them.
    """
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
    except ValueError:
        # CPython reports setrlimit's EPERM as ValueError. Raising the hard limit above the
        # holder's needs CAP_SYS_RESOURCE, which some hosts' bounding sets lack: then the
        # holder's hard limit is the most a dyno can get.
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard >= nofile:
            raise
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    # A crashing app must not fill the writable layer (or a host core_pattern pipe) with
    # dumps of its memory.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
