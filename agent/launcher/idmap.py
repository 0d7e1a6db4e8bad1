"""Idmapped slug mounts: the slug (extracted as root, shared by every dyno of a release)
appears owned by the dyno's own uid, so the app may modify /app like on Heroku while each
dyno's changes stay in its private overlay upper layer."""

from __future__ import annotations

import os
import signal

from agent.launcher import syscalls as sc


def userns_mapping_root_to(uid: int, gid: int) -> int:
    """An fd on a new user namespace that maps 0 -> uid and 0 -> gid (and nothing else).

    A user namespace needs a process to be created in; a short-lived child unshares, and we
    write its maps. Called from the launch child before pivot_root, when /proc is still the
    host's, so the helper's *host* pid (read from /proc/self) is what we address it by.
    """
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        try:
            os.close(ready_r)
            sc.unshare(sc.CLONE_NEWUSER)
            os.write(ready_w, os.readlink("/proc/self").encode())
            signal.pause()
        finally:
            os._exit(0)
    os.close(ready_w)
    try:
        host_pid = os.read(ready_r, 32).decode()
        if not host_pid.isdigit():
            raise OSError(0, "user namespace helper failed", "/proc/self")
        proc = f"/proc/{host_pid}"
        _write(f"{proc}/uid_map", f"0 {uid} 1\n")
        _write(f"{proc}/setgroups", "deny\n")
        _write(f"{proc}/gid_map", f"0 {gid} 1\n")
        return os.open(f"{proc}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(ready_r)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def idmapped_bind(source: str, target: str, uid: int, gid: int) -> None:
    """Bind `source` on `target` read-only, nosuid, nodev, with root's files shown as uid/gid."""
    userns = userns_mapping_root_to(uid, gid)
    try:
        tree = sc.open_tree_clone(source)
        try:
            sc.mount_setattr_fd(tree, sc.MOUNT_ATTR_IDMAP | sc.MOUNT_ATTR_RDONLY |
                                sc.MOUNT_ATTR_NOSUID | sc.MOUNT_ATTR_NODEV, userns, source)
            sc.move_mount_fd(tree, target)
        finally:
            os.close(tree)
    finally:
        os.close(userns)


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)
