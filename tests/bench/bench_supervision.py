"""Supervision at scale, through the real daemon in a test host: 200 simultaneous starts to
all `up`, the agent's (and holder's) RSS and CPU with 200 idle dynos over 60 s, and log
throughput to a follower with the agent's peak memory. Peers are measured in the same run."""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tests.support.agentproc import AgentProcess
from tests.support.bench import InfoProbe, close_stream, seq_pipe_rate, temp_slug
from tests.support.testhost import new_test_host
from tests.support.wait import wait_for

DYNOS = 200
IDLE_S = 60.0
LOG_LINES = 300_000
CLK_TCK = os.sysconf("SC_CLK_TCK")


def _status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    raise KeyError(key)


def _cpu_s(pid: int) -> float:
    raw = Path(f"/proc/{pid}/stat").read_text()
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


def _spec(app: str, name: str, command: str, slug: Path) -> dict[str, Any]:
    return {"app": app, "name": name, "command": command,
            "release": {"version": 1, "slug": {"path": str(slug)}}}


class UpCounter:
    """Follows /v1/events on a thread and notes when each dyno id first became `up`."""

    def __init__(self, agent: AgentProcess) -> None:
        self.stream = agent.stream("/v1/events?follow=1", timeout_s=300)
        self.up_at: dict[str, float] = {}
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            while raw := self.stream.readline():
                event = json.loads(raw)
                if event.get("state") == "up":
                    self.up_at.setdefault(event["id"], time.monotonic())

    def close(self) -> None:
        close_stream(self.stream, self._thread)


def _start_200(agent: AgentProcess, slug: Path) -> tuple[list[str], dict[str, float]]:
    counter = UpCounter(agent)
    latencies: list[float] = []
    probe = InfoProbe(agent)
    try:
        started = time.monotonic()

        def create(n: int) -> str:
            t0 = time.monotonic()
            status = agent.api("POST", "/v1/dynos",
                               _spec("bench", f"worker.{n}", "exec sleep 100000", slug),
                               expect=201, timeout_s=300)
            latencies.append(time.monotonic() - t0)
            return str(status["id"])

        with ThreadPoolExecutor(DYNOS) as pool:
            ids = list(pool.map(create, range(1, DYNOS + 1)))
        accepted_s = time.monotonic() - started
        wait_for(lambda: all(i in counter.up_at for i in ids), 300, interval_s=0.05,
                 what=f"{DYNOS} dynos up")
        all_up_s = max(counter.up_at[i] for i in ids) - started
        ups = sorted(counter.up_at[i] - started for i in ids)
    finally:
        info_ms = [ms for _, ms in probe.stop()]
        counter.close()
    return ids, {"accepted_s": accepted_s, "all_up_s": all_up_s,
                 "info_median_ms": statistics.median(info_ms), "info_max_ms": max(info_ms),
                 "median_up_s": statistics.median(ups),
                 "median_request_ms": statistics.median(latencies) * 1e3}


def _peer_unshare_200() -> float:
    """The floor: 200 `unshare` sandboxes (pid, mount, net, uts, ipc namespaces; no cgroup,
    no network wiring, no supervision) started at once, until each runs `sleep`."""
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
        return time.monotonic() - started
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


def _idle(agent: AgentProcess) -> dict[str, float]:
    assert agent.proc is not None
    pid = agent.proc.pid
    holder = _holder_pid(agent)
    rss_start = _status_kib(pid, "VmRSS")
    cpu_agent, cpu_holder = _cpu_s(pid), _cpu_s(holder) if holder else 0.0
    rss_samples: list[int] = []
    deadline = time.monotonic() + IDLE_S
    while time.monotonic() < deadline:
        rss_samples.append(_status_kib(pid, "VmRSS"))
        time.sleep(1.0)  # a sampling period, not a wait for a condition
    return {
        "agent_rss_mib_start": rss_start / 1024,
        "agent_rss_mib_median": statistics.median(rss_samples) / 1024,
        "agent_cpu_pct": (_cpu_s(pid) - cpu_agent) / IDLE_S * 100,
        "holder_rss_mib": (_status_kib(holder, "VmRSS") / 1024) if holder else float("nan"),
        "holder_cpu_pct": ((_cpu_s(holder) - cpu_holder) / IDLE_S * 100) if holder
        else float("nan"),
    }


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


def main() -> None:
    with temp_slug() as slug, new_test_host("dt") as host:
        agent = AgentProcess(extra={"log_level": "info"}, netns=host.name)
        try:
            agent.start()
            ids, start = _start_200(agent, slug)
            idle = _idle(agent)
            delete_s = _delete_all(agent, ids)
            logs = _log_throughput(agent, slug)
        except BaseException:
            print(agent.log()[-5000:])
            raise
        finally:
            agent.cleanup()
    peer_start_s = _peer_unshare_200()
    peer_lines_per_s = seq_pipe_rate(LOG_LINES)  # the ceiling
    print(f"{DYNOS} simultaneous starts (worker dynos running sleep), 1 run:")
    print(f"  all requests answered 201       {start['accepted_s']:7.2f} s  "
          f"(median request {start['median_request_ms']:.0f} ms)")
    print(f"  all {DYNOS} up                      {start['all_up_s']:7.2f} s  "
          f"(median dyno up at {start['median_up_s']:.2f} s)")
    print(f"  GET /v1/info meanwhile (every 50 ms): median {start['info_median_ms']:.1f} ms, "
          f"max {start['info_max_ms']:.0f} ms")
    print(f"  peer: {DYNOS} bare `unshare` sandboxes {peer_start_s:7.2f} s  "
          f"ratio agent/peer {start['all_up_s'] / peer_start_s:.1f}x")
    print(f"  delete all {DYNOS} (32 at a time)     {delete_s:7.2f} s")
    print(f"{DYNOS} idle dynos over {IDLE_S:.0f} s (sample_interval_s 20):")
    print(f"  agent RSS median {idle['agent_rss_mib_median']:.1f} MiB "
          f"(at start of window {idle['agent_rss_mib_start']:.1f} MiB), "
          f"CPU {idle['agent_cpu_pct']:.2f} % of one core")
    print(f"  holder RSS {idle['holder_rss_mib']:.1f} MiB, CPU {idle['holder_cpu_pct']:.2f} %")
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
