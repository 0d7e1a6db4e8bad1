"""ctypes bindings for the namespace, mount and capability syscalls the launcher needs.

Every wrapper raises OSError(errno, message, path) so the caller can attribute the failure.
x86_64 syscall numbers only (the project targets x86_64 hosts).
"""

from __future__ import annotations

import ctypes
import os

_libc = ctypes.CDLL(None, use_errno=True)

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MNT_DETACH = 0x2

PR_SET_PDEATHSIG = 1
PR_CAPBSET_DROP = 24
PR_SET_CHILD_SUBREAPER = 36
PR_GET_CHILD_SUBREAPER = 37
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4

_SYS_CAPSET = 126
_SYS_PIVOT_ROOT = 155
_SYS_CLOSE_RANGE = 436
_CLOSE_RANGE_CLOEXEC = 1 << 2
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong]
_libc.syscall.restype = ctypes.c_long


def _check(result: int, what: str, path: str | None = None) -> None:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", path)


def _b(value: str | None) -> bytes | None:
    return None if value is None else os.fsencode(value)


def mount(source: str | None, target: str, fstype: str | None, flags: int,
          data: str | None = None) -> None:
    _check(_libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data)), "mount", target)


def umount2(target: str, flags: int) -> None:
    _check(_libc.umount2(_b(target), flags), "umount2", target)


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def setns(fd: int, nstype: int, path: str | None = None) -> None:
    _check(_libc.setns(fd, nstype), "setns", path)


def pivot_root(new_root: str, put_old: str) -> None:
    _check(_libc.syscall(_SYS_PIVOT_ROOT, _b(new_root), _b(put_old)), "pivot_root", new_root)


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    result: int = _libc.prctl(option, arg2, arg3, arg4, arg5)
    _check(result, f"prctl({option})")
    return result


def cloexec_from(first_fd: int) -> None:
    """Mark every fd >= first_fd close-on-exec in one syscall (Linux 5.11+)."""
    _check(_libc.syscall(_SYS_CLOSE_RANGE, ctypes.c_uint(first_fd), ctypes.c_uint(0xFFFFFFFF),
                         ctypes.c_uint(_CLOSE_RANGE_CLOEXEC)), "close_range")


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def clear_capabilities() -> None:
    """Empty the effective, permitted and inheritable sets of the calling thread."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(_libc.syscall(_SYS_CAPSET, ctypes.byref(header), ctypes.byref(data)), "capset")


def last_capability() -> int:
    with open("/proc/sys/kernel/cap_last_cap", "rb") as f:
        return int(f.read())


_SYS_OPEN_TREE = 428
_SYS_MOVE_MOUNT = 429
_SYS_MOUNT_SETATTR = 442
AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
OPEN_TREE_CLONE = 1
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOVE_MOUNT_T_EMPTY_PATH = 0x40
_SYS_OPENAT2 = 437
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_IN_ROOT = 0x10
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8
MOUNT_ATTR_IDMAP = 0x00100000


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def open_tree_clone(path: str) -> int:
    """A detached copy of the mount at `path` (Linux 5.2+), as a close-on-exec fd."""
    fd: int = _libc.syscall(_SYS_OPEN_TREE, ctypes.c_int(AT_FDCWD), _b(path),
                            ctypes.c_uint(OPEN_TREE_CLONE | os.O_CLOEXEC))
    _check(fd, "open_tree", path)
    return fd


def mount_setattr_fd(fd: int, attr_set: int, userns_fd: int = 0, path: str | None = None) -> None:
    attr = _MountAttr(attr_set, 0, 0, userns_fd)
    _check(_libc.syscall(_SYS_MOUNT_SETATTR, ctypes.c_int(fd), b"",
                         ctypes.c_uint(AT_EMPTY_PATH), ctypes.byref(attr),
                         ctypes.c_size_t(ctypes.sizeof(attr))), "mount_setattr", path)


def move_mount_fd(fd: int, target: str) -> None:
    _check(_libc.syscall(_SYS_MOVE_MOUNT, ctypes.c_int(fd), b"", ctypes.c_int(AT_FDCWD),
                         _b(target), ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH)),
           "move_mount", target)


def move_mount_onto_fd(fd: int, target_fd: int, path: str | None = None) -> None:
    """Attach the detached mount `fd` on the file or directory that `target_fd` refers to."""
    _check(_libc.syscall(_SYS_MOVE_MOUNT, ctypes.c_int(fd), b"", ctypes.c_int(target_fd), b"",
                         ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH)),
           "move_mount", path)


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


def open_in_root(root_fd: int, path: str, flags: int) -> int:
    """openat2 with RESOLVE_IN_ROOT (Linux 5.6+): `path` and every symlink met on the way
    resolve as if `root_fd` were "/", so a stack's absolute symlinks cannot lead to the host."""
    how = _OpenHow(flags | os.O_CLOEXEC, 0, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)
    fd: int = _libc.syscall(_SYS_OPENAT2, ctypes.c_int(root_fd), _b(path), ctypes.byref(how),
                            ctypes.c_size_t(ctypes.sizeof(how)))
    _check(fd, "openat2", path)
    return fd


