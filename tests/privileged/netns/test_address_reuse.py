"""Reused addresses on the real kernel: a namespace that gets the address of one just
removed is reachable at once from the host and from its peers, and the bridge's MAC (the
namespaces' gateway) does not change as ports come and go."""

from __future__ import annotations

import json

from netns import Attachment, HostNetwork
from netns.names import bridge_mac
from tests.privileged.netns.helpers import ALLOWED_TCP_PORT, LINK_PREFIX, Server, ping, probe
from tests.support.names import unique
from tests.support.testhost import Netns, TestHost

SERVICE_PORT = 8080
# The agent's boot probe gives a new dyno a few seconds; a stale ARP entry costs ~45 s.
AT_ONCE_S = "1"


def _attach(net: HostNetwork) -> tuple[Attachment, Netns]:
    attachment = net.create_attached("alpha", unique("dt", 8))
    return attachment, Netns(attachment.namespace)


def _neighbour(host: TestHost, bridge: str, address: str) -> dict[str, object] | None:
    out = host.run("ip", "-j", "neigh", "show", "dev", bridge, "to", address).stdout
    entries: list[dict[str, object]] = json.loads(out or "[]")
    return entries[0] if entries else None


def _mac(ns: Netns, ifname: str) -> str:
    return str(json.loads(ns.run("ip", "-j", "link", "show", ifname).stdout)[0]["address"])


def test_reused_address_is_reachable_at_once(net: HostNetwork, host: TestHost,
                                             servers: list[Server]) -> None:
    # A bystander keeps the bridge up (with no port left it would drop its neighbours) and,
    # as a peer, caches the first holder's MAC too.
    _, bystander = _attach(net)
    first, a = _attach(net)
    address = str(first.address.ip)
    server_a = Server(a, "serve-tcp", "0.0.0.0", str(SERVICE_PORT))
    servers.append(server_a)
    control = probe(host, "connect-tcp", address, str(SERVICE_PORT), AT_ONCE_S)
    assert control.returncode == 0, control.stdout + control.stderr
    assert ping(bystander, address), "control: the peer must reach the first holder"
    bridge = net.ensure_space("alpha").bridge
    assert _neighbour(host, bridge, address) is not None, "control: the host resolved it"

    server_a.stop()
    net.destroy("alpha", a.name)
    second, b = _attach(net)
    assert second.address == first.address, "the lowest free address is reused"
    servers.append(Server(b, "serve-tcp", "0.0.0.0", str(SERVICE_PORT)))

    from_host = probe(host, "connect-tcp", address, str(SERVICE_PORT), AT_ONCE_S)
    assert from_host.returncode == 0, f"host: {from_host.stdout}" \
        f" neighbour={_neighbour(host, bridge, address)}"
    # The peer's entry is not the host's to remove: B's gratuitous ARP corrects it.
    from_peer = probe(bystander, "connect-tcp", address, str(SERVICE_PORT), AT_ONCE_S)
    assert from_peer.returncode == 0, f"peer: {from_peer.stdout}"


def test_release_and_attach_clear_the_hosts_entry(net: HostNetwork, host: TestHost) -> None:
    _attach(net)  # keeps the bridge up
    first, a = _attach(net)
    address = str(first.address.ip)
    bridge = net.ensure_space("alpha").bridge
    assert ping(host, address)
    assert _neighbour(host, bridge, address) is not None, "control: the host resolved it"
    net.detach("alpha", a.name)
    assert _neighbour(host, bridge, address) is None, "release leaves the old MAC behind"

    # An entry the announcement cannot override (it arrived some other way, e.g. a restart
    # between release and reuse): attaching the address removes it all the same.
    host.run("ip", "neigh", "replace", address, "lladdr", "02:00:00:00:de:ad", "dev", bridge,
             "nud", "permanent")
    second, b = _attach(net)
    assert str(second.address.ip) == address
    entry = _neighbour(host, bridge, address)
    assert entry is None or entry.get("lladdr") == _mac(b, "eth0"), entry
    assert ping(host, address)


def test_bridge_mac_is_fixed(net: HostNetwork, host: TestHost,
                             servers: list[Server]) -> None:
    bridge = net.ensure_space("alpha").bridge
    fixed = bridge_mac(LINK_PREFIX, "alpha")
    assert _mac(host, bridge) == fixed
    _, bystander = _attach(net)
    low, a = _attach(net)
    # A port with the lowest MAC would become the bridge's MAC and take it along on leaving.
    host.run("ip", "link", "set", low.host_ifname, "address", "02:00:00:00:00:01")
    assert _mac(host, bridge) == fixed
    servers.append(Server(host, "serve-tcp", "0.0.0.0", str(ALLOWED_TCP_PORT)))
    gateway = str(low.gateway)
    control = probe(bystander, "connect-tcp", gateway, str(ALLOWED_TCP_PORT), AT_ONCE_S)
    assert control.returncode == 0, control.stdout
    net.destroy("alpha", a.name)
    assert _mac(host, bridge) == fixed
    after = probe(bystander, "connect-tcp", gateway, str(ALLOWED_TCP_PORT), AT_ONCE_S)
    assert after.returncode == 0, f"gateway lost after a port left: {after.stdout}"
