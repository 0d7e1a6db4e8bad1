"""A one-off start as a user waits for it: through the operator API of a real agent, POST a
one-off `true` and wait (following /v1/events) until it is `complete`; against `runc run` of
the same `true` in the same run, interleaved. The agent's side is broken down by the phases
each dyno timed itself (`timings_ms`: record write, queue, slug, uid, dir, cgroup, netns,
prepare, launch and its steps in the holder, up, exit → complete). Prints figures only;
asserts nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from agent.supervision.runtime import PLACED_AT_ONCE
from tests.bench.bench_launch import _build_rootfs, _oci, _oci_bundle, _percentile
from tests.support.agentproc import BIN, AgentProcess
from tests.support.bench import close_stream, launch_bench_skipped
from tests.support.testhost import new_test_host

RUNS = int(os.environ.get("BENCH_START_RUNS", "30"))
WARMUP = 3
# The phases a dyno times, in the order they happen (agent/cli/dynoctl.py START_PHASES).
PHASES = ("record", "queue", "slug", "uid", "dir", "cgroup", "netns", "prepare", "launch",
          "up", "run", "exit_event", "exit")


class StateWatch:
    """Follows /v1/events on a thread: when (monotonic) each dyno id first reached each
    state, and a condition to wait on."""

    def __init__(self, agent: AgentProcess) -> None:
        self.stream = agent.stream("/v1/events?follow=1", timeout_s=300)
        self.seen: dict[tuple[str, str], float] = {}
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            while raw := self.stream.readline():
                now = time.monotonic()
                event = json.loads(raw)
                key = (str(event.get("id")), str(event.get("state")))
                with self._changed:
                    self.seen.setdefault(key, now)
                    self._changed.notify_all()

    def wait(self, dyno_id: str, state: str, timeout_s: float = 60) -> float:
        with self._changed:
            if not self._changed.wait_for(lambda: (dyno_id, state) in self.seen, timeout_s):
                raise TimeoutError(f"dyno {dyno_id} not {state} within {timeout_s} s")
            return self.seen[(dyno_id, state)]

    def close(self) -> None:
        close_stream(self.stream, self._thread)


def _dynoctl_run(agent: AgentProcess) -> Callable[[int], float | None]:
    """`dynoctl run -- true` as an operator types it: the wall time of the whole command
    (the CLI's own start included), attached, until it exits with the dyno's status."""
    argv = [str(BIN / "dynoctl"), "--socket", str(agent.socket), "run", "--app", "bench",
            "--", "true"]
    # Installed, its modules are compiled once (the warm-up writes them here).
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}

    def one(_i: int) -> None:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False,
                              env=env)
        if done.returncode != 0:
            raise RuntimeError(f"dynoctl run exited {done.returncode}: {done.stderr[-500:]}")
    return one


class OneOffs:
    """One sample: POST a one-off `true`, until `complete` is heard on the event stream; its
    timings are read after, and the dyno deleted (neither is timed)."""

    def __init__(self, agent: AgentProcess, watch: StateWatch, slug: Path) -> None:
        self.agent = agent
        self.watch = watch
        self.slug = slug
        self.post_ms: list[float] = []
        self.timings: list[dict[str, float]] = []

    def one(self, i: int) -> float:
        """The ms from the POST until `complete` was heard."""
        spec = {"app": "bench", "name": f"run.{i + 1000}", "command": "true",
                "release": {"version": 1, "slug": {"path": str(self.slug)}}}
        t0 = time.monotonic()
        status = self.agent.api("POST", "/v1/dynos", spec, expect=201, timeout_s=60)
        answered = time.monotonic()
        dyno_id = str(status["id"])
        complete = self.watch.wait(dyno_id, "complete")
        detail = self.agent.api("GET", f"/v1/dynos/{dyno_id}")
        if detail.get("exit_status") != 0:
            raise RuntimeError(f"the one-off exited with {detail.get('exit_status')}")
        self.agent.api("DELETE", f"/v1/dynos/{dyno_id}", expect=204, timeout_s=60)
        if i >= 0:
            self.post_ms.append((answered - t0) * 1e3)
            self.timings.append(dict(detail.get("timings_ms") or {}))
        return (complete - t0) * 1e3


def _interleaved(contenders: dict[str, Callable[[int], float | None]]
                 ) -> dict[str, list[float]]:
    """Round-robin, so that a load change hits every contender alike. A contender that
    returns its own measure (ms) is taken at its word (what it did after is not timed)."""
    for i in range(WARMUP):
        for one in contenders.values():
            one(-1 - i)
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for i in range(RUNS):
        for name, one in contenders.items():
            t0 = time.monotonic()
            own = one(i)
            samples[name].append((time.monotonic() - t0) * 1e3 if own is None else own)
    return samples


def _line(name: str, samples: list[float], ref: float) -> str:
    med = statistics.median(samples)
    return (f"  {name:<44} median {med:7.1f} ms   p90 {_percentile(samples, 0.9):7.1f} ms   "
            f"{med / ref:5.2f}x runc   (n={len(samples)})")


def _phase_medians(timings: list[dict[str, float]]) -> list[tuple[str, float]]:
    names = [p for p in PHASES if any(p in t for t in timings)]
    names += sorted({k for t in timings for k in t if "." not in k} - set(names))
    launch = sorted({k for t in timings for k in t if k.startswith("launch.")},
                    key=lambda k: list(timings[0]).index(k) if k in timings[0] else 99)
    return [(name, statistics.median([t[name] for t in timings if name in t]))
            for name in [*names, *launch]]


def main() -> None:
    if launch_bench_skipped():
        return
    netns = f"dts{secrets.token_hex(3)}"
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="dtstart", dir="/tmp") as tmp, \
            contextlib.ExitStack() as stack, new_test_host("ds") as host:
        base = Path(tmp)
        base.chmod(0o755)
        rootfs = _build_rootfs(base)
        slug = base / "slug"
        slug.mkdir(mode=0o755)
        subprocess.run(["ip", "netns", "add", netns], check=True)
        stack.callback(subprocess.run, ["ip", "netns", "delete", netns], check=False)
        subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True)
        # runc as a user would run it: a new network namespace of its own every run (as a
        # dyno gets), and as bench_launch does, one made beforehand and reused.
        own = _oci_bundle(base, rootfs, slug, netns, "runc")
        config = json.loads((own / "config.json").read_text())
        config["linux"]["namespaces"] = [
            {"type": "network"} if n["type"] == "network" else n
            for n in config["linux"]["namespaces"]]
        shared = base / "bundle-runc-shared"
        shutil.copytree(own, shared)
        (own / "config.json").write_text(json.dumps(config))
        agent = AgentProcess(extra={"log_level": "warning"}, netns=host.name)
        try:
            agent.start()
            watch = StateWatch(agent)
            stack.callback(watch.close)
            ones = OneOffs(agent, watch, slug)
            # `dynoctl run` takes the app's release from a dyno of the app on the agent.
            agent.api("POST", "/v1/dynos", {
                "app": "bench", "name": "worker.1", "command": "exec sleep 86400",
                "release": {"version": 1, "slug": {"path": str(slug)}}}, expect=201)
            results = _interleaved({
                "API one-off `true` POST → complete": ones.one,
                "dynoctl run -- true (whole command)": _dynoctl_run(agent),
                "runc run `true` (own new netns)": _oci(["runc"], own, base / "runc-own"),
                "runc run `true` (pre-made netns, reused)": _oci(["runc"], shared,
                                                                 base / "runc-shared"),
            })
        except BaseException:
            print(agent.log()[-5000:])
            raise
        finally:
            agent.cleanup()
    results["  of which: POST answered 201"] = ones.post_ms
    runc = statistics.median(results["runc run `true` (own new netns)"])
    print(f"one-off `true` start → complete vs `runc run`, {RUNS} runs each after {WARMUP} "
          f"warm-up, interleaved; load average before/after: {load_before:.2f} / "
          f"{os.getloadavg()[0]:.2f}")
    for name, samples in results.items():
        print(_line(name, samples, runc))
    phases = _phase_medians(ones.timings)
    top = [(name, ms) for name, ms in phases if "." not in name]
    print("  the agent's phases, median of each (ms; the dynos' timings_ms):")
    print("    " + ", ".join(f"{name} {ms:.2f}" for name, ms in top))
    # "up" overlaps "run" (the process runs while its state changes): not in the sum. The
    # placement's steps run at once: the slowest of each start counts.
    serial = {name: ms for name, ms in top if name != "up" and name not in PLACED_AT_ONCE}
    serial["placement steps"] = statistics.median(
        max(t.get(name, 0.0) for name in PLACED_AT_ONCE) for t in ones.timings)
    ours = statistics.median(results["API one-off `true` POST → complete"])
    launch = serial.get("launch", float("nan"))
    print(f"    sum of the medians but up's (of the placement's steps, the slowest): "
          f"{sum(serial.values()):.1f} ms = launch {launch:.1f}"
          f" + the process's run {serial.get('run', float('nan')):.1f} + the rest "
          f"{sum(serial.values()) - launch - serial.get('run', 0.0):.1f}; not in any phase "
          f"(HTTP request and answer, event stream): {ours - sum(serial.values()):.1f} ms")
    print("    launch in the holder: " + ", ".join(
        f"{name.removeprefix('launch.')} {ms:.2f}" for name, ms in phases if "." in name))
    print(f"  goal API one-off start → complete <= 1.0x runc run: {ours / runc:.2f}x "
          f"({'met' if ours <= runc else 'NOT met'})")
    ctl = statistics.median(results["dynoctl run -- true (whole command)"])
    print(f"  goal dynoctl run -- true <= 1.2x runc run: {ctl / runc:.2f}x "
          f"({'met' if ctl <= 1.2 * runc else 'NOT met'})")


if __name__ == "__main__":
    main()
