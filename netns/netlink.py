"""The one place that talks to pyroute2: typed link, address and route operations on one
RTNL socket, with every kernel refusal turned into a `LinkError`."""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from typing import Any, TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from netns.errors import LinkError

T = TypeVar("T")
IFF_UP = 0x1
_BUF_BYTES = 1 << 20
_AF_BRIDGE = 7
_NUD_NOARP = 0x40
_NUD_PERMANENT = 0x80
_NTF_SELF = 0x02
_RT_TABLE_MAIN = 254


@dataclass(frozen=True)
class Link:
    """A network interface as the kernel reports it."""

    index: int
    name: str
    kind: str | None
    alias: str | None
    master: int | None
    up: bool
    mtu: int = 0


@dataclass(frozen=True)
class Vxlan:
    """What identifies a VXLAN device's tunnel: a device that differs in any of these has
    to be re-made (the kernel does not change them on a live device)."""

    vni: int
    local: IPv4Address | None
    port: int
    learning: bool
    proxy: bool


@dataclass(frozen=True)
class Route:
    """An IPv4 network the namespace reaches directly, and through which link."""

    network: IPv4Network
    index: int


def _to_link(msg: Any) -> Link:
    master = msg.get_attr("IFLA_MASTER")
    mtu = msg.get_attr("IFLA_MTU")
    return Link(
        index=int(msg["index"]),
        name=str(msg.get_attr("IFLA_IFNAME")),
        kind=_str_or_none(msg.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND")),
        alias=_str_or_none(msg.get_attr("IFLA_IFALIAS")),
        master=int(master) if master else None,
        up=bool(int(msg["flags"]) & IFF_UP),
        mtu=int(mtu) if mtu else 0,
    )


def _to_vxlan(msg: Any) -> Vxlan | None:
    if msg.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND") != "vxlan":
        return None
    data = msg.get_nested("IFLA_LINKINFO", "IFLA_INFO_DATA")
    if data is None:
        return None
    local = data.get_attr("IFLA_VXLAN_LOCAL")
    return Vxlan(
        vni=int(data.get_attr("IFLA_VXLAN_ID") or 0),
        local=IPv4Address(local) if local else None,
        port=int(data.get_attr("IFLA_VXLAN_PORT") or 0),
        learning=bool(data.get_attr("IFLA_VXLAN_LEARNING")),
        proxy=bool(data.get_attr("IFLA_VXLAN_PROXY")),
    )


def _str_or_none(value: object) -> str | None:
    return None if value is None else str(value)


class Rtnl:
    """A typed RTNL client bound to one network namespace.

    Not thread-safe, and pyroute2 keeps per-thread state: use an instance only from the
    thread that made it. The namespace is the one the socket was opened in: the making
    thread's, or the one `sock` was opened in (see `netns.namespace.netlink_socket_in`).
    """

    def __init__(self, sock: socket.socket | None = None, *,
                 share_loop_with: Rtnl | None = None) -> None:
        self._sock = sock
        # Each sync IPRoute makes its own asyncio loop (about 0.3 ms); a short-lived client
        # on the same thread can borrow the loop of a long-lived one instead.
        loop = None if share_loop_with is None else share_loop_with._ipr.asyncore.event_loop
        try:
            if sock is None:
                self._ipr: Any = IPRoute(groups=0, use_event_loop=loop)
            else:
                # pyroute2 wants a datagram netlink socket with buffers like its own.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _BUF_BYTES)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _BUF_BYTES)
                self._ipr = IPRoute(groups=0, use_socket=sock, use_event_loop=loop)
        except (NetlinkError, OSError) as exc:
            if sock is not None:
                sock.close()
            raise LinkError("cannot open netlink socket", operation="open",
                            errno=_errno_of(exc)) from exc

    def close(self) -> None:
        try:
            self._ipr.close()
        finally:
            if self._sock is not None:
                self._sock.close()

    def __enter__(self) -> Rtnl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, operation: str, interface: str | None, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except NetlinkError as exc:
            raise LinkError("kernel refused request", operation=operation, interface=interface,
                            errno=_errno_of(exc)) from exc
        except OSError as exc:
            raise LinkError("netlink I/O failed", operation=operation, interface=interface,
                            errno=exc.errno) from exc

    # --- links ---------------------------------------------------------------------------

    def links(self) -> list[Link]:
        return self._call("list-links", None, lambda: [_to_link(m) for m in self._ipr.get_links()])

    def _get_link(self, interface: str | None, **query: Any) -> Any | None:
        """The kernel's message for the link `query` selects (ifname= or index=), or None
        if there is no such link."""
        try:
            msgs = self._call("get-link", interface, lambda: self._ipr.link("get", **query))
        except LinkError as exc:
            if exc.errno == errno.ENODEV:
                return None
            raise
        return msgs[0]

    def link(self, name: str) -> Link | None:
        """The link called `name`, or None."""
        msg = self._get_link(name, ifname=name)
        return None if msg is None else _to_link(msg)

    def link_by_index(self, index: int) -> Link | None:
        """The link with ifindex `index`, or None."""
        msg = self._get_link(None, index=index)
        return None if msg is None else _to_link(msg)

    def add_bridge(self, name: str, *, address: str) -> int:
        """A bridge with the MAC `address`. Given at creation, the address stays: otherwise
        the kernel gives the bridge the lowest MAC of its ports and changes it whenever
        that port leaves, which makes every namespace's cached gateway entry wrong."""
        self._call("add-bridge", name, lambda: self._ipr.link(
            "add", ifname=name, kind="bridge", address=address))
        return self._index(name)

    def add_vxlan(self, name: str, *, vni: int, local: IPv4Address, port: int,
                  master: int, mtu: int) -> int:
        """A VXLAN device on bridge `master` that never learns (`nolearning`) and answers
        ARP from its neighbour entries (`proxy`): every remote address is pushed, nothing
        floods. Not up yet: the caller sets the alias first."""
        self._call("add-vxlan", name, lambda: self._ipr.link(
            "add", ifname=name, kind="vxlan", vxlan_id=vni, vxlan_local=str(local),
            vxlan_port=port, vxlan_learning=0, vxlan_proxy=1, master=master, mtu=mtu))
        return self._index(name)

    def vxlan(self, name: str) -> Vxlan | None:
        """The tunnel parameters of the VXLAN device `name`; None if it is missing or not
        a VXLAN device."""
        msg = self._get_link(name, ifname=name)
        return None if msg is None else _to_vxlan(msg)

    def set_mtu(self, index: int, name: str, mtu: int) -> None:
        self._call("set-mtu", name, lambda: self._ipr.link("set", index=index, mtu=mtu))

    def set_master(self, index: int, name: str, master: int) -> None:
        self._call("set-master", name, lambda: self._ipr.link("set", index=index,
                                                               master=master))

    def set_alias(self, name: str, alias: str) -> None:
        # The kernel ignores IFLA_IFALIAS when it creates a link, so this is a second request.
        self._call("set-alias", name, lambda: self._ipr.link("set", ifname=name, ifalias=alias))

    def set_up(self, index: int, name: str) -> None:
        self._call("link-up", name, lambda: self._ipr.link("set", index=index, state="up"))

    def delete_link(self, name: str, *, missing_ok: bool = True) -> bool:
        """Delete `name`; False if it was already gone (and `missing_ok`)."""
        try:
            self._call("delete-link", name, lambda: self._ipr.link("del", ifname=name))
        except LinkError as exc:
            if missing_ok and exc.errno == errno.ENODEV:
                return False
            raise
        return True

    def _index(self, name: str) -> int:
        link = self.link(name)
        if link is None:
            raise LinkError("link vanished after creation", operation="lookup", interface=name,
                            errno=errno.ENODEV)
        return link.index

    # --- addresses and routes ------------------------------------------------------------

    def add_address(self, index: int, name: str, address: IPv4Interface) -> None:
        self._call("add-address", name, lambda: self._ipr.addr(
            "add", index=index, address=str(address.ip),
            prefixlen=address.network.prefixlen))

    def addresses(self, index: int, name: str) -> list[IPv4Interface]:
        msgs = self._call("list-addresses", name,
                          lambda: self._ipr.get_addr(family=socket.AF_INET, index=index))
        return [IPv4Interface(f"{m.get_attr('IFA_ADDRESS')}/{m['prefixlen']}") for m in msgs]

    def all_addresses(self) -> list[tuple[IPv4Interface, int]]:
        """Every IPv4 address of the namespace, with the index of its link."""
        msgs = self._call("list-addresses", None,
                          lambda: self._ipr.get_addr(family=socket.AF_INET))
        return [(IPv4Interface(f"{m.get_attr('IFA_ADDRESS')}/{m['prefixlen']}"), int(m["index"]))
                for m in msgs]

    def routes(self) -> list[Route]:
        """The main table's IPv4 routes that name an output link (default routes included:
        the caller decides what a 0.0.0.0/0 means)."""
        msgs = self._call("list-routes", None, lambda: self._ipr.get_routes(
            family=socket.AF_INET, table=_RT_TABLE_MAIN))
        routes: list[Route] = []
        for m in msgs:
            oif = m.get_attr("RTA_OIF")
            if oif is None:
                continue  # multipath and blackhole routes: not a network on a link
            dst = m.get_attr("RTA_DST") or "0.0.0.0"
            routes.append(Route(IPv4Network(f"{dst}/{m['dst_len']}", strict=False), int(oif)))
        return routes

    # --- neighbours ----------------------------------------------------------------------

    def delete_neighbour(self, index: int, name: str, address: IPv4Address) -> bool:
        """Forget the ARP entry for `address` on link `index`; False if there was none."""
        try:
            self._call("delete-neighbour", name, lambda: self._ipr.neigh(
                "del", family=socket.AF_INET, ifindex=index, dst=str(address)))
        except LinkError as exc:
            if exc.errno == errno.ENOENT:
                return False
            raise
        return True


    # --- overlay forwarding (VXLAN FDB and proxy neighbours) ---------------------------

    def vxlan_fdb(self, index: int, name: str) -> dict[str, IPv4Address]:
        """The VXLAN device's own (`self`) FDB: MAC -> remote underlay address."""
        msgs = self._call("list-fdb", name, lambda: self._ipr.get_neighbours(
            family=_AF_BRIDGE, ifindex=index))
        entries: dict[str, IPv4Address] = {}
        for m in msgs:
            dst, mac = m.get_attr("NDA_DST"), m.get_attr("NDA_LLADDR")
            if int(m["ifindex"]) == index and dst and mac:
                entries[str(mac)] = IPv4Address(dst)
        return entries

    def set_vxlan_fdb(self, index: int, name: str, mac: str, dst: IPv4Address) -> None:
        """`bridge fdb replace MAC dev NAME dst DST self permanent`."""
        self._call("set-fdb", name, lambda: self._ipr.neigh(
            "replace", family=_AF_BRIDGE, ifindex=index, lladdr=mac, dst=str(dst),
            state=_NUD_NOARP | _NUD_PERMANENT, flags=_NTF_SELF))

    def delete_vxlan_fdb(self, index: int, name: str, mac: str, dst: IPv4Address) -> None:
        try:
            self._call("delete-fdb", name, lambda: self._ipr.neigh(
                "del", family=_AF_BRIDGE, ifindex=index, lladdr=mac, dst=str(dst),
                state=_NUD_NOARP | _NUD_PERMANENT, flags=_NTF_SELF))
        except LinkError as exc:
            if exc.errno != errno.ENOENT:
                raise

    def neighbours(self, index: int, name: str) -> dict[IPv4Address, str]:
        """The link's permanent IPv4 neighbour entries: address -> MAC."""
        msgs = self._call("list-neighbours", name, lambda: self._ipr.get_neighbours(
            family=socket.AF_INET, ifindex=index))
        return {IPv4Address(m.get_attr("NDA_DST")): str(m.get_attr("NDA_LLADDR"))
                for m in msgs
                if int(m["ifindex"]) == index and int(m["state"]) & _NUD_PERMANENT
                and m.get_attr("NDA_DST") and m.get_attr("NDA_LLADDR")}

    def set_neighbour(self, index: int, name: str, address: IPv4Address, mac: str) -> None:
        """`ip neigh replace ADDRESS lladdr MAC dev NAME nud permanent`."""
        self._call("set-neighbour", name, lambda: self._ipr.neigh(
            "replace", family=socket.AF_INET, ifindex=index, dst=str(address), lladdr=mac,
            state=_NUD_PERMANENT))


def _errno_of(exc: BaseException) -> int | None:
    code = getattr(exc, "code", None)
    if isinstance(code, int):
        return code
    return getattr(exc, "errno", None)
