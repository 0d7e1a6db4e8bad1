"""Benchmark: create + limit + attach + remove latency of one group, in this host's mode.

Prints medians and p99 of 200 rounds per step, and the same cycle done by a plain shell-free
peer (raw os.mkdir/os.write/os.rmdir of the same files) measured in the same run.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

from cgroups import Limits, Mode, Tree, detect
from tests.support.names import unique

ROUNDS = 200
LIMITS = Limits(memory_high_bytes=512 << 20, memory_max_bytes=1024 << 20, cpu_weight=100,
                cpu_max_cpus=1.0, pids_max=256)


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def _line(name: str, values_s: list[float]) -> str:
    ms = [v * 1000 for v in values_s]
    return (f"  {name:<28} median {statistics.median(ms):7.3f} ms   p99 {_pct(ms, 99):7.3f} ms"
            f"   (n={len(ms)})")


def main() -> None:
    if os.geteuid() != 0:
        print("bench_cgroups: needs root (cgroupfs writes); skipped")
        return
    layout = detect(root_name=unique("dt", 8), use_delegation=False)
    tree = Tree(layout)
    tree.ensure()
    # One long-lived process moved into each group and back out, so attach is measured
    # without the cost of process creation.
    sleeper = subprocess.Popen(["sleep", "600"])
    park = tree.create_group("park.scope", Limits())
    steps: dict[str, list[float]] = {"create+limits": [], "attach": [], "detach": [],
                                     "remove": [], "total": []}
    peer: list[float] = []
    try:
        tree.create_group("app-b.slice/warm.scope", LIMITS).remove()
        for i in range(ROUNDS):
            t0 = time.perf_counter()
            group = tree.create_group(f"app-b.slice/d{i}.scope", LIMITS)
            t1 = time.perf_counter()
            group.attach(sleeper.pid)
            t2 = time.perf_counter()
            park.attach(sleeper.pid)
            t3 = time.perf_counter()
            group.remove(timeout_s=5)
            t4 = time.perf_counter()
            steps["create+limits"].append(t1 - t0)
            steps["attach"].append(t2 - t1)
            steps["detach"].append(t3 - t2)
            steps["remove"].append(t4 - t3)
            steps["total"].append(t4 - t0 - (t3 - t2))
            peer.append(_raw_cycle(tree, layout.mode, i, sleeper.pid))
    finally:
        sleeper.kill()
        sleeper.wait()
        park.remove(timeout_s=5)
        tree.destroy()
    print(f"cgroups: mode {layout.mode.value}, {len(layout.hierarchies)} hierarchies "
          f"({', '.join(h.name for h in layout.hierarchies)}), {ROUNDS} rounds, limits={LIMITS}")
    for name, values in steps.items():
        print(_line(name, values))
    print(_line("peer: raw syscalls, total", peer))
    ratio = statistics.median(steps["total"]) / statistics.median(peer)
    print(f"  library / raw-syscall peer (median total): {ratio:.2f}x")
    sys.stdout.flush()


def _raw_cycle(tree: Tree, mode: Mode, i: int, pid: int) -> float:
    """The same cycle with bare os calls and no checks: the floor the library is held to."""
    layout = tree.layout
    files = ([("memory.max", "1073741824"), ("memory.high", "536870912"),
              ("memory.oom.group", "1"), ("cpu.weight", "100"), ("cpu.max", "100000 100000"),
              ("pids.max", "256")] if mode is Mode.V2 else
             [("memory.limit_in_bytes", "1073741824"), ("cpu.shares", "1024"),
              ("cpu.cfs_period_us", "100000"), ("cpu.cfs_quota_us", "100000"),
              ("pids.max", "256")])
    dirs = [str(h.fs.path(f"{tree.root}/app-b.slice/raw{i}.scope")) for h in layout.hierarchies]
    park = [str(h.fs.path(f"{tree.root}/park.scope")) for h in layout.hierarchies]
    t0 = time.perf_counter()
    for d in dirs:
        os.mkdir(d)
    for d in dirs:
        for name, value in files:
            path = os.path.join(d, name)
            if os.path.exists(path):
                fd = os.open(path, os.O_WRONLY)
                os.write(fd, value.encode())
                os.close(fd)
    for d in dirs:
        fd = os.open(os.path.join(d, "cgroup.procs"), os.O_WRONLY)
        os.write(fd, str(pid).encode())
        os.close(fd)
    t1 = time.perf_counter()
    for d in park:
        fd = os.open(os.path.join(d, "cgroup.procs"), os.O_WRONLY)
        os.write(fd, str(pid).encode())
        os.close(fd)
    t2 = time.perf_counter()
    for d in dirs:
        while True:
            try:
                os.rmdir(d)
                break
            except OSError:
                time.sleep(0.001)
    t3 = time.perf_counter()
    return (t1 - t0) + (t3 - t2)


if __name__ == "__main__":
    main()
