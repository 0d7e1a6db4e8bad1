"""Spaces spread over hosts on the real kernel: two test hosts joined by an underlay LAN
(and a third, outside the fleet), a HostNetwork in each, VXLAN between them."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from netns import AddressError, HostNetwork, HostNetworkConfig, Space, overlay_mac, render
from netns.firewall import FirewallSpec, SpaceRules
from tests.privileged.netns.helpers import LINK_PREFIX, TABLE, Server, ping, probe
from tests.support.names import unique
from tests.support.testhost import Lan, Netns, TestHost, new_lan, new_test_host

PORT = 4789
POOL = IPv4Network("10.64.0.0/10")
ALPHA = IPv4Network("10.64.0.0/18")
BETA = IPv4Network("10.64.64.0/18")
SERVICE_PORT = 9000


@dataclass
class Fleet:
    hosts: list[TestHost]
    lan: Lan
    nets: list[HostNetwork]

    def underlay(self, n: int) -> IPv4Address:
        return self.lan.address(self.hosts[n]).ip


def _open(host: TestHost, state_dir: Path) -> HostNetwork:
    return HostNetwork(HostNetworkConfig(state_dir=state_dir, link_prefix=LINK_PREFIX,
                                         table=TABLE, host_netns=host.path,
                                         durable_state=False))


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    with new_test_host("dt") as a, new_test_host("dt") as b, new_test_host("dt") as c, \
            new_lan([a, b, c]) as lan:
        nets: list[HostNetwork] = []
        try:
            for n, host in enumerate((a, b)):
                nets.append(_open(host, tmp_path / f"host{n}"))
            yield Fleet([a, b, c], lan, nets)
        finally:
            for net in nets:
                try:
                    net.sweep((), ())
                finally:
                    net.close()


def _configure(fleet: Fleet, n: int, space: str, subnet: IPv4Network, vni: int,
               mtu: int | None = None) -> Space:
    # Host n gets the (n+1)th /24 of the subnet.
    slice_ = list(subnet.subnets(new_prefix=24))[n + 1]
    return fleet.nets[n].configure_space(space, subnet=subnet, slice=slice_, vni=vni,
                                         underlay=fleet.underlay(n), port=PORT, mtu=mtu)


def _dyno(net: HostNetwork, space: str) -> tuple[Netns, IPv4Address]:
    attachment = net.create_attached(space, unique("dt", 8))
    return Netns(attachment.namespace), attachment.address.ip


def _two_sided(fleet: Fleet, space: str, subnet: IPv4Network,
               vni: int) -> tuple[tuple[Netns, IPv4Address], tuple[Netns, IPv4Address]]:
    """A dyno of `space` on each host, each host knowing the other's."""
    for n in (0, 1):
        _configure(fleet, n, space, subnet, vni)
    d0, d1 = _dyno(fleet.nets[0], space), _dyno(fleet.nets[1], space)
    fleet.nets[0].set_space_peers(space, {d1[1]: fleet.underlay(1)})
    fleet.nets[1].set_space_peers(space, {d0[1]: fleet.underlay(0)})
    return d0, d1


def _set_fleet(fleet: Fleet) -> None:
    for net in fleet.nets:
        net.set_fleet([POOL], [fleet.underlay(0), fleet.underlay(1)], PORT)


def _mtu(ns: Netns, ifname: str) -> int:
    out = ns.run("ip", "-o", "link", "show", ifname).stdout
    words = out.split()
    return int(words[words.index("mtu") + 1])


def _fragments_made(fleet: Fleet) -> int:
    """IP fragments the two hosts have made (`FragCreates` of /proc/net/snmp, which shows
    the reading process's network namespace)."""
    total = 0
    for host in fleet.hosts[:2]:
        header, values = [line.split() for line in host.run(
            "cat", "/proc/net/snmp").stdout.splitlines() if line.startswith("Ip:")]
        total += int(values[header.index("FragCreates")])
    return total


