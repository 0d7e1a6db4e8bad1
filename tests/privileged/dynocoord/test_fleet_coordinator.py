"""`dynocoord serve` against a real etcd, driven through its platform API, with simulated agents
(tests/support/fakeagent.py: the real protocol, no dynos launched): placement across hosts, a
lost host's dynos placed elsewhere, a returning host's stale dynos removed, the coordinator
killed and restarted (and a leader killed with a replica waiting) without disturbing a dyno,
and bad input refused without a write."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import pytest

from agent.coordinator.link import CoordinatorLink, LinkState
from dynocoord.etcd import EtcdClient
from tests.support.dynocoord import ROOT, Replica, request
from tests.support.etcd import EtcdProcess
from tests.support.fakeagent import FakeAgent
from tests.support.names import unique
from tests.support.pki import OpensslMissing, make_pki

TOKEN = "fleet-test-token"
GIB = 1 << 30


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def api(url: str, method: str, path: str, body: Any = None,
        token: str = TOKEN) -> tuple[int, Any]:
    return request(url + path, method, body, token)


async def call(url: str, method: str, path: str, body: Any = None,
               expect: int | None = None, token: str = TOKEN) -> Any:
    status, answer = await asyncio.to_thread(api, url, method, path, body, token)
    if expect is not None:
        assert status == expect, f"{method} {path}: {status} {answer}"
    return answer


async def until(check: Any, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = check()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(0.1)
    raise AssertionError(f"{what}: not within {timeout_s}s; last: {last!r}")


async def leading(replica: Replica) -> bool:
    status, _ = await asyncio.to_thread(api, replica.url, "GET", "/v1/apps")
    return status == 200


class Cluster:
    def __init__(self, etcd: EtcdProcess, tmp: Path) -> None:
        self.etcd = etcd
        self.prefix = f"/{unique('fleet', 6)}"
        self.token_file = tmp / "token"
        self.token_file.write_text(TOKEN + "\n")
        self.tmp = tmp
        self.replicas: list[Replica] = []
        self.agents: list[FakeAgent] = []

    def replica(self, name: str, port: int | None = None,
                extra_args: tuple[str, ...] = ()) -> Replica:
        replica = Replica(etcd_url=self.etcd.url, prefix=self.prefix,
                          token_file=self.token_file, name=name, log_dir=self.tmp,
                          address="127.0.0.1", port=port or free_port(),
                          extra_args=extra_args).start()
        self.replicas.append(replica)
        return replica

    def agent(self, n: int, urls: list[str], **options: Any) -> FakeAgent:
        """A started fake agent `agent-n` on `host-n`; `options` go to FakeAgent as well."""
        agent = FakeAgent(urls, TOKEN, f"agent-{n}", f"host-{n}",
                          capacity={"cpus": 4, "memory_bytes": 8 * GIB},
                          boot_delay_s=0.2, ping_interval_s=1.0, backoff_min_s=0.1,
                          backoff_max_s=0.5, heartbeat_interval_s=1.0, **options)
        agent.start()
        self.agents.append(agent)
        return agent

    def up(self) -> dict[str, list[str]]:
        """Formation dynos up on each connected agent: host -> sorted names."""
        return {a.host: sorted(d["name"] for d in a.dynos() if d["state"] == "up")
                for a in self.agents}

    def logs(self) -> str:
        return "\n".join(f"--- {r.log.name}\n{r.log_tail()}" for r in self.replicas)


@contextlib.asynccontextmanager
async def running_cluster(etcd: EtcdProcess, tmp: Path) -> AsyncIterator[Cluster]:
    """A Cluster whose agents are closed and replicas stopped after."""
    fleet = Cluster(etcd, tmp)
    try:
        yield fleet
    finally:
        for agent in fleet.agents:
            await agent.close()
        for replica in fleet.replicas:
            replica.stop()


@pytest.fixture
async def cluster(own_etcd: EtcdProcess, tmp_path: Path) -> AsyncIterator[Cluster]:
    async with running_cluster(own_etcd, tmp_path) as fleet:
        yield fleet


async def deploy_web(url: str, app: str, web: int) -> None:
    """Create `app` with a `web` process type and scale it to `web` dynos."""
    await call(url, "POST", "/v1/apps", {"name": app}, expect=201)
    await call(url, "POST", f"/v1/apps/{app}/releases",
               {"slug": {"path": f"/var/lib/dynoagent/slugs/{app}"}, "stack": "host",
                "process_types": {"web": "python3 server.py"}}, expect=201)
    await scale_web(url, app, web)


async def scale_web(url: str, app: str, web: int) -> None:
    await call(url, "PATCH", f"/v1/apps/{app}/formation", {"web": {"quantity": web}},
               expect=200)


async def deploy(url: str, app: str = "shop", web: int = 3, worker: int = 3) -> None:
    await call(url, "POST", "/v1/apps", {"name": app}, expect=201)
    await call(url, "POST", f"/v1/apps/{app}/releases",
               {"slug": {"path": "/var/lib/dynoagent/slugs/shop"}, "stack": "host",
                "process_types": {"web": "python3 server.py", "worker": "python3 work.py"},
                "env": {"GREETING": "hi"}}, expect=201)
    await call(url, "PATCH", f"/v1/apps/{app}/formation",
               {"web": {"quantity": web}, "worker": {"quantity": worker}}, expect=200)


def total_up(up: dict[str, list[str]]) -> list[str]:
    return sorted(name for names in up.values() for name in names)


SIX = sorted([f"web.{n}" for n in (1, 2, 3)] + [f"worker.{n}" for n in (1, 2, 3)])


async def leading_replica(cluster: Cluster, name: str = "c1") -> Replica:
    replica = cluster.replica(name)
    await until(lambda: leading(replica), 20, f"{name} leading")
    return replica


async def shop_on_three_hosts(cluster: Cluster) -> Replica:
    """A leading coordinator, three agents, and `shop` (web=3 worker=3) up on them."""
    replica = await leading_replica(cluster)
    for n in range(3):
        cluster.agent(n, [replica.agent_url])
    await deploy(replica.url)
    await until(lambda: total_up(cluster.up()) == SIX, 20, "six dynos up")
    return replica


async def test_formation_spreads_over_hosts_and_a_lost_hosts_dynos_move_at_once(
        cluster: Cluster) -> None:
    replica = await shop_on_three_hosts(cluster)
    agents = cluster.agents[:]
    up = cluster.up()
    # Spread: every host runs one web and one worker.
    assert all(sorted(n.split(".")[0] for n in names) == ["web", "worker"]
               for names in up.values()), up
    listed = await call(replica.url, "GET", "/v1/apps/shop/dynos", expect=200)
    assert sorted(d["name"] for d in listed) == SIX
    assert {d["state"] for d in listed} == {"up"}, listed

    # The host dies at once (no close frame): its two dynos are placed and up elsewhere.
    victim = agents[0]
    moved = set(cluster.up()[victim.host])
    started = time.monotonic()
    await victim.kill()
    cluster.agents.remove(victim)

    def replaced() -> bool:
        return total_up(cluster.up()) == SIX
    await until(replaced, 15, "the lost host's dynos up on the other hosts")
    elapsed = time.monotonic() - started
    print(f"lost host -> replacements up in {elapsed:.1f}s (host TTL 3 s)")
    assert elapsed < 10, elapsed
    hosts = await call(replica.url, "GET", "/v1/hosts", expect=200)
    assert {h["host"]: h["state"] for h in hosts}["host-0"] == "lost"
    assert moved

    # It comes back: its stale copies are removed by its first sync, never doubled.
    cluster.agents.append(victim)
    await victim.restart()
    await until(lambda: victim.connected and not victim.dynos(), 15,
                "the returning host's stale dynos removed")
    assert total_up(cluster.up()) == SIX
    hosts = await call(replica.url, "GET", "/v1/hosts", expect=200)
    assert {h["host"]: h["state"] for h in hosts}["host-0"] == "ready"


async def test_coordinator_killed_and_restarted_disturbs_no_dyno(cluster: Cluster) -> None:
    replica = await shop_on_three_hosts(cluster)
    before = {a.host: {d["id"]: d["pid"] for d in a.dynos()} for a in cluster.agents}
    events_before = sum(len(a.events()) for a in cluster.agents)

    replica.kill()
    # On the same port: the agents dial the same URL.
    again = cluster.replica("c1-again", port=replica.port)
    await until(lambda: leading(again), 20, "the restarted coordinator leading")
    await until(lambda: all(a.connected for a in cluster.agents), 20, "agents reconnected")
    # Every agent got its desired set again, as it was: nothing started, stopped or replaced.
    await until(lambda: all(len(a.requests("dynos.sync")) >= 2 for a in cluster.agents), 20,
                "a sync after the reconnect")
    await asyncio.sleep(1)
    after = {a.host: {d["id"]: d["pid"] for d in a.dynos()} for a in cluster.agents}
    assert after == before
    assert sum(len(a.events()) for a in cluster.agents) == events_before, \
        "a dyno changed state across the coordinator's restart"
    listed = await call(again.url, "GET", "/v1/apps/shop/dynos", expect=200)
    assert sorted(d["name"] for d in listed) == SIX


async def test_leader_killed_the_replica_leads_and_no_dyno_is_disturbed(
        cluster: Cluster) -> None:
    first = await leading_replica(cluster)
    second = cluster.replica("c2")
    await asyncio.sleep(1)
    status, answer = await asyncio.to_thread(api, second.url, "GET", "/v1/apps")
    assert status == 503 and answer["error"]["code"] == "not_leader", answer
    urls = [first.agent_url, second.agent_url]
    for n in range(3):
        cluster.agent(n, urls)
    await deploy(first.url)
    await until(lambda: total_up(cluster.up()) == SIX, 20, "six dynos up")
    before = {a.host: {d["id"]: d["pid"] for d in a.dynos()} for a in cluster.agents}
    events_before = sum(len(a.events()) for a in cluster.agents)

    first.kill()
    killed_at = time.monotonic()
    await until(lambda: leading(second), 20, "c2 leading")
    print(f"failover: c2 leads {time.monotonic() - killed_at:.1f}s after c1's SIGKILL")
    await until(lambda: all(a.connected and a.url == second.agent_url for a in cluster.agents),
                20, "agents on c2")
    await asyncio.sleep(1.5)
    after = {a.host: {d["id"]: d["pid"] for d in a.dynos()} for a in cluster.agents}
    assert after == before
    assert sum(len(a.events()) for a in cluster.agents) == events_before
    assert sorted(d["name"] for d in await call(second.url, "GET", "/v1/apps/shop/dynos",
                                                expect=200)) == SIX


async def test_bad_input_is_refused_and_writes_nothing(cluster: Cluster) -> None:
    replica = await leading_replica(cluster)
    await call(replica.url, "POST", "/v1/apps", {"name": "shop"}, expect=201)
    async with EtcdClient(cluster.etcd.url) as client:
        before = (await client.get_prefix(cluster.prefix.encode())).kvs
        cases = [
            ("POST", "/v1/apps", {"name": "Bad_Name"}, 422),
            ("POST", "/v1/apps", {"name": "shop"}, 409),
            ("POST", "/v1/apps", {"name": "ok-app", "extra": 1}, 422),
            ("GET", "/v1/apps/nope", None, 404),
            ("PATCH", "/v1/apps/nope/formation", {"web": {"quantity": 1}}, 404),
            ("PATCH", "/v1/apps/shop/formation", {"web": {"quantity": -1}}, 422),
            ("PATCH", "/v1/apps/shop/formation", {"web": {"size": "huge"}}, 422),
            ("POST", "/v1/apps/shop/releases",
             {"slug": {"path": "/x"}, "process_types": {"web": "x" * (70 << 10)}}, 422),
            ("POST", "/v1/apps/shop/releases", {"slug": {"url": "http://x/s.tgz"},
                                                "process_types": {"web": "w"}}, 422),
            ("PATCH", "/v1/apps/shop/config", {"1BAD": "v"}, 409),
            ("POST", "/v1/hosts/nohost/drain", None, 404),
        ]
        for method, path, body, want in cases:
            status, answer = await asyncio.to_thread(api, replica.url, method, path, body)
            assert status == want, (method, path, status, answer)
            assert isinstance(answer, dict) and answer["error"]["message"], answer
        status, _ = await asyncio.to_thread(api, replica.url, "GET", "/v1/apps", None, "wrong")
        assert status == 401
        after = (await client.get_prefix(cluster.prefix.encode())).kvs
    assert after == before



def release_dynos(cluster: Cluster) -> list[tuple[FakeAgent, dict[str, Any]]]:
    return [(a, d) for a in cluster.agents for d in a.dynos()
            if d["name"].startswith("release.") and d["state"] == "up"]


async def test_release_phase_gates_a_rollout_that_keeps_the_app_serving(
        cluster: Cluster) -> None:
    replica = await shop_on_three_hosts(cluster)
    types = {"web": "python3 server.py", "worker": "python3 work.py",
             "release": "python3 migrate.py"}
    slug = {"path": "/var/lib/dynoagent/slugs/shop2"}

    # v2's release phase succeeds: then, and only then, the formation rolls to v2.
    answer = await call(replica.url, "POST", "/v1/apps/shop/releases",
                        {"slug": slug, "stack": "host", "process_types": types}, expect=201)
    assert answer == {"version": 2, "status": "pending"}
    agent, dyno = (await until(lambda: release_dynos(cluster), 10, "release.1 up"))[0]
    assert dyno["command"] == "python3 migrate.py"
    listed = await call(replica.url, "GET", "/v1/apps/shop/dynos", expect=200)
    assert {d["release"] for d in listed if d["type"] != "release"} == {1}
    serving: list[int] = []

    async def rolled() -> bool:
        listed = await call(replica.url, "GET", "/v1/apps/shop/dynos", expect=200)
        serving.append(sum(1 for d in listed if d["type"] == "web" and d["state"] == "up"))
        formation = [d for d in listed if d["type"] in ("web", "worker")]
        return len(formation) == 6 and all(d["release"] == 2 and d["state"] == "up"
                                           for d in formation)
    agent.exit_process(dyno["id"], 0)
    await until(rolled, 30, "every formation dyno on v2 and up")
    # Preboot: a new web dyno is up before the old one it replaces stops.
    assert min(serving) >= 3, f"web dynos up while rolling: {serving}"
    releases = await call(replica.url, "GET", "/v1/apps/shop/releases", expect=200)
    assert [(r["version"], r["status"]) for r in releases] == [(1, "succeeded"),
                                                                (2, "succeeded")]

    # v3's release phase fails: v3 is not deployed, v2 keeps running untouched.
    before = {a.host: {d["id"] for d in a.dynos()} for a in cluster.agents}
    await call(replica.url, "POST", "/v1/apps/shop/releases",
               {"slug": slug, "stack": "host", "process_types": types,
                "env": {"BROKEN": "1"}}, expect=201)
    agent, dyno = (await until(lambda: release_dynos(cluster), 10, "release.N up"))[0]
    agent.exit_process(dyno["id"], 1)

    async def failed() -> Any:
        releases = await call(replica.url, "GET", "/v1/apps/shop/releases", expect=200)
        return releases[-1]["status"] == "failed" and releases[-1]
    outcome = await until(failed, 10, "v3 failed")
    assert outcome["version"] == 3 and outcome["release_phase"]["exit_status"] == 1
    await asyncio.sleep(1)
    after = {a.host: {d["id"] for d in a.dynos() if not d["name"].startswith("release.")}
             for a in cluster.agents}
    assert after == {h: {i for i in ids if i != dyno["id"]} for h, ids in before.items()}
    info = await call(replica.url, "GET", "/v1/apps/shop", expect=200)
    assert info["release"] == 2


async def test_etcd_restarted_the_coordinator_waits_and_carries_on(cluster: Cluster) -> None:
    replica = await shop_on_three_hosts(cluster)
    before = {a.host: {d["id"]: d["pid"] for d in a.dynos()} for a in cluster.agents}
    cluster.etcd.stop()
    status, answer = await asyncio.to_thread(api, replica.url, "PATCH",
                                             "/v1/apps/shop/formation",
                                             {"worker": {"quantity": 4}})
    assert status == 503, (status, answer)
    await asyncio.sleep(2)
    cluster.etcd.start()
    await until(lambda: leading(replica), 30, "c1 leading again")
    await call(replica.url, "PATCH", "/v1/apps/shop/formation", {"worker": {"quantity": 4}},
               expect=200)
    await until(lambda: len(total_up(cluster.up())) == 7, 20, "worker.4 up")
    after = {a.host: {d["id"]: d["pid"] for d in a.dynos() if d["name"] != "worker.4"}
             for a in cluster.agents}
    assert after == before, "a dyno was disturbed by etcd's restart"


def cli(replica: Replica, token_file: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dynocoord.cli", "--coordinator", replica.url,
                           "--token-file", str(token_file), *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=30)


async def test_the_cli_drives_the_real_coordinator(cluster: Cluster) -> None:
    replica = await leading_replica(cluster)
    for n in range(2):
        cluster.agent(n, [replica.agent_url])
    await until(lambda: all(a.connected for a in cluster.agents), 10, "agents connected")
    steps = [("apps:create", "shop"),
             ("releases:create", "-a", "shop", "--slug", "/var/lib/dynoagent/slugs/shop",
              "--stack", "host", "--process", "web=python3 server.py"),
             ("ps:scale", "-a", "shop", "web=2:standard-2x"),
             ("config:set", "-a", "shop", "GREETING=hello")]
    for argv in steps:
        done = await asyncio.to_thread(cli, replica, cluster.token_file, *argv)
        assert done.returncode == 0, (argv, done.stdout, done.stderr)
    await until(lambda: len(total_up(cluster.up())) == 2, 20, "two web dynos up")

    def all_on_v2() -> bool:
        listed = api(replica.url, "GET", "/v1/apps/shop/dynos")[1]
        return len(listed) == 2 and all(d["release"] == 2 and d["state"] == "up"
                                        for d in listed)
    await until(lambda: asyncio.to_thread(all_on_v2), 20, "config:set rolled out as v2")
    ps = await asyncio.to_thread(cli, replica, cluster.token_file, "ps", "-a", "shop")
    assert ps.returncode == 0, ps.stderr
    assert "=== web (Standard-2X): python3 server.py (2)" in ps.stdout, ps.stdout
    assert ps.stdout.count(": up ") == 2, ps.stdout
    hosts = await asyncio.to_thread(cli, replica, cluster.token_file, "hosts", "--json")
    assert sorted(h["host"] for h in json.loads(hosts.stdout)) == ["host-0", "host-1"]
    config = await asyncio.to_thread(cli, replica, cluster.token_file, "config", "-a", "shop")
    assert "GREETING" in config.stdout and "hello" in config.stdout, config.stdout
    bad = await asyncio.to_thread(cli, replica, cluster.token_file, "ps", "-a", "nope")
    assert bad.returncode == 1 and "nope" in bad.stderr, (bad.stdout, bad.stderr)


async def test_a_drained_host_gets_its_dynos_moved_and_nothing_new(cluster: Cluster) -> None:
    replica = await shop_on_three_hosts(cluster)
    drained = cluster.agents[0]
    answer = await call(replica.url, "POST", f"/v1/hosts/{drained.agent_id}/drain",
                        expect=200)
    assert answer["state"] == "draining"
    await until(lambda: not cluster.up()[drained.host] and total_up(cluster.up()) == SIX, 15,
                "the drained host's dynos up on the others")
    await call(replica.url, "PATCH", "/v1/apps/shop/formation", {"worker": {"quantity": 5}},
               expect=200)
    await until(lambda: len(total_up(cluster.up())) == 8, 15, "two more workers up")
    assert not cluster.up()[drained.host], "nothing new is placed on a draining host"
    hosts = {h["host"]: h for h in await call(replica.url, "GET", "/v1/hosts", expect=200)}
    assert hosts[drained.host]["state"] == "draining" and hosts[drained.host]["dynos"] == 0


async def test_a_one_off_runs_on_a_host_with_room_and_reports_its_end(cluster: Cluster) -> None:
    replica = await shop_on_three_hosts(cluster)
    created = await call(replica.url, "POST", "/v1/apps/shop/dynos",
                         {"command": "python3 manage.py check", "size": "standard-2x"},
                         expect=201)
    assert created["name"] == "run.1" and created["size"] == "standard-2x"
    owner = await until(lambda: next((a for a in cluster.agents for d in a.dynos()
                                      if d["id"] == created["id"]), None), 10, "run.1 placed")
    status = next(d for d in owner.dynos() if d["id"] == created["id"])
    assert status["command"] == "python3 manage.py check"
    owner.exit_process(created["id"], 0)

    async def complete() -> bool:
        listed = await call(replica.url, "GET", "/v1/apps/shop/dynos", expect=200)
        return any(d["id"] == created["id"] and d["state"] == "complete"
                   and d["exit_status"] == 0 for d in listed)
    await until(complete, 10, "run.1 complete with status 0")
    for bad, field in (({"command": ""}, "command"), ({"command": "x", "size": "huge"}, "size"),
                       ({"command": "x", "extra": 1}, "command")):
        status_code, answer = await asyncio.to_thread(api, replica.url, "POST",
                                                      "/v1/apps/shop/dynos", bad)
        assert status_code == 422 and answer["error"]["field"] == field, answer


async def test_tls_for_the_api_and_mutual_tls_for_agents(cluster: Cluster,
                                                         tmp_path: Path) -> None:
    try:
        pki = make_pki(tmp_path)
    except OpensslMissing as exc:
        pytest.skip(f"needs {exc} to make test certificates")
    replica = cluster.replica("tls", extra_args=(
        "--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key"),
        "--tls-client-ca", str(pki / "ca.pem")))
    assert replica.url.startswith("https://")

    def apps() -> subprocess.CompletedProcess[str]:
        return cli(replica, cluster.token_file, "--ca-file", str(pki / "ca.pem"), "apps")
    listed = await until(lambda: asyncio.to_thread(lambda: (done := apps()).returncode == 0
                                                   and done), 20, "the API over https")
    assert listed.returncode == 0
    unverified = await asyncio.to_thread(cli, replica, cluster.token_file, "apps")
    assert unverified.returncode == 1 and "certificate" in unverified.stderr.lower(), \
        unverified.stderr

    # The agent's own link: with its client certificate it is a host; without, refused.
    token = tmp_path / "agent-token"
    token.write_text(TOKEN)

    def link(agent_id: str, client_cert: bool) -> CoordinatorLink:
        hello = {"agent_id": agent_id, "host": agent_id, "version": "test", "protocol": 1,
                 "boot_id": "b" * 32, "capacity": {"cpus": 2, "memory_bytes": 4 * GIB},
                 "labels": {}, "generation": None, "draining": False, "dynos": []}
        return CoordinatorLink(
            replica.agent_url, lambda method, params: asyncio.sleep(0, {}), lambda: hello,
            lambda: [], token_file=token, ca_file=pki / "ca.pem",
            client_cert_file=pki / "client.pem" if client_cert else None,
            client_key_file=pki / "client.key" if client_cert else None,
            backoff_min_s=0.1, backoff_max_s=0.3)
    with_cert, without = link("tls-agent", True), link("bare-agent", False)
    with_cert.start()
    without.start()
    try:
        await until(lambda: with_cert.state is LinkState.CONNECTED, 15, "agent over mTLS")
        await until(lambda: without.counters.connect_failures >= 2, 15, "refusals")
        assert without.state is not LinkState.CONNECTED
        assert "403" in (without.last_error or ""), without.last_error
        hosts = await asyncio.to_thread(cli, replica, cluster.token_file, "--ca-file",
                                        str(pki / "ca.pem"), "hosts", "--json")
        assert [h["id"] for h in json.loads(hosts.stdout)] == ["tls-agent"], hosts.stdout
    finally:
        await with_cert.close()
        await without.close()


async def test_after_etcd_stalled_past_a_host_ttl_a_lost_host_is_still_noticed(
        cluster: Cluster) -> None:
    """etcd frozen longer than a host's TTL (3 s) but not the leader's lease (5 s), as a
    loaded etcd may be: every host stays, and one that dies afterwards is still found lost
    and its dynos moved."""
    replica = await shop_on_three_hosts(cluster)
    pid = cluster.etcd.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        await asyncio.sleep(4)
    finally:
        os.kill(pid, signal.SIGCONT)
    await until(lambda: leading(replica), 30, "leading again after the stall")
    await until(lambda: all(a.connected for a in cluster.agents), 20, "agents connected")
    await until(lambda: total_up(cluster.up()) == SIX, 20, "six dynos up")
    victim = cluster.agents[0]
    await victim.kill()
    cluster.agents.remove(victim)
    started = time.monotonic()
    await until(lambda: total_up(cluster.up()) == SIX, 15, "the dead host's dynos moved")
    print(f"after the stall: lost host -> replacements up in {time.monotonic() - started:.1f}s")
    await victim.close()


async def test_malformed_agent_frames_are_refused_and_change_nothing(cluster: Cluster) -> None:
    replica = await shop_on_three_hosts(cluster)
    async with EtcdClient(cluster.etcd.url) as client:
        before = (await client.get_prefix(cluster.prefix.encode())).kvs
        async with aiohttp.ClientSession() as session:
            headers = {"Authorization": f"Bearer {TOKEN}"}
            # Garbage instead of hello: the connection is closed, nothing recorded.
            for first in (b"\xc1\xc1", b"not msgpack", msgpack.packb([1, 2]),
                          msgpack.packb({"t": "req", "id": 1, "m": "dyno.start", "p": {}}),
                          msgpack.packb({"t": "req", "id": 1, "m": "hello", "p": {"x": 1}})):
                async with session.ws_connect(replica.agent_url, protocols=("dynoagent.v1",),
                                              headers=headers) as ws:
                    await ws.send_bytes(first)
                    message = await ws.receive(timeout=10)
                    while message.type is aiohttp.WSMsgType.BINARY:  # an error answer
                        assert msgpack.unpackb(message.data)["e"]["code"] == "bad_request"
                        message = await ws.receive(timeout=10)
                    assert message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
            # A wrong token: refused before the upgrade.
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await session.ws_connect(replica.agent_url, protocols=("dynoagent.v1",),
                                         headers={"Authorization": "Bearer wrong"})
            assert refused.value.status == 401
        # A connected agent sending garbage after hello: ignored, the agent keeps its dynos.
        agent = cluster.agents[0]
        assert agent._ws is not None
        for junk in (b"\xc1", msgpack.packb({"t": "evt", "m": "dyno.state", "p": "x"}),
                     msgpack.packb({"t": "res", "id": 99999, "p": {}})):
            await agent._ws.send_bytes(junk)
        await asyncio.sleep(1)
        assert agent.connected and total_up(cluster.up()) == SIX
        after = (await client.get_prefix(cluster.prefix.encode())).kvs
    assert [(kv.key, kv.value) for kv in after] == [(kv.key, kv.value) for kv in before]