_SYS_SECCOMP = 317
_SECCOMP_SET_MODE_FILTER = 1


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


class BpfProgram:
    """A classic BPF program (struct sock_filter[]) copied into C memory once, so that a
    forked child installs it with a single syscall and allocates nothing."""

    def __init__(self, code: bytes) -> None:
        if not code or len(code) % 8 or len(code) // 8 > 0xFFFF:
            raise ValueError(f"not a sock_filter array: {len(code)} bytes")
        self.code = code
        self._buffer = ctypes.create_string_buffer(code, len(code))
        self._fprog = _SockFprog(len(code) // 8, ctypes.addressof(self._buffer))


def seccomp_set_filter(program: BpfProgram) -> None:
    """seccomp(SECCOMP_SET_MODE_FILTER) for the calling thread (Linux 3.17+). Needs
    no_new_privs or CAP_SYS_ADMIN; cannot be undone, is kept across fork and execve."""
    _check(_libc.syscall(_SYS_SECCOMP, ctypes.c_uint(_SECCOMP_SET_MODE_FILTER),
                         ctypes.c_uint(0), ctypes.byref(program._fprog)), "seccomp")


_SYS_CLONE3 = 435
CLONE_INTO_CGROUP = 0x200000000
_SIGCHLD = 17
# Calls through this handle keep the GIL: a clone must not let another thread run between
# the fork hooks and the syscall.
_pylibc = ctypes.PyDLL(None, use_errno=True)
_pylibc.syscall.restype = ctypes.c_long


class _CloneArgs(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in (
        "flags", "pidfd", "child_tid", "parent_tid", "exit_signal", "stack", "stack_size",
        "tls", "set_tid", "set_tid_size", "cgroup")]


def fork_into_cgroup(cgroup_fd: int) -> int:
    """`os.fork()` whose child is born in the cgroup v2 directory open as `cgroup_fd`
    (clone3 with CLONE_INTO_CGROUP): no migration afterwards, so none of the global lock a
    write to cgroup.procs takes (a whole RCU grace period when the lock was idle, ~6 to 10 ms).
    Runs CPython's fork hooks around the syscall exactly as `os.fork` does. Returns 0 in the
    child, the child's pid in the parent; OSError(ENOSYS) on kernels before 5.7."""
    args = _CloneArgs(flags=CLONE_INTO_CGROUP, exit_signal=_SIGCHLD, cgroup=cgroup_fd)
    ctypes.pythonapi.PyOS_BeforeFork()
    pid = int(_pylibc.syscall(ctypes.c_long(_SYS_CLONE3), ctypes.byref(args),
                              ctypes.c_size_t(ctypes.sizeof(args))))
    if pid == 0:
        ctypes.pythonapi.PyOS_AfterFork_Child()
        return 0
    err = ctypes.get_errno()
    ctypes.pythonapi.PyOS_AfterFork_Parent()
    if pid < 0:
        raise OSError(err, f"clone3: {os.strerror(err)}")
    return pid
