"""Benchmark of the coordinator link: msgpack encode+send of `hello` with 1,000 dynos (JSON
of the same payload as the peer), and the latency from a dyno's exit to the coordinator
receiving its `dyno.state` (the operator API's event stream, same run, as the peer): a worker's
`crashed`, and a one-off's `complete`. The clock starts as the bench sends SIGKILL to the
dyno's PID 1 (its exit: the kernel ends the pid namespace, the holder reaps PID 1, the agent
hears of it, decides, saves and publishes) and stops when the event is read.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp

from agent.coordinator.frames import Request, encode
from agent.coordinator.link import SUBPROTOCOL
from tests.support.agentproc import AgentProcess
from tests.support.coordinator import CoordinatorThread, TestCoordinator, unix_listener
from tests.support.names import unique
from tests.support.testhost import new_test_host
from tests.support.wait import wait_for

DYNOS = 1000
ROUNDS = 100
LATENCY_ROUNDS = 100
# Issue 18's goals (medians): exit → the coordinator has `dyno.state`; exit → `complete` on
# the operator API's event stream.
GOAL_COORDINATOR_MS = 10.0
GOAL_COMPLETE_MS = 5.0
_STATE = re.compile(rb'"state": ?"([a-z]+)"')


def _status(n: int) -> dict[str, Any]:
    return {"id": f"5f0c6a2e-{n:04d}-4a7b-9d1e-0c8d{n:08d}", "app": f"app-{n % 40}",
            "name": f"web.{n % 25 + 1}", "type": "web", "state": "up",
            "since": "2026-11-26T10:00:00.123456+00:00", "pid": 100000 + n,
            "ip": f"172.20.{n // 250}.{n % 250 + 2}", "restarts": n % 3,
            "size": "standard-1x", "exit_status": None, "reason": "booted",
            "command": "bundle exec puma -C config/puma.rb"}


def _hello() -> dict[str, Any]:
    return {"agent_id": "0" * 32, "host": "bench", "version": "0.1.0", "protocol": 1,
            "boot_id": "b" * 36, "started_at": time.time(),
            "capacity": {"cpus": 2, "memory_bytes": 24 << 30},
            "labels": {"arch": "x86_64"}, "generation": 7, "draining": False,
            "dynos": [_status(n) for n in range(DYNOS)]}


def _ms(values: list[float]) -> str:
    ms = sorted(v * 1000 for v in values)
    p90 = ms[min(len(ms) - 1, round(0.9 * (len(ms) - 1)))]
    return f"median {statistics.median(ms):8.3f} ms   p90 {p90:8.3f} ms   (n={len(ms)})"


async def _hello_send() -> None:
    payload = _hello()
    encode_s: list[float] = []
    json_s: list[float] = []
    send_s: list[float] = []
    delivered_s: list[float] = []
    size = len(encode(Request(1, "hello", payload)))
    json_size = len(json.dumps({"t": "req", "id": 1, "m": "hello", "p": payload}).encode())
    for i in range(ROUNDS):
        t0 = time.perf_counter()
        encode(Request(i, "hello", payload))
        encode_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        json.dumps({"t": "req", "id": i, "m": "hello", "p": payload}).encode()
        json_s.append(time.perf_counter() - t0)
    with tempfile.TemporaryDirectory(prefix="dtb") as tmp:
        path = Path(tmp) / "c.sock"
        coordinator = TestCoordinator()
        await coordinator.start(unix_listener(path))
        try:
            async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(path))
                                             ) as session, session.ws_connect(
                    "ws://c/v1/agents/connect", protocols=(SUBPROTOCOL,),
                    headers={"Authorization": "Bearer test-token"}) as ws:
                for i in range(ROUNDS):
                    before = len(coordinator.received)
                    t0 = time.perf_counter()
                    await ws.send_bytes(encode(Request(i + 1, "hello", payload)))
                    t1 = time.perf_counter()
                    await coordinator.wait_until(lambda b=before: len(coordinator.received) > b,
                                                 10, "hello received")
                    t2 = time.perf_counter()
                    send_s.append(t1 - t0)
                    delivered_s.append(t2 - t0)
        finally:
            await coordinator.stop()
    print(f"hello with {DYNOS} dynos: msgpack {size / 1024:.1f} KiB, "
          f"JSON {json_size / 1024:.1f} KiB")
    print(f"  msgpack encode               {_ms(encode_s)}")
    print(f"  JSON encode (peer)           {_ms(json_s)}   ratio msgpack/JSON "
          f"{statistics.median(encode_s) / statistics.median(json_s):.2f}")
    print(f"  msgpack encode + ws send     {_ms(send_s)}")
    print(f"  … until decoded by the coordinator (Unix socket) {_ms(delivered_s)}")


class _EventTap(threading.Thread):
    """Reads the operator API's `/v1/events?follow=1` and timestamps the events that reach
    `crashed` and `complete` (any dyno's: one dyno is measured at a time)."""

    def __init__(self, socket_path: Path) -> None:
        super().__init__(daemon=True, name="event-tap")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(socket_path))
        self.sock.sendall(b"GET /v1/events?follow=1 HTTP/1.1\r\nHost: agent\r\n\r\n")
        self.seen: dict[bytes, list[float]] = {b"crashed": [], b"complete": []}

    def times(self, state: str) -> list[float]:
        return self.seen[state.encode()]

    def run(self) -> None:
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            now = time.monotonic()
            for state in _STATE.findall(data):
                if state in self.seen:
                    self.seen[state].append(now)


