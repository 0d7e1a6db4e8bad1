"""Private spaces on the coordinator (dynocoord.spaces): the pool cut into subnets, slices and
VNIs, the records and keys that keep them, `dynocoord serve`'s addressing options, and the
view each host gets in `spaces.sync`."""

from __future__ import annotations

from ipaddress import IPv4Network, ip_address, ip_network
from pathlib import Path
from typing import Any

import pytest

from dynocoord import keys as keyspace
from dynocoord import model, spaces
from dynocoord.model import Host, HostNetwork, HostState, Invalid, Placement, Space, SpaceSlice
from dynocoord.server import parse_args
from dynocoord.spaces import Addressing, allocate, fleet_view

# Wide spaces and slices (/18 and /24) make the addresses in these tests easy to read.
WIDE = Addressing(IPv4Network("10.64.0.0/10"), 18, 24)

NOW = "2026-12-03T02:00:00.000000+00:00"
POOL = IPv4Network("10.64.0.0/10")


def net(text: str) -> IPv4Network:
    return IPv4Network(text)


# ---------------------------------------------------------------- allocation

def test_subnets_are_cut_in_order_and_the_pool_runs_out_with_a_clear_error() -> None:
    small = Addressing(net("10.0.0.0/22"), 24, 28)
    got = allocate(small, [f"app-{n}" for n in range(5)], [], {}, {}, [])
    assert [(s.space, s.subnet) for s in got.spaces] == [
        (f"app-{n}", net(f"10.0.{n}.0/24")) for n in range(4)]
    assert got.errors == {"app-4": "the space pool 10.0.0.0/22 has no free /24 left"}


def test_a_subnet_overlapping_a_host_network_is_skipped() -> None:
    avoid = [ip_network("10.64.0.0/18"), ip_network("10.64.64.7/32"),
             ip_network("2001:db8::/32"), ip_network("0.0.0.0/0")]  # a default route: no clash
    got = allocate(WIDE, ["aaa"], [], {}, {}, avoid)
    assert got.spaces == [Space("aaa", net("10.64.128.0/18"), 1)]
    # A host network that covers the whole pool leaves nothing.
    got = allocate(WIDE, ["aaa"], [], {}, {}, [ip_network("10.0.0.0/8")])
    assert got.spaces == [] and "no free /18" in got.errors["aaa"]


def test_slices_and_vnis_are_the_first_free_ones() -> None:
    space = Space("alpha", net("10.64.0.0/18"), 3)
    have = {h: SpaceSlice("alpha", h, net(cut)) for h, cut in
            (("h1", "10.64.0.0/24"), ("h3", "10.64.2.0/24"))}
    got = allocate(WIDE, [], [("alpha", "h2")], {"alpha": space}, {"alpha": have}, [])
    assert got.slices == [SpaceSlice("alpha", "h2", net("10.64.1.0/24"))]
    tiny = Addressing(net("10.64.0.0/28"), 28, 29)
    got = allocate(tiny, [], [("alpha", f"h{n}") for n in (1, 2, 3)], {}, {}, [])
    assert [str(s.slice) for s in got.slices] == ["10.64.0.0/29", "10.64.0.8/29"]
    assert got.errors == {"alpha": "the space subnet 10.64.0.0/28 has no free /29 slice left "
                                   "for host h3"}
    taken = {n: Space(n, net(f"10.{64 + i}.0.0/18"), vni) for i, (n, vni) in
             enumerate((("aaa", 1), ("bbb", 2), ("ddd", 4)))}
    got = allocate(WIDE, ["ccc", "eee"], [], taken, {}, [])
    assert [(s.space, s.vni) for s in got.spaces] == [("ccc", 3), ("eee", 5)]


def test_allocate_gives_each_space_its_own_subnet_and_vni_and_each_host_its_own_slice() -> None:
    old = Space("alpha", net("10.64.0.0/18"), 1)
    kept = SpaceSlice("alpha", "h1", net("10.64.0.0/24"))
    got = allocate(WIDE, ["gamma"], [("alpha", "h1"), ("alpha", "h2"), ("beta", "h1"),
                                            ("beta", "h2"), ("beta", "h3")],
                   {"alpha": old}, {"alpha": {"h1": kept}}, [ip_network("10.64.64.0/20")])
    assert got.errors == {}
    assert got.spaces == [Space("beta", net("10.64.128.0/18"), 2),
                          Space("gamma", net("10.64.192.0/18"), 3)]
    # h1 keeps its slice of alpha; h2 gets the next; beta's hosts get distinct slices.
    assert got.slices == [SpaceSlice("alpha", "h2", net("10.64.1.0/24")),
                          SpaceSlice("beta", "h1", net("10.64.128.0/24")),
                          SpaceSlice("beta", "h2", net("10.64.129.0/24")),
                          SpaceSlice("beta", "h3", net("10.64.130.0/24"))]
    # Nothing new when everything is allocated already.
    again = allocate(WIDE, ["alpha"], [("alpha", "h1")], {"alpha": old},
                     {"alpha": {"h1": kept}}, [])
    assert (again.spaces, again.slices, again.errors) == ([], [], {})


