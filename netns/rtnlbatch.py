"""Raw rtnetlink for the hot path of an attach: the few link, address, route and neighbour
requests it makes, encoded with `struct` (no pyroute2), sent several to one `send` and
acknowledged one by one, every refusal turned into the `LinkError` netns.netlink raises."""

from __future__ import annotations

import errno
import select
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface

from netns.errors import LinkError

# <linux/netlink.h>
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
# <linux/rtnetlink.h>
RTM_NEWLINK = 16
RTM_GETLINK = 18
RTM_NEWADDR = 20
RTM_NEWROUTE = 24
RTM_DELNEIGH = 29
RT_TABLE_MAIN = 254
RTPROT_STATIC = 4
RT_SCOPE_UNIVERSE = 0
RTN_UNICAST = 1
RTA_GATEWAY = 5
# <linux/if_link.h>, <linux/veth.h>, <linux/if_addr.h>, <linux/neighbour.h>
IFLA_ADDRESS = 1
IFLA_IFNAME = 3
IFLA_MTU = 4
IFLA_MASTER = 10
IFLA_LINKINFO = 18
IFLA_IFALIAS = 20
IFLA_AF_SPEC = 26
IFLA_NET_NS_FD = 28
IFLA_INET6_ADDR_GEN_MODE = 8
IN6_ADDR_GEN_MODE_NONE = 1
IFLA_INFO_KIND = 1
IFLA_INFO_DATA = 2
VETH_INFO_PEER = 1
IFA_ADDRESS = 1
IFA_LOCAL = 2
NDA_DST = 1
NUD_PERMANENT = 0x80
IFF_UP = 0x1

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, port id
_IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
_RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, protocol,
#                                        scope, type, flags
_NDMSG = struct.Struct("=BxxxiHBB")  # family, ifindex, state, flags, type
_NLATTR = struct.Struct("=HH")  # len, type
_U32 = struct.Struct("=I")
_ERRNO = struct.Struct("=i")
_NEW = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
_SET = NLM_F_REQUEST | NLM_F_ACK
_REFUSED = "kernel refused request"
_RECV_BYTES = 1 << 16
_SEQ_MAX = (1 << 32) - 1


@dataclass(frozen=True)
class Request:
    """One rtnetlink request without its header (`type`, `flags` and the body after it),
    and the `operation` and `interface` a refusal's `LinkError` names. A refusal with an
    errno in `tolerated` is returned instead of raised."""

    type: int
    flags: int
    body: bytes
    operation: str
    interface: str | None
    tolerated: frozenset[int] = frozenset()


@dataclass(frozen=True)
class Reply:
    """What the kernel answered to one request: 0 or the errno it refused with, and the
    messages (header included) it sent before its acknowledgement, such as a link."""

    errno: int
    messages: tuple[bytes, ...] = ()


def _attr(kind: int, payload: bytes) -> bytes:
    length = _NLATTR.size + len(payload)
    return _NLATTR.pack(length, kind) + payload + b"\0" * (-length % 4)


def _u32(kind: int, value: int) -> bytes:
    return _attr(kind, _U32.pack(value))


def _string(kind: int, value: str) -> bytes:
    return _attr(kind, value.encode() + b"\0")


def _ifinfo(index: int = 0, *, up: bool = False) -> bytes:
    flags = IFF_UP if up else 0
    return _IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, flags, flags)


def _mac(text: str) -> bytes:
    raw = bytes.fromhex(text.replace(":", ""))
    if len(raw) != 6:
        raise ValueError(f"bad MAC address {text!r}")
    return raw


# --- requests ---------------------------------------------------------------------------
# Byte for byte what pyroute2 0.9.7 sent when the attach went through netns.netlink.Rtnl
# (nested attributes without NLA_F_NESTED, strings NUL-terminated, "set" as RTM_NEWLINK),
# so the kernel sees no change; the operation names are Rtnl's too.


def add_veth(name: str, *, master: int, peer_name: str, peer_netns_fd: int,
             mtu: int | None = None) -> Request:
    """A veth pair, the host end `name` up on bridge `master`, the peer `peer_name` made
    directly inside the namespace behind `peer_netns_fd` (no rename, no move); `mtu` on
    both ends."""
    mtu_attr = b"" if mtu is None else _u32(IFLA_MTU, mtu)
    peer = _ifinfo() + _string(IFLA_IFNAME, peer_name) \
        + _u32(IFLA_NET_NS_FD, peer_netns_fd) + mtu_attr
    linkinfo = _string(IFLA_INFO_KIND, "veth") \
        + _attr(IFLA_INFO_DATA, _attr(VETH_INFO_PEER, peer))
    body = _ifinfo(up=True) + _string(IFLA_IFNAME, name) + _u32(IFLA_MASTER, master) \
        + mtu_attr + _attr(IFLA_LINKINFO, linkinfo)
    return Request(RTM_NEWLINK, _NEW, body, "add-veth", name)


