"""Benchmark of the coordinator link: msgpack encode+send of `hello` with 1,000 dynos (JSON
of the same payload as the peer), and the latency from a dyno's exit to the coordinator
receiving its `dyno.state` (the operator API's event stream, same run, as the peer).
"""

from __future__ import annotations

import asyncio
import json
import os
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
    """Reads the operator API's `/v1/events?follow=1` and timestamps chunks naming a crash."""

    def __init__(self, socket_path: Path) -> None:
        super().__init__(daemon=True, name="event-tap")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(socket_path))
        self.sock.sendall(b"GET /v1/events?follow=1 HTTP/1.1\r\nHost: agent\r\n\r\n")
        self.crashes: list[float] = []

    def run(self) -> None:
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            now = time.monotonic()
            self.crashes.extend(now for _ in range(data.count(b'"crashed"')
                                                   - data.count(b'"previous": "crashed"')
                                                   - data.count(b'"previous":"crashed"')))


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
                pid = wait_for(lambda: _up_pid(agent, dyno_id), 30, interval_s=0.005,
                               what="dyno up")
                crashes = coordinator.snapshot(lambda c: len(_crashes(c, dyno_id)))
                api_crashes = len(tap.crashes)
                t0 = time.monotonic()
                os.kill(pid, signal.SIGKILL)
                got = coordinator.wait(lambda c, n=crashes: _crashes(c, dyno_id)[n:], 30,
                                       what="crash event")
                to_coordinator.append(got[0].at - t0)
                wait_for(lambda n=api_crashes: len(tap.crashes) > n, 10, interval_s=0.001)
                to_api.append(tap.crashes[api_crashes] - t0)
            print(f"dyno exit (SIGKILL of its PID 1) → event, {LATENCY_ROUNDS} crashes:")
            print(f"  coordinator receives dyno.state  {_ms(to_coordinator)}")
            print(f"  operator /v1/events line (peer)  {_ms(to_api)}   ratio "
                  f"{statistics.median(to_coordinator) / statistics.median(to_api):.2f}")
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


def _up_pid(agent: AgentProcess, dyno_id: str) -> int | None:
    for dyno in agent.ctl_json("ps"):
        if dyno["id"] == dyno_id and dyno["state"] == "up" and dyno["pid"]:
            return int(dyno["pid"])
    return None


def _crashes(c: TestCoordinator, dyno_id: str) -> list[Any]:
    return [r for r in c.events("dyno.state")
            if r.params.get("id") == dyno_id and r.params.get("state") == "crashed"]


def main() -> None:
    asyncio.run(_hello_send())
    _latency()


if __name__ == "__main__":
    main()
