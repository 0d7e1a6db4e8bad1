"""A host's space networks: bridges per space, namespaces attached by veth pairs, addresses
from the persisted pool, the firewall table and the sweep, all driven from one thread pinned
to the host's network namespace."""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import logging
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path
from typing import ParamSpec, TypeVar

from netns import entries, rtnlbatch
from netns.errors import (
    AddressError,
    LinkError,
    NamespaceError,
    NamespaceExistsError,
    NamespaceNotFoundError,
    NetnsError,
)
from netns.firewall import FirewallSpec, Nft, SpaceRules
from netns.ipam import DEFAULT_POOL, AddressBook, Fleet, Overlay, SpaceLease
from netns.names import (
    LinkOwner,
    bridge_alias,
    bridge_mac,
    bridge_name,
    check_id,
    check_prefix,
    overlay_mac,
    parse_alias,
    veth_alias,
    veth_name,
    vxlan_alias,
    vxlan_name,
)
from netns.namespace import (
    NamespaceDir,
    netlink_socket_in,
    open_current,
    setns,
    write_sysctls_in,
)
from netns.netlink import Link, Rtnl, Vxlan
from netns.rtnlbatch import RtnlSocket

log = logging.getLogger(__name__)
P = ParamSpec("P")
T = TypeVar("T")

INNER_IFNAME = "eth0"
_LO_IFINDEX = 1
_MARKERS = "namespaces"
_MARKER_ANCHOR = "namespace-marker"  # every marker is a hard link to it (netns.entries)
_IP_FORWARD = "/proc/sys/net/ipv4/ip_forward"
# Set before the inner end exists, so that it inherits the default: the kernel then announces
# the address (gratuitous ARP) when the link's MAC is set, and peers on the bridge that
# cached the previous holder's MAC for a reused address update their entry at once.
#
# IPv6 is off on the inner end (it inherits the default too; `lo` keeps ::1): the space
# carries IPv4 only (the firewall drops IPv6 from space bridges). Left on, every new link
# made a link-local address, probed it, solicited routers and sent MLD reports over the
# bridge, each through the bridge's netfilter hooks: about an eighth of the host's CPU in a
# burst of 200 starts. On a kernel without IPv6 (booted with ipv6.disable=1) neither this
# nor the host end's `addrgenmode none` exists, nor is needed.
_ARP_NOTIFY = {"net/ipv4/conf/default/arp_notify": "1"}
_ARP_NOTIFY_NO_IPV6 = {**_ARP_NOTIFY, "net/ipv6/conf/default/disable_ipv6": "1"}


def host_has_ipv6() -> bool:
    """Whether this kernel has IPv6 at all (its sysctls exist only then)."""
    return os.path.isdir("/proc/sys/net/ipv6")


# IPv4 VXLAN: inner Ethernet 14 + VXLAN 8 + UDP 8 + outer IPv4 20.
VXLAN_OVERHEAD = 50
_VNI_MAX = (1 << 24) - 1


@dataclass(frozen=True)
class HostNetworkConfig:
    """Where things live and how they are named. Agents side by side in one network
    namespace need distinct `state_dir`, `pool`, `link_prefix` and `table`."""

    state_dir: Path
    netns_dir: Path = Path("/run/netns")
    shared_netns_dir: bool = True
    pool: IPv4Network = DEFAULT_POOL
    link_prefix: str = "dy"
    table: str = "dynoagent"
    outbound: tuple[str, ...] = ()
    allowed_tcp_ports: tuple[int, ...] = ()
    allowed_udp_ports: tuple[int, ...] = ()
    host_netns: Path | None = None
    enable_forwarding: bool = True
    durable_state: bool = True
    call_timeout_s: float = 30.0


@dataclass(frozen=True)
class Space:
    """A space's network on this host."""

    space_id: str
    bridge: str
    subnet: IPv4Network
    gateway: IPv4Interface
    slice: IPv4Network | None = None  # this host's share of `subnet` (spread spaces only)
    vxlan: str | None = None
    vni: int | None = None
    mtu: int | None = None  # of the VXLAN device, the bridge and every veth of the space


