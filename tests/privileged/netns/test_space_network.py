"""Space networks on the real kernel, each inside a test host of its own: reachability
within a space, isolation between spaces, masquerade, host services, teardown and sweep."""

from __future__ import annotations

import dataclasses
import errno
import os
import struct
import subprocess
import time
from ipaddress import IPv4Network
from pathlib import Path

import pytest

from netns import HostNetwork, HostNetworkConfig, LinkError, render, rtnlbatch
from netns import host as host_module
from netns.firewall import FirewallSpec, SpaceRules
from tests.privileged.netns.helpers import (
    ALLOWED_TCP_PORT,
    LINK_PREFIX,
    TABLE,
    Server,
    ping,
    probe,
)
from tests.support.names import unique
from tests.support.testhost import Netns, TestHost
from tests.support.wait import wait_for

BLOCKED_TCP_PORT = 7071
SERVICE_PORT = 8080


def _dyno(net: HostNetwork, space: str) -> tuple[Netns, str]:
    attachment = net.create_attached(space, unique("dt", 8))
    return Netns(attachment.namespace), str(attachment.address.ip)


def test_same_space_ping_and_tcp(net: HostNetwork, servers: list[Server]) -> None:
    a1, ip1 = _dyno(net, "alpha")
    a2, ip2 = _dyno(net, "alpha")
    assert ip1 != ip2
    assert ping(a1, ip2) and ping(a2, ip1)
    servers.append(Server(a2, "serve-tcp", "0.0.0.0", str(SERVICE_PORT)))
    done = probe(a1, "connect-tcp", ip2, str(SERVICE_PORT), "5")
    assert done.returncode == 0, done.stdout + done.stderr
    # Inside a space nothing is translated: the server sees the client's own address.
    assert done.stdout.strip() == f"peer={ip1}"


def test_other_space_cannot_reach(net: HostNetwork, servers: list[Server]) -> None:
    a1, ip1 = _dyno(net, "alpha")
    a2, ip2 = _dyno(net, "alpha")
    b1, ip_b = _dyno(net, "beta")
    assert net.ensure_space("alpha").subnet != net.ensure_space("beta").subnet

    assert ping(a2, ip1), "control: same-space ping must work"
    assert not ping(b1, ip1) and not ping(b1, ip2)
    assert not ping(a1, ip_b)

    servers.append(Server(a1, "serve-tcp", "0.0.0.0", str(SERVICE_PORT)))
    control = probe(a2, "connect-tcp", ip1, str(SERVICE_PORT), "5")
    assert control.returncode == 0, control.stdout
    blocked = probe(b1, "connect-tcp", ip1, str(SERVICE_PORT), "1.5")
    assert blocked.returncode == 1 and "error=" in blocked.stdout

    udp = Server(a1, "serve-udp", "0.0.0.0", str(SERVICE_PORT + 1), "3")
    servers.append(udp)
    probe(a2, "send-udp", ip1, str(SERVICE_PORT + 1), "5", "same")
    probe(b1, "send-udp", ip1, str(SERVICE_PORT + 1), "5", "other")
    received = udp.output(timeout_s=10)
    assert f"from={ip2} data=same" in received, "control: same-space UDP must arrive"
    assert "data=other" not in received


def test_egress_is_masqueraded(net: HostNetwork, host: TestHost,
                               servers: list[Server]) -> None:
    assert host.upstream is not None and host.address is not None
    assert host.peer_address is not None
    a1, ip1 = _dyno(net, "alpha")
    servers.append(Server(host.upstream, "serve-tcp", "0.0.0.0", str(SERVICE_PORT)))
    done = probe(a1, "connect-tcp", str(host.peer_address.ip), str(SERVICE_PORT), "5")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == f"peer={host.address.ip}"
    assert ip1 != str(host.address.ip)


def test_host_services_are_off_limits(net: HostNetwork, host: TestHost,
                                      servers: list[Server]) -> None:
    assert host.address is not None
    a1, _ = _dyno(net, "alpha")
    gateway = str(net.ensure_space("alpha").gateway.ip)
    own = str(host.address.ip)
    host.run("ip", "addr", "add", "169.254.169.254/32", "dev", "lo")
    for port in (BLOCKED_TCP_PORT, ALLOWED_TCP_PORT):
        servers.append(Server(host, "serve-tcp", "0.0.0.0", str(port)))

    allowed = probe(a1, "connect-tcp", own, str(ALLOWED_TCP_PORT), "5")
    assert allowed.returncode == 0, "control: an explicitly allowed port must be reachable"
    for address in (own, gateway):
        blocked = probe(a1, "connect-tcp", address, str(BLOCKED_TCP_PORT), "1.5")
        assert blocked.returncode == 1, f"{address}:{BLOCKED_TCP_PORT} reachable"
    # Link-local stays unreachable even on a port that is otherwise allowed.
    metadata = probe(a1, "connect-tcp", "169.254.169.254", str(ALLOWED_TCP_PORT), "1.5")
    assert metadata.returncode == 1


