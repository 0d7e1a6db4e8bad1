"""A web dyno is `up` once its $PORT accepts: how long after the app's listen(2) an operator
following /v1/events hears it. Each dyno listens a random 100 to 300 ms after it starts and
logs the wall clock right after listen; the bench notes the wall clock at which the `up`
event reaches it. The agent hears listens from the kernel (a sock_ops program on the dyno's
cgroup); the peer, in the same run, is the same agent with DYNOAGENT_LISTEN_EVENTS=0, which
finds out by connecting every 50 ms (its probe alone). Prints figures; asserts nothing.
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Any

from tests.support.agentproc import AgentProcess
from tests.support.bench import close_stream, percentile, temp_slug
from tests.support.testhost import new_test_host
from tests.support.wait import wait_for

RUNS = int(os.environ.get("BENCH_WEBUP_RUNS", "30"))
GOAL_MS = 5.0
# Listens after a random pause (not on the probes' grid), then logs when.
WEB = ("python3 -c 'import os, random, socket, time; time.sleep(random.uniform(0.1, 0.3)); "
       "s = socket.socket(); s.bind((\"\", int(os.environ[\"PORT\"]))); s.listen(); "
       "print(\"listening\", repr(time.time()), flush=True); time.sleep(1e6)'")


class UpTimes:
    """The wall clock at which each dyno's `up` event arrived on /v1/events."""

    def __init__(self, agent: AgentProcess) -> None:
        self.stream = agent.stream("/v1/events?follow=1", timeout_s=300)
        self.up_at: dict[str, float] = {}
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while raw := self.stream.readline():
                now = time.time()
                event = json.loads(raw)
                if event.get("state") == "up":
                    self.up_at.setdefault(str(event["id"]), now)
        except (OSError, ValueError, AttributeError):
            return

    def close(self) -> None:
        close_stream(self.stream, self._thread)


def _listened_at(agent: AgentProcess, name: str) -> float | None:
    text = agent.api("GET", f"/v1/logs?app=webup&dyno={name}&tail=50") or ""
    for line in str(text).splitlines():
        if "listening " in line:
            return float(line.rsplit("listening ", 1)[1])
    return None


def _measure(slug: Path, events: bool) -> list[float]:
    """Milliseconds from listen(2) to the `up` event, one per dyno."""
    env = {} if events else {"DYNOAGENT_LISTEN_EVENTS": "0"}
    with new_test_host("dw") as host:
        agent = AgentProcess(extra={"log_level": "info"}, env=env, netns=host.name)
        try:
            agent.start()
            ups = UpTimes(agent)
            latencies: list[float] = []
            try:
                for n in range(RUNS):
                    name = f"web.{n + 1}"
                    spec: dict[str, Any] = {"app": "webup", "name": name, "command": WEB,
                                            "release": {"version": 1,
                                                        "slug": {"path": str(slug)}}}
                    dyno_id = str(agent.api("POST", "/v1/dynos", spec, expect=201)["id"])
                    wait_for(functools.partial(ups.up_at.__contains__, dyno_id), 30,
                             interval_s=0.01, what=f"{name} up")
                    listened = wait_for(functools.partial(_listened_at, agent, name), 10,
                                        what=f"{name}'s listen line")
                    latencies.append((ups.up_at[dyno_id] - listened) * 1e3)
                    agent.api("DELETE", f"/v1/dynos/{dyno_id}")
            finally:
                ups.close()
            return latencies
        except BaseException:
            print(agent.log()[-3000:])
            raise
        finally:
            agent.cleanup()


def main() -> None:
    if os.geteuid() != 0:
        print("skipped: needs root (namespaces, cgroups, netns)")
        return
    with temp_slug() as slug:
        heard = _measure(slug, events=True)
        probed = _measure(slug, events=False)
    med, p90 = statistics.median(heard), percentile(heard, 90)
    peer_med, peer_p90 = statistics.median(probed), percentile(probed, 90)
    print(f"web dyno listen(2) -> `up` on /v1/events, {RUNS} dynos each:")
    print(f"  heard from the kernel (sock_ops)   median {med:6.2f} ms, p90 {p90:6.2f} ms, "
          f"max {max(heard):6.2f} ms")
    print(f"  peer: connect probe every 50 ms    median {peer_med:6.2f} ms, p90 "
          f"{peer_p90:6.2f} ms, max {max(probed):6.2f} ms")
    print(f"  ratio {med / peer_med:.2f}x; goal <= {GOAL_MS:.0f} ms: "
          f"{'met' if med <= GOAL_MS else 'NOT met'} (median)")
