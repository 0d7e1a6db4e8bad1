"""Benchmark of `dynocoord serve` at fleet size: a real etcd, one coordinator process, and
FLEET_HOSTS (1,000) simulated agents (tests/support/fakeagent.py: the real protocol, nothing
launched) in this process. Prints, for each step, its time, the CPU seconds of the coordinator,
etcd and this process (the fleet), the coordinator's RSS, and etcd's writes:

1. every agent connected;
2. 1,000 apps of web=60 worker=40 (100 dynos per host), their formation PATCHes sent at once,
   until every dyno is `up`; the etcd keys stored and written per dyno;
3. one host killed (no close frame): until its dynos are `up` elsewhere (--host-ttl
   FLEET_HOST_TTL, 5 s, the default);
4. FLEET_IDLE_S (20 s) idle: CPU of each process and etcd's request rate by method;
5. a 10,000-dyno formation change in one PATCH (one app +10,000), until all are `up`, with the
   coordinator's own plan and write times (its `converged:` log lines); then back;
6. 10,000 dynos more as 1,000 PATCHes of web +10, ten at a time (last: many plans, each
   re-sending every changed host its whole desired set, load the coordinator most).

Why 1,000 apps of 100: the planner's own benchmark (bench_placement) uses the same fleet, so
the coordinator's planning times compare with the pure function's; and an app of 100 dynos
spans a tenth of the hosts, so spreading and capacity both matter, which a fleet of a few
huge apps or of one-dyno apps would not exercise. A step stops the benchmark when a tenth of
the agents are disconnected at once (the coordinator overloaded). Asserts nothing.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp

from dynocoord.etcd import EtcdClient
from tests.support.etcd import EtcdProcess
from tests.support.fakeagent import FakeFleet

HOSTS = int(os.environ.get("FLEET_HOSTS", "1000"))
HOST_TTL_S = int(os.environ.get("FLEET_HOST_TTL", "5"))
IDLE_S = float(os.environ.get("FLEET_IDLE_S", "20"))
WEB, WORKER = 60, 40
APPS = HOSTS  # web=60 worker=40 each: 100 dynos per host
CHANGE = 10 * HOSTS  # the formation change: 10,000 dynos at 1,000 hosts
API_CONCURRENCY = 10  # PATCHes in flight at once, as a deploy tool would send them
GIB = 1 << 30
TOKEN = "bench-fleet-token"
PREFIX = "/benchfleet"
ROOT = Path(__file__).resolve().parents[2]
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
CONVERGED = re.compile(r"^(\S+ \S+) dynocoord INFO converged: \+(\d+) -(\d+) dynos on (\d+) "
                       r"hosts, planned in ([\d.]+) s, written in ([\d.]+) s")
LOST = re.compile(r"^(\S+ \S+) dynocoord WARNING host (\S+): lease expired, lost")


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


def _memory_mib(pid: int) -> dict[str, float]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024
    return out


def _etcd_metrics(url: str) -> dict[str, float]:
    """Write counters, and gRPC messages received by method (the JSON gateway's calls
    arrive at etcd's gRPC server, so they are counted there)."""
    with OPENER.open(url + "/metrics", timeout=10) as answer:
        text = answer.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        if name in ("etcd_mvcc_put_total", "etcd_mvcc_delete_total", "etcd_mvcc_txn_total",
                    "etcd_mvcc_range_total", "etcd_mvcc_db_total_size_in_bytes"):
            out[name] = float(value)
        elif name.startswith("grpc_server_msg_received_total"):
            method = re.search(r'grpc_method="([^"]+)"', name)
            if method is not None:
                key = f"rpc {method.group(1)}"
                out[key] = out.get(key, 0.0) + float(value)
    return out


@dataclass
class Snapshot:
    at: float
    cpu_s: dict[str, float]
    etcd: dict[str, float]


class Meter:
    """CPU of the three processes and etcd's counters, between two snapshots."""

    def __init__(self, pids: dict[str, int], etcd_url: str) -> None:
        self.pids = pids
        self.etcd_url = etcd_url

    async def snapshot(self) -> Snapshot:
        etcd = await asyncio.to_thread(_etcd_metrics, self.etcd_url)
        return Snapshot(time.monotonic(), {n: _cpu_s(p) for n, p in self.pids.items()}, etcd)

    def usage(self, a: Snapshot, b: Snapshot) -> str:
        wall = b.at - a.at
        parts = [f"{name} {b.cpu_s[name] - a.cpu_s[name]:.1f} s "
                 f"({(b.cpu_s[name] - a.cpu_s[name]) / wall * 100:.0f}%)" for name in self.pids]
        return "CPU " + ", ".join(parts)

    def writes(self, a: Snapshot, b: Snapshot) -> dict[str, float]:
        return {k: b.etcd.get(k, 0.0) - a.etcd.get(k, 0.0) for k in b.etcd}


class Coordinator:
    def __init__(self, etcd: EtcdProcess, tmp: Path) -> None:
        token_file = tmp / "token"
        token_file.write_text(TOKEN + "\n")
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.agent_url = f"ws://127.0.0.1:{self.port}/v1/agents/connect"
        self.log = tmp / "dynocoord.log"
        self.argv = [sys.executable, "-m", "dynocoord.server", "--etcd", etcd.url,
                     "--listen", f"127.0.0.1:{self.port}", "--token-file", str(token_file),
                     "--prefix", PREFIX, "--id", "bench", "--host-ttl", str(HOST_TTL_S),
                     "--log-level", "info"]
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(self.argv, cwd=ROOT, stdout=out, stderr=out)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def mark(self) -> int:
        return self.log.stat().st_size

    def lines_since(self, offset: int) -> list[str]:
        with self.log.open("rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace").splitlines()

    def converges_since(self, offset: int) -> str:
        rounds = [m for m in map(CONVERGED.match, self.lines_since(offset)) if m]
        if not rounds:
            return "no converge logged"
        planned = [float(m.group(5)) for m in rounds]
        written = [float(m.group(6)) for m in rounds]
        added = sum(int(m.group(2)) for m in rounds)
        removed = sum(int(m.group(3)) for m in rounds)
        return (f"{len(rounds)} converge rounds (+{added:,} -{removed:,}): planning "
                f"{sum(planned):.2f} s in all (largest round {max(planned):.3f} s), writing "
                f"{sum(written):.2f} s in all (largest {max(written):.3f} s)")

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-40:])