@dataclass
class _Peers:
    """What a space's VXLAN device holds (as last read or written): FDB MAC -> underlay
    address, neighbours address -> MAC."""

    fdb: dict[str, IPv4Address] = field(default_factory=dict)
    neighbours: dict[IPv4Address, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Attachment:
    """A namespace wired into a space: `ifname` inside with `address`, default route via
    `gateway`, `host_ifname` on the space's bridge."""

    space_id: str
    namespace: str
    path: Path
    address: IPv4Interface
    gateway: IPv4Address
    host_ifname: str
    ifname: str = INNER_IFNAME


@dataclass(frozen=True)
class SweepReport:
    """What a sweep removed."""

    links: tuple[str, ...]
    namespaces: tuple[str, ...]
    addresses: tuple[str, ...]
    table_removed: bool


class _PinnedThread:
    """One thread that lives in a given network namespace and owns an `Rtnl` there, and an
    `RtnlSocket` for the hot path of an attach.

    pyroute2 keeps per-thread sockets and a socket stays in the namespace it was opened in,
    so every netlink call of the library happens on a thread like this one.
    """

    def __init__(self, name: str, netns_fd: int, timeout_s: float) -> None:
        self._netns_fd = netns_fd
        self._timeout_s = timeout_s
        self._ident: int | None = None
        self._rtnl: Rtnl | None = None
        self._raw: RtnlSocket | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=name,
                                            initializer=self._start)
        self.call("start", lambda: None)  # surfaces a failed setns/socket here, not later

    def _start(self) -> None:
        setns(self._netns_fd)
        self._ident = threading.get_ident()
        self._rtnl = Rtnl()
        self._raw = RtnlSocket.open()

    @property
    def rtnl(self) -> Rtnl:
        if self._rtnl is None or threading.get_ident() != self._ident:
            raise RuntimeError("netlink used outside its pinned thread")
        return self._rtnl

    @property
    def raw(self) -> RtnlSocket:
        if self._raw is None or threading.get_ident() != self._ident:
            raise RuntimeError("netlink used outside its pinned thread")
        return self._raw

    def submit(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        return self._executor.submit(fn, *args, **kwargs)

    def call(self, operation: str, fn: Callable[[], T]) -> T:
        if threading.get_ident() == self._ident:
            return fn()
        try:
            return self._executor.submit(fn).result(self._timeout_s)
        except concurrent.futures.TimeoutError as exc:
            raise NetnsError(f"no answer within {self._timeout_s}s", operation=operation,
                             errno=errno.ETIMEDOUT) from exc
        except concurrent.futures.BrokenExecutor as exc:
            raise NetnsError("network thread failed to start", operation=operation) from exc

    def close(self) -> None:
        def stop() -> None:
            if self._raw is not None:
                self._raw.close()
                self._raw = None
            if self._rtnl is not None:
                self._rtnl.close()
                self._rtnl = None
        with contextlib.suppress(concurrent.futures.BrokenExecutor):
            self._executor.submit(stop).result(self._timeout_s)
        self._executor.shutdown(wait=True)


class HostNetwork:
    """Space networks on one host (or test host). Thread-safe: every method may be called
    from any thread (from asyncio through `asyncio.to_thread`); the work itself runs on a
    thread pinned to the host namespace, so callers' threads never change namespace.

    Slow teardown (the kernel unregisters a veth in tens of milliseconds) has its own
    pinned thread: `destroy_later` returns a future at once.
    """

    def __init__(self, config: HostNetworkConfig) -> None:
        check_prefix(config.link_prefix)
        self.config = config
        self._namespaces = NamespaceDir(config.netns_dir, shared=config.shared_netns_dir)
        self._markers = config.state_dir / _MARKERS
        self._marker_anchor = config.state_dir / _MARKER_ANCHOR
        self._markers.mkdir(parents=True, exist_ok=True)
        self._ipv6 = host_has_ipv6()
        self._book = AddressBook(config.state_dir, config.pool, durable=config.durable_state)
        self._nft = Nft()
        self._spaces: dict[str, tuple[Space, int]] = {}
        self._peers: dict[str, _Peers] = {}
        self._forwarding_done = False
        self._main: _PinnedThread | None = None
        self._reaper: _PinnedThread | None = None
        try:
            self._host_fd = (os.open(config.host_netns, os.O_RDONLY | os.O_CLOEXEC)
                             if config.host_netns is not None else open_current())
        except OSError as exc:
            self._book.close()
            raise NamespaceNotFoundError("cannot open host namespace", operation="open-host",
                                         path=config.host_netns, errno=exc.errno) from exc
        try:
            self._main = _PinnedThread("netns", self._host_fd, config.call_timeout_s)
            self._reaper = _PinnedThread("netns-reaper", self._host_fd, config.call_timeout_s)
            if self._book.spaces():
                # After a restart the table may be stale or gone; make it match the records.
                self._main.call("firewall", self._apply_firewall)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop the threads (waiting for queued teardowns) and release the state lock.
        Kernel objects stay: a restarted agent adopts them."""
        for thread in (self._reaper, self._main):
            if thread is not None:
                thread.close()
        self._reaper = self._main = None
        if self._host_fd >= 0:
            os.close(self._host_fd)
            self._host_fd = -1
        self._book.close()

    def __enter__(self) -> HostNetwork:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _pinned(self) -> _PinnedThread:
        if self._main is None:
            raise NetnsError("host network is closed", operation="call")
        return self._main

    def _run(self, operation: str, fn: Callable[[], T]) -> T:
        return self._pinned().call(operation, fn)

    # --- namespaces -----------------------------------------------------------------------

    def namespace_path(self, name: str) -> Path:
        return self._namespaces.path(name)

    def create_namespace(self, name: str, *, exist_ok: bool = False) -> Path:
        """Create and mount the namespace `name` (recorded so that a sweep can remove it)."""
        return self._run("create-namespace", lambda: self._create_namespace(name, exist_ok))

    def delete_namespace(self, name: str) -> None:
        """Unmount the namespace now (the kernel frees it once nothing holds it)."""
        self._run("delete-namespace", lambda: self._delete_namespace(name))

    def namespaces(self) -> list[str]:
        """Namespaces this host network created that are still mounted."""
        return [n for n in self._marker_names() if self._namespaces.exists(n)]

    def _create_namespace(self, name: str, exist_ok: bool) -> Path:
        marker = self._markers / check_id("namespace name", name)
        # Before the mount, so that a crash in between leaves it sweepable.
        entries.add(self._marker_anchor, marker, exclusive=False)
        try:
            return self._namespaces.create(name)
        except NamespaceExistsError:
            if exist_ok:
                return self._namespaces.path(name)
            raise
        except BaseException:
            marker.unlink(missing_ok=True)
            raise

    def _delete_namespace(self, name: str) -> None:
        self._namespaces.delete(name)
        (self._markers / check_id("namespace name", name)).unlink(missing_ok=True)

    def _marker_names(self) -> list[str]:
        return sorted(os.listdir(self._markers))

    # --- spaces ---------------------------------------------------------------------------

    def ensure_space(self, space_id: str) -> Space:
        """The space's bridge with its gateway address, created on first use."""
        return self._run("ensure-space", lambda: self._ensure_space(space_id)[0])

    def known_space(self, space_id: str) -> Space | None:
        """The space as `ensure_space` last made or found it, without the trip to the network
        thread (one dict read, safe from any thread); None when it is not known (never
        ensured, or dropped since): ask `ensure_space` then."""
        cached = self._spaces.get(space_id)
        return None if cached is None else cached[0]

    def spaces(self) -> list[Space]:
        """Every space that holds a subnet (whether or not its bridge exists right now)."""
        result = []
        for lease in self._book.spaces():
            cached = self._spaces.get(lease.space_id)
            result.append(cached[0] if cached is not None else self._space_of(lease))
        return result

    def remove_space(self, space_id: str) -> None:
        """Delete the bridge and VXLAN device, forget the subnet, its overlay and every
        address in it, update the firewall."""
        self._run("remove-space", lambda: self._remove_space(space_id))

    def configure_space(self, space_id: str, *, subnet: IPv4Network, slice: IPv4Network,
                        vni: int, underlay: IPv4Address, port: int = 4789,
                        mtu: int | None = None) -> Space:
        """Make the space one part of a network spread over hosts: gateway = first host
        address of this host's `slice` with `subnet`'s prefix length, namespaces get the
        slice's other addresses, and a VXLAN device (`vni`, from `underlay` to UDP `port`,
        no learning, ARP answered from pushed entries) joins the bridge. `mtu` (default:
        the underlay link's MTU minus 50) goes on the VXLAN device, the bridge and both
        ends of every veth of the space.

        Persisted and idempotent. Raises `AddressError` when `subnet` overlaps the host's
        own networks (`host_networks`) or another space of this host, or when the subnet
        or slice changes while namespaces hold addresses in the space (without any, the
        space is re-made with the new addressing)."""
        subnet, slice_ = IPv4Network(subnet), IPv4Network(slice)
        underlay = IPv4Address(underlay)
        if not 0 < vni <= _VNI_MAX:
            raise AddressError(f"space {space_id}: VNI {vni} outside 1..{_VNI_MAX}",
                               operation="configure-space")
        if not 0 < port < 65536:
            raise AddressError(f"space {space_id}: bad port {port}",
                               operation="configure-space")
        if mtu is not None and not 68 <= mtu <= 65535:
            raise AddressError(f"space {space_id}: bad MTU {mtu}", operation="configure-space")
        overlay = Overlay(vni, underlay, port, mtu)
        return self._run("configure-space",
                         lambda: self._configure_space(space_id, subnet, slice_, overlay))

    def unconfigure_space(self, space_id: str) -> None:
        """Take the space off the overlay: its VXLAN device and peers go. A space without
        members is removed altogether (as `remove_space`); one with members keeps its
        addressing (gateway and addresses stay valid) as a space local to this host until
        `remove_space`, `sweep` or a new `configure_space`."""
        self._run("unconfigure-space", lambda: self._unconfigure_space(space_id))

    def set_space_peers(self, space_id: str,
                        peers: Mapping[IPv4Address, IPv4Address]) -> None:
        """Make the space's VXLAN forwarding exactly `peers` (remote namespace address ->
        underlay address of its host): per peer an FDB entry `overlay_mac(space, ip) dst
        UNDERLAY` (self, permanent) and a permanent neighbour entry `ip lladdr MAC`, which
        the device uses to answer ARP (proxy). Missing entries are added, changed ones
        replaced, stale ones deleted; only the difference reaches the kernel. Peers on this
        host (the space's own underlay, or an address of a local member) are skipped."""
        wanted = {IPv4Address(ip): IPv4Address(host) for ip, host in peers.items()}
        self._run("set-space-peers", lambda: self._set_space_peers(space_id, wanted))

    def _space_of(self, lease: SpaceLease, mtu: int | None = None) -> Space:
        prefix = self.config.link_prefix
        overlay = lease.overlay
        if overlay is None:
            return Space(lease.space_id, bridge_name(prefix, lease.space_id), lease.subnet,
                         lease.gateway, lease.slice)
        return Space(lease.space_id, bridge_name(prefix, lease.space_id), lease.subnet,
                     lease.gateway, lease.slice, vxlan_name(prefix, lease.space_id),
                     overlay.vni, mtu if mtu is not None else overlay.mtu)

    def _ensure_space(self, space_id: str) -> tuple[Space, int]:
        cached = self._spaces.get(space_id)
        if cached is not None:
            return cached
        rtnl = self._pinned().rtnl
        lease = self._book.space(space_id)
        new_lease = lease is None
        if lease is None:
            # Skip /24s the host already uses, so that its own hosts stay reachable.
            avoid = [network for network, _ in self._host_networks(rtnl)]
            lease = self._book.lease_space(space_id, avoid=avoid)
        mtu = None
        if lease.overlay is not None:
            mtu = lease.overlay.mtu or self._underlay_mtu(rtnl, lease.overlay.underlay) \
                - VXLAN_OVERHEAD
        space = self._space_of(lease, mtu)
        created = False
        try:
            link = rtnl.link(space.bridge)
            if link is None:
                index = rtnl.add_bridge(space.bridge,
                                        address=bridge_mac(self.config.link_prefix, space_id))
                created = True
                link = rtnl.link(space.bridge)
            elif link.kind != "bridge" or parse_alias(link.alias) not in (
                    None, LinkOwner("bridge", space_id)):
                raise LinkError("name taken by a link of someone else", operation="add-bridge",
                                interface=space.bridge, errno=errno.EEXIST)
            else:
                index = link.index
            rtnl.set_alias(space.bridge, bridge_alias(space_id))
            if space.gateway not in rtnl.addresses(index, space.bridge):
                rtnl.add_address(index, space.bridge, space.gateway)
            if mtu is not None and link is not None and link.mtu != mtu:
                # Set explicitly, the bridge keeps it whatever its ports' MTUs.
                rtnl.set_mtu(index, space.bridge, mtu)
                self._set_members_mtu(rtnl, space_id, mtu)
            if lease.overlay is not None and mtu is not None:
                self._ensure_vxlan(rtnl, space_id, lease.overlay, index, mtu)
            rtnl.set_up(index, space.bridge)
            self._enable_forwarding()
            self._apply_firewall()
        except BaseException:
            if created:
                rtnl.delete_link(space.bridge)
                if lease.overlay is not None:
                    rtnl.delete_link(vxlan_name(self.config.link_prefix, space_id))
            if new_lease:
                self._book.release_space(space_id)
            raise
        log.info("space ready", extra={"SPACE": space_id, "BRIDGE": space.bridge,
                                       "SUBNET": str(space.subnet), "VXLAN": space.vxlan})
        self._spaces[space_id] = (space, index)
        return space, index

    def _ensure_vxlan(self, rtnl: Rtnl, space_id: str, overlay: Overlay, bridge_index: int,
                      mtu: int) -> None:
        name = vxlan_name(self.config.link_prefix, space_id)
        link = rtnl.link(name)
        if link is not None:
            if link.kind != "vxlan" or parse_alias(link.alias) not in (
                    None, LinkOwner("vxlan", space_id)):
                raise LinkError("name taken by a link of someone else", operation="add-vxlan",
                                interface=name, errno=errno.EEXIST)
            # VNI, local address and port cannot change on a live device: re-make it.
            if rtnl.vxlan(name) != Vxlan(overlay.vni, overlay.underlay, overlay.port,
                                         learning=False, proxy=True):
                rtnl.delete_link(name)
                link = None
        if link is None:
            self._peers.pop(space_id, None)  # a new device holds no entries
            index = rtnl.add_vxlan(name, vni=overlay.vni, local=overlay.underlay,
                                   port=overlay.port, master=bridge_index, mtu=mtu)
        else:
            index = link.index
            if link.master != bridge_index:
                rtnl.set_master(index, name, bridge_index)
            if link.mtu != mtu:
                rtnl.set_mtu(index, name, mtu)
        rtnl.set_alias(name, vxlan_alias(space_id))
        rtnl.set_up(index, name)

    def _set_members_mtu(self, rtnl: Rtnl, space_id: str, mtu: int) -> None:
        for namespace in self._book.members(space_id):
            host_if = veth_name(self.config.link_prefix, namespace)
            link = rtnl.link(host_if)
            if link is not None and link.mtu != mtu:
                rtnl.set_mtu(link.index, host_if, mtu)
            if not self._namespaces.exists(namespace):
                continue
            path = self._namespaces.path(namespace)
            with Rtnl(netlink_socket_in(path), share_loop_with=rtnl) as inner:
                inner_link = inner.link(INNER_IFNAME)
                if inner_link is not None and inner_link.mtu != mtu:
                    inner.set_mtu(inner_link.index, INNER_IFNAME, mtu)

    def _configure_space(self, space_id: str, subnet: IPv4Network, slice_: IPv4Network,
                         overlay: Overlay) -> Space:
        rtnl = self._pinned().rtnl
        for network, ifname in self._host_networks(rtnl):
            if network.overlaps(subnet):
                raise AddressError(f"space {space_id}: subnet {subnet} overlaps the host's "
                                   f"network {network} ({ifname})", operation="configure-space")
        if overlay.mtu is None:
            self._underlay_mtu(rtnl, overlay.underlay)  # refuse an underlay the host lacks
        previous = self._book.space(space_id)
        lease, readdressed = self._book.configure_space(space_id, subnet, slice_, overlay)
        if readdressed and previous is not None:
            # Nobody holds an address (the book refused otherwise): re-make from scratch.
            self._spaces.pop(space_id, None)
            self._peers.pop(space_id, None)
            rtnl.delete_link(vxlan_name(self.config.link_prefix, space_id))
            rtnl.delete_link(bridge_name(self.config.link_prefix, space_id))
        elif previous != lease:
            self._spaces.pop(space_id, None)  # look at the kernel objects again
        try:
            return self._ensure_space(space_id)[0]
        except BaseException:
            self._spaces.pop(space_id, None)
            raise

    def _unconfigure_space(self, space_id: str) -> None:
        if self._book.space(space_id) is None:
            return
        if not self._book.members(space_id):
            self._remove_space(space_id)
            return
        self._spaces.pop(space_id, None)
        self._peers.pop(space_id, None)
        self._pinned().rtnl.delete_link(vxlan_name(self.config.link_prefix, space_id))
        self._book.clear_overlay(space_id)

    def _set_space_peers(self, space_id: str, peers: dict[IPv4Address, IPv4Address]) -> None:
        lease = self._book.space(space_id)
        if lease is None or lease.overlay is None:
            raise AddressError(f"space {space_id} has no overlay (configure_space first)",
                               operation="set-space-peers")
        for address in peers:
            if address not in lease.subnet:
                raise AddressError(f"space {space_id}: peer {address} is outside subnet "
                                   f"{lease.subnet}", operation="set-space-peers")
        self._ensure_space(space_id)
        rtnl = self._pinned().rtnl
        name = vxlan_name(self.config.link_prefix, space_id)
        link = rtnl.link(name)
        if link is None:  # removed behind our back: make it again
            self._spaces.pop(space_id, None)
            self._ensure_space(space_id)
            link = _link_or_raise(rtnl, name, "VXLAN device missing", "set-space-peers")
        index = link.index
        local = {a.ip for a in self._book.members(space_id).values()}
        fdb: dict[str, IPv4Address] = {}
        neighbours: dict[IPv4Address, str] = {}
        for address, host in peers.items():
            if host == lease.overlay.underlay or address in local:
                continue
            mac = overlay_mac(space_id, address)
            fdb[mac], neighbours[address] = host, mac
        have = self._peers.get(space_id)
        if have is None:
            have = _Peers(rtnl.vxlan_fdb(index, name), rtnl.neighbours(index, name))
            self._peers[space_id] = have
        try:
            # `have` follows every change as it is made, so a failure half-way leaves it
            # true to the kernel and the next call finishes the job.
            for mac, dst in list(have.fdb.items()):
                if mac not in fdb:
                    rtnl.delete_vxlan_fdb(index, name, mac, dst)
                    del have.fdb[mac]
            for address in list(have.neighbours):
                if address not in neighbours:
                    rtnl.delete_neighbour(index, name, address)
                    del have.neighbours[address]
            for mac, dst in fdb.items():
                if have.fdb.get(mac) != dst:
                    rtnl.set_vxlan_fdb(index, name, mac, dst)
                    have.fdb[mac] = dst
            for address, mac in neighbours.items():
                if have.neighbours.get(address) != mac:
                    rtnl.set_neighbour(index, name, address, mac)
                    have.neighbours[address] = mac
        except BaseException:
            self._peers.pop(space_id, None)  # re-read from the kernel next time
            raise
        log.debug("space peers set", extra={"SPACE": space_id, "PEERS": len(fdb)})

    def _remove_space(self, space_id: str) -> None:
        rtnl = self._pinned().rtnl
        self._spaces.pop(space_id, None)
        self._peers.pop(space_id, None)
        rtnl.delete_link(vxlan_name(self.config.link_prefix, space_id))
        rtnl.delete_link(bridge_name(self.config.link_prefix, space_id))
        self._book.release_space(space_id)
        self._sync_firewall()

    # --- the host's own networks and the fleet --------------------------------------------

    def host_networks(self) -> list[IPv4Network]:
        """The host's own IPv4 networks: those of its addresses and of its main table's
        routes (default routes aside) on links this library did not make, loopback aside."""
        return sorted({network for network, _ in self.host_network_links()})

    def host_network_links(self) -> list[tuple[IPv4Network, str]]:
        """`host_networks` with the interface each one was found on (first seen)."""
        return self._run("host-networks", lambda: self._host_networks(self._pinned().rtnl))

    def underlay_mtu(self, address: IPv4Address) -> int:
        """The MTU of the host link that holds `address`; AddressError if none does."""
        return self._run("underlay-mtu", lambda: self._underlay_mtu(
            self._pinned().rtnl, IPv4Address(address)))

    def set_fleet(self, pools: Iterable[IPv4Network], hosts: Iterable[IPv4Address],
                  port: int | None) -> None:
        """The firewall's view of the fleet (persisted, so a restarted agent applies the
        same table before the coordinator speaks): dynos reach nothing in `pools` outside
        their own space and no address of `hosts`; UDP `port` (the overlay's) is accepted
        only from `hosts`."""
        if port is not None and not 0 < port < 65536:
            raise ValueError(f"bad port {port}")
        fleet = Fleet(tuple(sorted({IPv4Network(p) for p in pools})),
                      tuple(sorted({IPv4Address(h) for h in hosts})), port)
        self._run("set-fleet", lambda: self._set_fleet(fleet))

    def _set_fleet(self, fleet: Fleet) -> None:
        if self._book.set_fleet(fleet):
            self._sync_firewall()

    def _host_networks(self, rtnl: Rtnl) -> list[tuple[IPv4Network, str]]:
        # Links looked up one by one: the few that carry addresses or routes, not every
        # veth of a busy host.
        names: dict[int, str | None] = {}

        def foreign(index: int) -> str | None:
            if index not in names:
                link = None if index == _LO_IFINDEX else rtnl.link_by_index(index)
                ours = link is None or parse_alias(link.alias) is not None
                names[index] = None if ours or link is None else link.name
            return names[index]

        found: dict[IPv4Network, str] = {}
        for address, index in rtnl.all_addresses():
            name = foreign(index)
            if name is not None and not address.network.is_loopback:
                found.setdefault(address.network, name)
        for route in rtnl.routes():
            name = foreign(route.index)
            if name is not None and route.network.prefixlen > 0:
                found.setdefault(route.network, name)
        return sorted(found.items())

    @staticmethod
    def _underlay_mtu(rtnl: Rtnl, address: IPv4Address) -> int:
        for iface, index in rtnl.all_addresses():
            if iface.ip == address:
                link = rtnl.link_by_index(index)
                if link is not None:
                    return link.mtu
        raise AddressError(f"no link of the host holds {address}", operation="underlay-mtu")

    def _enable_forwarding(self) -> None:
        # Written from the pinned thread: /proc/sys/net resolves to the writer's namespace.
        if not self.config.enable_forwarding or self._forwarding_done:
            return
        try:
            fd = os.open(_IP_FORWARD, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, b"1")
            finally:
                os.close(fd)
        except OSError as exc:
            raise NetnsError("cannot enable forwarding", operation="ip-forward",
                             path=Path(_IP_FORWARD), errno=exc.errno) from exc
        self._forwarding_done = True

    def _firewall_spec(self) -> FirewallSpec:
        fleet = self._book.fleet()
        return FirewallSpec(
            table=self.config.table,
            spaces=tuple(SpaceRules(s.bridge, s.subnet, s.gateway.ip) for s in self.spaces()),
            outbound=self.config.outbound,
            allowed_tcp_ports=self.config.allowed_tcp_ports,
            allowed_udp_ports=self.config.allowed_udp_ports,
            private_pools=fleet.pools,
            fleet_hosts=fleet.hosts,
            overlay_port=fleet.port,
        )

    def _apply_firewall(self) -> None:
        self._nft.apply(self._firewall_spec())

    def _sync_firewall(self) -> bool:
        """Apply the table, or delete it when no space is left; True if it was deleted."""
        if self._book.spaces():
            self._apply_firewall()
            return False
        return self._nft.delete_table(self.config.table)

    # --- attachments ----------------------------------------------------------------------

    def attach(self, space_id: str, namespace: str) -> Attachment:
        """Wire an existing namespace into the space. Idempotent: attaching again returns
        the same address; a half-made attachment is rebuilt."""
        return self._run("attach", lambda: self._attach(space_id, namespace))

    def create_attached(self, space_id: str, namespace: str) -> Attachment:
        """`create_namespace` + `attach` in one trip to the network thread (the fast path
        of a dyno start); the namespace is removed again if attaching fails."""
        def both() -> Attachment:
            self._create_namespace(namespace, exist_ok=False)
            try:
                return self._attach(space_id, namespace)
            except BaseException:
                self._delete_namespace(namespace)
                raise
        return self._run("create-attached", both)

    def detach(self, space_id: str, namespace: str) -> None:
        """Remove the namespace's veth pair and release its address."""
        self._run("detach", lambda: self._detach(self._pinned().rtnl, space_id, namespace))

    def destroy(self, space_id: str, namespace: str) -> None:
        """Detach and delete the namespace, waiting for it."""
        self._run("destroy", lambda: self._destroy(self._pinned().rtnl, space_id, namespace))

    def destroy_later(self, space_id: str, namespace: str) -> Future[None]:
        """Detach and delete the namespace on the teardown thread; returns at once.
        The address is released only after the veth is gone."""
        reaper = self._reaper
        if reaper is None:
            raise NetnsError("host network is closed", operation="destroy-later")
        return reaper.submit(lambda: self._destroy(reaper.rtnl, space_id, namespace))

    def _attach(self, space_id: str, namespace: str) -> Attachment:
        space, bridge_index = self._ensure_space(space_id)
        pinned = self._pinned()
        rtnl, raw = pinned.rtnl, pinned.raw
        path = self._namespaces.path(namespace)
        if not self._namespaces.exists(namespace):
            raise NamespaceNotFoundError("no such namespace", operation="attach", path=path,
                                         errno=errno.ENOENT)
        had_address = self._book.address_of(space_id, namespace) is not None
        address = self._book.assign(space_id, namespace)
        host_if = veth_name(self.config.link_prefix, namespace)
        alias = veth_alias(space_id, namespace)
        attachment = Attachment(space_id, namespace, path, address, space.gateway.ip, host_if)
        mac = overlay_mac(space_id, address.ip)
        # Raw rtnetlink (netns.rtnlbatch), not Rtnl: pyroute2 costs about 0.5 ms a request
        # and 0.9 ms to open a client in the namespace, several times the kernel's work.
        with RtnlSocket(netlink_socket_in(path)) as inner:
            # Optimistic: on a fresh namespace the veth cannot exist yet, so try to create
            # it and look at what is there only when the kernel says EEXIST.
            try:
                self._wire(raw, inner, path, host_if, alias, bridge_index, address,
                           space.gateway.ip, mac, space.mtu, self._ipv6)
                self._forget_neighbour(raw, space.bridge, bridge_index, address.ip)
                return attachment
            except BaseException as exc:
                exists = (isinstance(exc, LinkError) and exc.errno == errno.EEXIST
                          and exc.operation == "add-veth")
                if not exists:
                    self._undo_attach(rtnl, space_id, namespace, host_if, had_address)
                    raise
            existing = rtnl.link(host_if)
            if (existing is not None and existing.alias == alias
                    and existing.master == bridge_index
                    and self._inner_ready(rtnl, path, address)):
                return attachment
            rtnl.delete_link(host_if)  # half-made or moved: rebuild from scratch
            try:
                self._wire(raw, inner, path, host_if, alias, bridge_index, address,
                           space.gateway.ip, mac, space.mtu, self._ipv6)
                self._forget_neighbour(raw, space.bridge, bridge_index, address.ip)
            except BaseException:
                self._undo_attach(rtnl, space_id, namespace, host_if, had_address)
                raise
        return attachment

    def _undo_attach(self, rtnl: Rtnl, space_id: str, namespace: str, host_if: str,
                     had_address: bool) -> None:
        rtnl.delete_link(host_if)
        if not had_address:
            self._book.release(space_id, namespace)

    @staticmethod
    def _inner_ready(rtnl: Rtnl, path: Path, address: IPv4Interface) -> bool:
        with Rtnl(netlink_socket_in(path), share_loop_with=rtnl) as inner:
            link = inner.link(INNER_IFNAME)
            return (link is not None and link.up
                    and address in inner.addresses(link.index, INNER_IFNAME))

    @staticmethod
    def _wire(host: RtnlSocket, inner: RtnlSocket, path: Path, host_if: str, alias: str,
              bridge_index: int, address: IPv4Interface, gateway: IPv4Address,
              mac: str, mtu: int | None, ipv6: bool) -> None:
        # Each batch goes out only once the one before was acknowledged: the kernel runs a
        # batch to its end whatever fails in it, and everything after the veth is undone
        # with it (`_undo_attach`), but nothing may follow a failed veth (EEXIST: someone
        # else's link, or one `_attach` still has to look at).
        write_sysctls_in(path, _ARP_NOTIFY_NO_IPV6 if ipv6 else _ARP_NOTIFY)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise NamespaceError("cannot open namespace", operation="attach", path=path,
                                 errno=exc.errno) from exc
        try:
            host.run([rtnlbatch.add_veth(host_if, master=bridge_index, peer_name=INNER_IFNAME,
                                         peer_netns_fd=fd, mtu=mtu)])
        finally:
            os.close(fd)
        # The host end is a bridge port and needs no IPv6 address either; set before the
        # inner end is up, that is before the pair has a carrier and would make one.
        host.run([rtnlbatch.set_alias(host_if, alias),
                  *([rtnlbatch.set_no_ipv6_address(host_if)] if ipv6 else [])])
        # veth honours a requested peer ifindex only when the host end's index is given
        # too, so the inside index has to be asked for.
        # Up first (by name, in the same trip): the bridge enables the new port only once
        # the kernel's link watcher has seen its carrier (asynchronously), and drops what
        # arrives before. An announcement sent at link-up (as arp_notify does) was lost
        # about 1 time in 20 (kernel 6.18).
        try:
            found, _ = inner.run([rtnlbatch.get_link(INNER_IFNAME),
                                  rtnlbatch.set_up(INNER_IFNAME)])
        except LinkError as exc:
            if exc.operation == "get-link" and exc.errno == errno.ENODEV:
                raise LinkError("peer missing after creation", operation="add-veth",
                                interface=INNER_IFNAME, errno=errno.ENODEV) from exc
            raise
        inner_index = rtnlbatch.link_index(found.messages[0])
        inner.run([
            rtnlbatch.set_up("lo", _LO_IFINDEX),
            rtnlbatch.add_address(inner_index, INNER_IFNAME, address),
            rtnlbatch.add_default_route(gateway, INNER_IFNAME),
            # Last, so that the port is most likely forwarding by now: with arp_notify a
            # MAC change announces the address (0 lost in 300, under load too, against 8
            # in 150 at link-up). Still one unacknowledged frame: the host's own entry is
            # removed instead (`_forget_neighbour`).
            rtnlbatch.set_mac(inner_index, INNER_IFNAME, mac),
        ])

    @staticmethod
    def _forget_neighbour(raw: RtnlSocket, bridge: str, bridge_index: int,
                          address: IPv4Address) -> None:
        # Addresses are reused (lowest free first). While another port keeps the bridge up,
        # the host's ARP entry for a reused address keeps the previous namespace's MAC
        # (REACHABLE, then STALE and unicast probes to that MAC) for up to ~45 s, and the
        # host cannot reach the new holder; without an entry it asks by broadcast.
        (reply,) = raw.run([rtnlbatch.delete_neighbour(bridge_index, bridge, address)])
        if reply.errno == 0:
            log.debug("stale neighbour removed", extra={"BRIDGE": bridge,
                                                        "ADDRESS": str(address)})

    def _forget_neighbour_in(self, rtnl: Rtnl, space_id: str, address: IPv4Address) -> None:
        # As `_forget_neighbour`, off the hot path (pyroute2, on whichever pinned thread).
        bridge = bridge_name(self.config.link_prefix, space_id)
        link = rtnl.link(bridge)
        # With the bridge gone, its neighbours went too.
        if link is not None and rtnl.delete_neighbour(link.index, bridge, address):
            log.debug("stale neighbour removed", extra={"BRIDGE": bridge,
                                                        "ADDRESS": str(address)})

    def _detach(self, rtnl: Rtnl, space_id: str, namespace: str) -> None:
        address = self._book.address_of(space_id, namespace)
        # Deleting the host end takes the peer inside with it (a veth pair dies whole).
        rtnl.delete_link(veth_name(self.config.link_prefix, namespace))
        try:
            if address is not None:
                self._forget_neighbour_in(rtnl, space_id, address.ip)
        finally:
            self._book.release(space_id, namespace)

    def _destroy(self, rtnl: Rtnl, space_id: str, namespace: str) -> None:
        self._detach(rtnl, space_id, namespace)
        self._delete_namespace(namespace)

    # --- sweep ----------------------------------------------------------------------------

    def sweep(self, live_spaces: Iterable[str], live_namespaces: Iterable[str]) -> SweepReport:
        """Remove every link, namespace, address record and (if no space is left) the table
        of this host network that the live ids do not name."""
        spaces, names = set(live_spaces), set(live_namespaces)
        return self._run("sweep", lambda: self._sweep(spaces, names))

    def _sweep(self, spaces: set[str], names: set[str]) -> SweepReport:
        rtnl = self._pinned().rtnl
        prefix = self.config.link_prefix
        links: list[str] = []
        # Veths first: a bridge deleted before its ports would leave them dangling.
        for link in sorted(rtnl.links(), key=lambda item: item.kind == "bridge"):
            owner = parse_alias(link.alias)
            if owner is None:
                continue
            if owner.role == "veth" and owner.namespace is not None:
                ours = link.name == veth_name(prefix, owner.namespace)
                dead = owner.namespace not in names or owner.space_id not in spaces
            elif owner.role == "vxlan":
                ours = link.name == vxlan_name(prefix, owner.space_id)
                dead = owner.space_id not in spaces
            else:
                ours = link.name == bridge_name(prefix, owner.space_id)
                dead = owner.space_id not in spaces
            if ours and dead and rtnl.delete_link(link.name):
                links.append(link.name)
        removed_ns: list[str] = []
        for name in self._marker_names():
            if name not in names:
                self._delete_namespace(name)
                removed_ns.append(name)
        for space_id in [s for s in self._spaces if s not in spaces]:
            del self._spaces[space_id]
        for space_id in [s for s in self._peers if s not in spaces]:
            del self._peers[space_id]
        for lease in self._book.spaces():
            if lease.space_id in spaces:
                for member, address in self._book.members(lease.space_id).items():
                    if member not in names:
                        self._forget_neighbour_in(rtnl, lease.space_id, address.ip)
        addresses = self._book.retain(spaces, names)
        table_removed = self._sync_firewall()
        report = SweepReport(tuple(links), tuple(removed_ns), tuple(addresses), table_removed)
        log.info("sweep done", extra={"LINKS": len(links), "NAMESPACES": len(removed_ns),
                                      "ADDRESSES": len(addresses)})
        return report


def _link_or_raise(rtnl: Rtnl, name: str, message: str, operation: str) -> Link:
    """The link called `name`; LinkError (ENODEV) with `message` if there is none."""
    link = rtnl.link(name)
    if link is None:
        raise LinkError(message, operation=operation, interface=name, errno=errno.ENODEV)
    return link
