"""launch(): turn a LaunchRequest into a running, isolated dyno whose PID 1 (the reaper) is a
direct child of the caller. Must run in a single-threaded process (the holder)."""

from __future__ import annotations

import os
import socket
import time
from typing import NoReturn

from agent.launcher import cgroupjoin, etc, idmap, privileges, process, rootfs, seccomp, terminal
from agent.launcher import report as rep
from agent.launcher import syscalls as sc
from agent.launcher.errors import LaunchError, SeccompError
from agent.launcher.request import LaunchRequest, LaunchResult

PHASES = ("prepare", "fork", "cgroup", "namespaces", "netns", "mounts", "user")
_NAMESPACES = sc.CLONE_NEWNS | sc.CLONE_NEWUTS | sc.CLONE_NEWIPC | sc.CLONE_NEWCGROUP

_last_cap: int | None = None


def launch(req: LaunchRequest, stdin_fd: int, stdout_fd: int, stderr_fd: int, *,
           timeout_s: float = 10.0, pty: terminal.PtyRequest | None = None) -> LaunchResult:
    """Start `req.reaper -- *req.argv` isolated; return once it has exec'd (`launch_steps`,
    run to its end)."""
    return rep.run_to_end(launch_steps(req, stdin_fd, stdout_fd, stderr_fd,
                                       timeout_s=timeout_s, pty=pty))


def launch_steps(req: LaunchRequest, stdin_fd: int, stdout_fd: int, stderr_fd: int, *,
                 timeout_s: float = 10.0, pty: terminal.PtyRequest | None = None,
                 ) -> rep.Steps[LaunchResult]:
    """Start `req.reaper -- *req.argv` isolated, in steps (report.Steps): everything up to
    the fork happens before the first wait; the result comes once the child has exec'd.

    stdio fds stay owned by the caller (the child has its own copies once the first wait is
    yielded). With `pty`, the dyno's PID 1 gets a new pty of the dyno's own devpts as
    controlling terminal and stdio instead (the stdio fds are ignored) and the result
    carries its master. The reaper is
    opened on the host and exec'd by fd, so a stack need not contain it (use a static build
    for stacks without the host's libc). Raises LaunchError(phase, errno, message).
    """
    global _last_cap
    start_ns = time.monotonic_ns()
    req.validate()
    if pty is not None:
        pty.validate()
    if _last_cap is None:
        _last_cap = sc.last_capability()
    last_cap = _last_cap
    if req.seccomp:
        _build_seccomp_filter()
    etc_files = None
    if req.own_etc:
        # The dyno id as an alias: the hostname is at most 63 characters, an id 64.
        etc_files = etc.etc_files(req.hostname, req.effective_private_ip(), (req.dyno_id,),
                                  etc.read_host_resolv_conf() if req.nameserver is None else "",
                                  req.nameserver)
    plan = rootfs.plan_rootfs(
        stack_dir=req.stack_dir, slug_dir=req.slug_dir, dyno_dir=req.dyno_dir,
        writable_limit_bytes=req.writable_limit_bytes, uid=req.uid, gid=req.gid,
        hide_paths=req.hide_paths, idmap_slug=req.idmap_slug and req.app_dir is None,
        app_dir=req.app_dir, binds=req.binds,
        stack_complete=rootfs.stack_has_mount_points(req.stack_dir), etc_files=etc_files)
    argv = [req.reaper, "--", *req.argv]
    env = dict(req.env)
    fds: list[int] = []
    channel: tuple[int, int] | None = None
    try:
        if pty is not None:
            channel = terminal.channel()
            fds.extend(channel)
        reaper_fd = _open(req.reaper, os.O_PATH, "exec", fds)
        netns_fd = None if req.netns_path is None else _open(req.netns_path, os.O_RDONLY,
                                                             "netns", fds)
        userns_fd = None
        if req.idmap_slug and req.app_dir is None:
            # The slug directory's owner becomes the dyno user, nobody else: a slug path that
            # shows a root-owned host tree must not make root's files the dyno's.
            try:
                owner = os.stat(req.slug_dir)
            except OSError as e:
                raise LaunchError("prepare", e.errno or 0, f"slug: {e.strerror}",
                                  req.slug_dir) from e
            try:
                userns_fd = idmap.userns_mapping(owner.st_uid, owner.st_gid, req.uid, req.gid)
            except OSError as e:
                raise LaunchError("prepare", e.errno or 0,
                                  f"user namespace for the idmapped slug: {e.strerror}") from e
            fds.append(userns_fd)

        join = cgroupjoin.plan(req.cgroup_procs)

        def child(write_fd: int) -> NoReturn:
            _child(req, plan, join.writes, argv, env, reaper_fd, netns_fd, userns_fd,
                   last_cap, (stdin_fd, stdout_fd, stderr_fd), write_fd,
                   None if pty is None or channel is None else (pty, channel[1]))

        prepared_ns = time.monotonic_ns()
        start_times: list[int] = []
        pid, report = yield from process.fork_into_steps(
            lambda: sc.unshare(sc.CLONE_NEWPID), child, timeout_s,
            join.clone_into, lambda pid: start_times.append(read_start_time(pid)))
        report.marks["prepare"] = prepared_ns
        master = None if channel is None else _pty_master(pid, channel[0])
    finally:
        for fd in fds:
            os.close(fd)
        idmap.reap_helpers()
    timings = rep.durations_ms(start_ns, report.marks, report.eof_ns, PHASES)
    # Read right after the fork: the dyno may have exited, and been reaped, by now.
    return LaunchResult(pid=pid, start_time=start_times[-1], timings_ms=timings,
                        pty_master=master)


