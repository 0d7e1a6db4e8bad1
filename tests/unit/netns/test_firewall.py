"""The rendered nftables table: what it allows, drops and translates, and that nothing in
it can touch traffic that is not the agent's."""

from __future__ import annotations

import re
from ipaddress import IPv4Network

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
