"""A fleet of real agents under `dynocoord serve`: etcd and the coordinator in one test host,
three agents each in a test host of its own, all on one bridge. An app with web=3 worker=3
spreads over the three hosts; the busiest host dies at once (its link down, its agent, holder
and dynos SIGKILLed) and its dynos are up on the two others within 10 s; it comes back and its
stale dynos go without ever being doubled; the coordinator SIGKILLed and restarted, the leader
SIGKILLed with a second replica waiting, and etcd restarted disturb no dyno.

The tests share one fleet and run in order, each from where the last one left it."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import COORDINATED_SETTINGS
from tests.e2e.test_chaos import holder_pids
from tests.e2e.test_log_drains import receiver
from tests.e2e.test_supervision import make_slug
from tests.support.agentproc import AgentProcess, ApiError
from tests.support.dynocoord import OPENER, Replica, request
from tests.support.etcd import EtcdProcess
from tests.support.names import unique
from tests.support.testhost import Lan, NetnsThread, TestHost, new_lan, new_test_host
from tests.support.wait import wait_for

TOKEN = "fleet-e2e-token"
APP = "shop"
ROOT = Path(__file__).resolve().parents[2]
# Fixed ports: the coordinator's test host is a fresh namespace, below etcd's ephemeral ones.
PORTS = (7501, 7502)
# A host unheard of for 3 s is lost: failover well inside the 10 s.
HOST_TTL_S = 3
# A restarted leader waits this long for agents (reconnecting with backoff) before it counts
# a host without a lease as lost.
TAKEOVER_GRACE_S = 20
SIX = sorted([f"web.{n}" for n in (1, 2, 3)] + [f"worker.{n}" for n in (1, 2, 3)])
WORKER_LOOP = "while :; do sleep 10; done"
# The dynos are tiny: a quota far below the default 512 MiB, on this small machine.
AGENT_SETTINGS = {**COORDINATED_SETTINGS,
                  "sizes": {"standard-1x": {"memory_mb": 64}}}


def agent_url(address: str, port: int) -> str:
    return f"ws://{address}:{port}/v1/agents/connect"


@dataclass
class Member:
    """One agent's test host and the agent in it."""

    host: TestHost
    agent: AgentProcess
    host_id: str = ""

    def dynos(self) -> list[dict[str, Any]]:
        """The agent's own view of its dynos (none while it is down)."""
        try:
            found: list[dict[str, Any]] = self.agent.api("GET", "/v1/dynos", timeout_s=10)
        except (OSError, ApiError):
            return []
        return found

    def up(self) -> list[str]:
        """The app's formation dynos this host runs and has `up`."""
        return sorted(d["name"] for d in self.dynos() if d["app"] == APP and d["state"] == "up"
                      and d["name"].split(".")[0] in ("web", "worker"))

    def link(self) -> dict[str, Any]:
        info: dict[str, Any] = self.agent.api("GET", "/v1/info", timeout_s=10)["coordinator"]
        return info


@dataclass
class Fleet:
    hub: TestHost
    lan: Lan
    etcd: EtcdProcess
    base: Path
    client: NetnsThread
    slug: Path
    prefix: str = field(default_factory=lambda: f"/{unique('fleet', 6)}")
    members: list[Member] = field(default_factory=list)
    replicas: dict[str, Replica] = field(default_factory=dict)

    @property
    def token_file(self) -> Path:
        return self.base / "token"

    @property
    def address(self) -> str:
        """The coordinator's test host on the LAN: where every replica listens."""
        return str(self.lan.address(self.hub).ip)

    def replica(self, name: str, port: int) -> Replica:
        replica = Replica(etcd_url=self.etcd.url, prefix=self.prefix,
                          token_file=self.token_file, name=name, log_dir=self.base,
                          address=self.address, port=port, netns=self.hub,
                          host_ttl_s=HOST_TTL_S, takeover_grace_s=TAKEOVER_GRACE_S).start()
        self.replicas[name] = replica
        return replica

    def api(self, replica: Replica, method: str, path: str,
            body: Any = None) -> tuple[int, Any]:
        """One request to `replica`'s platform API, from inside the coordinator's test host:
        (status, decoded body), status 0 when nothing answered."""
        return self.client.call(request, replica.url + path, method, body, TOKEN)

    def call(self, replica: Replica, method: str, path: str, body: Any = None,
             expect: int = 200) -> Any:
        status, answer = self.api(replica, method, path, body)
        assert status == expect, f"{method} {path}: {status} {answer}"
        return answer

    def leads(self, replica: Replica) -> bool:
        return self.api(replica, "GET", "/v1/apps")[0] == 200

    def up(self) -> dict[str, list[str]]:
        """Formation dynos up, by host id, as each agent sees them."""
        return {m.host_id: m.up() for m in self.members}

    def pids(self) -> dict[str, tuple[str, int, int]]:
        """Every dyno of every agent: id -> (state, pid, restarts)."""
        return {d["id"]: (d["state"], d["pid"], d["restarts"])
                for m in self.members for d in m.dynos()}

    def logs(self) -> str:
        return "\n".join(f"--- {r.log.name}\n{r.log_tail()}" for r in self.replicas.values())