def _pty_master(pid: int, channel_fd: int) -> int:
    """The master the child sent before it exec'd; without it the launch failed."""
    try:
        return terminal.receive_master(channel_fd)
    except LaunchError:
        process.kill_and_reap(pid)
        raise


def _open(path: str, flags: int, phase: str, fds: list[int]) -> int:
    try:
        fd = os.open(path, flags | os.O_CLOEXEC)
    except OSError as e:
        raise LaunchError(phase, e.errno or 0, f"cannot open: {e.strerror}", path) from e
    fds.append(fd)
    return fd


def _child(req: LaunchRequest, plan: list[rootfs.Op], cgroup_writes: tuple[str, ...],
           argv: list[str], env: dict[str, str], reaper_fd: int, netns_fd: int | None,
           userns_fd: int | None, last_cap: int, stdio: tuple[int, int, int], write_fd: int,
           pty: tuple[terminal.PtyRequest, int] | None) -> NoReturn:
    # We are PID 1 of a fresh pid namespace, born in the dyno's cgroup v2 group if there is
    # one. Nothing of the app may run before the other cgroup joins, so that every byte and
    # fork the app ever makes is accounted to the dyno.
    marks: dict[str, int] = {"fork": process.mark()}
    phase = "cgroup"
    try:
        cgroupjoin.join(cgroup_writes)
        marks["cgroup"] = process.mark()
        phase = "namespaces"
        # The cgroup namespace is created after the join so its root is the dyno's cgroup.
        sc.unshare(_NAMESPACES | (sc.CLONE_NEWNET if netns_fd is None else 0))
        socket.sethostname(req.hostname)
        marks["namespaces"] = process.mark()
        phase = "netns"
        if netns_fd is not None:
            sc.setns(netns_fd, sc.CLONE_NEWNET, req.netns_path)
        marks["netns"] = process.mark()
        phase = "mounts"
        # Private, not slave: nothing we mount may propagate to the host, and host mounts
        # appearing later must not leak into the dyno either.
        sc.mount(None, "/", None, sc.MS_REC | sc.MS_PRIVATE)
        rootfs.apply(plan, userns_fd)
        marks["mounts"] = process.mark()
        phase = "user"
        if pty is not None:
            # After pivot_root: /dev/pts is the dyno's own devpts instance.
            phase = "tty"
            peer = terminal.open_in_child(pty[0], req.uid, req.gid, pty[1])
            stdio = (peer, peer, peer)
            phase = "user"
        privileges.install_stdio(*stdio)
        privileges.reset_signals()
        privileges.reset_process_attributes()
        privileges.set_rlimits(req.nofile_limit)
        privileges.drop_to(req.uid, req.gid, last_cap)
        os.chdir("/app")
        if req.seccomp:
            # Last, right before exec: no_new_privs is set (drop_to), and nothing of ours
            # after this needs more than write, execveat and exit.
            phase = "seccomp"
            seccomp.install(seccomp.dyno_filter())
        marks["user"] = process.mark()
        os.write(write_fd, rep.encode_marks(marks))
        phase = "exec"
        try:
            os.execve(reaper_fd, argv, env)
        except OSError as e:
            raise OSError(e.errno, e.strerror, req.reaper) from e
    except BaseException as e:
        process.fail(write_fd, phase, e)


def _build_seccomp_filter() -> None:
    """Compile the filter in the caller, once for all launches: the child only installs it."""
    try:
        seccomp.dyno_filter()
    except SeccompError as e:
        raise LaunchError("seccomp", 0, str(e)) from e


def proc_start_time(pid: int) -> int:
    """Field 22 of /proc/<pid>/stat (clock ticks since boot): pid + this = identity. OSError
    when the process is gone."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        return parse_start_time(f.read())


def read_start_time(pid: int) -> int:
    """`proc_start_time` of a dyno just launched: a failure is the launch's."""
    try:
        return proc_start_time(pid)
    except OSError as e:
        raise LaunchError("exec", e.errno or 0, "cannot read start time", f"/proc/{pid}/stat") \
            from e


def stat_fields(stat: bytes) -> list[bytes]:
    """/proc/PID/stat's fields from the third (state) on. comm may contain spaces and ')':
    the fields after the LAST ')' are fixed."""
    return stat[stat.rindex(b")") + 2:].split()


def parse_start_time(stat: bytes) -> int:
    return int(stat_fields(stat)[19])
