"""Dyno sizes: Heroku's default table and the `[sizes.NAME]` config overrides."""

from __future__ import annotations

from typing import Any

import pytest

from agent.launcher.request import MAX_NOFILE, MIN_NOFILE
from agent.sizes import (
    DEFAULT_SIZES,
    MIB,
    NOFILE_MAX,
    NOFILE_MIN,
    Size,
    SizeError,
    apply_overrides,
    display_name,
)

# The file table (fs.file-max) of the reference host the README's shares are given for: 24
# GiB of RAM (the kernel's default is about RAM / 10 KiB), this project's machines.
REFERENCE_FILE_MAX = 2_466_116


@pytest.mark.parametrize(("name", "memory_mib", "pids", "weight", "cpus", "nofile"), [
    ("eco", 512, 256, 100, None, 1024),
    ("basic", 512, 256, 100, None, 1024),
    ("standard-1x", 512, 256, 100, None, 1024),
    ("standard-2x", 1024, 512, 200, None, 1024),
    ("performance-m", 2560, 16384, 200, 2.0, 10000),
    ("performance-l", 14336, 32768, 800, 8.0, 10000),
])
def test_default_table_is_herokus(name: str, memory_mib: int, pids: int, weight: int,
                                  cpus: float | None, nofile: int) -> None:
    size = DEFAULT_SIZES[name]
    assert size == Size(name, memory_mib * MIB, pids, weight, cpus, 2.0, nofile)
    assert size.kill_at_bytes == 2 * memory_mib * MIB
    assert size.fd_budget == nofile * pids


@pytest.mark.parametrize(("name", "budget", "share"), [
    ("eco", 262_144, 0.106), ("basic", 262_144, 0.106), ("standard-1x", 262_144, 0.106),
    ("standard-2x", 524_288, 0.213),
])
def test_no_shared_dyno_can_hold_more_than_a_quarter_of_the_file_table(
        name: str, budget: int, share: float) -> None:
    # The figures README's Sizes table gives; before issue 11 a 1x dyno could hold
    # 256 x 10,000 = 2.56 M open files, more than the whole table.
    size = DEFAULT_SIZES[name]
    assert size.fd_budget == budget
    assert round(budget / REFERENCE_FILE_MAX, 3) == share <= 0.25


def test_nofile_bounds_are_the_launchers() -> None:
    assert (NOFILE_MIN, NOFILE_MAX) == (MIN_NOFILE, MAX_NOFILE)


def test_nofile_override() -> None:
    sizes = apply_overrides(DEFAULT_SIZES, {"standard-1x": {"nofile": 4096},
                                            "fdtest": {"memory_mb": 64, "pids_max": 8}})
    assert sizes["standard-1x"].nofile == 4096
    assert sizes["standard-1x"].fd_budget == 4096 * 256
    assert sizes["fdtest"].nofile == 1024  # a new size starts from the shared figure
    assert DEFAULT_SIZES["standard-1x"].nofile == 1024


def test_defaults_cannot_be_mutated() -> None:
    with pytest.raises(TypeError):
        DEFAULT_SIZES["eco"] = DEFAULT_SIZES["basic"]  # type: ignore[index]


@pytest.mark.parametrize(("name", "shown"), [
    ("standard-1x", "Standard-1X"), ("standard-2x", "Standard-2X"), ("eco", "Eco"),
    ("basic", "Basic"), ("performance-m", "Performance-M"), ("performance-l", "Performance-L"),
    ("performance-l-ram", "Performance-L-RAM"), ("private-2xl", "Private-2XL"),
])
def test_display_name(name: str, shown: str) -> None:
    assert display_name(name) == shown


def test_override_changes_only_given_fields_and_leaves_defaults_alone() -> None:
    sizes = apply_overrides(DEFAULT_SIZES, {"standard-1x": {"memory_mb": 768, "kill_at": 1.5}})
    one = sizes["standard-1x"]
    assert one.memory_quota_bytes == 768 * MIB
    assert one.kill_at == 1.5
    assert (one.pids_max, one.cpu_weight, one.cpu_max_cpus) == (256, 100, None)
    assert DEFAULT_SIZES["standard-1x"].memory_quota_bytes == 512 * MIB
    assert sizes["eco"] == DEFAULT_SIZES["eco"]


def test_new_size_and_cpu_cap_removal() -> None:
    sizes = apply_overrides(DEFAULT_SIZES, {
        "tiny": {"memory_mb": 64, "pids_max": 32, "cpu_max": 0.25},
        "performance-m": {"cpu_max": "max", "cpu_weight": 1000},
    })
    assert sizes["tiny"] == Size("tiny", 64 * MIB, 32, 100, 0.25, 2.0)
    assert sizes["performance-m"].cpu_max_cpus is None
    assert sizes["performance-m"].cpu_weight == 1000


@pytest.mark.parametrize(("table", "key"), [
    ({"eco": {"memory": 1}}, "sizes.eco.memory"),
    ({"eco": {"memory_mb": "512"}}, "sizes.eco.memory_mb"),
    ({"eco": {"memory_mb": True}}, "sizes.eco.memory_mb"),
    ({"eco": {"memory_mb": 0}}, "sizes.eco.memory_mb"),
    ({"eco": {"memory_mb": 512.5}}, "sizes.eco.memory_mb"),
    ({"eco": {"pids_max": -1}}, "sizes.eco.pids_max"),
    ({"eco": {"cpu_weight": 0}}, "sizes.eco.cpu_weight"),
    ({"eco": {"cpu_weight": 10001}}, "sizes.eco.cpu_weight"),
    ({"eco": {"cpu_max": 0}}, "sizes.eco.cpu_max"),
    ({"eco": {"cpu_max": "unlimited"}}, "sizes.eco.cpu_max"),
    ({"eco": {"cpu_max": float("nan")}}, "sizes.eco.cpu_max"),
    ({"eco": {"kill_at": 0.5}}, "sizes.eco.kill_at"),
    ({"eco": {"kill_at": float("inf")}}, "sizes.eco.kill_at"),
    ({"eco": {"nofile": 63}}, "sizes.eco.nofile"),
    ({"eco": {"nofile": (1 << 20) + 1}}, "sizes.eco.nofile"),
    ({"eco": {"nofile": "1024"}}, "sizes.eco.nofile"),
    ({"eco": {"nofile": 1024.0}}, "sizes.eco.nofile"),
    ({"eco": {"nofile": True}}, "sizes.eco.nofile"),
    ({"eco": []}, "sizes.eco"),
    ({"Big": {"memory_mb": 1, "pids_max": 1}}, "sizes.Big"),
    ({"new": {"pids_max": 10}}, "sizes.new.memory_mb"),
    ({"new": {"memory_mb": 10}}, "sizes.new.pids_max"),
])
def test_bad_override_names_the_key(table: dict[str, Any], key: str) -> None:
    with pytest.raises(SizeError) as caught:
        apply_overrides(DEFAULT_SIZES, table)
    assert caught.value.key == key
    assert str(caught.value).startswith(key + ": ")