def total(up: dict[str, list[str]]) -> list[str]:
    return sorted(name for names in up.values() for name in names)


def start_fleet(stack: contextlib.ExitStack, base: Path, slug: Path, name: str,
                ports: tuple[int, ...] = PORTS) -> Fleet:
    """etcd and the coordinator replica c1 in a hub test host, and an agent in each of three
    test hosts (given the URLs of `ports`), all on one LAN; undone by `stack`, the slug too."""
    (base / "token").write_text(TOKEN + "\n")
    stack.callback(shutil.rmtree, slug, ignore_errors=True)
    hub = stack.enter_context(new_test_host(f"{name}c"))
    hosts = [stack.enter_context(new_test_host(f"{name}h")) for _ in range(3)]
    lan = stack.enter_context(new_lan([hub, *hosts]))
    etcd = EtcdProcess(netns=hub)
    stack.callback(etcd.close)
    etcd.start()
    client = stack.enter_context(NetnsThread(hub))
    fleet = Fleet(hub, lan, etcd, base, client, slug)
    stack.callback(_teardown, fleet)
    c1 = fleet.replica("c1", PORTS[0])
    wait_for(lambda: fleet.leads(c1), 20, interval_s=0.1, what="c1 leading")
    urls = [agent_url(fleet.address, port) for port in ports]
    for host in hosts:
        agent = AgentProcess(netns=host.name, extra={
            **AGENT_SETTINGS, "coordinator_url": urls,
            "coordinator_token_file": str(fleet.token_file)})
        member = Member(host, agent)
        fleet.members.append(member)
        agent.start()
        member.host_id = agent.api("GET", "/v1/info")["agent_id"]
    return fleet


@contextlib.contextmanager
def logs_on_failure(fleet: Fleet, request: pytest.FixtureRequest) -> Iterator[None]:
    """Every agent connected; the replicas' and agents' logs printed if a test failed."""
    failed_before = request.session.testsfailed
    try:
        wait_for(lambda: all(m.link()["state"] == "connected" for m in fleet.members),
                 20, interval_s=0.1, what="agents connected")
        yield
    except BaseException:
        print_logs(fleet)
        raise
    if request.session.testsfailed > failed_before:
        print_logs(fleet)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory,
          request: pytest.FixtureRequest) -> Iterator[Fleet]:
    with contextlib.ExitStack() as stack:
        # Both replicas' URLs from the start: c2 only runs for the failover test.
        fleet = start_fleet(stack, tmp_path_factory.mktemp("fleet"), make_slug(), "dt")
        with logs_on_failure(fleet, request):
            yield fleet


def print_logs(fleet: Fleet) -> None:
    print(fleet.logs())
    for member in fleet.members:
        print(f"--- agent {member.host_id}\n{member.agent.log()[-6000:]}")