def test_attach_is_idempotent_and_repairs(net: HostNetwork, host: TestHost) -> None:
    name = unique("dt", 8)
    net.create_namespace(name)
    first = net.attach("alpha", name)
    again = net.attach("alpha", name)
    assert again == first
    # Break the wiring behind the library's back: the next attach rebuilds it in place.
    host.run("ip", "link", "del", first.host_ifname)
    repaired = net.attach("alpha", name)
    assert repaired.address == first.address
    other, _ = _dyno(net, "alpha")
    assert ping(other, str(first.address.ip))


def test_dyno_links_make_no_ipv6_address(net: HostNetwork, host: TestHost) -> None:
    """Spaces carry IPv4 only: neither end of a dyno's veth pair makes a link-local address
    (and so sends no probe, solicitation or MLD report over the bridge); lo keeps ::1."""
    dyno, _ = _dyno(net, "alpha")
    _, peer_ip = _dyno(net, "alpha")
    host_if = net.attach("alpha", dyno.name).host_ifname
    # The pair's carrier comes up asynchronously, and with it any link-local address.
    wait_for(lambda: "LOWER_UP" in dyno.run("ip", "-o", "link", "show", "eth0").stdout
             and "LOWER_UP" in host.run("ip", "-o", "link", "show", host_if).stdout,
             5, what="veth carrier")
    time.sleep(0.2)
    assert dyno.run("ip", "-o", "-6", "addr", "show", "dev", "eth0").stdout == ""
    assert host.run("ip", "-o", "-6", "addr", "show", "dev", host_if).stdout == ""
    assert "inet6 ::1/128" in dyno.run("ip", "-o", "-6", "addr", "show", "dev", "lo").stdout
    assert ping(dyno, peer_ip)


