"""Idmapped slug mounts: the files of the slug directory's owner (root for a slug extracted
into the cache, shared by every dyno of a release; the developer for `dynoagent up`'s app
directory) appear owned by the dyno's own uid, so the app may modify /app like on Heroku while
each dyno's changes stay in its private overlay upper layer. Files of anyone else appear
owned by the overflow uid (nobody): only the owner's files become the dyno's."""

from __future__ import annotations

import ctypes
import os
import signal

from agent.launcher import syscalls as sc

_SYS_PAUSE = 34  # x86_64
_STACK_BYTES = 64 * 1024
_libc = ctypes.CDLL(None, use_errno=True)
_libc.clone.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
_libc.clone.restype = ctypes.c_int


# Killed userns helpers not yet reaped, with the stacks they ran on: reaping them lazily
# keeps the launch from waiting for the scheduler to run a dying process (ms under load).
_dying: list[tuple[int, ctypes.Array[ctypes.c_char]]] = []


def userns_mapping(owner_uid: int, owner_gid: int, uid: int, gid: int) -> int:
    """An fd on a new user namespace that maps owner_uid -> uid and owner_gid -> gid, and
    nothing else (an idmapped mount shows on-disk id N as the id N maps to here).

    Call it in the holder (whose /proc matches its pid namespace), not in the launch child.
    A user namespace needs a process to be born in: we clone one with CLONE_VM that only
    runs the raw pause syscall (no Python, no page-table copy: ~0.1 ms instead of a ~1 ms
    fork), write its maps, keep an fd on its namespace and kill it.
    """
    reap_helpers()
    stack = ctypes.create_string_buffer(_STACK_BYTES)
    top = (ctypes.addressof(stack) + _STACK_BYTES - 64) & ~0xF
    # glibc's syscall() as the entry point: syscall(SYS_pause) blocks until SIGKILL and
    # touches no shared state, which matters because the child shares our memory.
    entry = ctypes.cast(_libc.syscall, ctypes.c_void_p)
    flags = sc.CLONE_NEWUSER | _CLONE_VM | signal.SIGCHLD
    pid = _libc.clone(entry, ctypes.c_void_p(top), flags, ctypes.c_void_p(_SYS_PAUSE))
    if pid < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"clone(CLONE_NEWUSER): {os.strerror(err)}")
    try:
        proc = f"/proc/{pid}"
        _write(f"{proc}/uid_map", f"{owner_uid} {uid} 1\n")
        _write(f"{proc}/setgroups", "deny\n")
        _write(f"{proc}/gid_map", f"{owner_gid} {gid} 1\n")
        return os.open(f"{proc}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.kill(pid, signal.SIGKILL)
        # The stack stays referenced until the helper is reaped: it shares our memory.
        _dying.append((pid, stack))


def reap_helpers() -> None:
    """Reap killed userns helpers that have exited (never blocks)."""
    for entry in list(_dying):
        try:
            done, _ = os.waitpid(entry[0], os.WNOHANG)
        except ChildProcessError:
            done = entry[0]  # a caller that reaps every child took it
        if done:
            _dying.remove(entry)


_CLONE_VM = 0x00000100


def idmapped_bind(source: str, target: str, userns_fd: int) -> None:
    """Bind `source` on `target` read-only, nosuid, nodev, with ids mapped by `userns_fd`."""
    tree = sc.open_tree_clone(source)
    try:
        sc.mount_setattr_fd(tree, sc.MOUNT_ATTR_IDMAP | sc.MOUNT_ATTR_RDONLY |
                            sc.MOUNT_ATTR_NOSUID | sc.MOUNT_ATTR_NODEV, userns_fd, source)
        sc.move_mount_fd(tree, target)
    finally:
        os.close(tree)


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)
