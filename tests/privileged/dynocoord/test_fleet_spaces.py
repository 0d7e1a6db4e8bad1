"""Private spaces through `dynocoord serve` with a real etcd and simulated agents: every host
of a space gets `spaces.sync` with the space's subnet, its own slice and the members on every
host, before the `dynos.sync` that starts the space's first dyno there; a lost host's members
are withdrawn; the addressing survives a coordinator restart; an agent that does not know
`spaces.sync` still runs its dynos."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest

from dynocoord.etcd import EtcdClient
from tests.privileged.dynocoord.test_fleet_coordinator import (
    Cluster,
    call,
    leading_replica,
    running_cluster,
    until,
)
from tests.privileged.dynocoord.test_fleet_coordinator import (
    deploy_web as deploy,
)
from tests.privileged.dynocoord.test_fleet_coordinator import (
    scale_web as scale,
)
from tests.support.etcd import EtcdProcess
from tests.support.fakeagent import FakeAgent


@pytest.fixture
async def fleet(own_etcd: EtcdProcess, tmp_path: Path) -> AsyncIterator[Cluster]:
    async with running_cluster(own_etcd, tmp_path) as cluster:
        yield cluster


def agent(cluster: Cluster, n: int, url: str, *, spaces_sync: bool = True,
          mtu: int = 1500, stop_delay_s: float = 0.01) -> FakeAgent:
    network = {"underlay": f"192.0.2.{n + 1}", "mtu": mtu,
               "networks": [f"192.0.2.{n + 1}/24"]} if spaces_sync else None
    return cluster.agent(n, [url], network=network, spaces_sync=spaces_sync,
                         stop_delay_s=stop_delay_s)


def entry(fake: FakeAgent, space: str) -> dict[str, Any] | None:
    """The space's entry in the last spaces.sync the agent applied."""
    return next((e for e in (fake.spaces or {}).get("spaces", ()) if e["space"] == space),
                None)


def addressing(fake: FakeAgent, space: str) -> dict[str, Any]:
    found = entry(fake, space)
    assert found is not None, f"{fake.agent_id} has no {space}"
    return {k: found[k] for k in ("subnet", "slice", "vni")}


def members(fake: FakeAgent, space: str) -> list[tuple[str, str, str]]:
    found = entry(fake, space)
    return sorted((m["name"], m["ip"], m["host"]) for m in found["members"]) if found else []


def up_ips(fake: FakeAgent, app: str) -> dict[str, str]:
    return {d["name"]: d["ip"] for d in fake.dynos() if d["app"] == app and d["state"] == "up"}


async def test_every_host_of_a_space_hears_its_slice_and_the_members_on_all_hosts(
        fleet: Cluster) -> None:
    replica = await leading_replica(fleet)
    a, b = agent(fleet, 0, replica.agent_url, mtu=9000), agent(fleet, 1, replica.agent_url)
    old = agent(fleet, 2, replica.agent_url, spaces_sync=False)
    await until(lambda: all(x.connected for x in (a, b, old)), 10, "agents connected")
    await deploy(replica.url, "alpha", 3)
    await until(lambda: sum(len(up_ips(x, "alpha")) for x in (a, b, old)) == 3, 20,
                "alpha's three web dynos up")

    def both_see_both() -> bool:
        want = sorted([*((n, ip, "192.0.2.1") for n, ip in up_ips(a, "alpha").items()),
                       *((n, ip, "192.0.2.2") for n, ip in up_ips(b, "alpha").items())])
        return len(want) == 2 and members(a, "alpha") == members(b, "alpha") == want
    await until(both_see_both, 10, "both hosts' spaces.sync listing both hosts' dynos")
    ea, eb = entry(a, "alpha"), entry(b, "alpha")
    assert ea is not None and eb is not None
    subnet = IPv4Network(ea["subnet"])
    assert eb["subnet"] == ea["subnet"] and ea["vni"] == eb["vni"]
    slices = IPv4Network(ea["slice"]), IPv4Network(eb["slice"])
    assert slices[0] != slices[1] and all(s.subnet_of(subnet) for s in slices)
    assert subnet.subnet_of(IPv4Network("10.64.0.0/10"))
    # The dynos took their addresses from their host's slice (the fake agent does so).
    assert IPv4Address(next(iter(up_ips(a, "alpha").values()))) in slices[0]
    assert ea["mtu"] == eb["mtu"] == 1450  # min(9000, 1500) - 50
    assert a.spaces is not None
    assert (a.spaces["port"], a.spaces["pools"]) == (4789, ["10.64.0.0/10"])
    assert a.spaces["hosts"] == ["192.0.2.1", "192.0.2.2"]  # the old agent reported none

    # The space came before the dynos.sync that started its first dyno there.
    for fake in (a, b):
        methods = [(r.method, r.params) for r in fake.received if r.method in
                   ("spaces.sync", "dynos.sync")]
        first_dyno = next(i for i, (m, p) in enumerate(methods) if m == "dynos.sync" and
                          any(d["app"] == "alpha" for d in p["dynos"]))
        assert any(m == "spaces.sync" and any(e["space"] == "alpha" for e in p["spaces"])
                   for m, p in methods[:first_dyno]), methods

    # An agent that does not know spaces.sync was asked once and runs its dyno all the same.
    assert len(old.requests("spaces.sync")) == 1 and len(up_ips(old, "alpha")) == 1
    info = await call(replica.url, "GET", "/v1/apps/alpha", expect=200)
    assert info["space"]["subnet"] == str(subnet) and info["space"]["vni"] == ea["vni"]
    # The old agent's host has a slice too (an agent updated in place uses it).
    assert {k: v for k, v in info["space"]["slices"].items() if k != "agent-2"} == \
        {"agent-0": str(slices[0]), "agent-1": str(slices[1])}
    assert len(set(info["space"]["slices"].values())) == 3
    listed = await call(replica.url, "GET", "/v1/spaces", expect=200)
    assert listed == [info["space"]]

    # b dies: its members leave a's view, and so does b itself.
    b_names = set(up_ips(b, "alpha"))
    await b.kill()
    fleet.agents.remove(b)
    await until(lambda: a.spaces is not None and "192.0.2.2" not in a.spaces["hosts"]
                and all(host != "192.0.2.2" for _, _, host in members(a, "alpha")), 15,
                "b's members withdrawn from a's view")
    await b.close()
    # Its dyno was placed again on a live host; on a it shows up as a's.
    if b_names:
        await until(lambda: len(up_ips(a, "alpha")) + len(up_ips(old, "alpha")) == 3, 15,
                    "b's dyno up elsewhere")


