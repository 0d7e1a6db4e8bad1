"""enter(): run a command inside a running dyno — all its namespaces, its cgroup, its user,
no capabilities (the basis of `dynoctl exec`)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import NoReturn

from agent.launcher import privileges, process
from agent.launcher import report as rep
from agent.launcher import syscalls as sc
from agent.launcher.errors import LaunchError
from agent.launcher.launch import _join_cgroup
from agent.launcher.request import DEFAULT_NOFILE

# The pid namespace is entered by the parent for the fork; the child joins the rest.
_CHILD_NAMESPACES = (sc.CLONE_NEWNS | sc.CLONE_NEWUTS | sc.CLONE_NEWIPC | sc.CLONE_NEWNET |
                     sc.CLONE_NEWCGROUP)


def enter(target_pid: int, argv: Sequence[str],
          env: Mapping[str, str] | Sequence[tuple[str, str]], uid: int, gid: int, cwd: str,
          stdin_fd: int, stdout_fd: int, stderr_fd: int, cgroup_procs: tuple[str, ...], *,
          timeout_s: float = 10.0, nofile_limit: int = DEFAULT_NOFILE) -> int:
    """Start `argv` (searched on env's PATH) inside the dyno whose PID 1 is `target_pid`.

    It gets the same resource limits a dyno's app starts with (`nofile_limit` must match the
    dyno's LaunchRequest when that was not the default). Returns the host pid, a direct
    child of the caller. The target is pinned by a pidfd for
    the whole operation, so a recycled pid cannot redirect us into another process.
    """
    if not argv:
        raise LaunchError("exec", 0, "empty command")
    if uid <= 0 or gid <= 0:
        raise LaunchError("user", 0, f"refusing to enter as uid={uid} gid={gid}")
    env_map = dict(env)
    args = list(argv)
    try:
        pidfd = os.pidfd_open(target_pid)
    except OSError as e:
        raise LaunchError("fork", e.errno or 0, f"no such dyno process {target_pid}") from e
    try:
        last_cap = sc.last_capability()

        def child(write_fd: int) -> NoReturn:
            _child(pidfd, args, env_map, uid, gid, cwd, (stdin_fd, stdout_fd, stderr_fd),
                   cgroup_procs, last_cap, nofile_limit, write_fd)

        pid, _ = process.fork_into(lambda: sc.setns(pidfd, sc.CLONE_NEWPID), child, timeout_s)
    finally:
        os.close(pidfd)
    return pid


def _child(pidfd: int, argv: list[str], env: dict[str, str], uid: int, gid: int, cwd: str,
           stdio: tuple[int, int, int], cgroup_procs: tuple[str, ...], last_cap: int,
           nofile_limit: int, write_fd: int) -> NoReturn:
    phase = "cgroup"
    try:
        # Host paths: must be written before we switch to the dyno's mount namespace.
        for path in cgroup_procs:
            _join_cgroup(path)
        phase = "namespaces"
        sc.setns(pidfd, _CHILD_NAMESPACES)
        phase = "user"
        privileges.install_stdio(*stdio)
        # A process group of its own: whoever ends the command (a caller that left) ends
        # its background jobs and pipelines with it, by group.
        os.setpgid(0, 0)
        privileges.reset_signals()
        privileges.reset_process_attributes()
        privileges.set_rlimits(nofile_limit)
        privileges.drop_to(uid, gid, last_cap)
        os.chdir(cwd)
        os.write(write_fd, rep.encode_marks({}))
        phase = "exec"
        os.execvpe(argv[0], argv, env)
    except BaseException as e:
        process.fail(write_fd, phase, e)