def get_link(name: str) -> Request:
    """The link called `name` (its RTM_NEWLINK comes back in `Reply.messages`)."""
    return Request(RTM_GETLINK, _SET, _ifinfo() + _string(IFLA_IFNAME, name), "get-link",
                   name)


def set_up(name: str, index: int | None = None) -> Request:
    """Link `index` up; without an index, the link called `name`."""
    if index is None:
        return Request(RTM_NEWLINK, _SET, _ifinfo(up=True) + _string(IFLA_IFNAME, name),
                       "link-up", name)
    return Request(RTM_NEWLINK, _SET, _ifinfo(index, up=True), "link-up", name)


def set_alias(name: str, alias: str) -> Request:
    """The link called `name` gets the alias (ifalias) `alias`. The kernel ignores
    IFLA_IFALIAS when it creates a link, so this is a request of its own."""
    body = _ifinfo() + _string(IFLA_IFNAME, name) + _string(IFLA_IFALIAS, alias)
    return Request(RTM_NEWLINK, _SET, body, "set-alias", name)


def set_no_ipv6_address(name: str) -> Request:
    """The link called `name` never makes itself an IPv6 address (addrgenmode none): no
    link-local, so no duplicate-address probe, router solicitation or MLD report when it
    comes up. The kernel refuses this on a link it is creating, so it is a request of its
    own, made before the link has a carrier."""
    mode = _attr(socket.AF_INET6,
                 _attr(IFLA_INET6_ADDR_GEN_MODE, bytes([IN6_ADDR_GEN_MODE_NONE])))
    body = _ifinfo() + _string(IFLA_IFNAME, name) + _attr(IFLA_AF_SPEC, mode)
    return Request(RTM_NEWLINK, _SET, body, "set-addrgenmode", name)


def set_mac(index: int, name: str, address: str) -> Request:
    """Link `index` gets the MAC `address` (aa:bb:cc:dd:ee:ff)."""
    return Request(RTM_NEWLINK, _SET, _ifinfo(index) + _attr(IFLA_ADDRESS, _mac(address)),
                   "set-mac", name)


def add_address(index: int, name: str, address: IPv4Interface) -> Request:
    """`address` (with its prefix) on link `index`."""
    packed = address.ip.packed
    body = _IFADDRMSG.pack(socket.AF_INET, address.network.prefixlen, 0, 0, index) \
        + _attr(IFA_ADDRESS, packed) + _attr(IFA_LOCAL, packed)
    return Request(RTM_NEWADDR, _NEW, body, "add-address", name)


def add_default_route(gateway: IPv4Address, name: str) -> Request:
    """0.0.0.0/0 via `gateway` in the main table; `name` is the link it is for."""
    body = _RTMSG.pack(socket.AF_INET, 0, 0, 0, RT_TABLE_MAIN, RTPROT_STATIC,
                       RT_SCOPE_UNIVERSE, RTN_UNICAST, 0) + _attr(RTA_GATEWAY, gateway.packed)
    return Request(RTM_NEWROUTE, _NEW, body, "add-route", name)


def delete_neighbour(index: int, name: str, address: IPv4Address) -> Request:
    """Forget the ARP entry for `address` on link `index`; a missing entry (ENOENT) is a
    `Reply`, not an error."""
    body = _NDMSG.pack(socket.AF_INET, index, NUD_PERMANENT, 0, 0) \
        + _attr(NDA_DST, address.packed)
    return Request(RTM_DELNEIGH, _SET, body, "delete-neighbour", name,
                   tolerated=frozenset({errno.ENOENT}))


def link_index(message: bytes) -> int:
    """The ifindex of an RTM_NEWLINK message (as `get_link` gets back)."""
    kind = _NLMSGHDR.unpack_from(message)[1]
    if kind != RTM_NEWLINK or len(message) < _NLMSGHDR.size + _IFINFOMSG.size:
        raise LinkError(f"unexpected answer (type {kind})", operation="get-link",
                        errno=errno.EPROTO)
    return int(_IFINFOMSG.unpack_from(message, _NLMSGHDR.size)[2])


