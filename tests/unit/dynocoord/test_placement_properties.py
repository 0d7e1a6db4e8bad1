"""Placement invariants on random fleets (hypothesis): whatever the hosts, their states and
capacities, the formations and the placements a previous plan left, the new plan keeps every
host within capacity, places nothing on a host that is not ready, keeps every valid placement
untouched, numbers each type 1..quantity, reports only what truly fits nowhere, spreads within
one when capacity allows, and does not depend on the order of its inputs or on which of its
two lookup paths it takes."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.sizes import DEFAULT_SIZES
from agent.spec import ONE_SHOT_TYPES
from dynocoord import placement as placement_module
from dynocoord.model import FormationEntry, HostState, Placement
from dynocoord.placement import HostView, Plan, Target, plan

MIB = 1024**2
SIZES = ("standard-1x", "standard-2x", "performance-m")
STACKS = ("host", "heroku-24")
MEMORY = {name: size.memory_quota_bytes for name, size in DEFAULT_SIZES.items()}


@dataclass(frozen=True)
class Case:
    hosts: list[HostView]
    targets: list[Target]
    current: list[Placement]


def _hosts(rng: random.Random, count: int, roomy: bool) -> list[HostView]:
    hosts = []
    for i in range(count):
        memory = rng.choice([512, 1024, 2048, 4096, 8192]) * MIB
        if roomy:
            memory = 1024 * 1024 * MIB
        state = rng.choices(list(HostState), weights=[6, 1, 1])[0]
        slugs = frozenset(s for s in ("s0", "s1", "s2") if rng.random() < 0.3)
        stacks = rng.choice([None, frozenset(), frozenset({"heroku-24"})])
        hosts.append(HostView(f"h{i:02d}", state, memory, slugs, stacks))
    return hosts


def _targets(rng: random.Random, apps: int, release: int) -> list[Target]:
    targets = []
    for a in range(apps):
        app = f"app-{a}"
        entries = tuple(FormationEntry(app, kind, rng.randint(0, 9), rng.choice(SIZES))
                        for kind in ("web", "worker", "clock") if rng.random() < 0.8)
        targets.append(Target(app, release, f"s{a % 3}", rng.choice(STACKS), entries))
    return targets


def _case(seed: int, roomy: bool = False) -> Case:
    """A fleet in some state, the placements a plan made for an earlier state of it, and a
    new formation: hosts lost or drained since, quantities and sizes changed."""
    rng = random.Random(seed)
    count = rng.randint(1, 12)
    before = _hosts(rng, count, roomy)
    apps = rng.randint(1, 4)
    earlier = plan([HostView(h.id, HostState.READY, h.memory_bytes, h.slugs, h.stacks)
                    for h in before], _targets(rng, apps, 1), [], 1)
    current = list(earlier.placements)
    free = {h.id: h.memory_bytes for h in before}
    for p in current:
        free[p.host] -= MEMORY[p.size]
    for i in range(rng.randint(0, 3)):  # one-off dynos the API started where there was room
        host = rng.choice(before).id
        if free[host] >= MEMORY["standard-1x"]:
            free[host] -= MEMORY["standard-1x"]
            current.append(Placement(f"run-{i}", "app-0", f"run.{i + 1}", 1, "standard-1x",
                                     host, 1))
    rng.shuffle(current)
    return Case(before, _targets(rng, apps, 2), current)


def _free_after(case: Case, result: Plan) -> dict[str, int]:
    free = {h.id: h.memory_bytes for h in case.hosts if h.state is HostState.READY}
    for p in result.placements:
        if p.host in free:
            free[p.host] -= MEMORY[p.size]
    return free


def _valid(case: Case, p: Placement) -> bool:
    ready = {h.id for h in case.hosts if h.state is HostState.READY}
    wanted = {(e.app, e.type): e for t in case.targets for e in t.formation}
    entry = wanted.get((p.app, p.type))
    return (p.host in ready and entry is not None and p.number <= entry.quantity
            and p.size == entry.size)


seeds = st.integers(0, 2**32 - 1)
SETTINGS = settings(max_examples=300, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(seeds)
def test_no_host_over_capacity(seed: int) -> None:
    case = _case(seed)
    result = plan(case.hosts, case.targets, case.current, 2)
    # The earlier plan filled hosts within their capacity, and nothing grew since.
    assert all(free >= 0 for free in _free_after(case, result).values())


@SETTINGS
@given(seeds)
def test_nothing_new_on_a_host_that_is_not_ready(seed: int) -> None:
    case = _case(seed)
    result = plan(case.hosts, case.targets, case.current, 2)
    state = {h.id: h.state for h in case.hosts}
    assert all(state[p.host] is HostState.READY for p in result.added)
    for p in result.kept:
        if p.type in ONE_SHOT_TYPES:
            assert state[p.host] is not HostState.LOST
        else:
            assert state[p.host] is HostState.READY


@SETTINGS
@given(seeds)
def test_valid_placements_are_kept_untouched_and_the_rest_removed(seed: int) -> None:
    case = _case(seed)
    result = plan(case.hosts, case.targets, case.current, 2)
    assert sorted(result.kept + result.removed, key=lambda p: p.id) == sorted(
        case.current, key=lambda p: p.id)
    for p in case.current:
        if p.type not in ONE_SHOT_TYPES:
            assert (p in result.kept) == _valid(case, p), p
    assert not {p.id for p in result.added} & {p.id for p in case.current}


@SETTINGS
@given(seeds)
def test_names_are_one_to_quantity_exactly(seed: int) -> None:
    case = _case(seed)
    result = plan(case.hosts, case.targets, case.current, 2)
    names = Counter((p.app, p.name) for p in result.placements if p.type not in ONE_SHOT_TYPES)
    assert max(names.values(), default=1) == 1
    missing = Counter((u.app, u.name) for u in result.unplaceable)
    assert not set(names) & set(missing)
    expected = {(e.app, f"{e.type}.{n}") for t in case.targets for e in t.formation
                for n in range(1, e.quantity + 1)}
    assert set(names) | set(missing) == expected


@SETTINGS
@given(seeds)
def test_unplaceable_only_when_no_eligible_host_has_room(seed: int) -> None:
    case = _case(seed)
    result = plan(case.hosts, case.targets, case.current, 2)
    free = _free_after(case, result)
    stacks = {h.id: h.stacks for h in case.hosts}
    stack_of = {t.app: t.stack for t in case.targets}
    for u in result.unplaceable:
        stack = stack_of[u.app]
        eligible = [h for h in free
                    if stack == "host" or stacks[h] is None or stack in (stacks[h] or ())]
        assert all(free[h] < MEMORY[u.size] for h in eligible), u


@SETTINGS
@given(seeds, st.lists(st.integers(0, 30), min_size=1, max_size=6))
def test_spread_within_one_when_capacity_allows(seed: int, quantities: list[int]) -> None:
    # Ample memory, every host ready: through any sequence of scalings each type stays
    # within one dyno per host of even.
    rng = random.Random(seed)
    hosts = [HostView(h.id, HostState.READY, h.memory_bytes, h.slugs, None)
             for h in _hosts(rng, rng.randint(1, 9), roomy=True)]
    current: tuple[Placement, ...] = ()
    for step, web in enumerate(quantities):
        targets = [Target("app-0", 1, "s0", "host",
                          (FormationEntry("app-0", "web", web),
                           FormationEntry("app-0", "worker", (web * 7) % 11, "standard-2x"))),
                   Target("app-1", 1, "s1", "host",
                          (FormationEntry("app-1", "web", (web * 3) % 13),))]
        result = plan(hosts, targets, current, step + 1)
        assert not result.unplaceable
        for t in targets:
            for e in t.formation:
                counts = Counter(p.host for p in result.placements
                                 if (p.app, p.type) == (e.app, e.type))
                per_host = [counts.get(h.id, 0) for h in hosts]
                assert max(per_host) - min(per_host) <= 1, (e, per_host)
        current = result.placements


@SETTINGS
@given(seeds)
def test_the_order_of_inputs_does_not_matter(seed: int) -> None:
    case = _case(seed)
    result = plan(case.hosts, case.targets, case.current, 2)
    rng = random.Random(seed)
    hosts, targets, current = list(case.hosts), list(case.targets), list(case.current)
    rng.shuffle(hosts)
    rng.shuffle(targets)
    rng.shuffle(current)
    again = plan(hosts, targets, current, 2)
    assert set(again.added) == set(result.added)
    assert set(again.kept) == set(result.kept)
    assert set(again.removed) == set(result.removed)
    assert set(again.unplaceable) == set(result.unplaceable)


@contextmanager
def _path(shared: bool) -> Iterator[None]:
    saved = placement_module._SHARED_SPAN_MIN, placement_module._SHARED_SPAN_DIVISOR
    placement_module._SHARED_SPAN_MIN = 10**9 if shared else -1
    placement_module._SHARED_SPAN_DIVISOR = 1
    try:
        yield
    finally:
        placement_module._SHARED_SPAN_MIN, placement_module._SHARED_SPAN_DIVISOR = saved


@SETTINGS
@given(seeds, st.booleans())
def test_both_lookup_paths_give_the_same_plan(seed: int, roomy: bool) -> None:
    case = _case(seed, roomy)
    with _path(shared=True):
        shared = plan(case.hosts, case.targets, case.current, 2)
    with _path(shared=False):
        own = plan(case.hosts, case.targets, case.current, 2)
    assert shared == own


@pytest.mark.parametrize("shared", [True, False])
def test_both_paths_on_a_larger_fleet(shared: bool) -> None:
    rng = random.Random(7)
    hosts = _hosts(rng, 60, roomy=False)
    targets = _targets(rng, 30, 1)
    with _path(shared=not shared):
        other = plan(hosts, targets, [], 1)
    with _path(shared=shared):
        result = plan(hosts, targets, [], 1)
    assert result == other
    assert result.added
