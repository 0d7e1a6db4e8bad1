"""Who is on the other end of a Unix socket, and may they drive the agent.

Allowed: root, the agent's own user, and members of the socket's group (primary or
supplementary). The filesystem mode (0660) already keeps others out; this check also
covers a socket whose mode or group was changed by hand.
"""

from __future__ import annotations

import grp
import os
import pwd
import socket
import struct
from dataclasses import dataclass


@dataclass(frozen=True)
class PeerCred:
    pid: int
    uid: int
    gid: int


def peer_credentials(sock: socket.socket) -> PeerCred:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return PeerCred(pid, uid, gid)


def group_id(name: str) -> int | None:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


def is_allowed(cred: PeerCred, group_gid: int | None) -> bool:
    if cred.uid in (0, os.geteuid()):
        return True
    if group_gid is None:
        return False
    if cred.gid == group_gid:
        return True
    try:
        user = pwd.getpwuid(cred.uid).pw_name
    except KeyError:
        return False
    return user in grp.getgrgid(group_gid).gr_mem
