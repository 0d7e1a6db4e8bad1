"""Supervision at scale, through the real daemon in a test host: 200 simultaneous starts to
all `up`; 1,000 idle dynos (`sleep`), with the agent's and the holder's RSS and CPU over 60 s
of no requests, then the operator API's latency over 30 s, and the host kernel's memory per
dyno next to a bare netns, veth pair and cgroup; log throughput to
a follower with the agent's peak memory. Peers are measured in the same run, goals are
issue 18's.

Knobs: BENCH_SUPERVISION_IDLE_DYNOS (1000), BENCH_SUPERVISION_IDLE_S (60),
BENCH_SUPERVISION_API_S (30), BENCH_SUPERVISION_BATCH (100 starts at a time past the first 200).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import statistics
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tests.support.agentproc import AgentProcess, rmdir_quietly
from tests.support.bench import (
    KERNEL_FIELDS,
    ApiProbe,
    close_stream,
    cpu_ticks,
    cpu_use,
    kernel_kib,
    percentile,
    seq_pipe_rate,
    settled_meminfo,
    temp_slug,
)
from tests.support.names import unique
from tests.support.testhost import NETNS_DIR, ip, new_test_host
from tests.support.wait import wait_for

DYNOS = 200  # started at once
IDLE_DYNOS = max(DYNOS, int(os.environ.get("BENCH_SUPERVISION_IDLE_DYNOS", "1000")))
IDLE_S = float(os.environ.get("BENCH_SUPERVISION_IDLE_S", "60"))
API_S = float(os.environ.get("BENCH_SUPERVISION_API_S", "30"))
BATCH = int(os.environ.get("BENCH_SUPERVISION_BATCH", "100"))
# A space (by default one per app) has a /24 on each host: 253 dynos at most, so the idle
# dynos are spread over apps of 200 (bench, bench2, bench3…; the first 200 start at once).
DYNOS_PER_APP = 200
# The idle dyno: `sleep` under a small size (its limits only cap; they reserve nothing).
IDLE_SIZE = "bench-idle"
IDLE_SIZE_TABLE = {"memory_mb": 64, "pids_max": 32}
# Issue 18's goals.
GOAL_ALL_UP_S = 3.0
GOAL_AGENT_RSS_MB = 150.0
GOAL_AGENT_CPU_PCT = 2.0
GOAL_HOLDER_RSS_MB = 100.0
GOAL_API_P99_MS = 50.0
MB = 1e6
LOG_LINES = 300_000
CLK_TCK = os.sysconf("SC_CLK_TCK")


def _status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    raise KeyError(key)


def _cpu_s(pid: int, tid: int | None = None) -> float:
    """CPU seconds of process `pid`, or of its thread `tid`."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    raw = Path(path).read_text()
    fields = raw[raw.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def _holder_pid(agent: AgentProcess) -> int | None:
    needle = f"{agent.base}/run/holder.sock".encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if needle in (entry / "cmdline").read_bytes():
                    return int(entry.name)
    return None


def _spec(app: str, name: str, command: str, slug: Path,
          size: str | None = None) -> dict[str, Any]:
    spec = {"app": app, "name": name, "command": command,
            "release": {"version": 1, "slug": {"path": str(slug)}}}
    return spec if size is None else {**spec, "size": size}


def _create_idle(agent: AgentProcess, slug: Path, n: int) -> str:
    """Dyno number `n` (from 1): worker.N of app bench, bench2… (DYNOS_PER_APP each)."""
    app = "bench" + (str(1 + (n - 1) // DYNOS_PER_APP) if n > DYNOS_PER_APP else "")
    status = agent.api("POST", "/v1/dynos",
                       _spec(app, f"worker.{n}", "exec sleep 100000", slug, IDLE_SIZE),
                       expect=201, timeout_s=300)
    return str(status["id"])


def _goal(met: bool) -> str:
    return "met" if met else "NOT met"


class UpCounter:
    """Follows /v1/events on a thread and notes when each dyno id first became `up`, and
    which crashed."""

    def __init__(self, agent: AgentProcess) -> None:
        self.stream = agent.stream("/v1/events?follow=1", timeout_s=300)
        self.up_at: dict[str, float] = {}
        self.crashed: set[str] = set()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            while raw := self.stream.readline():
                event = json.loads(raw)
                if event.get("state") == "up":
                    self.up_at.setdefault(event["id"], time.monotonic())
                elif event.get("state") == "crashed":
                    self.crashed.add(event["id"])

    def all_up(self, ids: list[str]) -> bool:
        """Whether every dyno of `ids` is up; raises once one has crashed instead."""
        if crashed := self.crashed.intersection(ids):
            raise RuntimeError(f"{len(crashed)} dynos crashed (see the agent's log)")
        return all(i in self.up_at for i in ids)

    def close(self) -> None:
        close_stream(self.stream, self._thread)


def _start_200(agent: AgentProcess, slug: Path) -> tuple[list[str], dict[str, float]]:
    counter = UpCounter(agent)
    latencies: list[float] = []
    probe = ApiProbe(agent)
    try:
        ticks = cpu_ticks()
        started = time.monotonic()

        def create(n: int) -> str:
            t0 = time.monotonic()
            dyno_id = _create_idle(agent, slug, n)
            latencies.append(time.monotonic() - t0)
            return dyno_id

        with ThreadPoolExecutor(DYNOS) as pool:
            ids = list(pool.map(create, range(1, DYNOS + 1)))
        accepted_s = time.monotonic() - started
        wait_for(lambda: counter.all_up(ids), 300, interval_s=0.05, what=f"{DYNOS} dynos up")
        cpu = cpu_use(ticks, cpu_ticks())
        all_up_s = max(counter.up_at[i] for i in ids) - started
        ups = sorted(counter.up_at[i] - started for i in ids)
    finally:
        info_ms = [ms for _, ms in probe.stop()]
        counter.close()
    return ids, {"accepted_s": accepted_s, "all_up_s": all_up_s,
                 "info_median_ms": statistics.median(info_ms), "info_max_ms": max(info_ms),
                 "median_up_s": statistics.median(ups), "cpu_busy_pct": cpu["busy"],
                 "cpu_steal_pct": cpu["steal"],
                 "median_request_ms": statistics.median(latencies) * 1e3}


def _fill(agent: AgentProcess, slug: Path, first: int, count: int
          ) -> tuple[list[str], dict[str, float]]:
    """Start dynos `first`… up to `count` of them, BATCH at a time, each batch all `up`
    before the next is asked for."""
    counter = UpCounter(agent)
    ids: list[str] = []
    batches_s: list[float] = []
    started = time.monotonic()
    try:
        for low in range(first, first + count, BATCH):
            numbers = range(low, min(low + BATCH, first + count))
            t0 = time.monotonic()
            with ThreadPoolExecutor(len(numbers)) as pool:
                batch = list(pool.map(lambda n: _create_idle(agent, slug, n), numbers))
            wait_for(functools.partial(counter.all_up, batch), 300, interval_s=0.05,
                     what=f"dynos {numbers.start}…{numbers.stop - 1} up")
            batches_s.append(time.monotonic() - t0)
            ids += batch
    finally:
        counter.close()
    return ids, {"fill_s": time.monotonic() - started, "batches": len(batches_s),
                 "batch_median_s": statistics.median(batches_s) if batches_s else 0.0,
                 "batch_max_s": max(batches_s, default=0.0)}


def _peer_unshare_200() -> tuple[float, dict[str, float]]:
    """The floor: 200 `unshare` sandboxes (pid, mount, net, uts, ipc namespaces; no cgroup,
    no network wiring, no supervision) started at once, until each runs `sleep`; and what
    each costs the host while it runs."""
    before = settled_meminfo()
    started = time.monotonic()
    # --kill-child: the sandbox's PID 1 gets SIGKILL (parent-death signal) when unshare dies,
    # otherwise killing unshare would leave every sandbox running.
    procs = [subprocess.Popen(["unshare", "--fork", "--kill-child", "--pid", "--mount", "--net",
                               "--uts", "--ipc", "--mount-proc", "sh", "-c",
                               "echo up; exec sleep 100000"],
                              stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
             for _ in range(DYNOS)]
    try:
        for proc in procs:
            assert proc.stdout is not None
            proc.stdout.readline()
        elapsed_s = time.monotonic() - started
        return elapsed_s, _per_unit_kib(before, settled_meminfo(), DYNOS)
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


def _idle(agent: AgentProcess) -> dict[str, float]:
    """RSS (sampled every second) and CPU over IDLE_S of the agent and its holder, with no
    request to the agent meanwhile."""
    assert agent.proc is not None
    pid = agent.proc.pid
    holder = _holder_pid(agent)
    assert holder is not None, "no holder process"
    rss_start = _status_kib(pid, "VmRSS")
    cpu_agent, cpu_loop, cpu_holder = _cpu_s(pid), _cpu_s(pid, pid), _cpu_s(holder)
    agent_rss: list[int] = []
    holder_rss: list[int] = []
    started = time.monotonic()
    while time.monotonic() < started + IDLE_S:
        agent_rss.append(_status_kib(pid, "VmRSS"))
        holder_rss.append(_status_kib(holder, "VmRSS"))
        time.sleep(1.0)  # a sampling period, not a wait for a condition
    elapsed = time.monotonic() - started
    return {
        "agent_rss_mb_start": rss_start * 1024 / MB,
        "agent_rss_mb_median": statistics.median(agent_rss) * 1024 / MB,
        "agent_rss_mb_max": max(agent_rss) * 1024 / MB,
        "agent_cpu_pct": (_cpu_s(pid) - cpu_agent) / elapsed * 100,
        "agent_loop_cpu_pct": (_cpu_s(pid, pid) - cpu_loop) / elapsed * 100,
        "agent_threads": len(list(Path(f"/proc/{pid}/task").iterdir())),
        "holder_rss_mb_median": statistics.median(holder_rss) * 1024 / MB,
        "holder_rss_mb_max": max(holder_rss) * 1024 / MB,
        "holder_cpu_pct": (_cpu_s(holder) - cpu_holder) / elapsed * 100,
    }


def _api_latency(agent: AgentProcess) -> dict[str, float]:
    """GET /v1/info every 100 ms and GET /v1/dynos (every dyno) every 250 ms, for API_S; the
    agent's CPU meanwhile."""
    assert agent.proc is not None
    pid = agent.proc.pid
    cpu = _cpu_s(pid)
    started = time.monotonic()
    probes = {"info": ApiProbe(agent, "/v1/info", 0.1),
              "dynos": ApiProbe(agent, "/v1/dynos", 0.25)}
    time.sleep(API_S)  # the window being measured, not a wait for a condition
    figures: dict[str, float] = {}
    for name, probe in probes.items():
        ms = [m for _, m in probe.stop()]
        figures |= {f"{name}_n": len(ms), f"{name}_p50_ms": percentile(ms, 50),
                    f"{name}_p99_ms": percentile(ms, 99), f"{name}_max_ms": max(ms)}
    figures["agent_cpu_pct"] = (_cpu_s(pid) - cpu) / (time.monotonic() - started) * 100
    return figures


def _per_unit_kib(before: dict[str, int], after: dict[str, int], count: int
                  ) -> dict[str, float]:
    """What `count` things cost the host, each, from meminfo before and after (KiB)."""
    cost = {k: (after[k] - before[k]) / count for k in (*KERNEL_FIELDS, "AnonPages", "Shmem")}
    cost["kernel"] = (kernel_kib(after) - kernel_kib(before)) / count
    cost["available"] = (before["MemAvailable"] - after["MemAvailable"]) / count
    return cost


def _peer_netns(count: int, veth: bool) -> dict[str, float]:
    """`count` bare network namespaces made with `ip` (lo up), each with a veth pair whose
    other end (up) lies in one more namespace, like a host end, when `veth`."""
    tag = unique("", 4)
    names = [f"dtk{tag}{i:04d}" for i in range(count)]
    before = settled_meminfo()
    made: list[str] = []
    with contextlib.ExitStack() as cleanup:
        host = f"dtk{tag}h"
        ip("netns", "add", host)
        cleanup.callback(ip, "netns", "del", host, check=False)

        def delete_all() -> None:
            subprocess.run(["ip", "-force", "-batch", "-"],
                           input="".join(f"netns del {n}\n" for n in made),
                           capture_output=True, text=True, timeout=600, check=False)

        cleanup.callback(delete_all)
        made.extend(names)
        subprocess.run(["ip", "-batch", "-"], input="".join(f"netns add {n}\n" for n in names),
                       capture_output=True, text=True, timeout=600, check=True)
        if veth:
            lines = [f"link add k{tag}{i:04d} type veth peer name eth0 netns {n}\n"
                     f"link set k{tag}{i:04d} up\n" for i, n in enumerate(names)]
            subprocess.run(["ip", "-n", host, "-batch", "-"], input="".join(lines),
                           capture_output=True, text=True, timeout=600, check=True)

        def up(name: str) -> None:
            ip("-n", name, "link", "set", "lo", "up")
            if veth:
                ip("-n", name, "link", "set", "eth0", "up")

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(up, names))
        after = settled_meminfo()
    return _per_unit_kib(before, after, count)


def _peer_cgroups(count: int, hierarchies: list[Path]) -> dict[str, float]:
    """`count` bare cgroups: one empty directory in each of the hierarchies a dyno has a
    group in."""
    parent = unique("dtbenchcg", 6)
    before = settled_meminfo()
    made: list[Path] = []
    try:
        for hierarchy in hierarchies:
            (hierarchy / parent).mkdir()
            made.append(hierarchy / parent)
            for i in range(count):
                (hierarchy / parent / f"g{i}").mkdir()
                made.append(hierarchy / parent / f"g{i}")
        after = settled_meminfo()
    finally:
        for group in reversed(made):
            wait_for(functools.partial(rmdir_quietly, group), 5, what=f"rmdir {group}")
    return _per_unit_kib(before, after, count)


def _leftovers(dyno_netns: set[str], cgroup_root: str) -> list[str]:
    """What the run left behind: the dynos' network namespaces, the agent's cgroups."""
    found = [f"netns {n}" for n in sorted(dyno_netns & _netns_names())]
    found += [f"cgroup {p}" for p in sorted(Path("/sys/fs/cgroup").glob(f"*/{cgroup_root}"))]
    return found


def _delete_all(agent: AgentProcess, ids: list[str]) -> float:
    started = time.monotonic()
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(lambda i: agent.api("DELETE", f"/v1/dynos/{i}", expect=204,
                                          timeout_s=300), ids))
    return time.monotonic() - started


def _log_throughput(agent: AgentProcess, slug: Path) -> dict[str, float]:
    """A dyno prints LOG_LINES lines as fast as it can (`seq`); a follower reads the stream in
    big chunks, so the agent (not the reader) is the bottleneck. Ends once the stream has been
    quiet for a second after the output began (the end marker itself may have been dropped)."""
    assert agent.proc is not None
    pid = agent.proc.pid
    stream = agent.stream("/v1/logs?app=logs&follow=1", timeout_s=120)
    received = 0
    follower_dropped = 0
    first: float | None = None
    last = 0.0
    carry = b""
    rss_before = _status_kib(pid, "VmRSS")
    try:
        status = agent.api("POST", "/v1/dynos", _spec(
            "logs", "worker.1", f"seq 1 {LOG_LINES}; echo end-of-output; exec sleep 100000",
            slug), expect=201)
        stream.settimeout(30)
        while True:
            try:
                chunk = stream.response.read1(1 << 16)
            except TimeoutError:
                break
            if not chunk:
                break
            now = time.monotonic()
            lines = (carry + chunk).split(b"\n")
            carry = lines.pop()
            for line in lines:
                if b" app[worker.1]: " in line:
                    received += 1
                    first = first or now
                    last = now
                elif b" agent[logs]: Error L10" in line:
                    follower_dropped += int(line.rsplit(b": ", 1)[1].split()[0])
            if first is not None:
                stream.settimeout(1.0)
        elapsed = last - (first or last)
        holder_dropped = agent.api("GET", f"/v1/dynos/{status['id']}")["output_dropped"]
        agent.api("DELETE", f"/v1/dynos/{status['id']}", expect=204)
    finally:
        stream.close()
    return {"received": received, "follower_dropped": follower_dropped,
            "holder_dropped": holder_dropped,
            "lines_per_s": received / elapsed if elapsed > 0 else float("nan"),
            "rss_before_mib": rss_before / 1024,
            "peak_rss_mib": _status_kib(pid, "VmHWM") / 1024}


def _netns_names() -> set[str]:
    return {p.name for p in NETNS_DIR.iterdir()}


def _cost_row(label: str, cost: dict[str, float]) -> str:
    return (f"  {label:<28}" + "".join(f"{cost[k]:>13.1f}" for k in KERNEL_FIELDS)
            + f"{cost['kernel']:>9.1f}{cost['AnonPages']:>10.1f}{cost['available']:>10.1f}")


def main() -> None:
    netns_before = _netns_names()
    with temp_slug() as slug, new_test_host("dt") as host:
        agent = AgentProcess(extra={"log_level": "info", "sizes": {IDLE_SIZE: IDLE_SIZE_TABLE}},
                             netns=host.name)
        cgroup_root = agent.settings["cgroup_root"]
        try:
            agent.start()
            empty = settled_meminfo()
            ids, start = _start_200(agent, slug)
            more, fill = _fill(agent, slug, DYNOS + 1, IDLE_DYNOS - DYNOS)
            ids += more
            full = settled_meminfo()
            hierarchies = sorted(h for h in Path("/sys/fs/cgroup").iterdir()
                                 if (h / cgroup_root).is_dir())
            dyno_netns = _netns_names() - netns_before
            idle = _idle(agent)
            api = _api_latency(agent)
            delete_s = _delete_all(agent, ids)
            logs = _log_throughput(agent, slug)
        except BaseException:
            print(agent.log()[-5000:])
            raise
        finally:
            agent.cleanup()
    left = _leftovers(dyno_netns, cgroup_root)
    peer_start_s, peer_sandbox = _peer_unshare_200()
    peer_netns = _peer_netns(IDLE_DYNOS, veth=False)
    peer_veth = _peer_netns(IDLE_DYNOS, veth=True)
    peer_cgroup = _peer_cgroups(IDLE_DYNOS, hierarchies)
    peer_lines_per_s = seq_pipe_rate(LOG_LINES)  # the ceiling
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    print(f"load average at the end: {load} ({os.cpu_count()} CPUs)")
    print(f"{DYNOS} simultaneous starts (worker dynos running sleep), 1 run:")
    print(f"  all requests answered 201       {start['accepted_s']:7.2f} s  "
          f"(median request {start['median_request_ms']:.0f} ms)")
    print(f"  all {DYNOS} up                      {start['all_up_s']:7.2f} s  "
          f"(median dyno up at {start['median_up_s']:.2f} s)")
    print(f"  the host's CPUs meanwhile: {start['cpu_busy_pct']:.0f} % busy, "
          f"{start['cpu_steal_pct']:.0f} % taken by the hypervisor (steal)")
    print(f"  GET /v1/info meanwhile (every 50 ms): median {start['info_median_ms']:.1f} ms, "
          f"max {start['info_max_ms']:.0f} ms")
    print(f"  peer: {DYNOS} bare `unshare` sandboxes {peer_start_s:7.2f} s  "
          f"ratio agent/peer {start['all_up_s'] / peer_start_s:.1f}x")
    print(f"  goal all {DYNOS} up <= {GOAL_ALL_UP_S:.0f} s: {start['all_up_s']:.2f} s "
          f"({_goal(start['all_up_s'] <= GOAL_ALL_UP_S)})")
    print(f"then up to {IDLE_DYNOS} dynos, {BATCH} at a time, each batch all up before the "
          f"next: {fill['fill_s']:.1f} s for {IDLE_DYNOS - DYNOS} ({fill['batches']:.0f} batches, "
          f"median {fill['batch_median_s']:.2f} s, slowest {fill['batch_max_s']:.2f} s)")
    print(f"{IDLE_DYNOS} idle dynos (`sleep`, size {IDLE_SIZE}), no requests, over "
          f"{IDLE_S:.0f} s (sample_interval_s 20):")
    print(f"  agent RSS median {idle['agent_rss_mb_median']:.1f} MB, max "
          f"{idle['agent_rss_mb_max']:.1f} MB (at start of window "
          f"{idle['agent_rss_mb_start']:.1f} MB), {idle['agent_threads']:.0f} threads")
    print(f"  goal agent RSS <= {GOAL_AGENT_RSS_MB:.0f} MB: {idle['agent_rss_mb_max']:.1f} MB "
          f"({_goal(idle['agent_rss_mb_max'] <= GOAL_AGENT_RSS_MB)})")
    print(f"  goal agent CPU <= {GOAL_AGENT_CPU_PCT:.0f} % of a core: "
          f"{idle['agent_cpu_pct']:.2f} % ({_goal(idle['agent_cpu_pct'] <= GOAL_AGENT_CPU_PCT)}; "
          f"event-loop thread {idle['agent_loop_cpu_pct']:.2f} %, other threads "
          f"{idle['agent_cpu_pct'] - idle['agent_loop_cpu_pct']:.2f} %)")
    print(f"  holder (one for all dynos) RSS median {idle['holder_rss_mb_median']:.1f} MB, CPU "
          f"{idle['holder_cpu_pct']:.2f} % of a core")
    print(f"  goal holder RSS <= {GOAL_HOLDER_RSS_MB:.0f} MB: {idle['holder_rss_mb_max']:.1f} MB "
          f"({_goal(idle['holder_rss_mb_max'] <= GOAL_HOLDER_RSS_MB)})")
    print(f"operator API with {IDLE_DYNOS} idle dynos, over {API_S:.0f} s (agent CPU meanwhile "
          f"{api['agent_cpu_pct']:.1f} % of a core):")
    for name, path in (("info", "/v1/info every 100 ms"), ("dynos", "/v1/dynos every 250 ms")):
        print(f"  GET {path:<24} p50 {api[f'{name}_p50_ms']:6.1f} ms  p99 "
              f"{api[f'{name}_p99_ms']:6.1f} ms  max {api[f'{name}_max_ms']:6.1f} ms  "
              f"({api[f'{name}_n']:.0f} requests)")
    worst_p99 = max(api["info_p99_ms"], api["dynos_p99_ms"])
    print(f"  goal API p99 <= {GOAL_API_P99_MS:.0f} ms: {worst_p99:.1f} ms (the slower of the two) "
          f"({_goal(worst_p99 <= GOAL_API_P99_MS)})")
    print(f"  delete all {IDLE_DYNOS} (32 at a time) {delete_s:.1f} s; left behind: "
          f"{', '.join(left) or 'nothing'}")
    print("host memory per unit, KiB (/proc/meminfo before and after, slab caches shrunk; "
          "'kernel' sums the first five):")
    print(f"  {'':<28}" + "".join(f"{k:>13}" for k in KERNEL_FIELDS)
          + f"{'kernel':>9}{'AnonPages':>10}{'Avail-':>10}")
    print(_cost_row(f"idle dyno (x{IDLE_DYNOS})", _per_unit_kib(empty, full, IDLE_DYNOS)))
    print(_cost_row(f"peer: unshare sandbox (x{DYNOS})", peer_sandbox))
    print(_cost_row(f"peer: netns, ip (x{IDLE_DYNOS})", peer_netns))
    print(_cost_row(f"peer: netns + veth (x{IDLE_DYNOS})", peer_veth))
    print(_cost_row(f"peer: cgroup in {len(hierarchies)} trees", peer_cgroup))
    print(f"  ({', '.join(h.name for h in hierarchies)}; 'idle dyno' includes its tini and "
          f"sleep processes and the agent's and holder's growth; AnonPages and Avail- also "
          f"move with whatever else runs on the host)")
    print(f"log throughput, one dyno printing {LOG_LINES} lines (`seq`), one follower:")
    print(f"  delivered {logs['lines_per_s']:,.0f} lines/s to the follower "
          f"({logs['received']:.0f} of {LOG_LINES + 1} received; dropped: "
          f"{logs['holder_dropped']:.0f} by the holder before the agent read them, "
          f"{logs['follower_dropped']:.0f} by the follower's queue)")
    print(f"  peer: plain pipe read by Python {peer_lines_per_s:,.0f} lines/s  "
          f"ratio peer/agent {peer_lines_per_s / logs['lines_per_s']:.1f}x")
    print(f"  agent RSS before {logs['rss_before_mib']:.1f} MiB, peak (VmHWM, whole run) "
          f"{logs['peak_rss_mib']:.1f} MiB")


if __name__ == "__main__":
    main()