def test_addressing_follows_the_slice(fleet: Fleet) -> None:
    space = _configure(fleet, 0, "alpha", ALPHA, 17)
    assert str(space.gateway) == "10.64.1.1/18" and space.slice == IPv4Network("10.64.1.0/24")
    assert space.vxlan is not None and space.vxlan.startswith(f"{LINK_PREFIX}x")
    dyno, ip = _dyno(fleet.nets[0], "alpha")
    assert ip == IPv4Address("10.64.1.2")
    assert "10.64.1.2/18" in dyno.run("ip", "-o", "addr", "show", "eth0").stdout
    # (nsenter --net keeps the root's /sys: ask netlink, not /sys/class/net.)
    assert f"link/ether {overlay_mac('alpha', ip)} " in dyno.run(
        "ip", "-o", "link", "show", "eth0").stdout
    details = fleet.hosts[0].run("ip", "-d", "link", "show", space.vxlan).stdout
    assert f"master {space.bridge}" in details
    assert f"vxlan id 17 local {fleet.underlay(0)}" in details
    assert f"dstport {PORT}" in details and "nolearning" in details and "proxy" in details
    # Same config again: the same space, nothing re-made.
    before = fleet.hosts[0].run("ip", "-o", "link", "show", space.vxlan).stdout.split(":")[0]
    assert _configure(fleet, 0, "alpha", ALPHA, 17) == space
    after = fleet.hosts[0].run("ip", "-o", "link", "show", space.vxlan).stdout.split(":")[0]
    assert before == after


def test_dynos_reach_across_hosts_and_spaces_stay_apart(fleet: Fleet) -> None:
    _set_fleet(fleet)
    (a0, ip_a0), (a1, ip_a1) = _two_sided(fleet, "alpha", ALPHA, 17)
    (b0, ip_b0), (b1, ip_b1) = _two_sided(fleet, "beta", BETA, 18)
    assert ping(a0, str(ip_a1)) and ping(a1, str(ip_a0))
    assert ping(b0, str(ip_b1)) and ping(b1, str(ip_b0)), "control: beta across hosts"
    for dyno, target in ((b0, ip_a1), (b1, ip_a0), (b0, ip_a0), (a0, ip_b1)):
        assert not ping(dyno, str(target)), f"{dyno.name} reached {target}"

    # Peers dropped: the entries go and so does the path.
    fleet.nets[0].set_space_peers("alpha", {})
    vxlan = fleet.nets[0].ensure_space("alpha").vxlan
    assert vxlan is not None
    assert " dst " not in fleet.hosts[0].run("bridge", "fdb", "show", "dev", vxlan).stdout
    assert fleet.hosts[0].run("ip", "neigh", "show", "dev", vxlan).stdout.strip() == ""
    assert not ping(a0, str(ip_a1))
    # And back (a changed entry is replaced in place).
    fleet.nets[0].set_space_peers("alpha", {ip_a1: fleet.underlay(1)})
    assert ping(a0, str(ip_a1))


def test_set_space_peers_replaces_and_deletes_exactly(fleet: Fleet) -> None:
    space = _configure(fleet, 0, "alpha", ALPHA, 17)
    assert space.vxlan is not None
    net, host = fleet.nets[0], fleet.hosts[0]
    peers = {IPv4Address(f"10.64.2.{n}"): fleet.underlay(1) for n in range(2, 300 % 254)}
    peers |= {IPv4Address(f"10.64.3.{n}"): fleet.underlay(2) for n in range(2, 200)}
    net.set_space_peers("alpha", peers)
    fdb = host.run("bridge", "fdb", "show", "dev", space.vxlan).stdout.splitlines()
    assert len([line for line in fdb if " dst " in line]) == len(peers)
    assert not [line for line in fdb if line.startswith("00:00:00:00:00:00")]
    moved = IPv4Address("10.64.2.2")
    fewer = {ip: dst for ip, dst in peers.items() if ip.packed[2] == 2}
    fewer[moved] = fleet.underlay(2)
    net.set_space_peers("alpha", fewer)
    fdb = host.run("bridge", "fdb", "show", "dev", space.vxlan).stdout.splitlines()
    dst_lines = [line for line in fdb if " dst " in line]
    assert len(dst_lines) == len(fewer)
    assert f"{overlay_mac('alpha', moved)} dst {fleet.underlay(2)} self permanent" in fdb
    neigh = [line.strip() for line in
             host.run("ip", "neigh", "show", "dev", space.vxlan).stdout.splitlines()]
    assert len(neigh) == len(fewer)
    assert f"{moved} lladdr {overlay_mac('alpha', moved)} PERMANENT" in neigh


