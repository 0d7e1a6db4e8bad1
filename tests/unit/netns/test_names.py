"""Interface names and aliases: short, stable, distinct, parseable."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest

from netns.names import (
    IFNAMSIZ,
    LinkOwner,
    bridge_alias,
    bridge_mac,
    bridge_name,
    inner_mac,
    overlay_mac,
    parse_alias,
    veth_alias,
    veth_name,
    vxlan_alias,
    vxlan_name,
)


def test_names_fit_and_are_stable() -> None:
    long_id = "a" * 64
    for name in (bridge_name("abcde", long_id), veth_name("abcde", long_id)):
        assert len(name) <= IFNAMSIZ
    assert bridge_name("dy", "web") == bridge_name("dy", "web")
    assert bridge_name("dy", "web") != veth_name("dy", "web")
    assert bridge_name("dy", "web") != bridge_name("dy", "weB")
    assert bridge_name("dy", "web").startswith("dyb")


def test_distinct_over_many_ids() -> None:
    names = {veth_name("dy", f"dyno-{i}") for i in range(20000)}
    assert len(names) == 20000


@pytest.mark.parametrize("prefix", ["", "Dy", "abcdef", "1a", "d-y"])
def test_bad_prefix_refused(prefix: str) -> None:
    with pytest.raises(ValueError):
        bridge_name(prefix, "x")


def test_alias_round_trip() -> None:
    assert parse_alias(bridge_alias("space-1")) == LinkOwner("bridge", "space-1")
    assert parse_alias(veth_alias("s", "dyno-9")) == LinkOwner("veth", "s", "dyno-9")
    for foreign in (None, "", "eth0 uplink", "dynoagent", "dynoagent:bridge:",
                    "dynoagent:veth:s", "other:bridge:x", "dynoagent:tap:x"):
        assert parse_alias(foreign) is None


def test_vxlan_name_and_alias() -> None:
    assert vxlan_name("dy", "web").startswith("dyx")
    assert len(vxlan_name("abcde", "a" * 64)) <= IFNAMSIZ
    assert vxlan_name("dy", "web") not in (bridge_name("dy", "web"), veth_name("dy", "web"))
    assert parse_alias(vxlan_alias("space-1")) == LinkOwner("vxlan", "space-1")
    assert parse_alias("dynoagent:vxlan:") is None


def test_overlay_mac_is_a_function_of_space_and_address() -> None:
    ip = IPv4Address("10.64.1.2")
    mac = overlay_mac("alpha", ip)
    assert mac == overlay_mac("alpha", IPv4Address("10.64.1.2"))
    assert int(mac.split(":")[0], 16) & 0x03 == 0x02  # locally administered, unicast
    assert mac != overlay_mac("beta", ip)
    macs = {overlay_mac("alpha", IPv4Address(0x0A400000 + n)) for n in range(16384)}
    assert len(macs) == 16384
    assert mac not in (bridge_mac("dy", "alpha"), inner_mac("alpha"))
