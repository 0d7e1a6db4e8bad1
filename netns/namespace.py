"""Named network namespaces as bind mounts under a root directory (default /run/netns, as
iproute2 does): create with unshare(2) in the calling thread, enter with setns(2), delete."""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import stat
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from netns.errors import NamespaceError, NamespaceExistsError, NamespaceNotFoundError
from netns.names import check_id

CLONE_NEWNET = 0x40000000
MS_BIND = 0x1000
MS_REC = 0x4000
MS_SHARED = 1 << 20
MNT_DETACH = 0x2
_THREAD_NETNS = "/proc/thread-self/ns/net"

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_void_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]


def _fail(operation: str, path: Path | None) -> NamespaceError:
    code = ctypes.get_errno()
    return NamespaceError("system call failed", operation=operation, path=path, errno=code)


def open_current() -> int:
    """An fd on the calling thread's network namespace (not the process's: threads differ)."""
    return os.open(_THREAD_NETNS, os.O_RDONLY | os.O_CLOEXEC)


def setns(fd: int, path: Path | None = None) -> None:
    """Move the calling thread into the network namespace behind `fd`."""
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        raise _fail("setns", path)


@contextmanager
def entered(path: Path) -> Iterator[None]:
    """Run the block with the calling thread inside the namespace at `path`, then return.

    Only for threads the caller owns: every socket opened inside stays bound to that
    namespace, and anything else scheduled on the thread meanwhile would run there too.
    """
    try:
        target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise NamespaceNotFoundError("cannot open namespace", operation="enter", path=path,
                                     errno=exc.errno) from exc
    back = open_current()
    try:
        setns(target, path)
        try:
            yield
        finally:
            # A thread that cannot get back would silently run everything after this in
            # the wrong namespace; raising here is the lesser evil.
            setns(back, Path(_THREAD_NETNS))
    finally:
        os.close(target)
        os.close(back)


def netlink_socket_in(path: Path) -> socket.socket:
    """A NETLINK_ROUTE socket bound to the namespace at `path` (sockets keep their netns)."""
    with entered(path):
        return socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC,
                             socket.NETLINK_ROUTE)


def write_sysctls_in(path: Path, settings: Mapping[str, str]) -> None:
    """Write each `/proc/sys/<key>` of `settings` (e.g. `net/ipv4/conf/default/arp_notify`)
    as the namespace at `path` sees it: a net sysctl file belongs to the namespace of the
    thread that opens it. The namespace is entered once for all of them."""
    fds: list[tuple[Path, int, str]] = []
    try:
        with entered(path):
            for key, value in settings.items():
                sysctl = Path("/proc/sys") / key
                try:
                    fds.append((sysctl, os.open(sysctl, os.O_WRONLY | os.O_CLOEXEC), value))
                except OSError as exc:
                    raise NamespaceError("cannot open sysctl", operation="sysctl",
                                         path=sysctl, errno=exc.errno) from exc
        for sysctl, fd, value in fds:
            try:
                os.write(fd, value.encode())
            except OSError as exc:
                raise NamespaceError("cannot write sysctl", operation="sysctl", path=sysctl,
                                     errno=exc.errno) from exc
    finally:
        for _, fd, _ in fds:
            os.close(fd)


def namespace_id(path: Path) -> int:
    """The namespace's inode number: equal ids mean the same namespace."""
    return os.stat(path).st_ino


class NamespaceDir:
    """The namespaces mounted under one root directory.

    `shared=True` makes the root a shared mount point, as `ip netns add` does, so that a
    later unmount here also propagates into mount namespaces cloned from this one (a dyno's
    mount namespace would otherwise keep every namespace mounted at its creation alive).
    """

    def __init__(self, root: Path = Path("/run/netns"), *, shared: bool = True) -> None:
        self.root = root
        self.shared = shared
        self._prepared = False

    def path(self, name: str) -> Path:
        return self.root / check_id("namespace name", name)

    def prepare(self) -> None:
        """Create the root and (if `shared`) make it a shared mount point; idempotent."""
        if self._prepared:
            return
        self.root.mkdir(mode=0o755, parents=True, exist_ok=True)
        if self.shared:
            raw = os.fsencode(self.root)
            while _libc.mount(b"none", raw, None, MS_SHARED | MS_REC, None) != 0:
                # EINVAL: the root is not a mount point yet; bind it onto itself once.
                if ctypes.get_errno() != errno.EINVAL:
                    raise _fail("make-shared", self.root)
                if _libc.mount(raw, raw, b"none", MS_BIND | MS_REC, None) != 0:
                    raise _fail("bind-root", self.root)
        self._prepared = True

    def exists(self, name: str) -> bool:
        return self._is_mounted(self.path(name))

    def names(self) -> list[str]:
        """Names of the namespaces mounted under the root (plain files left behind excluded)."""
        try:
            entries = sorted(os.listdir(self.root))
        except FileNotFoundError:
            return []
        return [n for n in entries if self._is_mounted(self.root / n)]

    def create(self, name: str) -> Path:
        """Create a fresh network namespace and mount it at `<root>/<name>`.

        The calling thread unshares, bind-mounts its new namespace and returns to the
        namespace it was in; the namespace lives on through the mount alone.
        """
        self.prepare()
        path = self.path(name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
        except FileExistsError as exc:
            if self._is_mounted(path):
                raise NamespaceExistsError("already exists", operation="create", path=path,
                                           errno=errno.EEXIST) from exc
            # A file without a mount: left by a crash between open and mount; reuse it.
        except OSError as exc:
            raise NamespaceError("cannot create mount point", operation="create", path=path,
                                 errno=exc.errno) from exc
        else:
            os.close(fd)
        back = open_current()
        try:
            if _libc.unshare(CLONE_NEWNET) != 0:
                error = _fail("unshare", path)
                self._unlink(path)
                raise error
            try:
                if _libc.mount(_THREAD_NETNS.encode(), os.fsencode(path), b"none", MS_BIND,
                               None) != 0:
                    error = _fail("bind-mount", path)
                    self._unlink(path)
                    raise error
            finally:
                setns(back, Path(_THREAD_NETNS))
        finally:
            os.close(back)
        return path

    def delete(self, name: str, *, missing_ok: bool = True) -> None:
        """Unmount and remove `<root>/<name>`; the kernel frees the namespace once nothing
        (process, socket, fd) holds it any more."""
        path = self.path(name)
        if _libc.umount2(os.fsencode(path), MNT_DETACH) != 0:
            code = ctypes.get_errno()
            if code == errno.ENOENT and not missing_ok:
                raise NamespaceNotFoundError("no such namespace", operation="delete", path=path,
                                             errno=code)
            if code not in (errno.EINVAL, errno.ENOENT):  # EINVAL: not mounted
                raise NamespaceError("cannot unmount", operation="delete", path=path,
                                     errno=code)
        self._unlink(path)

    @staticmethod
    def _unlink(path: Path) -> None:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise NamespaceError("cannot remove mount point", operation="delete", path=path,
                                 errno=exc.errno) from exc

    @staticmethod
    def _is_mounted(path: Path) -> bool:
        # An nsfs bind mount shows up as a file on a different device than its directory.
        try:
            st = os.stat(path)
            parent = os.stat(path.parent)
        except OSError:
            return False
        return stat.S_ISREG(st.st_mode) and st.st_dev != parent.st_dev
