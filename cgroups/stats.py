"""Normalised statistics of one group, parsed by pure functions from v2 or v1 control files."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from cgroups.errors import CgroupError

# v1 reports "no limit" as the largest page-aligned signed 64-bit value.
V1_UNLIMITED_THRESHOLD = 1 << 62


@dataclass(frozen=True)
class Pressure:
    """One PSI file (cpu.pressure, memory.pressure, io.pressure): percentages and totals."""

    some_avg10: float
    some_avg60: float
    some_avg300: float
    some_total_usec: int
    full_avg10: float | None = None
    full_avg60: float | None = None
    full_avg300: float | None = None
    full_total_usec: int | None = None


@dataclass(frozen=True)
class Stats:
    """The same fields in both modes; None where the host's kernel does not report a figure."""

    memory_current_bytes: int | None = None
    memory_peak_bytes: int | None = None
    memory_limit_bytes: int | None = None
    memory_rss_bytes: int | None = None
    memory_cache_bytes: int | None = None
    memory_swap_bytes: int | None = None
    oom_events: int | None = None
    oom_kill_events: int | None = None
    high_events: int | None = None
    cpu_usage_usec: int | None = None
    cpu_user_usec: int | None = None
    cpu_system_usec: int | None = None
    cpu_nr_periods: int | None = None
    cpu_nr_throttled: int | None = None
    cpu_throttled_usec: int | None = None
    pids_current: int | None = None
    pids_limit: int | None = None
    pressure: Mapping[str, Pressure] = field(default_factory=dict)


def parse_flat(text: str, *, file: str = "") -> dict[str, int]:
    """"key value" lines (memory.stat, memory.events, cpu.stat, memory.oom_control)."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2:
            raise CgroupError("malformed flat-keyed line", file=file, value=line)
        try:
            out[parts[0]] = int(parts[1])
        except ValueError as exc:
            raise CgroupError("non-integer value", file=file, value=line) from exc
    return out


def parse_flat_fields(text: str, keys: Collection[str], *, file: str = "") -> dict[str, int]:
    """parse_flat(text), of the `keys` alone: only their values are converted. memory.stat
    has some 40 to 60 lines and a sample uses two of them (converting every value was most of
    a sample's parsing). A file whose word count is not two per line goes to parse_flat (and
    its errors); a non-integer value of a key not asked for is not looked at."""
    words = text.split()
    if not words or len(words) != 2 * (text.count("\n") + (not text.endswith("\n"))):
        return {key: value for key, value in parse_flat(text, file=file).items()
                if key in keys}
    values = dict(zip(words[::2], words[1::2], strict=True))
    out: dict[str, int] = {}
    for key in keys:
        value = values.get(key)
        if value is not None:
            try:
                out[key] = int(value)
            except ValueError as exc:
                raise CgroupError("non-integer value", file=file,
                                  value=f"{key} {value}") from exc
    return out


def parse_single(text: str, *, file: str = "") -> int | None:
    """A one-value file: an integer, or None for "max"."""
    value = text.strip()
    if value == "max":
        return None
    try:
        return int(value)
    except ValueError as exc:
        raise CgroupError("non-integer value", file=file, value=value) from exc


def parse_pressure(text: str, *, file: str = "") -> Pressure:
    """PSI: "some avg10=0.00 avg60=0.00 avg300=0.00 total=0" and optionally a "full" line."""
    lines: dict[str, dict[str, str]] = {}
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        try:
            lines[parts[0]] = dict(kv.split("=", 1) for kv in parts[1:])
        except ValueError as exc:
            raise CgroupError("malformed pressure line", file=file, value=line) from exc
    if "some" not in lines:
        raise CgroupError("pressure file without a 'some' line", file=file, value=text)
    try:
        some = lines["some"]
        full = lines.get("full")
        return Pressure(
            float(some["avg10"]), float(some["avg60"]), float(some["avg300"]),
            int(some["total"]),
            float(full["avg10"]) if full else None, float(full["avg60"]) if full else None,
            float(full["avg300"]) if full else None, int(full["total"]) if full else None)
    except (KeyError, ValueError) as exc:
        raise CgroupError("malformed pressure file", file=file, value=text) from exc


PRESSURE_FILES = ("cpu.pressure", "memory.pressure", "io.pressure")


def _pressure(files: Mapping[str, str]) -> dict[str, Pressure]:
    return {name.split(".")[0]: parse_pressure(files[name], file=name)
            for name in PRESSURE_FILES if name in files}


def _single(files: Mapping[str, str], name: str) -> int | None:
    return parse_single(files[name], file=name) if name in files else None


def _flat(files: Mapping[str, str], name: str) -> dict[str, int]:
    return parse_flat(files[name], file=name) if name in files else {}


# The memory.stat fields the stats use.
_V2_MEMORY_STAT_KEYS = frozenset({"anon", "file"})
_V1_MEMORY_STAT_KEYS = frozenset({"total_rss", "rss", "total_cache", "cache"})


def _memory_stat(files: Mapping[str, str], keys: frozenset[str]) -> dict[str, int]:
    text = files.get("memory.stat")
    return {} if text is None else parse_flat_fields(text, keys, file="memory.stat")


V2_FILES = ("memory.current", "memory.peak", "memory.max", "memory.stat", "memory.swap.current",
            "memory.events", "cpu.stat", "pids.current", "pids.max", *PRESSURE_FILES)
# What an exit needs (the OOM-kill count, the memory peak): counters the kernel formats without
# a lock or a flush of per-CPU statistics (reading memory.stat flushes them, which can take
# milliseconds on a busy host), so cheap enough to read on an event loop.
V2_COUNTER_FILES = ("memory.peak", "memory.events")
# What a periodic sample needs (memory use and quota checks, OOM kills, CPU time, pids): no
# limits (memory.max, pids.max) and no pressure files; roughly half the reads of V2_FILES.
V2_SAMPLE_FILES = ("memory.current", "memory.peak", "memory.stat", "memory.swap.current",
                   "memory.events", "cpu.stat", "pids.current")


def stats_v2(files: Mapping[str, str]) -> Stats:
    """Stats from the unified group's files (name -> text; absent files are simply missing)."""
    mem = _memory_stat(files, _V2_MEMORY_STAT_KEYS)
    events = _flat(files, "memory.events")
    cpu = _flat(files, "cpu.stat")
    return Stats(
        memory_current_bytes=_single(files, "memory.current"),
        memory_peak_bytes=_single(files, "memory.peak"),
        memory_limit_bytes=_single(files, "memory.max"),
        memory_rss_bytes=mem.get("anon"),
        memory_cache_bytes=mem.get("file"),
        memory_swap_bytes=_single(files, "memory.swap.current"),
        oom_events=events.get("oom"),
        oom_kill_events=events.get("oom_kill"),
        high_events=events.get("high"),
        cpu_usage_usec=cpu.get("usage_usec"),
        cpu_user_usec=cpu.get("user_usec"),
        cpu_system_usec=cpu.get("system_usec"),
        cpu_nr_periods=cpu.get("nr_periods"),
        cpu_nr_throttled=cpu.get("nr_throttled"),
        cpu_throttled_usec=cpu.get("throttled_usec"),
        pids_current=_single(files, "pids.current"),
        pids_limit=_single(files, "pids.max"),
        pressure=_pressure(files),
    )