def _teardown(fleet: Fleet) -> None:
    """The app deleted through the coordinator (each agent stops and removes its dynos);
    then every process by pid, and whatever a failed test left, removed by force."""
    leader = next((r for r in fleet.replicas.values() if fleet.leads(r)), None)
    if leader is not None:
        with contextlib.suppress(Exception):
            fleet.api(leader, "DELETE", f"/v1/apps/{APP}")
            wait_for(lambda: not any(m.dynos() for m in fleet.members), 30, interval_s=0.2,
                     what="every dyno removed")
    for replica in fleet.replicas.values():
        replica.stop()
    for member in fleet.members:
        with contextlib.suppress(Exception):
            for status in member.dynos():
                member.agent.api("DELETE", f"/v1/dynos/{status['id']}", timeout_s=30)
        member.agent.stop()
        left = member.agent.force_leftovers_away()
        member.agent.cleanup()
        if left:
            print(f"agent {member.host_id} left {left}")


def deploy(fleet: Fleet, replica: Replica) -> None:
    fleet.call(replica, "POST", "/v1/apps", {"name": APP}, expect=201)
    fleet.call(replica, "POST", f"/v1/apps/{APP}/releases",
               {"slug": {"path": str(fleet.slug)}, "stack": "host",
                "process_types": {"web": "python3 /app/server.py", "worker": WORKER_LOOP}},
               expect=201)
    fleet.call(replica, "PATCH", f"/v1/apps/{APP}/formation",
               {"web": {"quantity": 3}, "worker": {"quantity": 3}})


def listed(fleet: Fleet, replica: Replica) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = fleet.call(replica, "GET", f"/v1/apps/{APP}/dynos")
    return found


def all_listed_up(fleet: Fleet, replica: Replica, names: list[str]) -> bool:
    """The coordinator lists exactly `names`, every one `up` (its sessions' view)."""
    status, found = fleet.api(replica, "GET", f"/v1/apps/{APP}/dynos")
    return status == 200 and sorted(d["name"] for d in found) == names \
        and all(d["state"] == "up" for d in found)


def test_formation_spreads_over_the_three_hosts(fleet: Fleet) -> None:
    c1 = fleet.replicas["c1"]
    deploy(fleet, c1)

    def six_up() -> dict[str, list[str]] | None:
        up = fleet.up()
        return up if total(up) == SIX else None
    up = wait_for(six_up, 30, interval_s=0.1, what="six dynos up")
    assert up is not None
    # Spread: every host runs one web and one worker.
    assert all(sorted(n.split(".")[0] for n in names) == ["web", "worker"]
               for names in up.values()), up
    wait_for(lambda: all_listed_up(fleet, c1, SIX), 10, interval_s=0.1,
             what="the coordinator lists six dynos up")
    placed = {d["name"]: d["host_id"] for d in listed(fleet, c1)}
    assert placed == {name: host for host, names in up.items() for name in names}


def test_logs_from_every_host_merged_in_time_order(fleet: Fleet) -> None:
    """`GET /v1/apps/{app}/logs`: each host's lines (`logs.tail`), merged by time."""
    c1 = fleet.replicas["c1"]

    def lines() -> list[str] | None:
        status, text = fleet.api(c1, "GET", f"/v1/apps/{APP}/logs?tail=500")
        assert status == 200, text
        found = [line for line in str(text).splitlines() if line]
        booted = {line.split("[", 1)[1].split("]", 1)[0] for line in found
                  if "State changed from starting to up" in line}
        return found if booted >= set(SIX) else None
    found = wait_for(lines, 15, interval_s=0.2, what="every dyno's `up` line in the logs")
    assert found is not None
    stamps = [line.split(" ", 1)[0] for line in found]
    assert stamps == sorted(stamps), "lines of several hosts, merged in time order"
    status, text = fleet.api(c1, "GET", f"/v1/apps/{APP}/logs?tail=500&dyno=web.1")
    assert status == 200
    assert {line.split("[", 1)[1].split("]", 1)[0] for line in str(text).splitlines()} \
        == {"web.1"}, text


def kill_processes(member: Member) -> None:
    """The agent, its holder and every process of its dynos SIGKILLed (by pid)."""
    agent = member.agent
    assert agent.proc is not None
    root = agent.settings["cgroup_root"]

    def dyno_pids() -> set[int]:
        found: set[int] = set()
        for procs in Path("/sys/fs/cgroup").glob(f"*/{root}/**/cgroup.procs"):
            with contextlib.suppress(OSError, ValueError):
                found.update(int(pid) for pid in procs.read_text().split())
        return found

    holders = holder_pids(agent)
    assert holders, "no holder to kill"
    for pid in [agent.proc.pid, *holders, *dyno_pids()]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    agent.proc.wait(10)

    def all_dead() -> bool:
        left = dyno_pids()
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return not left
    wait_for(all_dead, 10, interval_s=0.05, what="the dead host's dyno processes gone")


