"""Dyno sizes: the limits each size stands for, Heroku's default table, and the agent
config's `[sizes.NAME]` overrides applied on top of it."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any

# Here as it always was; in its own module so that dynoctl can spell sizes without importing
# this one.
from agent.sizenames import display_name as display_name

MIB = 1024 * 1024

# cgroup v2 cpu.weight accepts 1..10000; the v1 cpu.shares mapping is done by the cgroup
# driver, so the size table only speaks the v2 vocabulary.
CPU_WEIGHT_MIN = 1
CPU_WEIGHT_MAX = 10_000
# The kernel caps pids.max at PID_MAX_LIMIT (4M on 64-bit); anything above is a typo.
PIDS_MAX_LIMIT = 4 * 1024 * 1024
# A kill point below the quota would kill before R14 could ever be reported, and one
# above 100x is indistinguishable from "never" on any real host, so both are mistakes.
KILL_AT_MIN = 1.0
KILL_AT_MAX = 100.0
# Open files per process (RLIMIT_NOFILE, soft = hard). Below 64 a shell and its dynamic
# loader run short; above fs.nr_open's default (1048576) setrlimit fails. The launcher
# checks the same bounds (agent.launcher.request), which this module may not import.
NOFILE_MIN = 64
NOFILE_MAX = 1 << 20
# Shared sizes: the Linux default soft limit, which software is written to live with. With
# Heroku's 256 processes of a 1x dyno that is at most 262,144 open files per dyno (10.6% of
# the file table, fs.file-max, of a 24 GiB host; 2x: 524,288, 21%), where 10,000 per process
# let one dyno fill the whole table (issue 11). README "Sizes" explains the figures.
NOFILE_SHARED = 1024
# Performance sizes keep Heroku's 10,000: with 16,384 or 32,768 processes no useful
# per-process figure keeps the total under the table; only their memory bounds it (every
# open file is charged to the dyno's memory cgroup, about 275 bytes), so they belong on a
# host of their own or one whose fs.file-max is raised, as systemd does at boot.
NOFILE_PERFORMANCE = 10_000

_NAME = re.compile(r"[a-z][a-z0-9-]{0,29}")
_OVERRIDE_KEYS = ("memory_mb", "pids_max", "cpu_weight", "cpu_max", "kill_at", "nofile")

class SizeError(ValueError):
    """A `[sizes.NAME]` table is unusable; `key` is the dotted config path (sizes.NAME.key)."""

    def __init__(self, key: str, message: str, value: Any = None) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message
        self.value = value


@dataclass(frozen=True, slots=True)
class Size:
    """The resource limits of one dyno size.

    `cpu_max_cpus` is a hard cap in CPUs' worth (cpu.max quota/period), None for no cap:
    shared sizes compete by weight, performance sizes get a dedicated-style cap.
    `kill_at` is the R15 kill point as a multiple of `memory_quota_bytes`.
    `nofile` is the open files each process may hold (RLIMIT_NOFILE, soft = hard).
    """

    name: str
    memory_quota_bytes: int
    pids_max: int
    cpu_weight: int
    cpu_max_cpus: float | None
    kill_at: float
    nofile: int = NOFILE_SHARED

    @property
    def display_name(self) -> str:
        return display_name(self.name)

    @property
    def kill_at_bytes(self) -> int:
        return int(self.memory_quota_bytes * self.kill_at)

    @property
    def fd_budget(self) -> int:
        """The most open files a dyno of this size can hold through its descriptors: every
        process it may have, each at its limit. (Descriptors in flight over Unix sockets
        add at most `nofile` more: the kernel caps them per user, and each dyno has its
        own.) Its memory bounds it too: the kernel charges each open file to the dyno."""
        return self.nofile * self.pids_max


def _shared(name: str, memory_mib: int, pids_max: int, cpu_weight: int) -> Size:
    return Size(name, memory_mib * MIB, pids_max, cpu_weight, None, 2.0, NOFILE_SHARED)


def _dedicated(name: str, memory_mib: int, pids_max: int, cpus: float) -> Size:
    # Weight in proportion to the CPUs' worth, so that under contention with shared dynos
    # (weight 100 per 1x) a performance dyno still receives what its cap promises.
    return Size(name, memory_mib * MIB, pids_max, int(100 * cpus), cpus, 2.0,
                NOFILE_PERFORMANCE)


# Heroku's published figures (DESIGN §5, reference/heroku.md §2).
DEFAULT_SIZES: Mapping[str, Size] = MappingProxyType({
    size.name: size
    for size in (
        _shared("eco", 512, 256, 100),
        _shared("basic", 512, 256, 100),
        _shared("standard-1x", 512, 256, 100),
        _shared("standard-2x", 1024, 512, 200),
        _dedicated("performance-m", 2560, 16384, 2.0),
        _dedicated("performance-l", 14 * 1024, 32768, 8.0),
    )
})
DEFAULT_SIZE = "standard-1x"


def _int(key: str, value: Any, low: int, high: int) -> int:
    # bool is an int subclass in Python; `memory_mb = true` is a typo, not 1 MiB.
    if isinstance(value, bool) or not isinstance(value, int):
        raise SizeError(key, f"must be an integer, got {type(value).__name__} {value!r}", value)
    if not low <= value <= high:
        raise SizeError(key, f"must be between {low} and {high}, got {value}", value)
    return value


def _number(key: str, value: Any, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SizeError(key, f"must be a number, got {type(value).__name__} {value!r}", value)
    number = float(value)
    if not math.isfinite(number) or not low <= number <= high:
        raise SizeError(key, f"must be between {low:g} and {high:g}, got {value!r}", value)
    return number


def _cpu_max(key: str, value: Any) -> float | None:
    # TOML has no null: "max" (cgroup's own word for no limit) removes a cap.
    if value == "max":
        return None
    cpus = _number(key, value, 0.0, 4096.0)
    if cpus == 0.0:
        raise SizeError(key, 'must be more than 0 CPUs (use "max" for no cap)', value)
    return cpus


def _apply(key: str, base: Size, table: Mapping[Any, Any]) -> Size:
    changes: dict[str, Any] = {}
    for field, value in table.items():
        path = f"{key}.{field}"
        if field == "memory_mb":
            # 4 MiB is below what any runtime boots in; 16 TiB is above any host's RAM.
            changes["memory_quota_bytes"] = _int(path, value, 4, 16 * 1024 * 1024) * MIB
        elif field == "pids_max":
            changes["pids_max"] = _int(path, value, 1, PIDS_MAX_LIMIT)
        elif field == "cpu_weight":
            changes["cpu_weight"] = _int(path, value, CPU_WEIGHT_MIN, CPU_WEIGHT_MAX)
        elif field == "cpu_max":
            changes["cpu_max_cpus"] = _cpu_max(path, value)
        elif field == "kill_at":
            changes["kill_at"] = _number(path, value, KILL_AT_MIN, KILL_AT_MAX)
        elif field == "nofile":
            changes["nofile"] = _int(path, value, NOFILE_MIN, NOFILE_MAX)
        else:
            raise SizeError(path, f"unknown key; known keys: {', '.join(_OVERRIDE_KEYS)}", field)
    return replace(base, **changes)


def apply_overrides(defaults: Mapping[str, Size],
                    table: Mapping[str, Any]) -> dict[str, Size]:
    """Return `defaults` with the config's `[sizes.NAME]` tables applied.

    An existing size takes only the keys given; a new size must give `memory_mb` and
    `pids_max` and defaults to weight 100, no CPU cap, a kill point of 2x the quota and
    1024 open files per process.
    """
    sizes = dict(defaults)
    for name, fields in table.items():
        key = f"sizes.{name}"
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise SizeError(key, "a size name must match [a-z][a-z0-9-]{0,29}", name)
        if not isinstance(fields, Mapping):
            raise SizeError(key, f"must be a table, got {type(fields).__name__}", fields)
        base = sizes.get(name)
        if base is None:
            for required in ("memory_mb", "pids_max"):
                if required not in fields:
                    raise SizeError(f"{key}.{required}", "is required for a new size")
            base = Size(name, 0, 0, 100, None, 2.0, NOFILE_SHARED)
        sizes[name] = _apply(key, base, fields)
    return sizes
