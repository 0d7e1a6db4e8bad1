"""Log drain throughput (issue 17): one dyno printing `seq 1 N` as fast as it can, through holder
and agent to a local syslog drain (a receiver started in the test host that stores what it
reads), against the same lines read from a bare pipe by Python in the same run; the agent's
RSS sampled meanwhile, and the drain's counters from /metrics. Medians of RUNS runs.

`DRAINS_BENCH_LINES` and `DRAINS_BENCH_RUNS` change the size."""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.bench.bench_logs import print_rss, sampled_agent
from tests.support.agentproc import AgentProcess
from tests.support.bench import seq_pipe_rate, temp_slug
from tests.support.drainmetrics import drain_metrics
from tests.support.testhost import TestHost, new_test_host

LINES = int(os.environ.get("DRAINS_BENCH_LINES", "500000"))
RUNS = int(os.environ.get("DRAINS_BENCH_RUNS", "3"))
TOP = Path(__file__).resolve().parents[2]


def _drain_once(agent: AgentProcess, host: TestHost, slug: Path, app: str, port: int,
                out: Path) -> dict[str, Any]:
    marker = f" host app worker.1 - {LINES}"
    receiver = host.popen([sys.executable, "-m", "tests.support.drainreceiver", "syslog",
                           str(port), str(out), "--mark", marker], cwd=TOP)
    try:
        assert receiver.stdout is not None
        assert "ready" in receiver.stdout.readline()
        status = agent.api("POST", "/v1/dynos", {
            "app": app, "name": "worker.1", "command": f"seq 1 {LINES}; exec sleep 100000",
            "release": {"version": 1, "slug": {"path": str(slug)}},
            "log_drains": [f"syslog://127.0.0.1:{port}"]}, expect=201)
        first = float(receiver.stdout.readline().split()[1])
        last = float(receiver.stdout.readline().split()[1])
        deadline = time.monotonic() + 60
        while (counters := drain_metrics(agent, app)).get("dynoagent_drain_lines_queued") \
                and time.monotonic() < deadline:
            time.sleep(0.1)
        agent.api("DELETE", f"/v1/dynos/{status['id']}", expect=204, timeout_s=120)
    finally:
        receiver.terminate()
        receiver.communicate(timeout=10)
    received = out.read_bytes().count(b" host app worker.1 - ")
    out.unlink()
    return {"lines_per_s": LINES / (last - first) if last > first else float("nan"),
            "received": received, "delivered": counters["dynoagent_drain_lines_delivered_total"],
            "dropped": counters["dynoagent_drain_lines_dropped_total"]}


def main() -> None:
    runs: list[dict[str, Any]] = []
    pipes: list[float] = []
    with temp_slug() as slug, new_test_host("dt") as host, \
            tempfile.TemporaryDirectory(prefix="dtdrains") as work:
        agent = AgentProcess(extra={"log_level": "info"}, netns=host.name)
        with sampled_agent(agent) as (sampler, rss_idle):
            for i in range(RUNS):
                sampler.reset()
                result = _drain_once(agent, host, slug, f"drains{i}", 5800 + i,
                                     Path(work) / f"run{i}.log")
                result["peak_rss_mib"] = sampler.peak / 1024
                runs.append(result)
                pipes.append(seq_pipe_rate(LINES))
    drain = statistics.median(r["lines_per_s"] for r in runs)
    pipe = statistics.median(pipes)
    print(f"one dyno printing `seq 1 {LINES}`, one local syslog drain, {RUNS} runs:")
    for r in runs:
        print(f"  run: {r['lines_per_s']:>11,.0f} lines/s at the receiver, {r['received']} "
              f"received, {r['delivered']:.0f} delivered + {r['dropped']:.0f} dropped "
              f"(agent's counters); agent peak RSS {r['peak_rss_mib']:.1f} MiB")
    print(f"  drain median {drain:,.0f} lines/s; bare pipe read by Python median "
          f"{pipe:,.0f} lines/s; ratio pipe/drain {pipe / drain:.1f}x")
    print_rss(rss_idle, runs)


if __name__ == "__main__":
    main()