def test_a_dead_hosts_dynos_are_up_elsewhere_within_10s_and_never_doubled_on_its_return(
        fleet: Fleet) -> None:
    c1 = fleet.replicas["c1"]
    up = fleet.up()
    assert total(up) == SIX
    victim = max(fleet.members, key=lambda m: len(up[m.host_id]))
    survivors = [m for m in fleet.members if m is not victim]
    moved = up[victim.host_id]
    generation = victim.link()["generation"]

    # At once: cable out first (so not even a FIN reaches the coordinator), then SIGKILLs.
    started = time.monotonic()
    fleet.lan.set_link(victim.host, up=False)
    kill_processes(victim)
    wait_for(lambda: total({m.host_id: m.up() for m in survivors}) == SIX, 15, interval_s=0.05,
             what="the dead host's dynos up on the two others")
    elapsed = time.monotonic() - started
    print(f"\nhost death -> its {len(moved)} dynos up on the other hosts in {elapsed:.2f} s "
          f"(host TTL {HOST_TTL_S} s)")
    assert elapsed < 10, elapsed
    hosts = {h["id"]: h for h in fleet.call(c1, "GET", "/v1/hosts")}
    assert hosts[victim.host_id]["state"] == "lost", hosts
    wait_for(lambda: all_listed_up(fleet, c1, SIX), 10, interval_s=0.1,
             what="the coordinator lists six dynos up")
    assert victim.host_id not in {d["host_id"] for d in listed(fleet, c1)}

    # It comes back on the same state dir: its first sync removes what moved away.
    fleet.lan.set_link(victim.host, up=True)
    assert victim.agent.proc is not None
    victim.agent.start()
    counts: list[tuple[bool, list[str]]] = []

    def synced() -> bool:
        # The link's generation is the newest sync received: its removals may still be
        # under way. The sync is carried out once the host has no dyno left as well.
        link = victim.link()
        received = link["state"] == "connected" and (link["generation"] or 0) > generation
        counts.append((False, total(fleet.up())))
        try:  # not `victim.dynos()`: an unanswered request must not pass for "no dynos"
            left = victim.agent.api("GET", "/v1/dynos", timeout_s=10)
        except (OSError, ApiError):
            return False
        return received and not left
    wait_for(synced, 20, interval_s=0.05, what="the returning host synced, its dynos removed")
    # And it stays so: polled for a while, six formation dynos, each once.
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        counts.append((True, total(fleet.up())))
    before_sync = [len(names) for after, names in counts if not after]
    print(f"returning host: formation dynos up at each poll until its first sync was carried out: "
          f"{sorted(set(before_sync))}; {sum(1 for a, _ in counts if a)} polls after it")
    assert all(names == SIX for after, names in counts if after), \
        [names for after, names in counts if after and names != SIX][:3]
    hosts = {h["id"]: h for h in fleet.call(c1, "GET", "/v1/hosts")}
    assert hosts[victim.host_id]["state"] == "ready" and hosts[victim.host_id]["connected"]


def wait_resynced(fleet: Fleet, replica: Replica, requests_before: dict[str, int],
                  timeout_s: float = 40) -> None:
    """Every agent connected to `replica` again and told its desired set since."""
    def resynced() -> bool:
        for member in fleet.members:
            link = member.link()
            if link["state"] != "connected" or link["url"] != replica.agent_url \
                    or link["counters"]["requests"] <= requests_before[member.host_id]:
                return False
        return True
    wait_for(resynced, timeout_s, interval_s=0.1, what=f"agents synced by {replica.name}")


def requests_seen(fleet: Fleet) -> dict[str, int]:
    return {m.host_id: m.link()["counters"]["requests"] for m in fleet.members}


