"""A pty for a command in a dyno, allocated from the dyno's own devpts instance by the forked
child (still privileged, already in the dyno's mount namespace), so that no terminal of the
host or of the operator ever becomes the command's; the master goes back to the caller over
a socketpair, as `docker exec -t` does.
"""

from __future__ import annotations

import array
import fcntl
import os
import socket
import struct
import termios
from dataclasses import dataclass

from agent.launcher.errors import LaunchError

# <asm-generic/ioctls.h>; Python's termios lacks both.
TIOCSPTLCK = 0x40045431
TIOCGPTPEER = 0x5441  # Linux 4.13: opens the peer through the master, not by a path
# The dyno's devpts (rootfs mounts it with newinstance): a path that resolves only once the
# child is in the dyno's mount namespace.
PTMX = "/dev/pts/ptmx"
MAX_SIZE = 0xFFFF


@dataclass(frozen=True)
class PtyRequest:
    rows: int
    cols: int

    def validate(self) -> None:
        for name, value in (("rows", self.rows), ("cols", self.cols)):
            if not isinstance(value, int) or isinstance(value, bool) or \
                    not 0 <= value <= MAX_SIZE:
                raise LaunchError("tty", 0, f"{name} must be 0..{MAX_SIZE}, got {value!r}")


def channel() -> tuple[int, int]:
    """(parent end, child end) for handing the master over; both close-on-exec."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    return parent.detach(), child.detach()


def open_in_child(request: PtyRequest, uid: int, gid: int, channel_fd: int) -> int:
    """In the child: a new pty of the dyno's devpts, its master sent over `channel_fd`; the
    child becomes a session leader with the peer as controlling terminal. Returns the peer
    (the caller installs it as stdio)."""
    master = os.open(PTMX, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        fcntl.ioctl(master, TIOCSPTLCK, struct.pack("i", 0))
        fcntl.ioctl(master, termios.TIOCSWINSZ,
                    struct.pack("HHHH", request.rows, request.cols, 0, 0))
        peer: int = fcntl.ioctl(master, TIOCGPTPEER, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
        # The dyno user's own terminal, as login(1) makes it: it may reopen it (/dev/tty,
        # ttyname) and nobody else in the dyno may write to it (mode stays 0620).
        os.fchown(peer, uid, gid)
        sock = socket.socket(fileno=os.dup(channel_fd))
        try:
            sock.sendmsg([b"m"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                   array.array("i", [master]).tobytes())])
        finally:
            sock.close()
    finally:
        os.close(master)
    os.setsid()
    fcntl.ioctl(peer, termios.TIOCSCTTY, 0)
    return peer


def receive_master(channel_fd: int) -> int:
    """In the parent, after the child exec'd: the master it sent."""
    sock = socket.socket(fileno=os.dup(channel_fd))
    try:
        msg, ancdata, flags, _ = sock.recvmsg(
            16, socket.CMSG_SPACE(array.array("i").itemsize), socket.MSG_DONTWAIT
            | socket.MSG_CMSG_CLOEXEC)
    except BlockingIOError:
        raise LaunchError("tty", 0, "the child sent no pty master") from None
    finally:
        sock.close()
    fds = array.array("i")
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
    if msg != b"m" or len(fds) != 1 or flags & socket.MSG_CTRUNC:
        for fd in fds:
            os.close(fd)
        raise LaunchError("tty", 0, "the child sent no pty master")
    return fds[0]
