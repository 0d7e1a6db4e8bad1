"""Private spaces seen from the coordinator: how the fleet's space pool is cut (a subnet and a
VNI per space, a slice of the subnet per host running the space) and what `spaces.sync` tells
each host. Pure functions; the leader (dynocoord/server.py) stores their output in etcd.

A space is an app for now: its name is the app's, it is allocated when the app is created (or
first placed, for apps older than spaces) and released when the app is deleted. A host keeps
its slice while the space exists, even with no dyno of the space left on it: addresses then
never move under a host that comes back, and a /18 holds 64 hosts' /24 slices.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Network
from typing import Any

from dynocoord import model

DEFAULT_POOL = "10.64.0.0/10"
_POOL = IPv4Network(DEFAULT_POOL)
DEFAULT_SPACE_PREFIX = 20
DEFAULT_SLICE_PREFIX = 27
DEFAULT_OVERLAY_PORT = 4789  # IANA's VXLAN port (RFC 7348)
# A slice holds its gateway, at least one dyno, and its network and broadcast addresses.
SLICE_PREFIX_MAX = 29
DEFAULT_UNDERLAY_MTU = 1500
# VXLAN's cost per packet: the inner Ethernet header (14) + VXLAN (8) + UDP (8) + the outer
# IP header (20 for IPv4, 40 for IPv6).
VXLAN_OVERHEAD_IPV4 = 50
VXLAN_OVERHEAD_IPV6 = 70


@dataclass(frozen=True, slots=True)
class Addressing:
    """The fleet's space addressing (`dynocoord serve --space-pool …`), checked once."""

    pool: IPv4Network = _POOL
    space_prefix: int = DEFAULT_SPACE_PREFIX
    slice_prefix: int = DEFAULT_SLICE_PREFIX
    port: int = DEFAULT_OVERLAY_PORT

    def __post_init__(self) -> None:
        if not self.pool.prefixlen <= self.space_prefix < self.slice_prefix <= SLICE_PREFIX_MAX:
            raise ValueError(
                f"need pool prefix ({self.pool.prefixlen}) <= space prefix "
                f"({self.space_prefix}) < slice prefix ({self.slice_prefix}) <= "
                f"{SLICE_PREFIX_MAX}")
        if not 1 <= self.port <= 65_535:
            raise ValueError(f"the overlay port must be within 1…65535, got {self.port}")

    @classmethod
    def parse(cls, pool: str, space_prefix: int, slice_prefix: int, port: int) -> Addressing:
        try:
            network = ipaddress.ip_network(pool, strict=True)
        except ValueError as exc:
            raise ValueError(f"the space pool must be a network such as {DEFAULT_POOL}: "
                             f"{exc}") from None
        if not isinstance(network, IPv4Network):
            raise ValueError(f"the space pool must be an IPv4 network, got {pool}")
        return cls(network, space_prefix, slice_prefix, port)


DEFAULT_ADDRESSING = Addressing()


# ---------------------------------------------------------------- allocation

def _overlaps(candidate: IPv4Network, others: Iterable[model.IPNetwork]) -> model.IPNetwork | None:
    for other in others:
        # A default route (prefix 0) is no network of the host's own: every space would
        # overlap it.
        if isinstance(other, IPv4Network) and other.prefixlen and candidate.overlaps(other):
            return other
    return None


def _free(candidates: Iterable[IPv4Network], prefix: int, taken: Collection[IPv4Network],
          avoid: Collection[model.IPNetwork]) -> Iterator[IPv4Network]:
    # Taken networks of the candidates' own size are a set lookup: the pool is usually cut
    # one way only, and comparing every candidate with every taken one costs n² at 1,000s.
    same = {t for t in taken if t.prefixlen == prefix}
    other = [t for t in taken if t.prefixlen != prefix]
    for candidate in candidates:
        if candidate not in same and _overlaps(candidate, other) is None \
                and _overlaps(candidate, avoid) is None:
            yield candidate


