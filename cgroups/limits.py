"""Limits of one group and the pure mapping from limits to control-file writes, per cgroup mode."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from cgroups.errors import InvalidValue


class Mode(enum.Enum):
    """How the host mounts cgroups: one unified tree, or v1 controllers + a tracking v2 tree."""

    V2 = "v2"
    HYBRID = "hybrid"


# The CFS period every quota is expressed against: the kernel default, and what systemd uses.
CPU_PERIOD_USEC = 100_000
# The kernel rejects a CFS quota below 1 ms (kernel/sched/core.c, min_cfs_quota_period).
CPU_MIN_QUOTA_USEC = 1_000
# v1 "unlimited" for memory files; writing -1 is the documented way to reset a limit.
V1_UNLIMITED = "-1"


@dataclass(frozen=True)
class Limits:
    """What a group may use. None means "leave the kernel default" (unlimited / default weight).

    memory_high_bytes is the quota (R14 on the agent's side; memory.high on v2, the v1 soft limit
    on hybrid), memory_max_bytes the kill point (OOM kill above it).
    """

    memory_high_bytes: int | None = None
    memory_max_bytes: int | None = None
    swap_allowed: bool = False
    cpu_weight: int | None = None
    cpu_max_cpus: float | None = None
    pids_max: int | None = None

    def __post_init__(self) -> None:
        for name in ("memory_high_bytes", "memory_max_bytes"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or value <= 0):
                raise InvalidValue("must be a positive number of bytes", file=name,
                                   value=str(value))
        if (self.memory_high_bytes is not None and self.memory_max_bytes is not None
                and self.memory_high_bytes > self.memory_max_bytes):
            raise InvalidValue("quota above the kill point", file="memory_high_bytes",
                               value=f"{self.memory_high_bytes}>{self.memory_max_bytes}")
        if self.cpu_weight is not None and not 1 <= self.cpu_weight <= 10_000:
            raise InvalidValue("cpu weight must be within 1..10000", file="cpu_weight",
                               value=str(self.cpu_weight))
        if self.cpu_max_cpus is not None and (
                not math.isfinite(self.cpu_max_cpus) or self.cpu_max_cpus <= 0):
            raise InvalidValue("cpu max must be a positive number of CPUs",
                               file="cpu_max_cpus", value=str(self.cpu_max_cpus))
        if self.pids_max is not None and self.pids_max < 1:
            raise InvalidValue("pids max must be at least 1", file="pids_max",
                               value=str(self.pids_max))


@dataclass(frozen=True)
class Write:
    """One control-file write: `value` into `file` of the group in `controller`'s hierarchy."""

    controller: str
    file: str
    value: str


def cpu_quota_usec(cpus: float) -> int:
    return max(CPU_MIN_QUOTA_USEC, round(cpus * CPU_PERIOD_USEC))


def weight_to_shares(weight: int) -> int:
    """v2 cpu.weight -> v1 cpu.shares, linear with default 100 <-> 1024.

    The same scale systemd uses (CPUWeight= vs CPUShares=), so a dyno of default weight competes
    evenly with the other default-weight cgroups of the host; clamped to v1's 2..262144.
    """
    return min(262_144, max(2, weight * 1024 // 100))


def controllers_needed(limits: Limits) -> frozenset[str]:
    """Controllers the limits write to (memory always: OOM accounting and stats need it)."""
    needed = {"memory"}
    if limits.cpu_weight is not None or limits.cpu_max_cpus is not None:
        needed.add("cpu")
    if limits.pids_max is not None:
        needed.add("pids")
    return frozenset(needed)


def plan_writes(limits: Limits, mode: Mode, *, swap_accounting: bool) -> list[Write]:
    """The ordered control-file writes that give a fresh group `limits`.

    `swap_accounting` says whether the host accounts swap per group (v2 memory.swap.max,
    v1 memory.memsw.*): without it swap cannot be capped per group.
    """
    if mode is Mode.V2:
        return _plan_v2(limits, swap_accounting)
    return _plan_v1(limits, swap_accounting)


def _plan_v2(limits: Limits, swap_accounting: bool) -> list[Write]:
    # An OOM kill takes the whole group: a dyno with its PID 1 gone is dead anyway, and this
    # is what makes the kill point a clean R15 instead of a half-killed process tree.
    writes = [Write("memory", "memory.oom.group", "1")]
    if limits.memory_high_bytes is not None:
        writes.append(Write("memory", "memory.high", str(limits.memory_high_bytes)))
    if limits.memory_max_bytes is not None:
        writes.append(Write("memory", "memory.max", str(limits.memory_max_bytes)))
    if swap_accounting:
        writes.append(Write("memory", "memory.swap.max", "max" if limits.swap_allowed else "0"))
    if limits.cpu_weight is not None:
        writes.append(Write("cpu", "cpu.weight", str(limits.cpu_weight)))
    if limits.cpu_max_cpus is not None:
        writes.append(Write("cpu", "cpu.max",
                            f"{cpu_quota_usec(limits.cpu_max_cpus)} {CPU_PERIOD_USEC}"))
    if limits.pids_max is not None:
        writes.append(Write("pids", "pids.max", str(limits.pids_max)))
    return writes


def _plan_v1(limits: Limits, swap_accounting: bool) -> list[Write]:
    writes: list[Write] = []
    if limits.memory_high_bytes is not None:
        # v1 has no memory.high. The soft limit is the nearest meaning: above it the group is
        # reclaimed first under host pressure. R14 itself is reported by the agent from stats.
        writes.append(Write("memory", "memory.soft_limit_in_bytes",
                            str(limits.memory_high_bytes)))
    if limits.memory_max_bytes is not None:
        limit = str(limits.memory_max_bytes)
        if swap_accounting:
            # The kernel insists memsw.limit >= limit at every step, so lift memsw first (valid
            # whatever the current values are), then set the limit, then memsw again.
            writes.append(Write("memory", "memory.memsw.limit_in_bytes", V1_UNLIMITED))
            writes.append(Write("memory", "memory.limit_in_bytes", limit))
            if not limits.swap_allowed:
                writes.append(Write("memory", "memory.memsw.limit_in_bytes", limit))
        else:
            writes.append(Write("memory", "memory.limit_in_bytes", limit))
    if not limits.swap_allowed and not swap_accounting:
        # Without memsw the only per-group way to keep a group out of swap.
        writes.append(Write("memory", "memory.swappiness", "0"))
    if limits.cpu_weight is not None:
        writes.append(Write("cpu", "cpu.shares", str(weight_to_shares(limits.cpu_weight))))
    if limits.cpu_max_cpus is not None:
        # Period before quota: the quota is validated against the period in force.
        writes.append(Write("cpu", "cpu.cfs_period_us", str(CPU_PERIOD_USEC)))
        writes.append(Write("cpu", "cpu.cfs_quota_us",
                            str(cpu_quota_usec(limits.cpu_max_cpus))))
    if limits.pids_max is not None:
        writes.append(Write("pids", "pids.max", str(limits.pids_max)))
    return writes
