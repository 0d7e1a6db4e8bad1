"""The pure limits -> writes mapping, exhaustively for both modes, and validation of Limits."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cgroups.errors import InvalidValue
from cgroups.limits import (
    Limits,
    Mode,
    Write,
    controllers_needed,
    cpu_quota_usec,
    plan_writes,
    weight_to_shares,
)

MiB = 1 << 20


def test_v2_full_spec_with_swap_accounting() -> None:
    limits = Limits(memory_high_bytes=512 * MiB, memory_max_bytes=1024 * MiB, swap_allowed=False,
                    cpu_weight=200, cpu_max_cpus=2.0, pids_max=512)
    assert plan_writes(limits, Mode.V2, swap_accounting=True) == [
        Write("memory", "memory.oom.group", "1"),
        Write("memory", "memory.high", str(512 * MiB)),
        Write("memory", "memory.max", str(1024 * MiB)),
        Write("memory", "memory.swap.max", "0"),
        Write("cpu", "cpu.weight", "200"),
        Write("cpu", "cpu.max", "200000 100000"),
        Write("pids", "pids.max", "512"),
    ]


def test_hybrid_full_spec_with_memsw() -> None:
    limits = Limits(memory_high_bytes=512 * MiB, memory_max_bytes=1024 * MiB, swap_allowed=False,
                    cpu_weight=200, cpu_max_cpus=2.0, pids_max=512)
    assert plan_writes(limits, Mode.HYBRID, swap_accounting=True) == [
        Write("memory", "memory.soft_limit_in_bytes", str(512 * MiB)),
        Write("memory", "memory.memsw.limit_in_bytes", "-1"),
        Write("memory", "memory.limit_in_bytes", str(1024 * MiB)),
        Write("memory", "memory.memsw.limit_in_bytes", str(1024 * MiB)),
        Write("cpu", "cpu.shares", "2048"),
        Write("cpu", "cpu.cfs_period_us", "100000"),
        Write("cpu", "cpu.cfs_quota_us", "200000"),
        Write("pids", "pids.max", "512"),
    ]


def test_empty_limits_v2_only_sets_group_oom() -> None:
    assert plan_writes(Limits(), Mode.V2, swap_accounting=False) == [
        Write("memory", "memory.oom.group", "1")]


def test_empty_limits_v2_swap_accounting_caps_swap() -> None:
    assert plan_writes(Limits(), Mode.V2, swap_accounting=True) == [
        Write("memory", "memory.oom.group", "1"), Write("memory", "memory.swap.max", "0")]


def test_empty_limits_hybrid_without_memsw_keeps_group_out_of_swap() -> None:
    assert plan_writes(Limits(), Mode.HYBRID, swap_accounting=False) == [
        Write("memory", "memory.swappiness", "0")]


def test_empty_limits_hybrid_with_memsw_writes_nothing() -> None:
    assert plan_writes(Limits(), Mode.HYBRID, swap_accounting=True) == []


@pytest.mark.parametrize(("swap_allowed", "accounting", "expected"), [
    (False, True, [("memory.memsw.limit_in_bytes", "-1"), ("memory.limit_in_bytes", "67108864"),
                   ("memory.memsw.limit_in_bytes", "67108864")]),
    (True, True, [("memory.memsw.limit_in_bytes", "-1"), ("memory.limit_in_bytes", "67108864")]),
    (False, False, [("memory.limit_in_bytes", "67108864"), ("memory.swappiness", "0")]),
    (True, False, [("memory.limit_in_bytes", "67108864")]),
])
def test_hybrid_kill_point_and_swap(swap_allowed: bool, accounting: bool,
                                    expected: list[tuple[str, str]]) -> None:
    limits = Limits(memory_max_bytes=64 * MiB, swap_allowed=swap_allowed)
    got = plan_writes(limits, Mode.HYBRID, swap_accounting=accounting)
    assert [(w.file, w.value) for w in got] == expected
    assert {w.controller for w in got} == {"memory"}


@pytest.mark.parametrize(("swap_allowed", "accounting", "expected"), [
    (False, True, [("memory.oom.group", "1"), ("memory.max", "67108864"),
                   ("memory.swap.max", "0")]),
    (True, True, [("memory.oom.group", "1"), ("memory.max", "67108864"),
                  ("memory.swap.max", "max")]),
    (False, False, [("memory.oom.group", "1"), ("memory.max", "67108864")]),
    (True, False, [("memory.oom.group", "1"), ("memory.max", "67108864")]),
])
def test_v2_kill_point_and_swap(swap_allowed: bool, accounting: bool,
                                expected: list[tuple[str, str]]) -> None:
    limits = Limits(memory_max_bytes=64 * MiB, swap_allowed=swap_allowed)
    got = plan_writes(limits, Mode.V2, swap_accounting=accounting)
    assert [(w.file, w.value) for w in got] == expected


def test_hybrid_has_no_memory_high_file() -> None:
    got = plan_writes(Limits(memory_high_bytes=MiB), Mode.HYBRID, swap_accounting=True)
    assert all(w.file != "memory.high" for w in got)
    assert Write("memory", "memory.soft_limit_in_bytes", str(MiB)) in got


@pytest.mark.parametrize(("cpus", "quota"), [
    (0.2, "20000"), (1.0, "100000"), (2.5, "250000"), (8, "800000"), (0.001, "1000"),
    (0.00001, "1000"), (0.123456, "12346")])
def test_cpu_max_as_cpus_worth(cpus: float, quota: str) -> None:
    v2 = plan_writes(Limits(cpu_max_cpus=cpus), Mode.V2, swap_accounting=False)
    assert Write("cpu", "cpu.max", f"{quota} 100000") in v2
    v1 = plan_writes(Limits(cpu_max_cpus=cpus), Mode.HYBRID, swap_accounting=True)
    assert v1 == [Write("cpu", "cpu.cfs_period_us", "100000"),
                  Write("cpu", "cpu.cfs_quota_us", quota)]


@pytest.mark.parametrize(("weight", "shares"), [
    (1, 10), (2, 20), (50, 512), (100, 1024), (200, 2048), (10_000, 102_400)])
def test_weight_to_shares_default_maps_to_default(weight: int, shares: int) -> None:
    assert weight_to_shares(weight) == shares
    got = plan_writes(Limits(cpu_weight=weight), Mode.HYBRID, swap_accounting=True)
    assert got == [Write("cpu", "cpu.shares", str(shares))]
    v2 = plan_writes(Limits(cpu_weight=weight), Mode.V2, swap_accounting=False)
    assert Write("cpu", "cpu.weight", str(weight)) in v2


def test_weight_to_shares_is_monotonic_and_in_v1_range() -> None:
    values = [weight_to_shares(w) for w in range(1, 10_001)]
    assert values == sorted(values)
    assert min(values) >= 2
    assert max(values) <= 262_144


@pytest.mark.parametrize("mode", list(Mode))
def test_pids_max_same_file_in_both_modes(mode: Mode) -> None:
    got = plan_writes(Limits(pids_max=20), mode, swap_accounting=True)
    assert Write("pids", "pids.max", "20") in got


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"memory_high_bytes": 0}, "memory_high_bytes"),
    ({"memory_max_bytes": -1}, "memory_max_bytes"),
    ({"memory_high_bytes": 2, "memory_max_bytes": 1}, "memory_high_bytes"),
    ({"cpu_weight": 0}, "cpu_weight"),
    ({"cpu_weight": 10_001}, "cpu_weight"),
    ({"cpu_max_cpus": 0.0}, "cpu_max_cpus"),
    ({"cpu_max_cpus": float("nan")}, "cpu_max_cpus"),
    ({"cpu_max_cpus": float("inf")}, "cpu_max_cpus"),
    ({"pids_max": 0}, "pids_max"),
    ({"memory_max_bytes": True}, "memory_max_bytes"),
])
def test_invalid_limits_are_rejected_naming_the_field(kwargs: dict[str, object],
                                                      field: str) -> None:
    with pytest.raises(InvalidValue) as info:
        Limits(**kwargs)  # type: ignore[arg-type]
    assert info.value.file == field


def test_controllers_needed() -> None:
    assert controllers_needed(Limits()) == {"memory"}
    assert controllers_needed(Limits(cpu_weight=5)) == {"memory", "cpu"}
    assert controllers_needed(Limits(cpu_max_cpus=1)) == {"memory", "cpu"}
    assert controllers_needed(Limits(pids_max=3)) == {"memory", "pids"}


def test_quota_never_below_kernel_minimum() -> None:
    assert cpu_quota_usec(1e-9) == 1000


def _v1_memsw_invariant_holds(writes: list[Write]) -> bool:
    """Replay writes on a v1 group starting unlimited: memsw >= limit after every step."""
    unlimited = 1 << 63
    limit, memsw = unlimited, unlimited
    for w in writes:
        value = unlimited if w.value == "-1" else int(w.value)
        if w.file == "memory.limit_in_bytes":
            limit = value
        elif w.file == "memory.memsw.limit_in_bytes":
            memsw = value
        else:
            continue
        if memsw < limit:
            return False
    return True


limits_strategy = st.builds(
    Limits,
    memory_high_bytes=st.none(),
    memory_max_bytes=st.one_of(st.none(), st.integers(1, 1 << 40)),
    swap_allowed=st.booleans(),
    cpu_weight=st.one_of(st.none(), st.integers(1, 10_000)),
    cpu_max_cpus=st.one_of(st.none(), st.floats(0.001, 64)),
    pids_max=st.one_of(st.none(), st.integers(1, 1 << 22)),
)


@given(limits_strategy, st.booleans())
def test_v1_plan_keeps_memsw_above_limit_at_every_step(limits: Limits, accounting: bool) -> None:
    assert _v1_memsw_invariant_holds(plan_writes(limits, Mode.HYBRID, swap_accounting=accounting))


@given(limits_strategy, st.booleans(), st.sampled_from(list(Mode)))
def test_plans_write_each_file_for_one_reason(limits: Limits, accounting: bool,
                                              mode: Mode) -> None:
    writes = plan_writes(limits, mode, swap_accounting=accounting)
    # Only memsw is written twice (lift, then set); every other file at most once.
    counts = {f: sum(1 for w in writes if w.file == f) for f in {w.file for w in writes}}
    assert all(n == 1 for f, n in counts.items() if f != "memory.memsw.limit_in_bytes")
    for w in writes:
        assert w.file.startswith(w.controller + ".")
        assert w.value and "\n" not in w.value


def test_every_combination_of_present_fields_maps_each_field() -> None:
    fields = {"memory_high_bytes": 10 * MiB, "memory_max_bytes": 20 * MiB, "cpu_weight": 300,
              "cpu_max_cpus": 1.5, "pids_max": 99}
    v2_file = {"memory_high_bytes": "memory.high", "memory_max_bytes": "memory.max",
               "cpu_weight": "cpu.weight", "cpu_max_cpus": "cpu.max", "pids_max": "pids.max"}
    v1_file = {"memory_high_bytes": "memory.soft_limit_in_bytes",
               "memory_max_bytes": "memory.limit_in_bytes", "cpu_weight": "cpu.shares",
               "cpu_max_cpus": "cpu.cfs_quota_us", "pids_max": "pids.max"}
    for n in range(len(fields) + 1):
        for chosen in itertools.combinations(fields, n):
            limits = Limits(**{k: fields[k] for k in chosen})  # type: ignore[arg-type]
            for mode, files in ((Mode.V2, v2_file), (Mode.HYBRID, v1_file)):
                written = {w.file for w in plan_writes(limits, mode, swap_accounting=True)}
                for name, file in files.items():
                    assert (file in written) == (name in chosen), (mode, chosen, file)
