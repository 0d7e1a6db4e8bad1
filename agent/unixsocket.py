"""Listening Unix sockets (operator API, attach, holder): a live one is never replaced, a new
one is never reachable with the wrong mode or group, and only its binder removes it."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

from agent.peercred import PeerCred, peer_credentials

PROBE_TIMEOUT_S = 1.0
# What connect(2) answers where nothing listens: a stale socket file, or no socket at all.
_NOBODY = (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTSOCK)


@dataclass(frozen=True)
class UnixListener:
    """A bound, listening, non-blocking socket and the identity of its file."""

    sock: socket.socket
    path: Path
    identity: tuple[int, int]  # (st_dev, st_ino) of the socket file it bound

    def unlink(self) -> None:
        """Remove the socket file if it is still this one: a successor may have replaced it."""
        with contextlib.suppress(FileNotFoundError):
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self.identity and stat.S_ISSOCK(st.st_mode):
                os.unlink(self.path)


def live_peer(path: Path | str) -> PeerCred | None:
    """Who accepts connections on the socket at `path`; None when nothing does (no file, not
    a socket, or a stale socket). OSError when it cannot be told."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.settimeout(PROBE_TIMEOUT_S)
        try:
            probe.connect(os.fspath(path))
        except OSError as exc:
            if exc.errno in _NOBODY:
                return None
            raise
        return peer_credentials(probe)
    finally:
        probe.close()


def listen(path: Path | str, *, mode: int, gid: int | None = None,
           backlog: int) -> UnixListener:
    """Listen at `path`, replacing whatever file is there (the caller has made sure no live
    server owns it). The socket is bound under a temporary name, given `mode` and group `gid`,
    then renamed into place, so it is never reachable with the wrong mode or group. Raises
    OSError and leaves nothing behind on failure."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(os.fspath(tmp))
        os.chmod(tmp, mode)
        if gid is not None:
            os.chown(tmp, -1, gid)
        sock.listen(backlog)
        st = os.stat(tmp)
        os.replace(tmp, path)
    except BaseException:
        sock.close()
        tmp.unlink(missing_ok=True)
        raise
    sock.setblocking(False)
    return UnixListener(sock, path, (st.st_dev, st.st_ino))