def test_the_coordinator_killed_and_restarted_disturbs_no_dyno(fleet: Fleet) -> None:
    c1 = fleet.replicas["c1"]
    placed = {d["id"]: d["host_id"] for d in listed(fleet, c1)}
    before = fleet.pids()
    assert len(placed) == 6 and set(placed) <= set(before)
    requests = requests_seen(fleet)

    c1.kill()
    killed_at = time.monotonic()
    c1.start()  # the same port, so the agents dial the same URL
    wait_for(lambda: fleet.leads(c1), 30, interval_s=0.1, what="the restarted c1 leading")
    wait_resynced(fleet, c1, requests)
    print(f"\ncoordinator restart: agents resynced {time.monotonic() - killed_at:.1f} s "
          "after the SIGKILL")
    # The same placements, read back from etcd; every dyno the same process, never restarted.
    assert {d["id"]: d["host_id"] for d in listed(fleet, c1)} == placed
    wait_for(lambda: all_listed_up(fleet, c1, SIX), 10, interval_s=0.1, what="six listed up")
    assert fleet.pids() == before


def test_the_leader_killed_the_other_replica_leads_and_no_dyno_is_disturbed(
        fleet: Fleet) -> None:
    c1 = fleet.replicas["c1"]
    c2 = fleet.replica("c2", PORTS[1])

    def following() -> bool:
        status, answer = fleet.api(c2, "GET", "/v1/apps")
        return status == 503 and answer["error"]["code"] == "not_leader"
    wait_for(following, 20, interval_s=0.1, what="c2 up and following")
    assert fleet.call(c2, "GET", "/v1/leader")["leader"] == "c1"
    placed = {d["id"]: d["host_id"] for d in listed(fleet, c1)}
    before = fleet.pids()
    requests = requests_seen(fleet)

    c1.kill()
    killed_at = time.monotonic()
    wait_for(lambda: fleet.leads(c2), 30, interval_s=0.05, what="c2 leading")
    leads_after = time.monotonic() - killed_at
    wait_resynced(fleet, c2, requests)
    print(f"\nleader failover: c2 leads {leads_after:.1f} s after c1's SIGKILL, every agent "
          f"synced by it after {time.monotonic() - killed_at:.1f} s")
    assert {d["id"]: d["host_id"] for d in listed(fleet, c2)} == placed
    wait_for(lambda: all_listed_up(fleet, c2, SIX), 10, interval_s=0.1, what="six listed up")
    assert fleet.pids() == before


def test_etcd_restarted_the_coordinator_waits_and_carries_on(fleet: Fleet) -> None:
    c2 = fleet.replicas["c2"]
    assert fleet.leads(c2)
    before = fleet.pids()

    fleet.etcd.stop()
    status, answer = fleet.api(c2, "PATCH", f"/v1/apps/{APP}/formation",
                               {"worker": {"quantity": 4}})
    assert status == 503, (status, answer)
    fleet.etcd.start()
    started = time.monotonic()
    wait_for(lambda: fleet.leads(c2), 30, interval_s=0.1, what="c2 leading again")
    print(f"\netcd restart: c2 answers as leader {time.monotonic() - started:.1f} s after etcd "
          "is healthy again")
    fleet.call(c2, "PATCH", f"/v1/apps/{APP}/formation", {"worker": {"quantity": 4}})
    seven = sorted([*SIX, "worker.4"])
    wait_for(lambda: total(fleet.up()) == seven, 30, interval_s=0.1, what="worker.4 up")
    wait_for(lambda: all_listed_up(fleet, c2, seven), 10, interval_s=0.1,
             what="seven listed up")
    after = fleet.pids()
    assert {i: after[i] for i in before} == before, "a dyno was disturbed by etcd's restart"


