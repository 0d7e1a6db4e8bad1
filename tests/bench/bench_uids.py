"""uid registry: the cost of `allocate()` (a new dyno's uid: lock, read, a remnants probe of
/proc and /proc/key-users — one per PROBE_REUSE_S while no other agent writes the registry,
so mostly none here — atomic rewrite), of `allocate()` for a dyno that already holds one
(lock and read only), of `release()`, and of the remnants probe alone, with registries of
increasing size. A private registry in a temp dir under /run (where production keeps it) and
the real probe. Prints medians and p99; asserts nothing.
"""

from __future__ import annotations

import functools
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable

from agent.launcher.uids import DEFAULT_FIRST, DEFAULT_LAST, UidAllocator, host_remnants

ROUNDS = 200


def _ms(samples: list[float]) -> str:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return f"median {statistics.median(ordered) * 1000:.3f} ms  p99 {p99 * 1000:.3f} ms"


def _time(call: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    call()
    return time.perf_counter() - t0


def main() -> None:
    base = tempfile.mkdtemp(prefix="dtbench-uids", dir="/run" if os.access("/run", os.W_OK)
                            else None)
    try:
        processes = sum(1 for name in os.listdir("/proc") if name.isdigit())
        probe = [_time(lambda: host_remnants(DEFAULT_FIRST, DEFAULT_LAST))
                 for _ in range(ROUNDS)]
        print(f"remnants probe ({processes} processes): {_ms(probe)}")
        for held in (0, 100, 1000):
            alloc = UidAllocator(os.path.join(base, f"agent{held}"), quarantine_s=600,
                                 path=os.path.join(base, f"reg{held}", "registry.json"))
            for i in range(held):
                alloc.allocate(f"held-{i}")
            new = [_time(functools.partial(alloc.allocate, f"new-{i}")) for i in range(ROUNDS)]
            again = [_time(functools.partial(alloc.allocate, f"new-{i}"))
                     for i in range(ROUNDS)]
            freed = [_time(functools.partial(alloc.release, f"new-{i}")) for i in range(ROUNDS)]
            print(f"registry of {held} + up to {ROUNDS} entries: allocate new {_ms(new)} | "
                  f"allocate held {_ms(again)} | release {_ms(freed)}")
    finally:
        shutil.rmtree(base, ignore_errors=True)