def test_a_kernel_without_ipv6_is_wired_all_the_same(host: TestHost, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Booted with ipv6.disable=1 there is no IPv6 sysctl to write nor address mode to set:
    the attach leaves both out (here, where IPv6 is there, the links then make their
    link-local addresses as before)."""
    monkeypatch.setattr(host_module, "host_has_ipv6", lambda: False)
    config = HostNetworkConfig(state_dir=tmp_path / "state", link_prefix=LINK_PREFIX,
                               table=TABLE, host_netns=host.path, durable_state=False)
    net = HostNetwork(config)
    try:
        dyno, _ = _dyno(net, "alpha")
        _, peer_ip = _dyno(net, "alpha")
        wait_for(lambda: "inet6 fe80" in dyno.run("ip", "-o", "-6", "addr", "show", "dev",
                                                  "eth0").stdout, 5, what="a link-local")
        assert ping(dyno, peer_ip)
    finally:
        try:
            net.sweep((), ())
        finally:
            net.close()


def test_namespace_markers_are_links_to_one_anchor(net: HostNetwork) -> None:
    names = [unique("dt", 8) for _ in range(3)]
    for name in names:
        net.create_namespace(name)
    markers = [net.config.state_dir / "namespaces" / n for n in names]
    anchor = net.config.state_dir / "namespace-marker"
    assert {m.stat().st_ino for m in markers} == {anchor.stat().st_ino}
    assert set(net.namespaces()) >= set(names)
    net.delete_namespace(names[0])
    assert not markers[0].exists() and anchor.stat().st_nlink == 3
    assert names[0] not in net.namespaces()


def test_sweep_removes_only_what_is_not_live(net: HostNetwork, host: TestHost) -> None:
    keep, _ = _dyno(net, "alpha")
    peer, peer_ip = _dyno(net, "alpha")
    gone, _ = _dyno(net, "beta")
    beta_bridge = net.ensure_space("beta").bridge
    report = net.sweep(["alpha"], [keep.name, peer.name])
    assert beta_bridge in report.links
    assert gone.name in report.namespaces
    assert not report.table_removed
    assert not gone.path.exists()
    assert ping(keep, peer_ip), "live dynos keep working after a sweep"
    assert [s.space_id for s in net.spaces()] == ["alpha"]
    assert "set space_bridges" in host.run("nft", "list", "table", "inet", TABLE).stdout


def test_teardown_and_sweep_leave_nothing(net: HostNetwork, host: TestHost,
                                          tmp_path: Path) -> None:
    dynos = [_dyno(net, space)[0] for space in ("alpha", "alpha", "beta")]
    net.destroy(net.spaces()[0].space_id, dynos[0].name)
    net.destroy_later("alpha", dynos[1].name).result(timeout=30)
    report = net.sweep((), ())
    assert dynos[2].name in report.namespaces and report.table_removed
    links = host.run("ip", "-o", "link").stdout
    assert f": {LINK_PREFIX}" not in links, links
    for dyno in dynos:
        assert not dyno.path.exists()
    assert TABLE not in host.run("nft", "list", "tables").stdout
    ipam = tmp_path / "state" / "ipam"
    assert not [p for p in ipam.iterdir() if p.is_dir()]
    assert '"spaces": {}' in (ipam / "spaces.json").read_text()
    assert not os.listdir(tmp_path / "state" / "namespaces")


def test_root_namespace_is_untouched(net: HostNetwork) -> None:
    forward_before = Path("/proc/sys/net/ipv4/ip_forward").read_text()
    _dyno(net, "alpha")
    assert Path("/proc/sys/net/ipv4/ip_forward").read_text() == forward_before
    root_links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True,
                                check=True).stdout
    assert net.ensure_space("alpha").bridge not in root_links
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True,
                            check=True).stdout
    assert TABLE not in tables


def test_foreign_link_with_bridge_name_is_refused(net: HostNetwork, host: TestHost) -> None:
    bridge = net.ensure_space("alpha").bridge
    net.remove_space("alpha")
    host.run("ip", "link", "add", bridge, "type", "veth", "peer", "name", "dtpeer0")
    try:
        net.ensure_space("alpha")
    except LinkError as exc:
        assert exc.interface == bridge and exc.operation == "add-bridge"
    else:
        raise AssertionError("a foreign link was adopted as a bridge")
    finally:
        host.run("ip", "link", "del", bridge)


def test_rendered_ruleset_passes_nft_check(host: TestHost) -> None:
    spec = FirewallSpec(table="dt_check", spaces=(
        SpaceRules("dtb1", IPv4Network("10.9.0.0/24")),),
        allowed_tcp_ports=(80,), allowed_udp_ports=(53,))
    done = host.run("nft", "-c", "-f", "-", input=render(spec), check=False)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(("step", "operation"), [
    ("add_veth", "add-veth"), ("set_alias", "set-alias"), ("set_up", "link-up"),
    ("add_address", "add-address"), ("add_default_route", "add-route"),
    ("set_mac", "set-mac")])
def test_failed_attach_undoes_every_step(net: HostNetwork, host: TestHost, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch, step: str,
                                         operation: str) -> None:
    net.ensure_space("alpha")
    name = unique("dt", 8)
    encode = getattr(rtnlbatch, step)

    def refused(*args: object, **kwargs: object) -> rtnlbatch.Request:
        # The kernel refuses the step (ENODEV: a link index nobody has) and, as it does for
        # any refusal, goes on with the rest of the batch.
        return dataclasses.replace(
            encode(*args, **kwargs), type=rtnlbatch.RTM_NEWLINK,
            flags=rtnlbatch.NLM_F_REQUEST | rtnlbatch.NLM_F_ACK,
            body=struct.pack("=BxHiII", 0, 0, 0x7FFFFFF0, 0, 0))

    monkeypatch.setattr(rtnlbatch, step, refused)
    with pytest.raises(LinkError) as refusal:
        net.create_attached("alpha", name)
    monkeypatch.undo()
    assert (refusal.value.operation, refusal.value.errno) == (operation, errno.ENODEV)
    assert not Netns(name).path.exists()
    assert net.namespaces() == []
    assert host.run("ip", "-o", "link", "show", "master",
                    net.ensure_space("alpha").bridge).stdout == ""
    assert not list((tmp_path / "state" / "ipam" / "alpha").iterdir())
    # And the space still works for the next dyno, which gets the first address.
    attachment = net.create_attached("alpha", name)
    assert str(attachment.address) == "172.20.0.2/24"