def test_a_config_change_rolls_out_with_web_dynos_prebooted(fleet: Fleet) -> None:
    """A new release (config:set) moves every dyno to it; each new web dyno boots on another
    host before its old one stops, so web never runs fewer than its 3 dynos."""
    c2 = fleet.replicas["c2"]
    answer = fleet.call(c2, "PATCH", f"/v1/apps/{APP}/config", {"GREETING": "v2"})
    version = answer["version"]
    webs_up: list[int] = []

    def rolled() -> bool:
        webs_up.append(sum(1 for names in fleet.up().values() for n in names
                           if n.startswith("web.")))
        status, found = fleet.api(c2, "GET", f"/v1/apps/{APP}/dynos")
        formation = [d for d in found if d["type"] in ("web", "worker")] if status == 200 \
            else []
        return len(formation) == 7 and all(d["release"] == version and d["state"] == "up"
                                           for d in formation)
    wait_for(rolled, 90, interval_s=0.05, what=f"every dyno on release {version} and up")
    assert min(webs_up) >= 3, f"web dynos up during the rollout: {webs_up}"
    seven = sorted([*SIX, "worker.4"])
    wait_for(lambda: total(fleet.up()) == seven, 20, interval_s=0.1,
             what="the old web dynos gone after their replacements")


def follow_until(url: str, marker: str, timeout_s: float) -> list[str]:
    """Lines of a `follow=1` log stream, up to the dyno's own line holding `marker` (or the
    timeout)."""
    sent = urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"})
    lines: list[str] = []
    deadline = time.monotonic() + timeout_s
    with OPENER.open(sent, timeout=timeout_s) as stream:
        while time.monotonic() < deadline:
            line = stream.readline().decode(errors="replace")
            if not line:
                break
            lines.append(line.rstrip("\n"))
            if marker in line and " app[" in line:  # the dyno's own line, not the agent's
                break
    return lines


def test_a_one_offs_output_streams_from_the_coordinator(fleet: Fleet) -> None:
    """`dynocoord run`'s path: a one-off on a host with room, its output followed through
    the coordinator (`logs.follow` on every host of the app)."""
    c2 = fleet.replicas["c2"]
    marker = f"fleet-follow-{unique('m', 6)}"
    with NetnsThread(fleet.hub) as reader:
        follower = reader.submit(follow_until, f"{c2.url}/v1/apps/{APP}/logs?tail=1&follow=1",
                                 marker, 30.0)
        time.sleep(1.0)  # the coordinator has subscribed on every host
        created = fleet.call(c2, "POST", f"/v1/apps/{APP}/dynos",
                             {"command": f"echo {marker}"}, expect=201)
        lines = follower.result(40)
    assert any(marker in line and "app[run." in line for line in lines), lines[-10:]

    def complete() -> bool:
        return any(d["id"] == created["id"] and d["state"] == "complete"
                   and d["exit_status"] == 0 for d in listed(fleet, c2))
    wait_for(complete, 20, interval_s=0.2, what="the one-off complete with status 0")


def test_a_drain_added_on_the_coordinator_gets_the_apps_lines_and_restarts_nothing(
        fleet: Fleet) -> None:
    """`drains:add` (the app's record, `drains.sync` to its hosts, never its specs): a
    one-off's output reaches the drain from whichever host runs it, and no dyno restarts.
    Each host has its own receiver at the drain's address, 127.0.0.1 in its namespace."""
    c2 = fleet.replicas["c2"]
    outs = [fleet.base / f"drain-{n}.log" for n in range(len(fleet.members))]
    receivers = [receiver(m.host, "syslog", 6514, out)
                 for m, out in zip(fleet.members, outs, strict=True)]
    try:
        before = {i: p for i, p in fleet.pids().items() if p[0] == "up"}
        fleet.call(c2, "POST", f"/v1/apps/{APP}/log-drains",
                   {"url": "syslog://127.0.0.1:6514"}, expect=201)
        time.sleep(2.0)  # drains.sync has reached every host
        after = fleet.pids()
        assert {i: after.get(i) for i in before} == before
        marker = f"fleet-drain-{unique('m', 6)}"
        fleet.call(c2, "POST", f"/v1/apps/{APP}/dynos", {"command": f"echo {marker}"},
                   expect=201)
        wait_for(lambda: any(marker.encode() in out.read_bytes() for out in outs
                             if out.exists()), 30, interval_s=0.2,
                 what="the one-off's line at the drain")
        received = b"".join(out.read_bytes() for out in outs if out.exists())
        assert b" app run." in received and b"State changed from" in received
        fleet.call(c2, "DELETE", f"/v1/apps/{APP}/log-drains?url=syslog%3A%2F%2F127.0.0.1"
                   "%3A6514", expect=200)
    finally:
        for process in receivers:
            process.stop()