def test_mtu_and_bulk_tcp_across_hosts(fleet: Fleet, servers: list[Server]) -> None:
    (a0, _), (a1, ip_a1) = _two_sided(fleet, "alpha", ALPHA, 17)
    space = fleet.nets[0].ensure_space("alpha")
    assert fleet.nets[0].underlay_mtu(fleet.underlay(0)) == 1500
    assert space.mtu == 1450 and space.vxlan is not None
    host = fleet.hosts[0]
    veth = fleet.nets[0].spaces()[0]
    assert veth.mtu == 1450
    for ifname in (space.vxlan, space.bridge):
        assert _mtu(host, ifname) == 1450, ifname
    assert _mtu(a0, "eth0") == 1450
    ports = host.run("ip", "-o", "link", "show", "master", space.bridge).stdout.splitlines()
    assert len(ports) == 2 and all(" mtu 1450 " in port for port in ports)  # veth, vxlan

    # Full-size segments fit the tunnel: the underlay never fragments (the kernel would,
    # silently, for a veth with a larger MTU than the VXLAN device's).
    fragments = _fragments_made(fleet)
    servers.append(Server(a1, "serve-sink", "0.0.0.0", str(SERVICE_PORT), "15"))
    done = probe(a0, "send-bytes", str(ip_a1), str(SERVICE_PORT), str(256 * 1024), "15")
    assert done.returncode == 0, done.stdout + done.stderr
    assert servers[-1].output(timeout_s=20).strip() == f"bytes={256 * 1024}"
    assert _fragments_made(fleet) == fragments
    # Nor did the sender have to learn a smaller path MTU (the VXLAN device answers an
    # oversize frame with "fragmentation needed"; TCP recovers, after losing a segment).
    learned = a0.run("ip", "route", "get", str(ip_a1)).stdout
    assert " mtu " not in learned, learned

    # A smaller MTU reaches the existing veths too, both ends.
    _configure(fleet, 0, "alpha", ALPHA, 17, mtu=1400)
    for ifname in (space.vxlan, space.bridge):
        assert _mtu(host, ifname) == 1400, ifname
    assert _mtu(a0, "eth0") == 1400
    assert host.run("ip", "-o", "link", "show", "master", space.bridge).stdout.count(
        "mtu 1400") == 2


def test_overlay_port_only_from_fleet_and_hosts_off_limits(fleet: Fleet,
                                                           servers: list[Server]) -> None:
    _set_fleet(fleet)
    (a0, ip_a0), (a1, _) = _two_sided(fleet, "alpha", ALPHA, 17)
    udp = Server(a0, "serve-udp", "0.0.0.0", str(SERVICE_PORT), "4")
    servers.append(udp)
    forged = [str(fleet.underlay(0)), str(PORT), "17", overlay_mac("alpha", ip_a0),
              "10.64.2.99", str(ip_a0), str(SERVICE_PORT)]
    outsider, member = fleet.hosts[2], fleet.hosts[1]
    assert probe(outsider, "inject-vxlan", *forged, "outsider").returncode == 0
    assert probe(member, "inject-vxlan", *forged, "fleet").returncode == 0
    received = udp.output(timeout_s=10)
    assert "data=fleet" in received, "control: a fleet host's frames are delivered"
    assert "data=outsider" not in received

    # Dynos reach no fleet host (so cannot speak VXLAN to any), but other addresses do.
    assert ping(a0, str(fleet.underlay(2))), "control: a non-fleet address is reachable"
    assert not ping(a0, str(fleet.underlay(1)))
    assert not ping(a1, str(fleet.underlay(0)))
    # Nor anything else in the fleet's pools (here an address the outsider holds).
    outsider.run("ip", "addr", "add", "10.127.0.1/32", "dev", "lo")
    fleet.hosts[0].run("ip", "route", "add", "10.127.0.0/16", "via", str(fleet.underlay(2)))
    assert not ping(a0, "10.127.0.1")


def test_overlapping_subnet_refused(fleet: Fleet) -> None:
    host = fleet.hosts[0]
    host.run("ip", "addr", "add", "10.99.0.1/24", "dev", "lan0")
    host.run("ip", "route", "add", "10.98.0.0/16", "via", str(fleet.underlay(1)))
    assert {IPv4Network("10.99.0.0/24"), IPv4Network("10.98.0.0/16"),
            IPv4Network("198.19.0.0/24")} <= set(fleet.nets[0].host_networks())
    with pytest.raises(AddressError, match=r"space gamma: subnet 10\.99\.0\.0/16 overlaps "
                       r"the host's network 10\.99\.0\.0/24 \(lan0\)"):
        fleet.nets[0].configure_space("gamma", subnet=IPv4Network("10.99.0.0/16"),
                                      slice=IPv4Network("10.99.4.0/24"), vni=5,
                                      underlay=fleet.underlay(0))
    with pytest.raises(AddressError, match=r"10\.98\.0\.0/16 \(lan0\)"):
        fleet.nets[0].configure_space("gamma", subnet=IPv4Network("10.98.128.0/18"),
                                      slice=IPv4Network("10.98.130.0/24"), vni=5,
                                      underlay=fleet.underlay(0))
    assert fleet.nets[0].spaces() == []
    # The space's own bridge and route are not the host's networks.
    _configure(fleet, 0, "alpha", ALPHA, 17)
    assert not [n for n in fleet.nets[0].host_networks() if n.overlaps(ALPHA)]


