"""Log throughput (issue 17): one dyno printing `seq 1 N` as fast as it can, through holder
and agent to one `/v1/logs?follow=1` reader, against the same lines read from a bare pipe by
Python in the same run; the agent's RSS sampled meanwhile. Medians of RUNS runs.

`LOGS_BENCH_LINES` and `LOGS_BENCH_RUNS` change the size; `LOGS_BENCH_PROFILE=DIR` has the
agent write a cProfile of its event loop there (see agent/daemon/__main__'s hook)."""

from __future__ import annotations

import contextlib
import os
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.support.agentproc import AgentProcess
from tests.support.bench import ApiProbe, seq_pipe_rate, temp_slug
from tests.support.testhost import new_test_host

LINES = int(os.environ.get("LOGS_BENCH_LINES", "1000000"))
RUNS = int(os.environ.get("LOGS_BENCH_RUNS", "3"))


def _status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    raise KeyError(key)


class RssSampler:
    """The agent's RSS every 20 ms on a thread; `peak` is the highest seen since `reset`."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            with contextlib.suppress(OSError, KeyError):
                self.peak = max(self.peak, _status_kib(self.pid, "VmRSS"))

    def reset(self) -> None:
        self.peak = _status_kib(self.pid, "VmRSS")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


@contextlib.contextmanager
def sampled_agent(agent: AgentProcess) -> Iterator[tuple[RssSampler, int]]:
    """`agent` started, its RSS sampled: the sampler and its idle RSS (KiB). The tail of its log
    is printed if anything fails; it is cleaned up after."""
    try:
        agent.start()
        assert agent.proc is not None
        sampler = RssSampler(agent.proc.pid)
        rss_idle = _status_kib(agent.proc.pid, "VmRSS")
        try:
            yield sampler, rss_idle
        finally:
            sampler.stop()
    except BaseException:
        print(agent.log()[-5000:])
        raise
    finally:
        agent.cleanup()


def print_rss(rss_idle: int, runs: list[dict[str, Any]]) -> None:
    print(f"  agent RSS idle {rss_idle / 1024:.1f} MiB, peak during the runs "
          f"{max(r['peak_rss_mib'] for r in runs):.1f} MiB")


def _follow_once(agent: AgentProcess, slug: Path, app: str) -> dict[str, float]:
    """Lines/s from the first line to the last (`N`) as the follower reads them."""
    stream = agent.stream(f"/v1/logs?app={app}&follow=1", timeout_s=120)
    received = follower_dropped = 0
    first: float | None = None
    last = 0.0
    carry = b""
    last_marker = b" app[worker.1]: " + str(LINES).encode()
    done = False
    try:
        status = agent.api("POST", "/v1/dynos", {
            "app": app, "name": "worker.1", "command": f"seq 1 {LINES}; exec sleep 100000",
            "release": {"version": 1, "slug": {"path": str(slug)}}}, expect=201)
        stream.settimeout(60)
        while not done:
            try:
                chunk = stream.response.read1(1 << 18)
            except TimeoutError:
                break
            if not chunk:
                break
            now = time.monotonic()
            # Counted at C speed, so that the reader keeps up with the agent.
            data = carry + chunk
            cut = data.rfind(b"\n") + 1
            data, carry = data[:cut], data[cut:]
            n = data.count(b" app[worker.1]: ")
            if n:
                received += n
                first = first or now
                last = now
            if b" agent[logs]: Error L10" in data:
                for line in data.split(b"\n"):
                    if b" agent[logs]: Error L10" in line:
                        follower_dropped += int(line.rsplit(b": ", 1)[1].split()[0])
            if last_marker + b"\n" in data:
                done = True
            if first is not None:
                stream.settimeout(5.0)
        elapsed = last - (first or last)
        holder_dropped = agent.api("GET", f"/v1/dynos/{status['id']}")["output_dropped"]
        agent.api("DELETE", f"/v1/dynos/{status['id']}", expect=204, timeout_s=120)
    finally:
        stream.close()
    return {"received": received, "follower_dropped": follower_dropped,
            "holder_dropped": holder_dropped, "complete": float(done),
            "first": first or 0.0, "last": last,
            "lines_per_s": received / elapsed if elapsed > 0 else float("nan")}


def main() -> None:
    runs: list[dict[str, Any]] = []
    pipes: list[float] = []
    env = {}
    if os.environ.get("LOGS_BENCH_PROFILE"):
        env["DYNOAGENT_PROFILE"] = os.environ["LOGS_BENCH_PROFILE"]
    with temp_slug() as slug, new_test_host("dt") as host:
        agent = AgentProcess(extra={"log_level": "info"}, netns=host.name, env=env)
        with sampled_agent(agent) as (sampler, rss_idle):
            for i in range(RUNS):
                sampler.reset()
                probe = ApiProbe(agent)
                try:
                    result = _follow_once(agent, slug, f"logs{i}")
                finally:
                    latencies = probe.stop()
                result["peak_rss_mib"] = sampler.peak / 1024
                # Requests sent while the lines flowed (from the first to the last).
                during = [ms for at, ms in latencies
                          if result["first"] - 0.05 <= at <= result["last"]] or [0.0]
                result["info_median_ms"] = statistics.median(during)
                result["info_max_ms"] = max(during)
                runs.append(result)
                pipes.append(seq_pipe_rate(LINES))
    follower = statistics.median(r["lines_per_s"] for r in runs)
    pipe = statistics.median(pipes)
    print(f"one dyno printing `seq 1 {LINES}`, one /v1/logs?follow=1 reader, {RUNS} runs:")
    for r in runs:
        print(f"  run: {r['lines_per_s']:>11,.0f} lines/s, {r['received']:.0f} received "
              f"(last line {'seen' if r['complete'] else 'NOT seen'}), dropped "
              f"{r['holder_dropped']:.0f} by the holder, {r['follower_dropped']:.0f} by the "
              f"follower; agent peak RSS {r['peak_rss_mib']:.1f} MiB; GET /v1/info every "
              f"50 ms while lines flowed: median {r['info_median_ms']:.1f} ms, max "
              f"{r['info_max_ms']:.0f} ms")
    print(f"  follower median {follower:,.0f} lines/s; bare pipe read by Python median "
          f"{pipe:,.0f} lines/s; ratio pipe/follower {pipe / follower:.1f}x")
    print_rss(rss_idle, runs)


if __name__ == "__main__":
    main()