V1_FILES = ("memory.usage_in_bytes", "memory.max_usage_in_bytes", "memory.limit_in_bytes",
            "memory.stat", "memory.memsw.usage_in_bytes", "memory.oom_control", "cpu.stat",
            "cpuacct.usage", "pids.current", "pids.max")
V1_COUNTER_FILES = ("memory.max_usage_in_bytes", "memory.oom_control")
# As V2_SAMPLE_FILES, plus the tracking group's cpu.stat (V1_SAMPLE_UNIFIED_FILES); cpuacct.usage
# only serves where that one is absent, so it is left to stats().
V1_SAMPLE_FILES = ("memory.usage_in_bytes", "memory.max_usage_in_bytes", "memory.stat",
                   "memory.memsw.usage_in_bytes", "memory.oom_control", "pids.current")
V1_SAMPLE_UNIFIED_FILES = ("cpu.stat",)


def stats_v1(v1: Mapping[str, str], unified: Mapping[str, str]) -> Stats:
    """Stats on a hybrid host: limits and memory from the v1 groups; CPU usage and PSI from the
    tracking group, whose cpu.stat and *.pressure work without any controller bound to v2."""
    mem = _memory_stat(v1, _V1_MEMORY_STAT_KEYS)
    oom = _flat(v1, "memory.oom_control")
    throttling = _flat(v1, "cpu.stat")
    core_cpu = _flat(unified, "cpu.stat")
    usage = _single(v1, "memory.usage_in_bytes")
    memsw = _single(v1, "memory.memsw.usage_in_bytes")
    limit = _single(v1, "memory.limit_in_bytes")
    if limit is not None and limit >= V1_UNLIMITED_THRESHOLD:
        limit = None
    cpu_usage = core_cpu.get("usage_usec")
    if cpu_usage is None and "cpuacct.usage" in v1:
        nanos = _single(v1, "cpuacct.usage")
        cpu_usage = nanos // 1000 if nanos is not None else None
    throttled_ns = throttling.get("throttled_time")
    return Stats(
        memory_current_bytes=usage,
        memory_peak_bytes=_single(v1, "memory.max_usage_in_bytes"),
        memory_limit_bytes=limit,
        # total_* include descendants, the same scope as v2's memory.stat.
        memory_rss_bytes=mem.get("total_rss", mem.get("rss")),
        memory_cache_bytes=mem.get("total_cache", mem.get("cache")),
        memory_swap_bytes=(memsw - usage) if memsw is not None and usage is not None else None,
        # v1 counts neither OOM episodes nor high-limit breaches, only kills (kernel >= 4.13).
        oom_events=None,
        oom_kill_events=oom.get("oom_kill"),
        high_events=None,
        cpu_usage_usec=cpu_usage,
        cpu_user_usec=core_cpu.get("user_usec"),
        cpu_system_usec=core_cpu.get("system_usec"),
        cpu_nr_periods=throttling.get("nr_periods"),
        cpu_nr_throttled=throttling.get("nr_throttled"),
        cpu_throttled_usec=throttled_ns // 1000 if throttled_ns is not None else None,
        pids_current=_single(v1, "pids.current"),
        pids_limit=_single(v1, "pids.max"),
        pressure=_pressure(unified),
    )