@dataclass
class Allocation:
    """What `allocate` adds: new records to store, and the spaces it could not serve."""

    spaces: list[model.Space] = field(default_factory=list)
    slices: list[model.SpaceSlice] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)  # space -> why


def allocate(addressing: Addressing, spaces_wanted: Iterable[str],
             slices_wanted: Iterable[tuple[str, str]], spaces: Mapping[str, model.Space],
             slices: Mapping[str, Mapping[str, model.SpaceSlice]],
             host_networks: Iterable[model.IPNetwork]) -> Allocation:
    """The records that give every wanted space its subnet and VNI, and every wanted
    (space, host) its slice, beside the existing `spaces` and `slices` (space -> host ->
    slice). A new subnet overlaps no host network; a space without a subnet gets no slice.
    Each free subnet, slice and VNI is found once, however many are wanted at once."""
    out = Allocation()
    known = dict(spaces)
    hosts_of: dict[str, list[str]] = {}
    for name, host in sorted(set(slices_wanted)):
        hosts_of.setdefault(name, []).append(host)
    new = sorted({*spaces_wanted, *hosts_of} - set(known))
    if new:
        free_subnets = _free(addressing.pool.subnets(new_prefix=addressing.space_prefix),
                             addressing.space_prefix, [s.subnet for s in known.values()],
                             list(host_networks))
        taken_vnis = {s.vni for s in known.values()}
        free_vnis = (v for v in range(1, model.VNI_MAX + 1) if v not in taken_vnis)
        for index, name in enumerate(new):
            subnet, vni = next(free_subnets, None), next(free_vnis, None)
            if subnet is None or vni is None:
                error = (f"the space pool {addressing.pool} has no free "
                         f"/{addressing.space_prefix} left" if subnet is None
                         else "every VNI is taken")
                out.errors.update(dict.fromkeys(new[index:], error))
                break
            known[name] = model.Space(name, subnet, vni)
            out.spaces.append(known[name])
    for name, hosts in hosts_of.items():
        space = known.get(name)
        have = slices.get(name, {})
        need = [host for host in hosts if host not in have]
        if space is None or not need:
            continue
        free = _free(space.subnet.subnets(new_prefix=addressing.slice_prefix),
                     addressing.slice_prefix, [s.slice for s in have.values()], ())
        for host in need:
            cut = next(free, None)
            if cut is None:
                out.errors[name] = (f"the space subnet {space.subnet} has no free "
                                    f"/{addressing.slice_prefix} slice left for host {host}")
                break
            out.slices.append(model.SpaceSlice(name, host, cut))
    return out


# ---------------------------------------------------------------- what each host is told

Status = Mapping[str, Any]  # a dyno's status map (docs/protocol.md), as the leader keeps it


@dataclass(frozen=True, slots=True)
class FleetView:
    """Every host's `spaces.sync` view, made once from the whole fleet (`fleet_view`), read
    per host (`for_host`): the member lists are shared by every host of a space."""

    addressing: Addressing
    spaces: Mapping[str, model.Space]
    slices: Mapping[str, Mapping[str, model.SpaceSlice]]
    # space -> its members on hosts with an underlay, as sent (sorted); and space -> host id ->
    # its members on that host, which has no underlay (told to that host only).
    members: Mapping[str, list[dict[str, Any]]]
    local_members: Mapping[str, Mapping[str, list[dict[str, Any]]]]
    mtus: Mapping[str, int]  # space -> overlay MTU
    on_host: Mapping[str, frozenset[str]]  # host id -> spaces with a placement there
    underlays: Mapping[str, str | None]  # host id -> underlay address (non-lost hosts)
    hosts: list[str]  # every non-lost host's underlay address, sorted

    def for_host(self, host_id: str, keep: Collection[str] = ()) -> dict[str, Any]:
        """The `spaces.sync` params (without `generation`) for one host: each space with a
        placement on it, and those of `keep` it still has a slice of."""
        entries = []
        for name in sorted(self.on_host.get(host_id, frozenset()) | set(keep)):
            space = self.spaces.get(name)
            cut = self.slices.get(name, {}).get(host_id)
            if space is None or cut is None:
                continue  # not allocated (the pool is full): the host hears nothing of it
            members = self.members.get(name, [])
            local = self.local_members.get(name, {}).get(host_id)
            if local:
                members = sorted([*members, *local], key=_member_key)
            entries.append({"space": name, "subnet": str(space.subnet),
                            "slice": str(cut.slice), "vni": space.vni,
                            "mtu": self.mtus.get(name, DEFAULT_UNDERLAY_MTU -
                                                 VXLAN_OVERHEAD_IPV4),
                            "members": members})
        return {"port": self.addressing.port, "hosts": self.hosts,
                "pools": [str(self.addressing.pool)], "spaces": entries}


