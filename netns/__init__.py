"""Private networks per space: network namespaces, bridges, veth pairs, persisted
addresses, an nftables table of the agent's own, and a sweep. Knows nothing of dynos.

Main entry point: `HostNetwork(HostNetworkConfig(state_dir=...))`. Its methods are
synchronous and thread-safe; the work runs on a thread pinned to the host's network
namespace (`host_netns`, default: the constructing thread's), so asyncio callers use
`await asyncio.to_thread(net.create_attached, space, name)`.

- `create_namespace(name)` / `delete_namespace(name)` / `namespaces()`: namespaces mounted
  at `<netns_dir>/<name>` (default /run/netns, so `ip netns exec` works).
- `ensure_space(space_id) -> Space`: bridge `<prefix>b<hash>` with gateway `.1` of a /24
  leased from `pool` (default 172.20.0.0/14); the full id is in the bridge's ifalias.
- `attach(space_id, name) -> Attachment` (idempotent), `create_attached` (fast path):
  veth `<prefix>v<hash>` on the bridge, `eth0` inside with an address, default route, lo up.
  Addresses are reused, so attach and release remove the host's ARP entry for the address
  and `eth0` announces itself (arp_notify); bridges have a fixed MAC (`bridge_mac`).
- `configure_space(space_id, subnet=, slice=, vni=, underlay=, port=, mtu=) -> Space`: a
  space spread over hosts (persisted, idempotent): gateway = first address of this host's
  slice with the subnet's prefix, a VXLAN device `<prefix>x<hash>` on the bridge (no
  learning, proxy ARP), the MTU on VXLAN, bridge and veths; `set_space_peers(space_id,
  {ip: underlay})` makes its FDB and neighbour entries exactly that set;
  `unconfigure_space`; `host_networks()` (refused overlaps), `underlay_mtu(address)`;
  `set_fleet(pools, hosts, port)` (firewall, persisted). Every eth0 has the MAC
  `overlay_mac(space_id, ip)`.
- `detach`, `destroy`, `destroy_later(...) -> concurrent.futures.Future` (teardown off the
  critical path: a veth takes 20-45 ms to unregister; `await asyncio.wrap_future(f)`).
- `sweep(live_spaces, live_namespaces) -> SweepReport`.
- Firewall (table `inet <table>`): same space allowed, between spaces dropped, egress
  masqueraded, host services rejected except `allowed_*_ports`, 169.254.0.0/16 unreachable.

Lower layers, usable on their own: `NamespaceDir` and `entered()` (namespaces),
`AddressBook` (addresses), `render`/`Nft` (firewall), `Rtnl` (typed pyroute2), and
`netns.rtnlbatch` (raw rtnetlink requests in batches: the hot path of an attach).
Every error is a `NetnsError` carrying `operation`, `interface`, `path`, `errno`.
"""

from netns.errors import (
    AddressError,
    FirewallError,
    LinkError,
    NamespaceError,
    NamespaceExistsError,
    NamespaceNotFoundError,
    NetnsError,
    PoolExhaustedError,
    StateLockedError,
)
from netns.firewall import FirewallSpec, Nft, SpaceRules, render
from netns.host import Attachment, HostNetwork, HostNetworkConfig, Space, SweepReport
from netns.ipam import DEFAULT_POOL, AddressBook, Fleet, Overlay, SpaceLease
from netns.names import bridge_name, overlay_mac, parse_alias, veth_name, vxlan_name
from netns.namespace import NamespaceDir, entered, namespace_id
from netns.netlink import Link, Route, Rtnl, Vxlan

__all__ = [
    "DEFAULT_POOL",
    "AddressBook",
    "AddressError",
    "Attachment",
    "FirewallError",
    "FirewallSpec",
    "Fleet",
    "HostNetwork",
    "HostNetworkConfig",
    "Link",
    "LinkError",
    "NamespaceDir",
    "NamespaceError",
    "NamespaceExistsError",
    "NamespaceNotFoundError",
    "NetnsError",
    "Nft",
    "Overlay",
    "PoolExhaustedError",
    "Route",
    "Rtnl",
    "Space",
    "SpaceLease",
    "SpaceRules",
    "StateLockedError",
    "SweepReport",
    "Vxlan",
    "bridge_name",
    "entered",
    "namespace_id",
    "overlay_mac",
    "parse_alias",
    "render",
    "veth_name",
    "vxlan_name",
]