def test_allocate_reports_a_full_pool_per_space_and_gives_no_slice_without_a_subnet() -> None:
    tiny = Addressing(net("10.64.0.0/18"), 18, 24)
    got = allocate(tiny, [], [("alpha", "h1"), ("beta", "h1")], {}, {}, [])
    assert [s.space for s in got.spaces] == ["alpha"]
    assert [(s.space, s.host) for s in got.slices] == [("alpha", "h1")]
    assert set(got.errors) == {"beta"} and "no free /18" in got.errors["beta"]


def test_a_freed_vni_and_subnet_are_reused() -> None:
    left = {"bbb": Space("bbb", net("10.64.64.0/18"), 2)}
    got = allocate(WIDE, ["ccc"], [], left, {}, [])
    assert got.spaces == [Space("ccc", net("10.64.0.0/18"), 1)]


# ---------------------------------------------------------------- records and keys

def test_space_records_and_keys_round_trip() -> None:
    keys = keyspace.Keys("/fleet")
    space = Space("alpha", net("10.64.0.0/18"), 17)
    cut = SpaceSlice("alpha", "agent-1", net("10.64.2.0/24"))
    assert Space.from_json(space.to_json()) == space
    assert SpaceSlice.from_json(cut.to_json()) == cut
    assert space.to_dict() == {"space": "alpha", "subnet": "10.64.0.0/18", "vni": 17}
    assert keys.space("alpha") == "/fleet/spaces/alpha"
    assert keys.parse_space(keys.space("alpha")) == "alpha"
    assert keys.slice("alpha", "agent-1") == "/fleet/slices/alpha/agent-1"
    assert keys.parse_slice(keys.slice("alpha", "agent-1")) == ("alpha", "agent-1")
    assert keys.slices("alpha") == "/fleet/slices/alpha/"
    with pytest.raises(keyspace.BadKey):
        keys.parse_slice("/fleet/slices/alpha")


@pytest.mark.parametrize(("data", "field"), [
    ({"space": "alpha", "subnet": "10.64.0.1/18", "vni": 1}, "subnet"),  # host bits
    ({"space": "alpha", "subnet": "fd00::/64", "vni": 1}, "subnet"),
    ({"space": "alpha", "subnet": "10.64.0.0/18", "vni": 0}, "vni"),
    ({"space": "alpha", "subnet": "10.64.0.0/18", "vni": 2**24}, "vni"),
    ({"space": "Alpha", "subnet": "10.64.0.0/18", "vni": 1}, "space"),
])
def test_bad_space_records_are_refused(data: dict[str, Any], field: str) -> None:
    with pytest.raises(Invalid) as refused:
        Space.from_dict(data)
    assert refused.value.field == field


def _hello(**extra: Any) -> dict[str, Any]:
    return {"agent_id": "agent-1", "host": "h1", "boot_id": "b" * 32, "version": "1",
            "capacity": {"cpus": 2, "memory_bytes": 1 << 30}, **extra}


def test_a_hosts_network_from_hello_is_kept_and_old_records_still_load() -> None:
    host = Host.from_hello(_hello(network={"underlay": "192.0.2.7", "mtu": 9000,
                                           "networks": ["192.0.2.7/24", "10.1.0.0/16"],
                                           "later": "ignored"}), HostState.READY, NOW)
    assert host.network == HostNetwork(ip_address("192.0.2.7"), 9000,
                                       (ip_network("192.0.2.0/24"), ip_network("10.1.0.0/16")))
    assert Host.from_json(host.to_json()) == host
    moved = Host.from_json(host.to_json())
    assert moved.to_dict()["network"] == {"underlay": "192.0.2.7", "mtu": 9000,
                                          "networks": ["192.0.2.0/24", "10.1.0.0/16"]}
    # An agent from before spaces, and the record it left.
    old = Host.from_hello(_hello(), HostState.READY, NOW)
    assert old.network is None and "network" not in old.to_dict()
    assert Host.from_json(old.to_json()) == old
    nulls = Host.from_hello(_hello(network={"underlay": None, "mtu": None, "networks": []}),
                            HostState.READY, NOW)
    assert nulls.network == HostNetwork()