async def test_the_addressing_survives_a_coordinator_restart(fleet: Cluster) -> None:
    replica = await leading_replica(fleet)
    b = agent(fleet, 1, replica.agent_url)
    await until(lambda: b.connected, 10, "b connected")
    # gone takes the first subnet and VNI, beta the second; gone is then deleted, so that a
    # coordinator that forgot beta's would give it the first ones again.
    await call(replica.url, "POST", "/v1/apps", {"name": "gone"}, expect=201)
    await deploy(replica.url, "beta", 1)
    await call(replica.url, "DELETE", "/v1/apps/gone", expect=200)
    await until(lambda: entry(b, "beta"), 20, "beta on b")
    # a comes later: it gets the second slice, though its id sorts first.
    a = agent(fleet, 0, replica.agent_url)
    await until(lambda: a.connected, 10, "a connected")
    await scale(replica.url, "beta", 2)
    await until(lambda: entry(a, "beta") and len(members(b, "beta")) == 2, 20,
                "beta on both hosts")
    before = {x.agent_id: addressing(x, "beta") for x in (a, b)}
    assert before["agent-1"]["subnet"] == "10.64.16.0/20" and before["agent-1"]["vni"] == 2
    assert before["agent-0"]["slice"] == "10.64.16.32/27"
    async with EtcdClient(fleet.etcd.url) as client:
        kept = (await client.get_prefix(f"{fleet.prefix}/slices/".encode())).kvs
    assert sorted(kv.key.decode().rsplit("/", 2)[1] for kv in kept) == ["beta", "beta"]

    replica.kill()
    for x in (a, b):
        x.spaces = None
    again = fleet.replica("c1-again", port=replica.port)
    await until(lambda: all(entry(x, "beta") for x in (a, b)), 30,
                "spaces.sync from the restarted coordinator")
    after = {x.agent_id: addressing(x, "beta") for x in (a, b)}
    assert after == before
    info = await call(again.url, "GET", "/v1/apps/beta", expect=200)
    assert info["space"]["subnet"] == "10.64.16.0/20"
    await asyncio.sleep(0)


async def test_dynos_placed_before_spaces_get_addresses_when_a_leader_starts(
        fleet: Cluster) -> None:
    replica = await leading_replica(fleet)
    a = agent(fleet, 0, replica.agent_url)
    await until(lambda: a.connected, 10, "a connected")
    await deploy(replica.url, "older", 1)
    await until(lambda: up_ips(a, "older"), 20, "older's dyno up")
    replica.kill()
    # As a coordinator from before spaces left it: placements, no space records.
    async with EtcdClient(fleet.etcd.url) as client:
        for tree in ("spaces", "slices"):
            await client.delete(f"{fleet.prefix}/{tree}/".encode(), prefix=True)
    a.spaces = None
    fleet.replica("c1-again", port=replica.port)
    found = await until(lambda: entry(a, "older"), 30, "older's space after the restart")
    assert (found["subnet"], found["slice"], found["vni"]) == ("10.64.0.0/20", "10.64.0.0/27",
                                                                1)


async def test_a_host_leaves_a_space_only_once_its_last_dyno_of_it_stopped(
        fleet: Cluster) -> None:
    replica = await leading_replica(fleet)
    # Dynos take a second to stop, as a real one takes its time after SIGTERM.
    a, b = (agent(fleet, n, replica.agent_url, stop_delay_s=1.0) for n in (0, 1))
    await until(lambda: a.connected and b.connected, 10, "agents connected")
    await deploy(replica.url, "alpha", 2)
    await until(lambda: len(up_ips(a, "alpha")) == len(up_ips(b, "alpha")) == 1, 20,
                "alpha on both hosts")
    await scale(replica.url, "alpha", 1)
    left = await until(lambda: next((x for x in (a, b) if entry(x, "alpha") is None), None),
                       20, "a host without alpha in its view")

    def alpha_down() -> Any:
        return next((r for r in left.sent if r.method == "dyno.state" and
                     r.params["app"] == "alpha" and r.params["state"] == "down"), None)
    down = await until(alpha_down, 10, "alpha's dyno down")
    syncs = [r for r in left.received if r.method == "spaces.sync"]
    had = [any(e["space"] == "alpha" for e in r.params["spaces"]) for r in syncs]
    dropped = syncs[had.index(True) + had[had.index(True):].index(False)]
    assert dropped.at > down.at, "the space left the host before its dyno had stopped"