def _latency() -> None:
    if os.geteuid() != 0:
        print("event latency: needs root (real dynos); skipped")
        return
    with new_test_host() as host:
        coordinator = CoordinatorThread(host.name).start()
        token = Path(tempfile.mkdtemp(prefix="dtb")) / "token"
        token.write_text("test-token\n")
        agent = AgentProcess(netns=host.name, extra={
            "coordinator_url": coordinator.url, "coordinator_token_file": str(token),
            "restart_schedule_s": [0.0], "log_level": "info"})
        slug = agent.base / "slug"
        slug.mkdir()
        dyno_id = unique("dtb", 6)
        spec = {"id": dyno_id, "app": "bench", "name": "worker.1", "command": "sleep 1000",
                "release": {"version": 1, "slug": {"path": str(slug)}}, "stop_timeout_s": 5}
        tap: _EventTap | None = None
        try:
            agent.start()
            coordinator.wait(lambda c: c.current, 15, "agent connected")
            coordinator.request("dynos.sync", {"generation": 1, "dynos": [spec]})
            tap = _EventTap(agent.socket)
            tap.start()
            to_coordinator: list[float] = []
            to_api: list[float] = []
            for _ in range(LATENCY_ROUNDS):
                coordinator_s, api_s = _exit_to_event(agent, coordinator, tap, dyno_id,
                                                      "crashed")
                to_coordinator.append(coordinator_s)
                to_api.append(api_s)
            complete_coordinator: list[float] = []
            complete_api: list[float] = []
            for n in range(LATENCY_ROUNDS):
                one_off = unique("dtb", 6)
                coordinator.request("dyno.start", {
                    **spec, "id": one_off, "name": f"run.{n + 1}", "stop_timeout_s": 1})
                coordinator_s, api_s = _exit_to_event(agent, coordinator, tap, one_off,
                                                      "complete")
                complete_coordinator.append(coordinator_s)
                complete_api.append(api_s)
                agent.api("DELETE", f"/v1/dynos/{one_off}", expect=204)
            print(f"dyno exit (the bench's SIGKILL of its PID 1) → event, {LATENCY_ROUNDS} "
                  f"crashes of a worker:")
            print(f"  coordinator receives dyno.state  {_ms(to_coordinator)}")
            print(f"  operator /v1/events line (peer)  {_ms(to_api)}   ratio "
                  f"{statistics.median(to_coordinator) / statistics.median(to_api):.2f}")
            print(f"… and → complete, {LATENCY_ROUNDS} one-offs (`run.N`):")
            print(f"  operator /v1/events line         {_ms(complete_api)}")
            print(f"  coordinator receives dyno.state  {_ms(complete_coordinator)}")
            print(_goal("dyno exit → coordinator receives dyno.state (crashed)",
                        to_coordinator, GOAL_COORDINATOR_MS))
            print(_goal("dyno exit → complete on /v1/events", complete_api, GOAL_COMPLETE_MS))
        finally:
            if tap is not None:
                tap.sock.close()
            try:
                coordinator.request("dynos.sync", {"generation": 2, "dynos": []})
            finally:
                agent.stop()
                coordinator.close()
                agent.cleanup()
                token.unlink(missing_ok=True)
                token.parent.rmdir()


def _exit_to_event(agent: AgentProcess, coordinator: CoordinatorThread, tap: _EventTap,
                   dyno_id: str, state: str) -> tuple[float, float]:
    """SIGKILL the dyno's PID 1 once it is up; the seconds until the coordinator received
    its `dyno.state` of `state`, and until the operator API's event stream carried it."""
    pid = wait_for(lambda: _up_pid(agent, dyno_id), 30, interval_s=0.005, what="dyno up")
    before = coordinator.snapshot(lambda c: len(_events(c, dyno_id, state)))
    on_api = len(tap.times(state))
    t0 = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    got = coordinator.wait(lambda c: _events(c, dyno_id, state)[before:], 30,
                           what=f"{state} event")
    wait_for(lambda: len(tap.times(state)) > on_api, 10, interval_s=0.001)
    return got[0].at - t0, tap.times(state)[on_api] - t0


def _goal(what: str, samples: list[float], goal_ms: float) -> str:
    median_ms = statistics.median(samples) * 1000
    return (f"  goal {what} <= {goal_ms:g} ms: {median_ms:.1f} ms "
            f"({'met' if median_ms <= goal_ms else 'NOT met'})")


def _up_pid(agent: AgentProcess, dyno_id: str) -> int | None:
    for dyno in agent.ctl_json("ps"):
        if dyno["id"] == dyno_id and dyno["state"] == "up" and dyno["pid"]:
            return int(dyno["pid"])
    return None


def _events(c: TestCoordinator, dyno_id: str, state: str) -> list[Any]:
    return [r for r in c.events("dyno.state")
            if r.params.get("id") == dyno_id and r.params.get("state") == state]


def main() -> None:
    asyncio.run(_hello_send())
    _latency()


if __name__ == "__main__":
    main()
