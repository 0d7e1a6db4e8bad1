"""`spaces.sync` on the agent: params checked strictly (nothing applied on a bad one), each
space applied to the host network, a failing space reported without stopping the others,
older generations ignored, spaces no longer listed unconfigured."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Mapping
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest

import netns
from agent import errors
from agent.coordinator.spaces import Member, SpaceSync, parse

UNDERLAY = "192.0.2.1"


def request(**changes: Any) -> dict[str, Any]:
    p: dict[str, Any] = {
        "generation": 3, "port": 4789, "hosts": ["192.0.2.1", "192.0.2.2"],
        "pools": ["10.64.0.0/10"],
        "spaces": [{"space": "alpha", "subnet": "10.64.0.0/18", "slice": "10.64.1.0/24",
                    "vni": 7, "mtu": 1450,
                    "members": [{"app": "alpha", "name": "web.1", "ip": "10.64.1.2",
                                 "host": "192.0.2.1", "state": "up"},
                                {"app": "alpha", "name": "web.2", "ip": "10.64.2.2",
                                 "host": "192.0.2.2", "state": "up"}]}]}
    p.update(changes)
    return p


class FakeNetwork:
    def __init__(self, refuse: set[str] | None = None) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.refuse = refuse or set()

    def set_fleet(self, pools: Any, hosts: Any, port: int) -> None:
        self.calls.append(("fleet", tuple(pools), tuple(hosts), port))

    def configure_space(self, space: str, **kw: Any) -> None:
        if space in self.refuse:
            raise netns.AddressError("space alpha: subnet 10.64.0.0/18 overlaps the host's "
                                     "network 10.64.0.0/16 (eth1)", operation="configure-space")
        self.calls.append(("configure", space, kw["subnet"], kw["slice"], kw["vni"],
                           kw["underlay"], kw["mtu"]))

    def set_space_peers(self, space: str, peers: Mapping[IPv4Address, IPv4Address]) -> None:
        self.calls.append(("peers", space, dict(peers)))

    def unconfigure_space(self, space: str) -> None:
        self.calls.append(("unconfigure", space))


class FakeNames:
    def __init__(self) -> None:
        self.remote: dict[str, list[Member]] = {}

    def set_remote(self, space: str, members: list[Member]) -> None:
        self.remote[space] = list(members)

    def forget_remote(self, space: str) -> None:
        self.remote.pop(space, None)


def sync(network: FakeNetwork, names: FakeNames | None = None) -> SpaceSync:
    return SpaceSync(network, lambda: UNDERLAY, names)  # type: ignore[arg-type]


@pytest.mark.parametrize(("change", "message"), [
    ({"spaces": [{**request()["spaces"][0], "vni": 0}]}, "p.spaces[0].vni"),
    ({"spaces": [{**request()["spaces"][0], "slice": "10.65.0.0/24"}]}, "p.spaces[0].slice"),
    ({"spaces": [{**request()["spaces"][0], "subnet": "10.64.0.1/18"}]}, "p.spaces[0].subnet"),
    ({"spaces": [{**request()["spaces"][0], "extra": 1}]}, "unknown key"),
    ({"spaces": request()["spaces"] * 2}, "listed twice"),
    ({"hosts": ["not-an-address"]}, "p.hosts[0]"),
    ({"port": 0}, "p.port"),
    ({"generation": True}, "p.generation"),
])
def test_bad_params_are_refused_naming_the_field_and_nothing_is_applied(
        change: dict[str, Any], message: str) -> None:
    network = FakeNetwork()
    with pytest.raises(errors.BadRequest, match=message.replace("[", r"\[").replace("]", r"\]")):
        asyncio.run(sync(network).handle(request(**change)))
    assert network.calls == []


def test_a_member_outside_the_subnet_is_refused() -> None:
    p = copy.deepcopy(request())
    p["spaces"][0]["members"][1]["ip"] = "10.99.0.2"
    with pytest.raises(errors.BadRequest, match=r"members\[1\]\.ip"):
        parse(p)


def test_each_space_is_configured_and_only_remote_members_get_tunnel_entries() -> None:
    network, names = FakeNetwork(), FakeNames()
    result = asyncio.run(sync(network, names).handle(request()))
    assert result == {"generation": 3, "ignored": False, "applied": ["alpha"], "failed": []}
    assert network.calls == [
        ("fleet", (IPv4Network("10.64.0.0/10"),),
         (IPv4Address("192.0.2.1"), IPv4Address("192.0.2.2")), 4789),
        ("configure", "alpha", IPv4Network("10.64.0.0/18"), IPv4Network("10.64.1.0/24"), 7,
         IPv4Address(UNDERLAY), 1450),
        ("peers", "alpha", {IPv4Address("10.64.2.2"): IPv4Address("192.0.2.2")}),
    ]
    assert [m.name for m in names.remote["alpha"]] == ["web.2"]


def test_a_failing_space_is_reported_and_the_others_applied() -> None:
    network = FakeNetwork(refuse={"alpha"})
    beta = {**request()["spaces"][0], "space": "beta", "vni": 8, "members": []}
    result = asyncio.run(sync(network).handle(request(spaces=[request()["spaces"][0], beta])))
    assert result["applied"] == ["beta"]
    assert result["failed"] == [{"space": "alpha", "code": "bad_request",
                                 "message": "configure-space: space alpha: subnet "
                                            "10.64.0.0/18 overlaps the host's network "
                                            "10.64.0.0/16 (eth1)"}]


def test_an_older_generation_is_ignored_and_a_space_no_longer_listed_loses_its_overlay() -> None:
    network, names = FakeNetwork(), FakeNames()
    spaces = sync(network, names)

    async def run() -> list[dict[str, Any]]:
        return [await spaces.handle(request()),
                await spaces.handle(request(generation=2, spaces=[])),
                await spaces.handle(request(generation=4, spaces=[]))]
    _, older, newer = asyncio.run(run())
    assert older["ignored"] is True and newer["ignored"] is False
    assert network.calls[-1] == ("unconfigure", "alpha")
    assert sum(1 for c in network.calls if c[0] == "unconfigure") == 1
    assert names.remote == {}


def test_without_an_underlay_address_the_agent_is_not_ready() -> None:
    network = FakeNetwork()
    spaces = SpaceSync(network, lambda: None)  # type: ignore[arg-type]
    with pytest.raises(errors.NotReady, match="overlay_address"):
        asyncio.run(spaces.handle(request()))
    assert network.calls == []


def test_a_member_whose_host_has_no_underlay_gets_no_tunnel_entry() -> None:
    p = copy.deepcopy(request())
    p["spaces"][0]["members"][1]["host"] = None
    network = FakeNetwork()
    asyncio.run(sync(network).handle(p))
    assert ("peers", "alpha", {}) in network.calls


def test_generations_are_compared_within_one_connection_only() -> None:
    network = FakeNetwork()
    spaces = sync(network)

    async def run() -> list[dict[str, Any]]:
        first = await spaces.handle(request(generation=10))
        spaces.new_connection()  # another coordinator, its clock behind
        return [first, await spaces.handle(request(generation=5))]
    _, behind = asyncio.run(run())
    assert behind["ignored"] is False and behind["applied"] == ["alpha"]


def test_a_partial_sync_leaves_unlisted_spaces_and_drops_only_the_removed_ones() -> None:
    network = FakeNetwork()
    spaces = sync(network)
    beta = {**request()["spaces"][0], "space": "beta", "vni": 8, "members": []}
    gamma = {**beta, "space": "gamma", "vni": 9}

    async def run() -> None:
        await spaces.handle(request(spaces=[request()["spaces"][0], beta, gamma]))
        network.calls.clear()
        await spaces.handle(request(generation=4, partial=True, spaces=[beta],
                                    removed=["gamma"]))
    asyncio.run(run())
    assert [c[:2] for c in network.calls if c[0] != "fleet"] == [
        ("configure", "beta"), ("peers", "beta"), ("unconfigure", "gamma")]
    assert spaces.configured == {"alpha", "beta"}


def test_removed_without_partial_is_refused() -> None:
    with pytest.raises(errors.BadRequest, match=r"p\.removed"):
        parse(request(removed=["alpha"]))