def test_config_survives_restart_and_sweep_removes_vxlan(fleet: Fleet,
                                                         tmp_path: Path) -> None:
    _set_fleet(fleet)
    (a0, ip_a0), (a1, ip_a1) = _two_sided(fleet, "alpha", ALPHA, 17)
    space = fleet.nets[0].ensure_space("alpha")
    fleet.nets[0].close()
    doc = json.loads((tmp_path / "host0" / "ipam" / "spaces.json").read_text())
    assert doc["spaces"]["alpha"]["vni"] == 17 and doc["fleet"]["port"] == PORT
    fleet.hosts[0].run("nft", "delete", "table", "inet", TABLE)
    fleet.nets[0] = net = _open(fleet.hosts[0], tmp_path / "host0")
    # The table is back before anyone configures anything, with the fleet rules.
    table = fleet.hosts[0].run("nft", "list", "table", "inet", TABLE).stdout
    assert f"udp dport {PORT} ip saddr != " in table
    assert [(s.space_id, s.slice, s.vni) for s in net.spaces()] == [
        ("alpha", space.slice, 17)]
    assert net.ensure_space("alpha") == space
    net.set_space_peers("alpha", {ip_a1: fleet.underlay(1)})
    assert ping(a0, str(ip_a1)) and ping(a1, str(ip_a0))
    with pytest.raises(AddressError, match="hold addresses"):
        net.configure_space("alpha", subnet=BETA, slice=IPv4Network("10.64.65.0/24"),
                            vni=17, underlay=fleet.underlay(0))

    report = net.sweep((), ())
    assert space.vxlan in report.links and space.bridge in report.links
    assert fleet.hosts[0].run("ip", "-o", "link", "show", "type", "vxlan").stdout == ""


def test_unconfigure_space(fleet: Fleet) -> None:
    net = fleet.nets[0]
    space = _configure(fleet, 0, "alpha", ALPHA, 17)
    dyno, ip = _dyno(net, "alpha")
    net.unconfigure_space("alpha")
    assert fleet.hosts[0].run("ip", "-o", "link", "show", "type", "vxlan").stdout == ""
    [kept] = net.spaces()
    assert kept.gateway == space.gateway and kept.vxlan is None
    assert f"{ip}/18" in dyno.run("ip", "-o", "addr", "show", "eth0").stdout
    net.destroy("alpha", dyno.name)
    net.unconfigure_space("alpha")
    assert net.spaces() == []
    assert space.bridge not in fleet.hosts[0].run("ip", "-o", "link").stdout


def test_rendered_overlay_ruleset_passes_nft_check(fleet: Fleet) -> None:
    spec = FirewallSpec(
        table="dt_check",
        spaces=(SpaceRules("dtb1", ALPHA, IPv4Address("10.64.1.1")),
                SpaceRules("dtb2", BETA, IPv4Address("10.64.65.1"))),
        private_pools=(POOL, IPv4Network("10.64.0.0/16")),
        fleet_hosts=(fleet.underlay(0), fleet.underlay(1)), overlay_port=PORT)
    done = fleet.hosts[0].run("nft", "-c", "-f", "-", input=render(spec), check=False)
    assert done.returncode == 0, done.stderr
    lonely = FirewallSpec(table="dt_check", spaces=spec.spaces, overlay_port=PORT)
    done = fleet.hosts[0].run("nft", "-c", "-f", "-", input=render(lonely), check=False)
    assert done.returncode == 0, done.stderr


def test_known_space_follows_the_gateway(fleet: Fleet) -> None:
    """known_space (read without the network thread) never names a gateway the space has
    left: the one ensure_space gives, nothing once the coordinator moved the space or it
    was removed, until ensure_space has looked again."""
    net = fleet.nets[0]
    assert net.known_space("alpha") is None
    local = net.ensure_space("alpha")
    assert net.known_space("alpha") == local
    moved = _configure(fleet, 0, "alpha", ALPHA, 17)
    assert moved.gateway != local.gateway
    assert net.known_space("alpha") in (None, moved)
    assert net.ensure_space("alpha") == moved and net.known_space("alpha") == moved
    net.remove_space("alpha")
    assert net.known_space("alpha") is None
