"""How much slower than the host this machine runs, for deadlines that must hold inside an
emulated guest (the VM tiers run under TCG, 10-40 times slower than the host, more when the
host is loaded): the harness measures the cost of starting a process on the host, the guest
measures the same, and the ratio scales every `wait_for` deadline in the guest."""

from __future__ import annotations

import os
import statistics
import subprocess
import time

SCALE_ENV = "DYNOAGENT_TEST_TIME_SCALE"
# A guest slower than this is broken, not slow: deadlines stay bounded.
MAX_SCALE = 50.0


def spawn_cost_s(rounds: int = 15) -> float:
    """Median seconds to fork and exec /bin/true and reap it: what the slow tests do most
    (start processes, wait for them in cgroups)."""
    samples = []
    for _ in range(rounds):
        began = time.perf_counter()
        subprocess.run(["/bin/true"], check=True)
        samples.append(time.perf_counter() - began)
    return statistics.median(samples)


def scale_for(host_cost_s: float, here_cost_s: float) -> float:
    if host_cost_s <= 0:
        return 1.0
    return min(MAX_SCALE, max(1.0, here_cost_s / host_cost_s))


def time_scale() -> float:
    """The factor set for this process's tests (1 outside an emulated guest)."""
    try:
        return min(MAX_SCALE, max(1.0, float(os.environ.get(SCALE_ENV, "1"))))
    except ValueError:
        return 1.0