@pytest.mark.parametrize(("network", "field"), [
    ({"underlay": "not-an-ip"}, "network.underlay"),
    ({"mtu": 20}, "network.mtu"),
    ({"mtu": True}, "network.mtu"),
    ({"networks": "10.0.0.0/8"}, "network.networks"),
    ({"networks": ["10.0.0.0/33"]}, "network.networks"),
    ({"networks": ["10.0.0.0/8"] * (model.NETWORKS_MAX + 1)}, "network.networks"),
])
def test_a_bad_network_in_hello_is_refused(network: dict[str, Any], field: str) -> None:
    with pytest.raises(Invalid) as refused:
        Host.from_hello(_hello(network=network), HostState.READY, NOW)
    assert refused.value.field == field


# ---------------------------------------------------------------- dynocoord serve's options

def test_addressing_options_are_parsed_and_checked(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    token = tmp_path / "token"
    token.write_text("t\n")
    base = ["--etcd", "http://127.0.0.1:2379", "--token-file", str(token)]
    settings = parse_args(base)
    assert settings.addressing == Addressing(net("10.64.0.0/10"), 20, 27, 4789)
    settings = parse_args([*base, "--space-pool", "172.16.0.0/12", "--space-prefix", "16",
                           "--slice-prefix", "29", "--overlay-port", "8472"])
    assert settings.addressing == Addressing(net("172.16.0.0/12"), 16, 29, 8472)
    for bad, said in ((["--space-pool", "10.64.0.1/10"], "host bits"),
                      (["--space-pool", "fd00::/8"], "IPv4"),
                      (["--space-pool", "nope"], "space pool"),
                      (["--space-prefix", "8"], "pool prefix (10) <= space prefix (8)"),
                      (["--slice-prefix", "18"], "space prefix (20) < slice prefix (18)"),
                      (["--slice-prefix", "30"], "<= 29"),
                      (["--overlay-port", "0"], "1…65535")):
        with pytest.raises(SystemExit) as ended:
            parse_args([*base, *bad])
        assert ended.value.code == 2, bad
        assert said in capsys.readouterr().err, bad


# ---------------------------------------------------------------- each host's view

def _host(n: int, state: HostState = HostState.READY, mtu: int | None = 1500,
          underlay: str | None = "") -> Host:
    address = f"192.0.2.{n}" if underlay == "" else underlay
    return Host(f"h{n}", f"host-{n}", state, model.Capacity(4, 1 << 33), {}, "b" * 32, "1", NOW,
                HostNetwork(None if address is None else ip_address(address), mtu, ()))


def _placement(app: str, name: str, host: int) -> Placement:
    return Placement(f"{app}-{name.replace('.', '-')}", app, name, 1, "standard-1x",
                     f"h{host}", 1)


def _status(p: Placement, ip: str | None, state: str = "up") -> dict[str, Any]:
    return {"id": p.id, "app": p.app, "name": p.name, "state": state, "ip": ip}


class World:
    """Three hosts; alpha on h1 and h2, beta on h2; slices given."""

    def __init__(self) -> None:
        self.hosts = {h.id: h for h in (_host(1), _host(2, mtu=9000), _host(3, mtu=1400))}
        self.placements = [_placement("alpha", "web.1", 1), _placement("alpha", "web.2", 2),
                           _placement("alpha", "worker.1", 2), _placement("beta", "web.1", 2)]
        self.ips = {"alpha-web-1": "10.64.0.2", "alpha-web-2": "10.64.1.2",
                    "alpha-worker-1": None, "beta-web-1": "10.64.65.2"}
        self.spaces = {"alpha": Space("alpha", net("10.64.0.0/18"), 1),
                       "beta": Space("beta", net("10.64.64.0/18"), 2)}
        self.slices = {"alpha": {"h1": SpaceSlice("alpha", "h1", net("10.64.0.0/24")),
                                 "h2": SpaceSlice("alpha", "h2", net("10.64.1.0/24"))},
                       "beta": {"h2": SpaceSlice("beta", "h2", net("10.64.65.0/24"))}}

    def view(self, host: str, keep: tuple[str, ...] = ()) -> dict[str, Any]:
        statuses: dict[str, dict[str, Any]] = {}
        for p in self.placements:
            statuses.setdefault(p.host, {})[p.id] = _status(p, self.ips.get(p.id))
        return fleet_view(WIDE, self.hosts, self.placements, statuses, self.spaces,
                          self.slices).for_host(host, keep)


def test_a_hosts_view_lists_its_spaces_with_members_on_every_host() -> None:
    world = World()
    view = world.view("h1")
    assert view == {
        "port": 4789, "hosts": ["192.0.2.1", "192.0.2.2", "192.0.2.3"],
        "pools": ["10.64.0.0/10"],
        "spaces": [{"space": "alpha", "subnet": "10.64.0.0/18", "slice": "10.64.0.0/24",
                    "vni": 1, "mtu": 1450,
                    "members": [
                        {"app": "alpha", "name": "web.1", "ip": "10.64.0.2",
                         "host": "192.0.2.1", "state": "up"},
                        {"app": "alpha", "name": "web.2", "ip": "10.64.1.2",
                         "host": "192.0.2.2", "state": "up"}]}]}  # worker.1: no ip yet
    h2 = world.view("h2")
    assert [(e["space"], e["slice"]) for e in h2["spaces"]] == [("alpha", "10.64.1.0/24"),
                                                                 ("beta", "10.64.65.0/24")]
    assert h2["spaces"][0]["members"] == view["spaces"][0]["members"]
    # h3 runs nothing: no space, but it hears the fleet's hosts.
    assert world.view("h3")["spaces"] == [] and world.view("h3")["hosts"] == view["hosts"]


def test_a_lost_hosts_dynos_leave_every_view_and_the_host_leaves_the_hosts() -> None:
    world = World()
    world.hosts["h2"] = _host(2, HostState.LOST)
    view = world.view("h1")
    assert [m["name"] for m in view["spaces"][0]["members"]] == ["web.1"]
    assert view["hosts"] == ["192.0.2.1", "192.0.2.3"]
    # A draining host still runs its dynos: they stay.
    world.hosts["h2"] = _host(2, HostState.DRAINING)
    assert [m["name"] for m in world.view("h1")["spaces"][0]["members"]] == ["web.1", "web.2"]


def test_the_mtu_is_the_smallest_underlay_mtu_of_the_spaces_hosts_less_vxlan() -> None:
    world = World()
    world.placements.append(_placement("alpha", "web.3", 3))  # h3: mtu 1400
    assert world.view("h1")["spaces"][0]["mtu"] == 1350
    assert world.view("h2")["spaces"][1]["mtu"] == 8950  # beta only on h2 (9000)
    # Hosts that report no MTU count as 1500; an IPv6 underlay costs 20 more.
    world.hosts = {h.id: h for h in (_host(1, mtu=None), _host(2, mtu=None),
                                     _host(3, mtu=None))}
    assert world.view("h1")["spaces"][0]["mtu"] == 1450
    world.hosts["h3"] = _host(3, mtu=1500, underlay="2001:db8::3")
    assert world.view("h1")["spaces"][0]["mtu"] == spaces.DEFAULT_UNDERLAY_MTU - 70


def test_members_of_a_host_without_an_underlay_are_told_to_that_host_only() -> None:
    world = World()
    world.hosts["h2"] = _host(2, underlay=None)
    assert [m["name"] for m in world.view("h1")["spaces"][0]["members"]] == ["web.1"]
    own = world.view("h2")["spaces"][0]["members"]
    assert [(m["name"], m["host"]) for m in own] == [("web.1", "192.0.2.1"), ("web.2", None)]
    assert world.view("h1")["hosts"] == ["192.0.2.1", "192.0.2.3"]


def test_a_space_kept_for_a_host_stays_until_dropped_and_unallocated_spaces_are_left_out(
        ) -> None:
    world = World()
    world.placements = [p for p in world.placements if p.host != "h1"]
    assert world.view("h1")["spaces"] == []
    kept = world.view("h1", keep=("alpha",))["spaces"]
    assert [(e["space"], e["slice"]) for e in kept] == [("alpha", "10.64.0.0/24")]
    del world.spaces["beta"]
    assert [e["space"] for e in world.view("h2")["spaces"]] == ["alpha"]
