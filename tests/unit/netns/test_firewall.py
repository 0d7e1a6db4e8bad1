"""The rendered nftables table: what it allows, drops and translates, and that nothing in
it can touch traffic that is not the agent's."""

from __future__ import annotations

import re
from ipaddress import IPv4Address, IPv4Network

import pytest

from netns import FirewallSpec, SpaceRules, render

TWO = FirewallSpec(
    table="dynoagent",
    spaces=(SpaceRules("dyb1", IPv4Network("172.20.0.0/24")),
            SpaceRules("dyb2", IPv4Network("172.20.1.0/24"))),
    outbound=("eth0",), allowed_tcp_ports=(8080, 443, 8080), allowed_udp_ports=(53,))


def test_replaces_table_atomically() -> None:
    text = render(TWO)
    lines = text.splitlines()
    assert lines[:3] == ["add table inet dynoagent", "delete table inet dynoagent",
                         "table inet dynoagent {"]


def test_base_chains_never_drop_by_policy() -> None:
    text = render(TWO)
    policies = re.findall(r"policy (\w+);", text)
    assert policies == ["accept", "accept", "accept"]


def test_every_drop_or_reject_matches_space_traffic() -> None:
    chain = None
    for line in render(TWO).splitlines():
        stripped = line.strip()
        if stripped.startswith("chain "):
            chain = stripped.split()[1]
        if stripped.endswith(("drop", "masquerade")) or " reject" in f" {stripped}":
            if chain == "input":
                continue  # guarded below by the leading "iifname != @space_bridges accept"
            assert "@space_bridges" in stripped or "@space_subnets" in stripped, stripped
    input_chain = render(TWO).split("chain input {")[1]
    rules = [r.strip() for r in input_chain.splitlines()[2:]]
    assert rules[0] == "iifname != @space_bridges accept"


def test_space_rules() -> None:
    text = render(TWO)
    assert 'iifname "dyb1" oifname "dyb1" accept' in text
    assert 'iifname "dyb2" oifname "dyb2" accept' in text
    assert text.index('oifname "dyb2" accept') < text.index(
        "iifname @space_bridges oifname @space_bridges drop")
    assert "ip daddr 169.254.0.0/16 reject" in text
    assert "tcp dport { 443, 8080 } accept" in text
    assert "udp dport { 53 } accept" in text
    assert 'ip saddr @space_subnets oifname { "eth0" } masquerade' in text
    assert "elements = { 172.20.0.0/24, 172.20.1.0/24 }" in text


def test_without_outbound_masquerades_off_bridge() -> None:
    text = render(FirewallSpec(table="t", spaces=TWO.spaces))
    assert "ip saddr @space_subnets oifname != @space_bridges masquerade" in text
    assert "dport" not in text


def test_empty_table_has_no_elements() -> None:
    text = render(FirewallSpec(table="t"))
    assert "elements" not in text and "policy accept" in text


@pytest.mark.parametrize("bad", [
    {"table": "bad name"},
    {"table": "t", "outbound": ("eth0; drop",)},
    {"table": "t", "allowed_tcp_ports": (0,)},
    {"table": "t", "spaces": (SpaceRules('x"y', IPv4Network("10.0.0.0/24")),)},
])
def test_injection_and_nonsense_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        FirewallSpec(**bad)  # type: ignore[arg-type]


OVERLAY = FirewallSpec(
    table="dynoagent",
    spaces=(SpaceRules("dyb1", IPv4Network("10.64.0.0/18"), IPv4Address("10.64.3.1")),
            SpaceRules("dyb2", IPv4Network("10.64.64.0/18"), IPv4Address("10.64.67.1"))),
    private_pools=(IPv4Network("10.64.0.0/10"), IPv4Network("10.64.0.0/16")),
    fleet_hosts=(IPv4Address("192.0.2.8"), IPv4Address("192.0.2.7")), overlay_port=4789)


def _chain(text: str, name: str) -> list[str]:
    body = text.split(f"chain {name} {{")[1].split("\n  }")[0]
    return [line.strip() for line in body.splitlines()[2:]]


def test_overlay_rules() -> None:
    text = render(OVERLAY)
    forward = _chain(text, "forward")
    pools = "iifname @space_bridges ip daddr { 10.64.0.0/10 } reject with icmpx type " \
        "admin-prohibited"
    hosts = "iifname @space_bridges ip daddr { 192.0.2.7, 192.0.2.8 } reject with icmpx " \
        "type admin-prohibited"
    # After the same-space accepts (a space's own subnet is inside the pool), before the rest.
    assert forward[2:4] == [pools, hosts]
    assert forward[:2] == ['iifname "dyb1" oifname "dyb1" accept',
                           'iifname "dyb2" oifname "dyb2" accept']
    inbound = _chain(text, "input")
    assert inbound[0] == "udp dport 4789 ip saddr != { 192.0.2.7, 192.0.2.8 } drop"
    assert inbound[1] == "iifname != @space_bridges accept"
    dns = 'iifname "dyb1" ip daddr 10.64.3.1 udp dport 53 accept'
    assert dns in inbound and 'iifname "dyb1" ip daddr 10.64.3.1 tcp dport 53 accept' in inbound
    assert inbound.index(dns) < inbound.index("meta l4proto tcp reject with tcp reset")
    assert 'iifname "dyb2" ip daddr 10.64.67.1 udp dport 53 accept' in inbound
    assert not [r for r in inbound if "dyb2" in r and "10.64.3.1" in r]


def test_overlay_port_without_fleet_hosts_drops_everything() -> None:
    text = render(FirewallSpec(table="t", spaces=OVERLAY.spaces, overlay_port=4789))
    assert _chain(text, "input")[0] == "udp dport 4789 drop"
    assert "192.0.2" not in text and "reject with icmpx type admin-prohibited\n" in text
    assert "dport 4789" not in render(FirewallSpec(table="t", spaces=OVERLAY.spaces))


def test_bad_overlay_port_refused() -> None:
    with pytest.raises(ValueError):
        FirewallSpec(table="t", overlay_port=70000)