def _log_time(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f").timestamp()


class Bench:
    def __init__(self, etcd: EtcdProcess, coordinator: Coordinator) -> None:
        self.etcd = etcd
        self.coordinator = coordinator
        self.meter = Meter({"coordinator": coordinator.process.pid, "etcd": etcd.pid or 0,
                            "fleet": os.getpid()}, etcd.url)
        self.fleet = FakeFleet(coordinator.agent_url, TOKEN, HOSTS, concurrency=100,
                               capacity={"cpus": 32, "memory_bytes": 64 * GIB})
        # Dynos `up` per agent, kept by the agents' state listeners: polling a thousand
        # agents' dynos would cost this process more than the fleet itself.
        self.ups = [0] * HOSTS
        self.dead: set[int] = set()
        self.http: aiohttp.ClientSession | None = None
        self.stall_s = 0.0

    async def _watch_loop(self) -> None:
        """The longest time this process's event loop was late (the fleet's stalls: a fake
        agent answers pings, like everything else, only between them)."""
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(0.05)
            self.stall_s = max(self.stall_s, loop.time() - before - 0.05)

    def stalls(self) -> str:
        stall, self.stall_s = self.stall_s, 0.0
        reconnects = sum(a.connection for a in self.fleet.agents) - len(self.fleet.agents)
        return f"fleet loop late by up to {stall:.2f} s; {reconnects} agent reconnects so far"

    def live_up(self) -> int:
        return sum(n for i, n in enumerate(self.ups) if i not in self.dead)

    def _listen(self, index: int) -> Callable[[dict[str, Any]], None]:
        def listener(params: dict[str, Any]) -> None:
            if params["state"] == "up":
                self.ups[index] += 1
            if params["previous"] == "up":
                self.ups[index] -= 1
        return listener

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        assert self.http is not None
        async with self.http.request(method, self.coordinator.url + path, json=body,
                                     headers={"Authorization": f"Bearer {TOKEN}"},
                                     timeout=aiohttp.ClientTimeout(total=120)) as response:
            answer = await response.json(content_type=None)
            if response.status >= 300:
                raise RuntimeError(f"{method} {path}: {response.status} {answer}")
            return answer

    async def each(self, calls: list[Awaitable[Any]],
                   concurrency: int = API_CONCURRENCY) -> None:
        """Await `calls` (API calls not yet started), `concurrency` at a time."""
        slots = asyncio.Semaphore(concurrency)

        async def one(call: Awaitable[Any]) -> None:
            async with slots:
                await call
        await asyncio.gather(*(one(c) for c in calls))

    async def until_up(self, count: int, timeout_s: float, what: str) -> float:
        began = time.monotonic()

        def done() -> bool:
            if self.fleet.connected < len(self.fleet.agents) - len(self.dead) - HOSTS // 10:
                # A tenth of the fleet disconnected at once: the coordinator is overloaded
                # (its pings went unanswered, or it lost its lead); waiting on tells nothing.
                raise RuntimeError(f"{what}: {self.fleet.connected} agents connected of "
                                   f"{len(self.fleet.agents) - len(self.dead)}; "
                                   f"{self.live_up():,} dynos up; {self.stalls()}")
            return self.live_up() == count
        await self.fleet.wait_for(done, timeout_s, what, poll_s=0.05)
        return time.monotonic() - began

    def rss(self) -> str:
        memory = _memory_mib(self.coordinator.process.pid)
        return f"coordinator RSS {memory['VmRSS']:.0f} MiB (peak {memory['VmHWM']:.0f} MiB)"

    async def run(self) -> None:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as self.http:
            deadline = time.monotonic() + 30
            while True:
                with contextlib.suppress(aiohttp.ClientError, RuntimeError):
                    await self.call("GET", "/v1/apps")
                    break
                if time.monotonic() > deadline or self.coordinator.process.poll() is not None:
                    raise RuntimeError("the coordinator did not lead within 30 s")
                await asyncio.sleep(0.1)
            for index, agent in enumerate(self.fleet.build()):
                agent.state_listeners.append(self._listen(index))
            watch = asyncio.create_task(self._watch_loop(), name="watch-loop")
            try:
                await self.steps()
            finally:
                watch.cancel()
                await asyncio.gather(watch, return_exceptions=True)
                await self.fleet.close()

    async def steps(self) -> None:
        m = self.meter
        print(f"{HOSTS:,} hosts (64 GiB each), coordinator --host-ttl {HOST_TTL_S}; "
              f"{APPS:,} apps of web={WEB} worker={WORKER} (standard-1x)", flush=True)

        # 1. Connect.
        s0 = await m.snapshot()
        self.stall_s = 0.0
        await self.fleet.start()
        await self.fleet.wait_connected(600)
        s1 = await m.snapshot()
        print(f"1. {HOSTS:,} agents connected in {s1.at - s0.at:.1f} s; {m.usage(s0, s1)}; "
              f"{self.rss()}; {self.stalls()}", flush=True)

        # 2. Apps and releases first, then the formations: timed from the first PATCH.
        await self.each([self.call("POST", "/v1/apps", {"name": _app(a)})
                         for a in range(APPS)])
        await self.each([self.call("POST", f"/v1/apps/{_app(a)}/releases", {
            "slug": {"path": f"/var/lib/dynoagent/slugs/{_app(a)}.tgz"}, "stack": "host",
            "process_types": {"web": "bundle exec puma -C config/puma.rb",
                              "worker": "bundle exec sidekiq"},
            "env": {"RACK_ENV": "production", "DATABASE_URL": f"postgres://db/{_app(a)}"}})
            for a in range(APPS)])
        await asyncio.sleep(1)
        total = APPS * (WEB + WORKER)
        mark, s2 = self.coordinator.mark(), await m.snapshot()
        self.stall_s = 0.0
        # All at once, as a fleet's restore would send them: they queue on the leader's lock
        # and coalesce into a few plans. (Step 6 sends its PATCHes ten at a time.)
        patched = asyncio.create_task(self.each([
            self.call("PATCH", f"/v1/apps/{_app(a)}/formation",
                                  {"web": {"quantity": WEB}, "worker": {"quantity": WORKER}})
            for a in range(APPS)], APPS))
        await self.until_up(total, 600, f"{total:,} dynos up")
        await patched
        s3 = await m.snapshot()
        async with EtcdClient(self.etcd.url) as client:
            keys = (await client.get_prefix(f"{PREFIX}/".encode(), keys_only=True)).kvs
        writes = m.writes(s2, s3)
        print(f"2. {APPS:,} formation PATCHes -> {total:,} dynos up in {s3.at - s2.at:.1f} s; "
              f"{m.usage(s2, s3)}; {self.rss()}; {self.stalls()}", flush=True)
        print(f"   {self.coordinator.converges_since(mark)}")
        print(f"   etcd: {len(keys):,} keys under the prefix ({len(keys) / total:.3f} per dyno);"
              f" this step wrote {writes['etcd_mvcc_put_total']:,.0f} keys "
              f"({writes['etcd_mvcc_put_total'] / total:.2f} per dyno) in "
              f"{writes['etcd_mvcc_txn_total']:,.0f} write txns (revision delta "
              f"{writes['etcd_mvcc_txn_total'] / total:.3f} per dyno); db "
              f"{s3.etcd['etcd_mvcc_db_total_size_in_bytes'] / (1 << 20):.0f} MiB", flush=True)

        # 3. One host dies at once; its dynos come up elsewhere.
        await asyncio.sleep(5)  # the last syncs' answers and events drained
        victim = HOSTS // 2
        moved = self.ups[victim]
        mark, s6 = self.coordinator.mark(), await m.snapshot()
        self.stall_s = 0.0
        killed_at = time.time()
        await self.fleet.agents[victim].kill()
        self.dead.add(victim)
        await self.until_up(total, 120, f"the lost host's {moved} dynos up elsewhere")
        s7 = await m.snapshot()
        lost_at = next((_log_time(m.group(1)) for m in
                        map(LOST.match, self.coordinator.lines_since(mark)) if m), None)
        seen = f"{lost_at - killed_at:.1f} s" if lost_at else "?"
        print(f"3. one host killed -> its {moved} dynos up elsewhere in {s7.at - s6.at:.1f} s "
              f"(lease expiry seen after {seen}, --host-ttl {HOST_TTL_S}); "
              f"{m.usage(s6, s7)}; {self.stalls()}", flush=True)
        print(f"   {self.coordinator.converges_since(mark)}", flush=True)

        # 4. Idle.
        await asyncio.sleep(2)
        s8 = await m.snapshot()
        self.stall_s = 0.0
        await asyncio.sleep(IDLE_S)
        s9 = await m.snapshot()
        wall = s9.at - s8.at
        rates = {k.removeprefix("rpc "): v / wall for k, v in m.writes(s8, s9).items()
                 if k.startswith("rpc ") and v}
        print(f"4. idle {IDLE_S:g} s, {HOSTS - 1:,} agents connected, {total:,} dynos: "
              f"{m.usage(s8, s9)}; {self.rss()}; {self.stalls()}")
        print("   etcd requests/s: " + ", ".join(
            f"{k} {v:.0f}" for k, v in sorted(rates.items(), key=lambda kv: -kv[1])),
            flush=True)

        # 5. One app, one PATCH, +CHANGE dynos; then back.
        big = {"web": {"quantity": WEB + CHANGE // 2},
               "worker": {"quantity": WORKER + CHANGE // 2}}
        mark, s4 = self.coordinator.mark(), await m.snapshot()
        self.stall_s = 0.0
        await self.call("PATCH", f"/v1/apps/{_app(0)}/formation", big)
        await self.until_up(total + CHANGE, 600, f"{CHANGE:,} more dynos up")
        s5 = await m.snapshot()
        print(f"5. one PATCH, one app +{CHANGE:,} dynos (web {WEB}->{WEB + CHANGE // 2}, "
              f"worker {WORKER}->{WORKER + CHANGE // 2}) -> all up in {s5.at - s4.at:.2f} s; "
              f"{m.usage(s4, s5)}; {self.rss()}; {self.stalls()}", flush=True)
        print(f"    {self.coordinator.converges_since(mark)}; etcd "
              f"{m.writes(s4, s5)['etcd_mvcc_put_total']:,.0f} keys written", flush=True)
        mark, s4 = self.coordinator.mark(), await m.snapshot()
        self.stall_s = 0.0
        await self.call("PATCH", f"/v1/apps/{_app(0)}/formation",
                        {"web": {"quantity": WEB}, "worker": {"quantity": WORKER}})
        await self.until_up(total, 600, f"{CHANGE:,} dynos down")
        s5 = await m.snapshot()
        print(f"    and back (-{CHANGE:,}): all stopped in {s5.at - s4.at:.2f} s; "
              f"{m.usage(s4, s5)}; {self.stalls()}; {self.coordinator.converges_since(mark)}",
              flush=True)

        # 6. Every app web +10: APPS PATCHes, +CHANGE dynos (last: it is the step that
        # loads the coordinator most, many rounds each re-sending whole desired sets).
        mark, s4 = self.coordinator.mark(), await m.snapshot()
        self.stall_s = 0.0
        patched = asyncio.create_task(self.each([
            self.call("PATCH", f"/v1/apps/{_app(a)}/formation",
                                  {"web": {"quantity": WEB + 10}}) for a in range(APPS)]))
        await patched
        answered = time.monotonic() - s4.at
        await self.until_up(total + CHANGE, 600, f"{CHANGE:,} more dynos up")
        s5 = await m.snapshot()
        total += CHANGE
        print(f"6. {APPS:,} PATCHes, web +10 each (+{CHANGE:,} dynos) -> all answered in "
              f"{answered:.1f} s, all up in {s5.at - s4.at:.1f} s; {m.usage(s4, s5)}; "
              f"{self.rss()}; {self.stalls()}", flush=True)
        print(f"    {self.coordinator.converges_since(mark)}; etcd "
              f"{m.writes(s4, s5)['etcd_mvcc_put_total']:,.0f} keys written", flush=True)


def _app(n: int) -> str:
    return f"app-{n:04d}"


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="benchfleet") as tmp:
        etcd = EtcdProcess()
        coordinator = None
        try:
            etcd.start()
            coordinator = Coordinator(etcd, Path(tmp))
            asyncio.run(Bench(etcd, coordinator).run())
        except BaseException:
            if coordinator is not None:
                kept = Path(tempfile.mkstemp(prefix="bench_fleet-", suffix=".log")[1])
                shutil.copyfile(coordinator.log, kept)
                print(f"--- the coordinator's log (all of it in {kept}), last lines:\n"
                      f"{coordinator.tail()}", file=sys.stderr)
            raise
        finally:
            if coordinator is not None:
                coordinator.stop()
            etcd.close()


if __name__ == "__main__":
    main()
