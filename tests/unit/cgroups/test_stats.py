"""Pure parsing of v2 and v1 statistics into the one normalised Stats."""

from __future__ import annotations

import pytest

from cgroups.errors import CgroupError
from cgroups.stats import (
    Pressure,
    parse_flat,
    parse_pressure,
    parse_single,
    stats_v1,
    stats_v2,
)

PSI = ("some avg10=1.50 avg60=0.25 avg300=0.00 total=12345\n"
       "full avg10=0.50 avg60=0.00 avg300=0.00 total=678\n")


def test_parse_flat_and_single() -> None:
    assert parse_flat("a 1\nb 22\n\n") == {"a": 1, "b": 22}
    assert parse_single("max\n") is None
    assert parse_single(" 42\n") == 42
    for bad in ("a\n", "a 1 2\n", "a x\n"):
        with pytest.raises(CgroupError):
            parse_flat(bad, file="memory.stat")
    with pytest.raises(CgroupError):
        parse_single("lots")


def test_parse_pressure() -> None:
    assert parse_pressure(PSI) == Pressure(1.5, 0.25, 0.0, 12345, 0.5, 0.0, 0.0, 678)
    some_only = parse_pressure("some avg10=0.00 avg60=0.00 avg300=0.00 total=9\n")
    assert some_only.some_total_usec == 9
    assert some_only.full_avg10 is None and some_only.full_total_usec is None
    for bad in ("", "full avg10=0 avg60=0 avg300=0 total=0\n", "some avg10\n",
                "some avg10=x avg60=0 avg300=0 total=0\n"):
        with pytest.raises(CgroupError):
            parse_pressure(bad, file="cpu.pressure")


def test_stats_v2_full() -> None:
    files = {
        "memory.current": "1000\n", "memory.peak": "5000\n", "memory.max": "max\n",
        "memory.stat": "anon 700\nfile 300\nkernel 5\n", "memory.swap.current": "11\n",
        "memory.events": "low 0\nhigh 4\nmax 9\noom 2\noom_kill 1\noom_group_kill 1\n",
        "cpu.stat": "usage_usec 900\nuser_usec 600\nsystem_usec 300\nnr_periods 10\n"
                    "nr_throttled 3\nthrottled_usec 77\n",
        "pids.current": "5\n", "pids.max": "20\n", "memory.pressure": PSI, "io.pressure": PSI,
    }
    s = stats_v2(files)
    assert (s.memory_current_bytes, s.memory_peak_bytes, s.memory_limit_bytes) == (1000, 5000, None)
    assert (s.memory_rss_bytes, s.memory_cache_bytes, s.memory_swap_bytes) == (700, 300, 11)
    assert (s.oom_events, s.oom_kill_events, s.high_events) == (2, 1, 4)
    assert (s.cpu_usage_usec, s.cpu_user_usec, s.cpu_system_usec) == (900, 600, 300)
    assert (s.cpu_nr_periods, s.cpu_nr_throttled, s.cpu_throttled_usec) == (10, 3, 77)
    assert (s.pids_current, s.pids_limit) == (5, 20)
    assert set(s.pressure) == {"memory", "io"}


def test_stats_v2_missing_files_are_none() -> None:
    s = stats_v2({"memory.current": "1\n"})
    assert s.memory_current_bytes == 1
    assert s.memory_peak_bytes is None  # memory.peak needs kernel 5.19
    assert s.oom_kill_events is None and s.pids_current is None and s.pressure == {}


def test_stats_v1_full() -> None:
    v1 = {
        "memory.usage_in_bytes": "1000\n", "memory.max_usage_in_bytes": "4000\n",
        "memory.limit_in_bytes": "67108864\n", "memory.memsw.usage_in_bytes": "1500\n",
        "memory.stat": "cache 1\nrss 2\ntotal_cache 30\ntotal_rss 60\n",
        "memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n",
        "cpu.stat": "nr_periods 8\nnr_throttled 2\nthrottled_time 5000000\n",
        "cpuacct.usage": "7000000\n", "pids.current": "4\n", "pids.max": "max\n",
    }
    unified = {"cpu.stat": "usage_usec 6500\nuser_usec 6000\nsystem_usec 500\n",
               "cpu.pressure": PSI}
    s = stats_v1(v1, unified)
    assert (s.memory_current_bytes, s.memory_peak_bytes, s.memory_limit_bytes) == (
        1000, 4000, 64 << 20)
    assert (s.memory_rss_bytes, s.memory_cache_bytes, s.memory_swap_bytes) == (60, 30, 500)
    assert (s.oom_events, s.oom_kill_events, s.high_events) == (None, 3, None)
    assert s.cpu_usage_usec == 6500  # the tracking tree's own accounting wins
    assert (s.cpu_user_usec, s.cpu_system_usec) == (6000, 500)
    assert (s.cpu_nr_periods, s.cpu_nr_throttled, s.cpu_throttled_usec) == (8, 2, 5000)
    assert (s.pids_current, s.pids_limit) == (4, None)
    assert set(s.pressure) == {"cpu"}


def test_stats_v1_unlimited_and_fallbacks() -> None:
    v1 = {"memory.limit_in_bytes": "9223372036854771712\n", "memory.usage_in_bytes": "10\n",
          "memory.stat": "cache 1\nrss 2\n", "cpuacct.usage": "7000000\n"}
    s = stats_v1(v1, {})
    assert s.memory_limit_bytes is None
    assert (s.memory_rss_bytes, s.memory_cache_bytes) == (2, 1)
    assert s.memory_swap_bytes is None  # no memsw accounting
    assert s.cpu_usage_usec == 7000  # cpuacct when the unified cpu.stat is missing
