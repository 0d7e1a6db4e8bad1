"""enter(): run a command inside a running dyno — all its namespaces, its cgroup, its user,
no capabilities (the basis of `dynoctl exec`)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import NoReturn

from agent.launcher import cgroupjoin, privileges, process, terminal
from agent.launcher import report as rep
from agent.launcher import seccomp as syscall_filter
from agent.launcher import syscalls as sc
from agent.launcher.errors import LaunchError, SeccompError
from agent.launcher.request import DEFAULT_NOFILE

# The pid namespace is entered by the parent for the fork; the child joins the rest.
_CHILD_NAMESPACES = (sc.CLONE_NEWNS | sc.CLONE_NEWUTS | sc.CLONE_NEWIPC | sc.CLONE_NEWNET |
                     sc.CLONE_NEWCGROUP)


def enter(target_pid: int, argv: Sequence[str],
          env: Mapping[str, str] | Sequence[tuple[str, str]], uid: int, gid: int, cwd: str,
          stdin_fd: int, stdout_fd: int, stderr_fd: int, cgroup_procs: tuple[str, ...], *,
          timeout_s: float = 10.0, nofile_limit: int = DEFAULT_NOFILE,
          seccomp: bool = True) -> int:
    """Start `argv` (searched on env's PATH) inside the dyno whose PID 1 is `target_pid`,
    with the given stdio, in a process group of its own.

    It gets the same resource limits a dyno's app starts with (`nofile_limit` must match the
    dyno's LaunchRequest when that was not the default) and the dyno's seccomp filter
    (`seccomp`: off only in tests that compare). Returns the host pid, a direct
    child of the caller. The target is pinned by a pidfd for
    the whole operation, so a recycled pid cannot redirect us into another process.
    """
    return _enter(target_pid, argv, env, uid, gid, cwd, (stdin_fd, stdout_fd, stderr_fd),
                  cgroup_procs, timeout_s, nofile_limit, seccomp, None)[0]


def enter_pty(target_pid: int, argv: Sequence[str],
              env: Mapping[str, str] | Sequence[tuple[str, str]], uid: int, gid: int, cwd: str,
              cgroup_procs: tuple[str, ...], pty: terminal.PtyRequest, *,
              timeout_s: float = 10.0, nofile_limit: int = DEFAULT_NOFILE,
              seccomp: bool = True) -> tuple[int, int]:
    """Like `enter`, but the command gets a new pty of the dyno's own devpts as controlling
    terminal and stdio, in a session of its own. Returns (host pid, the pty's master)."""
    pty.validate()
    pid, master = _enter(target_pid, argv, env, uid, gid, cwd, None, cgroup_procs, timeout_s,
                         nofile_limit, seccomp, pty)
    assert master is not None
    return pid, master


def _enter(target_pid: int, argv: Sequence[str],
           env: Mapping[str, str] | Sequence[tuple[str, str]], uid: int, gid: int, cwd: str,
           stdio: tuple[int, int, int] | None, cgroup_procs: tuple[str, ...], timeout_s: float,
           nofile_limit: int, seccomp: bool,
           pty: terminal.PtyRequest | None) -> tuple[int, int | None]:
    if not argv:
        raise LaunchError("exec", 0, "empty command")
    if uid <= 0 or gid <= 0:
        raise LaunchError("user", 0, f"refusing to enter as uid={uid} gid={gid}")
    env_map = dict(env)
    args = list(argv)
    try:
        program = syscall_filter.dyno_filter() if seccomp else None
    except SeccompError as e:
        raise LaunchError("seccomp", 0, str(e)) from e
    try:
        pidfd = os.pidfd_open(target_pid)
    except OSError as e:
        raise LaunchError("fork", e.errno or 0, f"no such dyno process {target_pid}") from e
    channel: tuple[int, int] | None = None
    try:
        last_cap = sc.last_capability()
        if pty is not None:
            channel = terminal.channel()
        tty = None if pty is None or channel is None else (pty, channel[1])

        join = cgroupjoin.plan(cgroup_procs)

        def child(write_fd: int) -> NoReturn:
            _child(pidfd, args, env_map, uid, gid, cwd, stdio, join.writes, last_cap,
                   nofile_limit, write_fd, program, tty)

        pid, _ = process.fork_into(
            lambda: sc.setns(pidfd, sc.CLONE_NEWPID), child, timeout_s,
            join.clone_into)
        master = None
        if channel is not None:
            try:
                master = terminal.receive_master(channel[0])
            except LaunchError:
                process.kill_and_reap(pid)
                raise
    finally:
        os.close(pidfd)
        if channel is not None:
            os.close(channel[0])
            os.close(channel[1])
    return pid, master


def _child(pidfd: int, argv: list[str], env: dict[str, str], uid: int, gid: int, cwd: str,
           stdio: tuple[int, int, int] | None, cgroup_writes: tuple[str, ...], last_cap: int,
           nofile_limit: int, write_fd: int, program: sc.BpfProgram | None,
           pty: tuple[terminal.PtyRequest, int] | None) -> NoReturn:
    phase = "cgroup"
    try:
        # Host paths: must be written before we switch to the dyno's mount namespace.
        cgroupjoin.join(cgroup_writes)
        phase = "namespaces"
        sc.setns(pidfd, _CHILD_NAMESPACES)
        if pty is not None:
            # Now in the dyno's mount namespace: /dev/pts is its own devpts instance. The
            # new session is also a process group of its own (see below).
            phase = "tty"
            peer = terminal.open_in_child(pty[0], uid, gid, pty[1])
            stdio = (peer, peer, peer)
        phase = "user"
        assert stdio is not None
        privileges.install_stdio(*stdio)
        if pty is None:
            # A process group of its own: whoever ends the command (a caller that left) ends
            # its background jobs and pipelines with it, by group.
            os.setpgid(0, 0)
        privileges.reset_signals()
        privileges.reset_process_attributes()
        privileges.set_rlimits(nofile_limit)
        privileges.drop_to(uid, gid, last_cap)
        os.chdir(cwd)
        if program is not None:
            # Last, right before exec, as in launch: an entered command is a dyno process.
            phase = "seccomp"
            syscall_filter.install(program)
        os.write(write_fd, rep.encode_marks({}))
        phase = "exec"
        os.execvpe(argv[0], argv, env)
    except BaseException as e:
        process.fail(write_fd, phase, e)
