"""Benchmark of the simulated fleet (tests/support/fakeagent.py): 1,000 fake agents in this
process converge to 100 dynos each, sent by a minimal coordinator in a child process, then
idle with the protocol's heartbeat and metrics periods. Prints the fleet's resident memory
and its CPU use while converging and while idle. FLEET_HOSTS, FLEET_DYNOS and FLEET_IDLE_S
change the figures.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import msgpack
from aiohttp import WSMsgType, web

from tests.support.fakeagent import FakeFleet

HOSTS = int(os.environ.get("FLEET_HOSTS", "1000"))
DYNOS = int(os.environ.get("FLEET_DYNOS", "100"))
IDLE_S = float(os.environ.get("FLEET_IDLE_S", "30"))
URL = "ws://coordinator/v1/agents/connect"


def _specs(host: int) -> list[dict[str, Any]]:
    return [{"id": f"h{host:05d}-d{n:03d}", "app": f"app-{n % 20}", "name": f"web.{n + 1}",
             "command": "bundle exec puma -C config/puma.rb", "env": {"RACK_ENV": "production"},
             "release": {"version": 3, "slug": {"path": "/srv/slugs/app.tgz"}}}
            for n in range(DYNOS)]


def _coordinator(path: str) -> None:
    """Answers hello, then sends one dynos.sync of DYNOS specs; counts everything else."""
    async def connect(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(protocols=("dynoagent.v1",), max_msg_size=64 << 20)
        await ws.prepare(request)
        async for message in ws:
            if message.type is not WSMsgType.BINARY:
                continue
            frame = msgpack.unpackb(message.data)
            if frame.get("t") == "req" and frame.get("m") == "hello":
                await ws.send_bytes(msgpack.packb({"t": "res", "id": frame["id"], "p": {}}))
                host = int(frame["p"]["host"].rpartition("-")[2])
                await ws.send_bytes(msgpack.packb({"t": "req", "id": 1, "m": "dynos.sync", "p": {
                    "generation": 1, "dynos": _specs(host)}}))
        return ws

    async def serve() -> None:
        app = web.Application()
        app.router.add_get("/v1/agents/connect", connect)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.UnixSite(runner, path, backlog=1024).start()
        await asyncio.Event().wait()

    asyncio.run(serve())


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _run(path: str) -> None:
    base_rss = _rss_mib()
    fleet = FakeFleet(URL, "bench", HOSTS, unix_path=path, concurrency=100)
    began, cpu0 = time.monotonic(), _cpu_s()
    await fleet.start()
    await fleet.wait_connected(300)
    connected = time.monotonic() - began
    total = HOSTS * DYNOS
    await fleet.wait_for(
        lambda: sum(a.counts()["by_state"].get("up", 0) for a in fleet.agents) == total, 600,
        "every dyno up", poll_s=0.5)
    converged, cpu1 = time.monotonic() - began, _cpu_s()
    print(f"{HOSTS} agents connected in {connected:.1f}s; {total:,} dynos up in "
          f"{converged:.1f}s (fleet CPU {cpu1 - cpu0:.1f}s)")
    print(f"fleet RSS: {_rss_mib() - base_rss:.0f} MiB above the {base_rss:.0f} MiB "
          f"before it ({(_rss_mib() - base_rss) * 1024 / total:.2f} KiB per dyno)")
    start, cpu2 = time.monotonic(), _cpu_s()
    await asyncio.sleep(IDLE_S)
    idle_cpu = (_cpu_s() - cpu2) / (time.monotonic() - start)
    beats = sum(a.counters["heartbeats"] for a in fleet.agents)
    print(f"idle for {IDLE_S:g}s: {idle_cpu * 100:.1f}% of one core; RSS {_rss_mib():.0f} MiB; "
          f"{beats:,} heartbeats sent in all")
    await fleet.close()


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "coord.sock")
        child = multiprocessing.get_context("spawn").Process(target=_coordinator, args=(path,),
                                                              daemon=True)
        child.start()
        try:
            deadline = time.monotonic() + 30
            while not Path(path).exists():
                if time.monotonic() > deadline:
                    raise TimeoutError("the bench coordinator did not start")
                time.sleep(0.05)
            asyncio.run(_run(path))
        finally:
            child.terminate()
            child.join(10)


if __name__ == "__main__":
    main()
