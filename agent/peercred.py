"""Who is on the other end of a Unix socket, and may they drive the agent.

Allowed: root, the agent's own user, and processes that hold the socket's group (as primary
or supplementary group when they connected). The filesystem mode (0660) already keeps
others out; this check also covers a socket whose mode or group was changed by hand, so it
fails closed: credentials that cannot be read are a refusal, never a pass.
"""

from __future__ import annotations

import errno
import grp
import os
import socket
import struct
from dataclasses import dataclass
from typing import Protocol

# SO_PEERGROUPS (Linux 4.13): the peer's supplementary groups as they were at connect(2).
# Python's socket module does not name it.
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
_GID = struct.Struct("I")
_MAX_GROUPS = 65536  # NGROUPS_MAX


class PeerCredError(OSError):
    """The peer's credentials cannot be read (not a Unix socket, or the kernel refused)."""


class SockOpts(Protocol):
    """What reading credentials needs: a socket.socket, or asyncio's TransportSocket."""

    @property
    def family(self) -> int: ...

    def getsockopt(self, level: int, optname: int, buflen: int) -> bytes: ...


@dataclass(frozen=True)
class PeerCred:
    pid: int
    uid: int
    gid: int
    # Supplementary groups at connect time (SO_PEERGROUPS).
    groups: tuple[int, ...] = ()


def peer_credentials(sock: SockOpts | None) -> PeerCred:
    """The peer's pid, uid, gid and groups as the kernel recorded them at connect(2).

    Raises PeerCredError for anything that is not a connected Unix socket: asyncio hands
    a TransportSocket, not a socket.socket, so callers must not filter on the type.
    """
    if sock is None:
        raise PeerCredError(errno.ENOTSOCK, "no socket to read peer credentials from")
    if sock.family != socket.AF_UNIX:
        raise PeerCredError(errno.EAFNOSUPPORT,
                            f"peer credentials need a Unix socket, not family {sock.family}")
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", raw)
        groups = _peer_groups(sock)
    except OSError as exc:
        raise PeerCredError(exc.errno or 0, f"cannot read peer credentials: {exc.strerror}") \
            from None
    return PeerCred(pid, uid, gid, groups)


def _peer_groups(sock: SockOpts) -> tuple[int, ...]:
    size = 64 * _GID.size
    while True:
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, size)
        except OSError as exc:
            # ERANGE: the buffer was too small (the kernel does not say by how much here).
            if exc.errno != errno.ERANGE or size >= _MAX_GROUPS * _GID.size:
                raise
            size *= 4
            continue
        return tuple(gid for (gid,) in _GID.iter_unpack(raw[:len(raw) - len(raw) % _GID.size]))


def group_id(name: str) -> int | None:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


def is_allowed(cred: PeerCred, group_gid: int | None) -> bool:
    """Root, the agent's own uid, or a process that held `group_gid` when it connected.

    The kernel's record of the peer's groups is what counts (the same groups the socket
    file's mode was checked against), not /etc/group, which may say otherwise.
    """
    if cred.uid in (0, os.geteuid()):
        return True
    if group_gid is None:
        return False
    return group_gid == cred.gid or group_gid in cred.groups