def encode(requests: Sequence[Request], first_seq: int) -> bytes:
    """The requests as one buffer of netlink messages, numbered from `first_seq`."""
    parts = []
    for seq, request in enumerate(requests, first_seq):
        length = _NLMSGHDR.size + len(request.body)
        parts.append(_NLMSGHDR.pack(length, request.type, request.flags, seq, 0))
        parts.append(request.body)  # every body is a multiple of 4 bytes long
    return b"".join(parts)


# --- the socket ---------------------------------------------------------------------------


class RtnlSocket:
    """A NETLINK_ROUTE socket that runs batches of `Request`s. Owns `sock` (bound to the
    namespace it was opened in); not thread-safe. `timeout_s`: how long to wait for an
    answer the kernel owes (see `_receive`)."""

    def __init__(self, sock: socket.socket, *, timeout_s: float = 5.0) -> None:
        self._sock = sock
        self._timeout_s = timeout_s
        self._seq = 0
        self._buffer = bytearray(_RECV_BYTES)

    @classmethod
    def open(cls) -> RtnlSocket:
        """A socket in the calling thread's network namespace."""
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                 socket.NETLINK_ROUTE)
        except OSError as exc:
            raise LinkError("cannot open netlink socket", operation="open",
                            errno=exc.errno) from exc
        return cls(sock)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> RtnlSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, requests: Sequence[Request]) -> list[Reply]:
        """Send `requests` in one datagram and collect one `Reply` each, in order.

        The kernel handles a datagram's messages one after the other and does not stop at
        a refusal, so a batch holds only requests whose followers are harmless (or undone
        by the caller) when one fails. Every answer is read before the first refusal not
        `tolerated` is raised as a `LinkError`, so the socket stays usable.
        """
        if not requests:
            return []
        if self._seq + len(requests) > _SEQ_MAX:
            self._seq = 0
        first = self._seq + 1
        self._seq += len(requests)
        try:
            self._sock.send(encode(requests, first))
        except OSError as exc:
            raise LinkError("netlink I/O failed", operation=requests[0].operation,
                            interface=requests[0].interface, errno=exc.errno) from exc
        replies = self._collect(requests, first)
        for request, reply in zip(requests, replies, strict=True):
            if reply.errno and reply.errno not in request.tolerated:
                raise LinkError(_REFUSED, operation=request.operation,
                                interface=request.interface, errno=reply.errno)
        return replies

    def _collect(self, requests: Sequence[Request], first: int) -> list[Reply]:
        answered: list[int | None] = [None] * len(requests)
        data: list[list[bytes]] = [[] for _ in requests]
        pending = len(requests)
        while pending:
            received = self._receive(requests[answered.index(None)])
            offset = 0
            while offset + _NLMSGHDR.size <= received:
                length, kind, _, seq, _ = _NLMSGHDR.unpack_from(self._buffer, offset)
                if length < _NLMSGHDR.size or offset + length > received:
                    break
                slot = seq - first
                if 0 <= slot < len(requests) and answered[slot] is None:
                    if kind == NLMSG_ERROR:
                        answered[slot] = -_ERRNO.unpack_from(self._buffer,
                                                             offset + _NLMSGHDR.size)[0]
                        pending -= 1
                    elif kind != NLMSG_DONE:
                        data[slot].append(bytes(self._buffer[offset:offset + length]))
                # Anything else answers an earlier batch that failed half-way: dropped.
                offset += (length + 3) & ~3
        return [Reply(code or 0, tuple(messages))
                for code, messages in zip(answered, data, strict=True)]

    def _receive(self, awaited: Request) -> int:
        # rtnetlink handles a request inside the sender's send(), so its answers are
        # queued before send() returns: the first try succeeds; the wait is a safety net.
        while True:
            try:
                return self._sock.recv_into(self._buffer, 0, socket.MSG_DONTWAIT)
            except BlockingIOError:
                poller = select.poll()  # not select(): the agent may hold fds above 1023
                poller.register(self._sock, select.POLLIN)
                if not poller.poll(self._timeout_s * 1000):
                    raise LinkError("no answer from the kernel", operation=awaited.operation,
                                    interface=awaited.interface,
                                    errno=errno.ETIMEDOUT) from None
            except OSError as exc:
                raise LinkError("netlink I/O failed", operation=awaited.operation,
                                interface=awaited.interface, errno=exc.errno) from exc
