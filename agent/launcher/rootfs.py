"""The dyno's filesystem as data: `plan_rootfs()` turns a request into mount operations (pure),
`apply()` performs them inside the child's private mount namespace (the only side effect).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from agent.launcher import idmap
from agent.launcher import syscalls as sc

# Mount points the new root must provide. If the stack lacks any of them (the host's "/" has
# no /app) a read-only overlay with a tiny skeleton layer supplies them, because the stack
# itself is never written to.
MOUNT_POINTS = ("app", "dev", "proc", "sys", "tmp")

# /proc entries that leak host information or offer host-wide knobs; masked like runc and
# Docker do. Entries a kernel lacks are skipped.
PROC_MASKED = ("/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
               "/proc/sched_debug", "/proc/scsi", "/proc/timer_list", "/proc/timer_stats")
PROC_READ_ONLY = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")
SYS_MASKED = ("/sys/firmware", "/sys/devices/virtual/powercap")

# (name, major, minor): the minimal /dev a dyno gets, as in the OCI default device list.
DEVICES = (("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8),
           ("urandom", 1, 9), ("tty", 5, 0))
DEV_LINKS = (("/proc/self/fd", "fd"), ("/proc/self/fd/0", "stdin"),
             ("/proc/self/fd/1", "stdout"), ("/proc/self/fd/2", "stderr"), ("pts/ptmx", "ptmx"))

_RO_BIND_REMOUNT = sc.MS_BIND | sc.MS_REMOUNT | sc.MS_RDONLY


@dataclass(frozen=True)
class Mkdir:
    path: str
    mode: int = 0o755
    uid: int = 0
    gid: int = 0


@dataclass(frozen=True)
class Mount:
    source: str | None
    target: str
    fstype: str | None
    flags: int
    data: str | None = None


@dataclass(frozen=True)
class Mknod:
    path: str
    major: int
    minor: int


@dataclass(frozen=True)
class Symlink:
    target: str
    path: str


@dataclass(frozen=True)
class Mask:
    """Hide `path` (inside the new root): an empty read-only tmpfs over a directory, /dev/null
    over anything else; skipped when the path does not exist."""

    path: str


@dataclass(frozen=True)
class ReadOnly:
    """Make `path` (inside the new root) a read-only bind of itself; skipped when absent."""

    path: str


@dataclass(frozen=True)
class IdmappedBind:
    """Read-only bind of `source` on `target` where the files of `source`'s owner appear as
    uid/gid (the owner is read when the user namespace is made, see launch.py)."""

    source: str
    target: str
    uid: int
    gid: int


@dataclass(frozen=True)
class WriteFile:
    """Create `path` (which must not exist) holding `content`, owned by root."""

    path: str
    content: str
    mode: int = 0o644


@dataclass(frozen=True)
class BindFile:
    """Bind the file `source` read-only over `path` as seen inside `root` (symlinks in the
    stack resolve within `root`); skipped when the stack has no regular file there."""

    source: str
    root: str
    path: str


@dataclass(frozen=True)
class PivotRoot:
    """Switch to `new_root` and detach the old root; later paths are inside the new root."""

    new_root: str


Op = (Mkdir | Mount | Mknod | Symlink | Mask | ReadOnly | IdmappedBind | WriteFile | BindFile |
      PivotRoot)


@dataclass(frozen=True)
class Layout:
    """Where things live in the scratch tmpfs that is mounted over the dyno dir."""

    scratch: str

    @property
    def root(self) -> str:
        return f"{self.scratch}/root"

    @property
    def skel(self) -> str:
        return f"{self.scratch}/skel"

    @property
    def slug(self) -> str:
        return f"{self.scratch}/slug"

    @property
    def upper(self) -> str:
        return f"{self.scratch}/app-upper"

    @property
    def work(self) -> str:
        return f"{self.scratch}/app-work"

    @property
    def tmp(self) -> str:
        return f"{self.scratch}/tmp"

    @property
    def shm(self) -> str:
        return f"{self.scratch}/shm"

    @property
    def etc(self) -> str:
        return f"{self.scratch}/etc"


def stack_has_mount_points(stack_dir: str) -> bool:
    return all(os.path.isdir(os.path.join(stack_dir, name)) and
               not os.path.islink(os.path.join(stack_dir, name)) for name in MOUNT_POINTS)


def plan_rootfs(*, stack_dir: str, slug_dir: str, dyno_dir: str, writable_limit_bytes: int,
                uid: int, gid: int, hide_paths: Sequence[str] = (),
                stack_complete: bool = True, idmap_slug: bool = True,
                etc_files: Mapping[str, str] | None = None, app_dir: str | None = None,
                binds: Sequence[tuple[str, str, bool]] = ()) -> list[Op]:
    """Every operation that builds a dyno's filesystem, in order.

    One tmpfs of `writable_limit_bytes` over `dyno_dir` (in the dyno's own mount namespace)
    holds everything writable: the /app upper layer, /tmp and /dev/shm, so the limit covers
    their sum and it all vanishes with the namespace. With `idmap_slug` the files of the
    slug directory's owner appear owned by the dyno user (an idmapped lower layer), so the app can
    modify them; the changes are copied up into its private upper layer. `etc_files`
    (name -> content) are written to the scratch tmpfs and bound read-only over the stack's
    /etc/<name>, so each dyno has its own hosts, hostname and resolv.conf.

    A build dyno has `app_dir` instead of a slug: that host directory is /app, read-write, so
    what the build writes stays on the host; each of `binds` (source, name, writable) shows a
    host directory at /tmp/<name>. Both are nosuid and nodev.
    """
    lay = Layout(dyno_dir.rstrip("/") or "/")
    root = lay.root
    ops: list[Op] = [
        Mount("tmpfs", lay.scratch, "tmpfs", sc.MS_NOSUID | sc.MS_NODEV,
              f"size={writable_limit_bytes},mode=0755"),
        Mkdir(root),
        Mkdir(lay.upper, 0o755, uid, gid),
        Mkdir(lay.work, 0o700),
        Mkdir(lay.tmp, 0o1777),
        Mkdir(lay.shm, 0o1777),
    ]
    if stack_complete:
        ops += [Mount(stack_dir, root, None, sc.MS_BIND),
                Mount(None, root, None, _RO_BIND_REMOUNT | sc.MS_NOSUID | sc.MS_NODEV)]
    else:
        ops.append(Mkdir(lay.skel))
        ops += [Mkdir(f"{lay.skel}/{name}") for name in MOUNT_POINTS]
        # No upperdir: overlayfs mounts the merged layers read-only.
        ops.append(Mount("overlay", root, "overlay", sc.MS_RDONLY | sc.MS_NOSUID | sc.MS_NODEV,
                         f"lowerdir={lay.skel}:{stack_dir}"))
    if app_dir is not None:
        ops += _bind(app_dir, f"{root}/app", writable=True)
    else:
        lower = slug_dir
        if idmap_slug:
            lower = lay.slug
            ops += [Mkdir(lay.slug), IdmappedBind(slug_dir, lay.slug, uid, gid)]
        ops.append(Mount("overlay", f"{root}/app", "overlay", sc.MS_NOSUID | sc.MS_NODEV,
                         f"lowerdir={lower},upperdir={lay.upper},workdir={lay.work}"))
    for source, name, writable in binds:
        ops += [Mkdir(f"{lay.tmp}/{name}"), *_bind(source, f"{lay.tmp}/{name}", writable)]
    ops += [
        Mount(lay.tmp, f"{root}/tmp", None, sc.MS_BIND | sc.MS_REC),
        Mount("tmpfs", f"{root}/dev", "tmpfs", sc.MS_NOSUID | sc.MS_NOEXEC,
              "size=64k,nr_inodes=64,mode=0755"),
        *(Mknod(f"{root}/dev/{name}", major, minor) for name, major, minor in DEVICES),
        *(Symlink(target, f"{root}/dev/{name}") for target, name in DEV_LINKS),
        Mkdir(f"{root}/dev/pts"),
        Mkdir(f"{root}/dev/shm", 0o1777),
        Mount("devpts", f"{root}/dev/pts", "devpts", sc.MS_NOSUID | sc.MS_NOEXEC,
              "newinstance,ptmxmode=0666,mode=0620"),
        Mount(lay.shm, f"{root}/dev/shm", None, sc.MS_BIND),
        Mount(None, f"{root}/dev", None, _RO_BIND_REMOUNT | sc.MS_NOSUID | sc.MS_NOEXEC),
        # proc and sysfs show the pid and network namespaces of the mounting process; the
        # child is PID 1 of the new pid namespace and already in the dyno's netns.
        Mount("proc", f"{root}/proc", "proc", sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC),
        Mount("sysfs", f"{root}/sys", "sysfs",
              sc.MS_RDONLY | sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC),
    ]
    if etc_files:
        ops.append(Mkdir(lay.etc))
        for name, content in etc_files.items():
            ops += [WriteFile(f"{lay.etc}/{name}", content),
                    BindFile(f"{lay.etc}/{name}", root, f"/etc/{name}")]
    ops += [
        # Everything below resolves inside the new root, so absolute symlinks in the stack
        # (e.g. /var/run -> /run) point where the dyno sees them, not into the host.
        PivotRoot(root),
        *(Mask(path) for path in PROC_MASKED),
        *(ReadOnly(path) for path in PROC_READ_ONLY),
        *(Mask(path) for path in SYS_MASKED),
        *(Mask(path) for path in hide_paths),
    ]
    return ops


def _bind(source: str, target: str, writable: bool) -> list[Op]:
    flags = sc.MS_BIND | sc.MS_REMOUNT | sc.MS_NOSUID | sc.MS_NODEV
    return [Mount(source, target, None, sc.MS_BIND),
            Mount(None, target, None, flags if writable else flags | sc.MS_RDONLY)]


class RootfsError(OSError):
    """An operation of the plan failed; carries the op for the launch error message."""


def apply(ops: Iterable[Op], userns_fd: int | None = None) -> None:
    """Perform `ops`; `userns_fd` (see idmap.userns_mapping) serves IdmappedBind."""
    for op in ops:
        try:
            _apply_one(op, userns_fd)
        except OSError as e:
            raise RootfsError(e.errno, f"{op}: {e.strerror}", e.filename) from e


def _apply_one(op: Op, userns_fd: int | None) -> None:
    if isinstance(op, Mount):
        sc.mount(op.source, op.target, op.fstype, op.flags, op.data)
    elif isinstance(op, Mkdir):
        os.mkdir(op.path)
        # mkdir honours the umask; sticky /tmp needs the explicit chmod.
        os.chmod(op.path, op.mode)
        if op.uid or op.gid:
            os.chown(op.path, op.uid, op.gid)
    elif isinstance(op, Mknod):
        os.mknod(op.path, 0o666 | stat.S_IFCHR, os.makedev(op.major, op.minor))
        os.chmod(op.path, 0o666)
    elif isinstance(op, Symlink):
        os.symlink(op.target, op.path)
    elif isinstance(op, Mask):
        _mask(op.path)
    elif isinstance(op, IdmappedBind):
        if userns_fd is None:
            raise OSError(0, "IdmappedBind needs a user namespace fd", op.source)
        idmap.idmapped_bind(op.source, op.target, userns_fd)
    elif isinstance(op, WriteFile):
        _write_new(op.path, op.content, op.mode)
    elif isinstance(op, BindFile):
        _bind_file(op)
    elif isinstance(op, ReadOnly):
        try:
            sc.mount(op.path, op.path, None, sc.MS_BIND | sc.MS_REC)
        except FileNotFoundError:
            return
        sc.mount(None, op.path, None, _RO_BIND_REMOUNT | sc.MS_NOSUID | sc.MS_NODEV)
    else:
        _pivot(op.new_root)


def _mask(path: str) -> None:
    try:
        # stat, not lstat: mount(2) follows a final symlink too, so judge what it points at.
        st = os.stat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        # Some /proc entries refuse even lstat to root (EACCES/EPERM); mask them blind.
        if e.errno not in (errno.EACCES, errno.EPERM):
            raise
        st = None
    if st is not None and stat.S_ISDIR(st.st_mode):
        sc.mount("tmpfs", path, "tmpfs", sc.MS_RDONLY | sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC,
                 "size=4k,nr_inodes=1,mode=0555")
    else:
        sc.mount("/dev/null", path, None, sc.MS_BIND)


def _write_new(path: str, content: str, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        os.write(fd, content.encode())
        os.fchmod(fd, mode)  # the umask must not narrow it
    finally:
        os.close(fd)


_FILE_ATTRS = (sc.MOUNT_ATTR_RDONLY | sc.MOUNT_ATTR_NOSUID | sc.MOUNT_ATTR_NODEV |
               sc.MOUNT_ATTR_NOEXEC)


def _bind_file(op: BindFile) -> None:
    # Before pivot_root the stack's absolute symlinks (Ubuntu's /etc/resolv.conf points into
    # /run) would resolve on the host; openat2(RESOLVE_IN_ROOT) resolves them inside the
    # dyno's root, and the new mount API attaches onto the fd it returns.
    root_fd = os.open(op.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            target_fd = sc.open_in_root(root_fd, op.path, os.O_PATH)
        except FileNotFoundError:
            return  # a stack without the file (or a dangling link): nothing to cover
        try:
            if not stat.S_ISREG(os.fstat(target_fd).st_mode):
                return
            tree = sc.open_tree_clone(op.source)
            try:
                sc.mount_setattr_fd(tree, _FILE_ATTRS, 0, op.source)
                sc.move_mount_onto_fd(tree, target_fd, op.path)
            finally:
                os.close(tree)
        finally:
            os.close(target_fd)
    finally:
        os.close(root_fd)


def _pivot(new_root: str) -> None:
    # pivot_root(".", ".") stacks the old root on top of the new one at "/"; detaching it
    # leaves only the new root, without needing a put_old directory in a read-only stack.
    os.chdir(new_root)
    sc.pivot_root(".", ".")
    sc.umount2(".", sc.MNT_DETACH)
    os.chdir("/")