def _member_key(member: Mapping[str, Any]) -> tuple[str, str, int, str]:
    kind, _, number = str(member["name"]).partition(".")
    return member["app"], kind, int(number) if number.isdigit() else 0, str(member["host"])


def fleet_view(addressing: Addressing, hosts: Mapping[str, model.Host],
               placements: Iterable[model.Placement],
               statuses: Mapping[str, Mapping[str, Status]],
               spaces: Mapping[str, model.Space],
               slices: Mapping[str, Mapping[str, model.SpaceSlice]]) -> FleetView:
    """The view of every host from the fleet: `statuses` is host id -> dyno id -> status
    (the last each host reported). A member is a placement on a host that is not lost whose
    status has an ip; its `host` is its host's underlay address (None when that host reported
    none: such a member is only told to its own host). A space's MTU is the smallest underlay
    MTU over the non-lost hosts running it (1500 when none reported one), less VXLAN's
    overhead."""
    live = {h.id: h for h in hosts.values() if h.state is not model.HostState.LOST}
    underlays = {h.id: _underlay(h) for h in live.values()}
    members: dict[str, list[dict[str, Any]]] = {}
    local: dict[str, dict[str, list[dict[str, Any]]]] = {}
    on_host: dict[str, set[str]] = {}
    running: dict[str, set[str]] = {}
    for p in placements:
        on_host.setdefault(p.host, set()).add(p.app)
        if p.host not in live:
            continue
        running.setdefault(p.app, set()).add(p.host)
        status = statuses.get(p.host, {}).get(p.id)
        ip = None if status is None else status.get("ip")
        if status is None or not isinstance(ip, str):
            continue
        member = {"app": p.app, "name": p.name, "ip": ip, "host": underlays[p.host],
                  "state": status.get("state")}
        if member["host"] is None:
            local.setdefault(p.app, {}).setdefault(p.host, []).append(member)
        else:
            members.setdefault(p.app, []).append(member)
    for listed in members.values():
        listed.sort(key=_member_key)
    mtus = {name: _mtu(live[h] for h in hosts_of) for name, hosts_of in running.items()}
    return FleetView(addressing, spaces, slices, members, local, mtus,
                     {h: frozenset(s) for h, s in on_host.items()}, underlays,
                     sorted({u for u in underlays.values() if u is not None},
                            key=_address_key))


def _underlay(host: model.Host) -> str | None:
    network = host.network
    return None if network is None or network.underlay is None else str(network.underlay)


def _mtu(hosts: Iterator[model.Host]) -> int:
    smallest: int | None = None
    overhead = VXLAN_OVERHEAD_IPV4
    for host in hosts:
        network = host.network
        if network is None:
            continue
        if network.mtu is not None:
            smallest = network.mtu if smallest is None else min(smallest, network.mtu)
        if isinstance(network.underlay, ipaddress.IPv6Address):
            overhead = VXLAN_OVERHEAD_IPV6
    return (DEFAULT_UNDERLAY_MTU if smallest is None else smallest) - overhead


def _address_key(text: str) -> tuple[int, int]:
    address = ipaddress.ip_address(text)
    return address.version, int(address)
