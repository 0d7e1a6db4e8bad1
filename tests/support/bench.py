"""Small pieces the benches share: the bare-pipe peer, a throwaway slug directory, the
root/tools check of the launch benches, closing a followed event stream, probing the operator
API's latency, and the kernel's memory from /proc/meminfo."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from tests.support.agentproc import ApiError, UnixHTTPConnection
from tests.support.tempdirs import readable_temp_dir


def seq_pipe_rate(lines: int) -> float:
    """Lines per second of `seq 1 lines` read line by line from a plain pipe by this process."""
    started = time.monotonic()
    with subprocess.Popen(["seq", "1", str(lines)], stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        count = sum(1 for _ in proc.stdout)
    assert count == lines
    return lines / (time.monotonic() - started)


def temp_slug() -> contextlib.AbstractContextManager[Path]:
    """An empty, world-readable slug directory under /tmp, removed after."""
    return readable_temp_dir("dtslug", "/tmp")


def launch_bench_skipped() -> bool:
    """True (having printed why) unless running as root with runc, busybox, tini-static and ip."""
    if os.geteuid() != 0:
        print("skipped: needs root (namespaces, cgroups, netns)")
        return True
    missing = [t for t in ("runc", "busybox", "tini-static", "ip") if shutil.which(t) is None]
    if missing:
        print(f"skipped: missing {', '.join(missing)}")
        return True
    return False


def close_stream(stream: Any, thread: threading.Thread) -> None:
    """Stop a thread reading a followed stream: shut its socket down, join, close."""
    sock = stream.conn.sock
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(2)
    thread.join(10)
    stream.close()


class ApiProbe:
    """GET `path` every `interval_s` on a thread: how responsive the agent stays meanwhile.
    Times the request until its whole answer is read, not the decoding of the JSON."""

    def __init__(self, agent: Any, path: str = "/v1/info", interval_s: float = 0.05) -> None:
        self.agent = agent
        self.path = path
        self.interval_s = interval_s
        self.latencies_ms: list[tuple[float, float]] = []  # (sent at, ms)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            t0 = time.monotonic()
            conn = UnixHTTPConnection(self.agent.socket, 60)
            try:
                conn.request("GET", self.path)
                response = conn.getresponse()
                body = response.read()
            finally:
                conn.close()
            if response.status != 200:
                raise ApiError("GET", self.path, response.status, body)
            self.latencies_ms.append((t0, (time.monotonic() - t0) * 1e3))

    def stop(self) -> list[tuple[float, float]]:
        """Stop probing: (sent at, ms) of every request."""
        self._stop.set()
        self._thread.join(70)
        return self.latencies_ms


def percentile(samples: list[float], pct: float) -> float:
    """The `pct` percentile (nearest rank) of `samples`."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(pct / 100 * len(ordered)) - 1))]


# The kernel's own memory in /proc/meminfo (KiB); AnonPages and MemAvailable come along to
# show what the processes themselves add and what the host has left.
KERNEL_FIELDS = ("SUnreclaim", "SReclaimable", "KernelStack", "PageTables", "Percpu")
MEMINFO_FIELDS = (*KERNEL_FIELDS, "AnonPages", "Shmem", "MemAvailable")


def cpu_ticks() -> list[int]:
    """The host's CPU time by kind so far (/proc/stat's first line: user, nice, system,
    idle, iowait, irq, softirq, steal), in clock ticks."""
    with open("/proc/stat") as f:
        return [int(field) for field in f.readline().split()[1:9]]


def cpu_use(before: list[int], after: list[int]) -> dict[str, float]:
    """How the host's CPUs spent the time between two `cpu_ticks()`, in % of it: `busy`
    (anything run here), `idle` (idle and iowait), `steal` (taken by the hypervisor for
    other guests: a figure timed meanwhile is slowed by it)."""
    d = [b - a for a, b in zip(before, after, strict=True)]
    total = sum(d) or 1
    return {"busy": 100 * (d[0] + d[1] + d[2] + d[5] + d[6]) / total,
            "idle": 100 * (d[3] + d[4]) / total, "steal": 100 * d[7] / total}


def meminfo_kib() -> dict[str, int]:
    """MEMINFO_FIELDS from /proc/meminfo, in KiB."""
    values: dict[str, int] = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in MEMINFO_FIELDS:
            values[key] = int(rest.split()[0])
    return values


def kernel_kib(values: dict[str, int]) -> int:
    return sum(values[k] for k in KERNEL_FIELDS)


def shrink_slabs() -> None:
    """Give the slab caches' empty slabs back (SLUB's `shrink`), so what a bench creates is
    counted afresh rather than fitted into free objects that an earlier step left behind."""
    for cache in Path("/sys/kernel/slab").iterdir():
        if not cache.is_symlink():
            with contextlib.suppress(OSError):
                (cache / "shrink").write_text("1")


def settled_meminfo(timeout_s: float = 20.0) -> dict[str, int]:
    """meminfo_kib() once the kernel's memory stops moving (deleted namespaces and cgroups
    are freed after RCU grace periods, by workqueues): two readings 0.5 s apart within
    256 KiB, or the last reading after `timeout_s` on a host that never settles."""
    shrink_slabs()
    deadline = time.monotonic() + timeout_s
    last = meminfo_kib()
    while time.monotonic() < deadline:
        time.sleep(0.5)  # a sampling period, not a wait for a condition
        now = meminfo_kib()
        if abs(kernel_kib(now) - kernel_kib(last)) < 256:
            return now
        last = now
    return last
