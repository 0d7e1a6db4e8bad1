"""The simulated agents of tests/support/fakeagent.py against the test coordinator on a Unix
socket: hello, convergence events, a killed and a restarted agent, and a fleet of 200."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.coordinator import TestCoordinator, unix_listener
from tests.support.fakeagent import FakeAgent, FakeFleet

URL = "ws://coordinator/v1/agents/connect"
STATUS_KEYS = {"id", "app", "name", "type", "state", "since", "pid", "ip", "restarts", "size",
               "exit_status", "reason", "command"}
EVENT_KEYS = {"id", "app", "name", "state", "previous", "reason", "exit_status", "ip", "at",
              "seq"}


def spec(n: int, app: str = "demo") -> dict[str, Any]:
    return {"id": f"{app}-w{n}", "app": app, "name": f"worker.{n}", "command": "sleep 1",
            "release": {"version": 1, "slug": {"path": "/srv/slug"}}}


class Harness:
    def __init__(self, tmp_path: Path) -> None:
        self.path = tmp_path / "coord.sock"
        self.coordinator = TestCoordinator()
        self.agents: list[FakeAgent] = []
        self.sessions: list[aiohttp.ClientSession] = []

    async def serve(self) -> None:
        await self.coordinator.start(unix_listener(self.path))

    def agent(self, agent_id: str = "a1", **options: Any) -> FakeAgent:
        session = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(self.path)))
        self.sessions.append(session)
        agent = FakeAgent(URL, "test-token", agent_id, f"host-{agent_id}",
                          {"cpus": 4, "memory_bytes": 8 << 30}, None, session=session,
                          boot_delay_s=0.02, heartbeat_interval_s=0.2, metrics_interval_s=0.3,
                          backoff_min_s=0.05, backoff_max_s=0.2, **options)
        self.agents.append(agent)
        return agent

    async def sync(self, generation: int, dynos: list[dict[str, Any]]) -> dict[str, Any]:
        response = await self.coordinator.request("dynos.sync", {"generation": generation,
                                                                 "dynos": dynos})
        assert "e" not in response, response
        result: dict[str, Any] = response["p"]
        return result


@pytest.fixture
async def h(tmp_path: Path) -> AsyncIterator[Harness]:
    harness = Harness(tmp_path)
    await harness.serve()
    try:
        yield harness
    finally:
        for agent in harness.agents:
            await agent.close()
        for session in harness.sessions:
            await session.close()
        await harness.coordinator.stop()


async def test_hello_has_every_field_of_the_protocol(h: Harness) -> None:
    agent = h.agent()
    agent.start()
    conn = await h.coordinator.wait_connected()
    hello = conn.hello
    assert hello is not None
    assert set(hello) == {"agent_id", "host", "version", "protocol", "boot_id", "started_at",
                          "capacity", "labels", "generation", "draining", "dynos"}
    assert (hello["agent_id"], hello["host"], hello["protocol"]) == ("a1", "host-a1", 1)
    assert hello["capacity"] == {"cpus": 4, "memory_bytes": 8 << 30}
    assert set(hello["labels"]) == {"arch", "kernel", "cgroup_mode"}
    assert hello["generation"] is None and hello["draining"] is False and hello["dynos"] == []
    assert h.coordinator.subprotocols == ["dynoagent.v1"]
    assert h.coordinator.received[0].frame["m"] == "hello"
    # Heartbeats follow the answer, with the counts of the protocol.
    await h.coordinator.wait_until(lambda: h.coordinator.events("agent.heartbeat"), 5,
                                   "a heartbeat")
    beat = h.coordinator.events("agent.heartbeat")[0].params
    assert beat["dynos"] == {"total": 0, "by_state": {}} and beat["generation"] is None


async def test_a_wrong_token_is_refused_and_the_fake_retries(h: Harness) -> None:
    agent = h.agent()
    agent.token = "wrong"
    agent.start()
    await h.coordinator.wait_until(lambda: h.coordinator.refused >= 2, 10, "2 refusals")
    assert h.coordinator.connections == [] and "401" in (agent.last_error or "")
    agent.token = "test-token"
    await h.coordinator.wait_connected()


async def test_sync_of_three_dynos_brings_them_up_with_events(h: Harness) -> None:
    agent = h.agent()
    agent.start()
    await h.coordinator.wait_connected()
    report = await h.sync(1, [spec(1), spec(2), spec(3)])
    assert report["started"] == ["demo-w1", "demo-w2", "demo-w3"]
    assert report["applied_generation"] == 1 and report["failed"] == []

    def ups() -> list[dict[str, Any]]:
        return [e for e in h.coordinator.states() if e["state"] == "up"]
    await h.coordinator.wait_until(lambda: len(ups()) == 3, 5, "3 dynos up")
    for event in h.coordinator.states():
        assert set(event) == EVENT_KEYS
    first = h.coordinator.states("demo-w1")
    assert [(e["previous"], e["state"], e["reason"]) for e in first] == [
        (None, "starting", "start"), ("starting", "up", "booted")]
    seqs = [e["seq"] for e in h.coordinator.states()]
    assert seqs == list(range(1, 7))
    statuses = agent.dynos()
    assert [s["name"] for s in statuses] == ["worker.1", "worker.2", "worker.3"]
    assert all(set(s) == STATUS_KEYS and s["state"] == "up" for s in statuses)


async def test_sync_removing_one_stops_it_and_forgets_it(h: Harness) -> None:
    agent = h.agent()
    agent.start()
    await h.coordinator.wait_connected()
    await h.sync(1, [spec(1), spec(2), spec(3)])
    await agent.wait_for(lambda: set(agent.states().values()) == {"up"}, 5, "all up")
    report = await h.sync(2, [spec(1), spec(3)])
    assert report["removed"] == ["demo-w2"] and report["unchanged"] == ["demo-w1", "demo-w3"]
    # Answered once the removal has finished: gone from the host, its down event sent.
    assert "demo-w2" not in agent.states()
    await h.coordinator.wait_until(lambda: len(h.coordinator.states("demo-w2")) == 3, 5,
                                   "down event")
    down = h.coordinator.states("demo-w2")[-1]
    assert (down["previous"], down["state"], down["reason"], down["exit_status"]) == (
        "up", "down", "stopped", 143)
    heartbeat_gen = await h.coordinator.wait_until(
        lambda: [e for e in h.coordinator.events("agent.heartbeat")
                 if e.params["dynos"]["total"] == 2], 5, "a heartbeat of 2 dynos")
    assert heartbeat_gen[-1].params["generation"] == 2


async def test_kill_drops_the_connection_without_a_close_frame(h: Harness) -> None:
    agent = h.agent()
    agent.start()
    conn = await h.coordinator.wait_connected()
    await agent.kill()
    await h.coordinator.wait_until(lambda: conn.closed, 5, "connection dropped")
    assert conn.ws.close_code == aiohttp.WSCloseCode.ABNORMAL_CLOSURE
    beats = len(h.coordinator.events("agent.heartbeat"))
    await asyncio.sleep(0.5)  # more than two heartbeat intervals
    assert len(h.coordinator.events("agent.heartbeat")) == beats
    assert len(h.coordinator.connections) == 1 and agent.link_state == "dead"


async def test_close_goes_away_with_1001(h: Harness) -> None:
    agent = h.agent()
    agent.start()
    conn = await h.coordinator.wait_connected()
    await agent.close()
    await h.coordinator.wait_until(lambda: conn.closed, 5, "connection closed")
    assert conn.ws.close_code == aiohttp.WSCloseCode.GOING_AWAY


async def test_restart_says_hello_again_with_the_same_dynos(h: Harness) -> None:
    agent = h.agent()
    agent.start()
    await h.coordinator.wait_connected()
    await h.sync(4, [spec(1), spec(2), spec(3)])
    await agent.wait_for(lambda: set(agent.states().values()) == {"up"}, 5, "all up")
    first = h.coordinator.hellos[0]
    await agent.kill()
    await agent.restart()
    await h.coordinator.wait_until(lambda: len(h.coordinator.hellos) == 2, 5, "second hello")
    second = h.coordinator.hellos[1]
    assert second["agent_id"] == "a1" and second["boot_id"] == first["boot_id"]
    assert second["started_at"] > first["started_at"] and second["generation"] == 4
    assert [(d["id"], d["state"]) for d in second["dynos"]] == [
        ("demo-w1", "up"), ("demo-w2", "up"), ("demo-w3", "up")]
    # A new process numbers its events from 1 again.
    report = await h.sync(5, [spec(1), spec(2)])
    assert report["removed"] == ["demo-w3"]
    await h.coordinator.wait_until(
        lambda: [r for r in h.coordinator.events("dyno.state") if r.connection == 2], 5,
        "an event on the new connection")
    assert [r.params["seq"] for r in h.coordinator.events("dyno.state")
            if r.connection == 2] == [1]


async def test_requests_get_the_agents_answers(h: Harness) -> None:
    agent = h.agent(stop_delay_s=0.05)
    agent.start()
    await h.coordinator.wait_connected()
    await h.sync(1, [spec(1)])
    await agent.wait_for(lambda: agent.states() == {"demo-w1": "up"}, 5, "up")
    stopped = await h.coordinator.request("dyno.stop", {"id": "demo-w1"})
    assert (stopped["p"]["state"], stopped["p"]["exit_status"]) == ("down", 143)
    restarted = await h.coordinator.request("dyno.restart", {"id": "demo-w1"})
    assert restarted["p"]["state"] == "starting"
    signalled = await h.coordinator.request("dyno.signal", {"id": "demo-w1",
                                                            "signal": "USR1"})
    assert signalled["p"]["signalled"] == 1
    assert (await h.coordinator.request("dyno.stop", {"id": "nope"}))["e"]["code"] == \
        "not_found"
    assert (await h.coordinator.request("dyno.delete", {"id": "demo-w1"}))["e"]["code"] == \
        "unknown_method"
    drained = await h.coordinator.request("agent.drain", {"stop": True})
    assert drained["p"]["draining"] is True and drained["p"]["stopped"] == ["demo-w1"]
    refused = await h.sync(2, [spec(1), spec(2)])
    assert refused["resumed"] == ["demo-w1"]
    assert refused["failed"] == [{"id": "demo-w2", "action": "start", "code": "draining",
                                  "message": "the agent is draining and starts no new dynos"}]
    info = (await h.coordinator.request("agent.info"))["p"]
    assert info["agent_id"] == "a1" and info["coordinator"]["generation"] == 2
    bad = await h.coordinator.request("dynos.sync", {"generation": 3, "dynos": [],
                                                     "force": True})
    assert bad["e"]["code"] == "bad_request" and "force" in bad["e"]["message"]


async def test_a_fleet_of_200_connects_and_converges(h: Harness) -> None:
    fleet = FakeFleet(URL, "test-token", 200, unix_path=str(h.path), concurrency=50,
                      boot_delay_s=0.01, heartbeat_interval_s=1.0, metrics_interval_s=None)
    began = time.monotonic()
    try:
        await fleet.start()
        await fleet.wait_connected(30)
        conns = [c for c in h.coordinator.connections if c.hello is not None]
        assert sorted(c.hello["agent_id"] for c in conns if c.hello) == \
            [f"fake-{n:05d}" for n in range(200)]
        answers = await asyncio.gather(*(
            h.coordinator.request("dynos.sync", {"generation": 1, "dynos": [
                spec(n, app=f"app{i % 7}") for n in range(1, 6)]}, conn=conn)
            for i, conn in enumerate(conns)))
        assert all(len(a["p"]["started"]) == 5 for a in answers)

        def ups() -> int:
            return sum(1 for e in h.coordinator.states() if e["state"] == "up")
        await h.coordinator.wait_until(lambda: ups() == 1000, 30, "1,000 dynos up")
        assert all(a.counts() == {"total": 5, "by_state": {"up": 5}} for a in fleet.agents)
        elapsed = time.monotonic() - began
        print(f"200 agents connected and 1,000 dynos up in {elapsed:.2f}s")
    finally:
        await fleet.close()


async def test_events_while_away_are_sent_after_the_next_hello(h: Harness) -> None:
    agent = h.agent()
    agent.start()
    await h.coordinator.wait_connected()
    await h.sync(1, [spec(1)])
    await h.coordinator.wait_until(lambda: len(h.coordinator.states("demo-w1")) == 2, 5, "up")
    await h.coordinator.stop()
    await agent.wait_for(lambda: not agent.connected, 5, "disconnected")
    agent.exit_process("demo-w1", 1)  # crashes, and is started again, while away
    await agent.wait_for(lambda: agent.states() == {"demo-w1": "up"}, 5, "up again")
    h.path.unlink(missing_ok=True)
    await h.serve()
    await h.coordinator.wait_until(lambda: len(h.coordinator.hellos) == 2, 10, "hello again")
    assert h.coordinator.hellos[1]["dynos"][0]["restarts"] == 1
    await h.coordinator.wait_until(lambda: len(h.coordinator.states("demo-w1")) == 5, 5,
                                   "the buffered events")
    second = [r for r in h.coordinator.received if r.connection == 2]
    assert second[0].method == "hello"
    assert [(e["previous"], e["state"], e["reason"], e["exit_status"], e["seq"])
            for e in h.coordinator.states("demo-w1")[2:]] == [
        ("up", "crashed", "crash", 1, 3), ("crashed", "starting", "restart", None, 4),
        ("starting", "up", "booted", None, 5)]
