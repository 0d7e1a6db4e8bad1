"""App log drains through `dynocoord serve` with a real etcd and simulated agents: `drains:add`
reaches the hosts that run the app (and no other) with `drains.sync`, restarting no dyno; a
host the app spreads to later hears them too; they survive a coordinator restart; removal
reaches the hosts; bad input is refused; an agent that does not know `drains.sync` is asked
once and keeps its dynos."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from dynocoord.etcd import EtcdClient
from tests.privileged.dynocoord.test_fleet_coordinator import (
    Cluster,
    call,
    cli,
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

SYSLOG = "syslog+tls://logs.example:6514"
HTTPS = "https://user:pass@collector.example/heroku?token=t"


@pytest.fixture
async def fleet(own_etcd: EtcdProcess, tmp_path: Path) -> AsyncIterator[Cluster]:
    async with running_cluster(own_etcd, tmp_path) as cluster:
        yield cluster


def agent(cluster: Cluster, n: int, url: str, *, drains_sync: bool = True) -> FakeAgent:
    return cluster.agent(n, [url], drains_sync=drains_sync)


def up(fake: FakeAgent, app: str) -> dict[str, Any]:
    """The app's dynos up on the host: id -> (pid, since), which a restart would change."""
    return {d["id"]: (d["pid"], d["since"]) for d in fake.dynos()
            if d["app"] == app and d["state"] == "up"}


def drains(fake: FakeAgent, app: str) -> list[str]:
    return (fake.drains or {}).get(app, [])


async def test_drains_reach_the_apps_hosts_only_restart_nothing_and_survive_a_restart(
        fleet: Cluster) -> None:
    replica = await leading_replica(fleet)
    hosts = [agent(fleet, n, replica.agent_url) for n in range(3)]
    old = agent(fleet, 3, replica.agent_url, drains_sync=False)
    await until(lambda: all(x.connected for x in (*hosts, old)), 10, "agents connected")
    await deploy(replica.url, "shop", 1)
    await deploy(replica.url, "blog", 4)
    everyone = (*hosts, old)
    await until(lambda: sum(len(up(x, "shop")) for x in everyone) == 1 and
                sum(len(up(x, "blog")) for x in everyone) == 4, 20, "shop's and blog's dynos")
    (runs_shop,) = [x for x in everyone if up(x, "shop")]
    before = {x.agent_id: (up(x, "shop"), up(x, "blog")) for x in everyone}
    states_before = {x.agent_id: len(x.events()) for x in everyone}

    added = await asyncio.to_thread(cli, replica, fleet.token_file, "drains:add", SYSLOG,
                                    "-a", "shop")
    assert added.returncode == 0, added.stderr
    assert added.stdout == f"Successfully added drain {SYSLOG}\n"
    await call(replica.url, "POST", "/v1/apps/shop/log-drains", {"url": HTTPS}, expect=201)
    if runs_shop is not old:
        await until(lambda: drains(runs_shop, "shop") == [SYSLOG, HTTPS], 10,
                    "shop's drains on its host")
    await asyncio.sleep(1.0)  # time for anything wrongly sent or restarted to show
    for x in everyone:
        if x is not runs_shop:
            assert drains(x, "shop") == [], x.agent_id
    # No dyno was replaced or restarted, and no dyno.state was published for one.
    assert {x.agent_id: (up(x, "shop"), up(x, "blog")) for x in everyone} == before
    assert {x.agent_id: len(x.events()) for x in everyone} == states_before
    # The old agent was asked once, and that was that.
    assert len(old.requests("drains.sync")) == 1 and old.drains is None

    listed = await asyncio.to_thread(cli, replica, fleet.token_file, "drains", "-a", "shop")
    assert listed.stdout.splitlines() == ["=== Drains", SYSLOG, HTTPS]
    assert await call(replica.url, "GET", "/v1/apps/shop/log-drains", expect=200) == \
        [{"url": SYSLOG}, {"url": HTTPS}]
    assert await call(replica.url, "GET", "/v1/apps/blog/log-drains", expect=200) == []

    # Refused, and nothing written.
    conflict = await call(replica.url, "POST", "/v1/apps/shop/log-drains", {"url": SYSLOG},
                          expect=409)
    assert conflict["error"]["code"] == "conflict"
    bad = await call(replica.url, "POST", "/v1/apps/shop/log-drains",
                     {"url": "ftp://logs.example"}, expect=422)
    assert bad["error"]["field"] == "url" and "syslog://" in bad["error"]["message"]
    for n in range(3):
        await call(replica.url, "POST", "/v1/apps/shop/log-drains",
                   {"url": f"syslog://logs.example:{n + 1}"}, expect=201)
    full = await call(replica.url, "POST", "/v1/apps/shop/log-drains",
                      {"url": "syslog://logs.example:9"}, expect=422)
    assert "5 drains" in full["error"]["message"]
    await call(replica.url, "DELETE", "/v1/apps/shop/log-drains?url=syslog://nowhere:1",
               expect=404)
    await call(replica.url, "POST", "/v1/apps/nope/log-drains", {"url": SYSLOG}, expect=404)
    for n in range(3):
        await call(replica.url, "DELETE", "/v1/apps/shop/log-drains?url=" +
                   quote(f"syslog://logs.example:{n + 1}", safe=""), expect=200)

    # The app spreads to every host: each new one hears its drains.
    await scale(replica.url, "shop", 4)
    await until(lambda: sum(len(up(x, "shop")) for x in everyone) == 4, 20, "four shop dynos")
    shop_hosts = [x for x in hosts if up(x, "shop")]
    assert len(shop_hosts) >= 2
    await until(lambda: all(drains(x, "shop") == [SYSLOG, HTTPS] for x in shop_hosts), 20,
                "shop's drains on every host it runs on")

    # A coordinator restart: the drains come back from etcd.
    replica.kill()
    async with EtcdClient(fleet.etcd.url) as client:
        kept = await client.get(f"{fleet.prefix}/apps/shop".encode())
    assert kept is not None and b"log_drains" in kept.value
    for x in hosts:
        x.drains = None
    again = fleet.replica("c1-again", port=replica.port)
    await until(lambda: all(drains(x, "shop") == [SYSLOG, HTTPS] for x in shop_hosts), 30,
                "shop's drains from the restarted coordinator")

    removed = await asyncio.to_thread(cli, again, fleet.token_file, "drains:remove", SYSLOG,
                                      "-a", "shop")
    assert removed.returncode == 0, removed.stderr
    assert removed.stdout == f"Successfully removed drain {SYSLOG}\n"
    await until(lambda: all(drains(x, "shop") == [HTTPS] for x in shop_hosts), 10,
                "the removal on every host")
    await call(again.url, "DELETE", "/v1/apps/shop/log-drains?url=" + quote(HTTPS, safe=""),
               expect=200)
    await until(lambda: all(x.drains == {} for x in shop_hosts), 10,
                "no drains left anywhere")
    assert len(old.requests("drains.sync")) <= 2  # once per connection at most
