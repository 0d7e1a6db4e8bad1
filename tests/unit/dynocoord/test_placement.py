"""Placement (dynocoord.placement.plan) by example: spread, capacity, slugs, minimal churn,
scale-down, lost and draining hosts, one-off dynos, ids; and the rollout order."""

from __future__ import annotations

from collections import Counter

import pytest

from dynocoord import placement as placement_module
from dynocoord.model import FormationEntry, HostState, Placement
from dynocoord.placement import HostView, Plan, Target, dyno_id, plan, plan_rollout

GIB = 1024**3
MIB = 1024**2
READY, DRAINING, LOST = HostState.READY, HostState.DRAINING, HostState.LOST
SLUG = "5" * 64


def _hosts(n: int, memory_gib: float = 8, **states: HostState) -> list[HostView]:
    return [HostView(f"h{i}", states.get(f"h{i}", READY), int(memory_gib * GIB))
            for i in range(n)]


def _target(app: str = "shop", release: int = 1, stack: str = "host", slug: str = SLUG,
            **types: int | tuple[int, str]) -> Target:
    entries = []
    for kind, value in types.items():
        quantity, size = value if isinstance(value, tuple) else (value, "standard-1x")
        entries.append(FormationEntry(app, kind, quantity, size))
    return Target(app, release, slug, stack, tuple(entries))


def _where(result: Plan) -> dict[str, str]:
    return {f"{p.app}/{p.name}": p.host for p in result.placements}


def _per_host(result: Plan, app: str, kind: str) -> Counter[str]:
    return Counter(p.host for p in result.placements if p.app == app and p.type == kind)


def _one_off(host: str, name: str = "run.1", size: str = "standard-1x") -> Placement:
    return Placement(dyno_id("shop", name, 1, 0), "shop", name, 1, size, host, 0)


# ---------------------------------------------------------------- spread and names

def test_web_and_worker_spread_over_three_hosts() -> None:
    result = plan(_hosts(3), [_target(web=3, worker=3)], [], 1)
    assert not result.kept and not result.removed and not result.unplaceable
    assert _per_host(result, "shop", "web") == {"h0": 1, "h1": 1, "h2": 1}
    assert _per_host(result, "shop", "worker") == {"h0": 1, "h1": 1, "h2": 1}
    assert sorted(p.name for p in result.added) == [
        "web.1", "web.2", "web.3", "worker.1", "worker.2", "worker.3"]


def test_exact_first_placement_is_by_free_memory_then_id() -> None:
    hosts = [HostView("a", READY, 4 * GIB), HostView("b", READY, 8 * GIB),
             HostView("c", READY, 8 * GIB)]
    result = plan(hosts, [_target(web=4)], [], 1)
    # b and c tie on free memory (b first by id); then a; then the least loaded again.
    assert _where(result) == {"shop/web.1": "b", "shop/web.2": "c", "shop/web.3": "a",
                              "shop/web.4": "b"}


def test_new_dynos_carry_the_target_release_size_and_generation() -> None:
    result = plan(_hosts(2), [_target(release=7, web=(2, "standard-2x"))], [], 41)
    for p in result.added:
        assert (p.release, p.size, p.generation) == (7, "standard-2x", 41)
        assert p.id == dyno_id("shop", p.name, 7, 41)


def test_scaling_up_moves_nothing() -> None:
    hosts = _hosts(3)
    first = plan(hosts, [_target(web=3)], [], 1)
    second = plan(hosts, [_target(web=4)], first.placements, 2)
    assert set(second.kept) == set(first.placements)
    assert not second.removed
    assert [p.name for p in second.added] == ["web.4"]


def test_an_unchanged_formation_changes_nothing() -> None:
    hosts = _hosts(4)
    first = plan(hosts, [_target(web=5, worker=2)], [], 1)
    again = plan(hosts, [_target(web=5, worker=2)], first.placements, 2)
    assert set(again.kept) == set(first.placements)
    assert not again.added and not again.removed and not again.changed_hosts


def test_scale_down_removes_the_highest_numbers_from_the_most_loaded_host() -> None:
    hosts = _hosts(3)
    first = plan(hosts, [_target(web=5)], [], 1)
    loads = _per_host(first, "shop", "web")
    down = plan(hosts, [_target(web=4)], first.placements, 2)
    assert [p.name for p in down.removed] == ["web.5"]
    (gone,) = down.removed
    assert loads[gone.host] == max(loads.values())
    assert not down.added
    down_more = plan(hosts, [_target(web=1)], down.placements, 3)
    assert sorted(p.name for p in down_more.removed) == ["web.2", "web.3", "web.4"]
    assert [p.name for p in down_more.placements] == ["web.1"]


def test_scale_to_zero_and_a_dropped_type_or_app_remove_their_dynos() -> None:
    hosts = _hosts(2)
    first = plan(hosts, [_target(web=2, worker=2), _target("blog", web=1)], [], 1)
    result = plan(hosts, [_target(web=0)], first.placements, 2)
    assert not result.placements
    assert len(result.removed) == 5


def test_names_fill_the_gaps_first() -> None:
    hosts = _hosts(2)
    first = plan(hosts, [_target(web=4)], [], 1)
    survivors = [p for p in first.placements if p.name != "web.2"]
    result = plan(hosts, [_target(web=4)], survivors, 2)
    assert [p.name for p in result.added] == ["web.2"]


def test_a_size_change_replaces_the_dynos() -> None:
    hosts = _hosts(2)
    first = plan(hosts, [_target(web=2)], [], 1)
    result = plan(hosts, [_target(web=(2, "standard-2x"))], first.placements, 2)
    assert set(result.removed) == set(first.placements)
    assert sorted((p.name, p.size) for p in result.added) == [
        ("web.1", "standard-2x"), ("web.2", "standard-2x")]
    assert not {p.id for p in result.added} & {p.id for p in first.placements}


def test_duplicate_names_keep_one() -> None:
    hosts = _hosts(2)
    a = Placement("aaa", "shop", "web.1", 1, "standard-1x", "h0", 1)
    b = Placement("bbb", "shop", "web.1", 1, "standard-1x", "h1", 1)
    for current in ([a, b], [b, a]):
        result = plan(hosts, [_target(web=1)], current, 2)
        assert result.kept == (a,)
        assert result.removed == (b,)
        assert not result.added
        # The removed one no longer counts on its host: web.2 spreads to it.
        two = plan(hosts, [_target(web=2)], current, 2)
        assert _where(two) == {"shop/web.1": "h0", "shop/web.2": "h1"}


# ---------------------------------------------------------------- host states

def test_dynos_of_a_lost_host_move_and_keep_their_names() -> None:
    first = plan(_hosts(3), [_target(web=3, worker=3)], [], 1)
    lost_host = "h1"
    on_lost = {p for p in first.placements if p.host == lost_host}
    result = plan(_hosts(3, h1=LOST), [_target(web=3, worker=3)], first.placements, 2)
    assert set(result.removed) == on_lost
    assert sorted(p.name for p in result.added) == sorted(p.name for p in on_lost)
    assert all(p.host != lost_host for p in result.added)
    assert set(result.kept) == set(first.placements) - on_lost
    assert result.changed_hosts == {lost_host} | {p.host for p in result.added}


@pytest.mark.parametrize("state", [DRAINING, LOST])
def test_nothing_is_placed_on_a_host_that_is_not_ready(state: HostState) -> None:
    result = plan(_hosts(3, h0=state, h2=state), [_target(web=4)], [], 1)
    assert {p.host for p in result.added} == {"h1"}


def test_a_host_absent_from_the_list_counts_as_lost() -> None:
    first = plan(_hosts(2), [_target(web=2)], [], 1)
    result = plan(_hosts(1), [_target(web=2)], first.placements, 2)
    assert {p.host for p in result.placements} == {"h0"}
    assert [p.host for p in result.removed] == ["h1"]


def test_one_off_dynos_stay_on_draining_hosts_and_go_with_lost_ones() -> None:
    run_on_draining = _one_off("h0", "run.1")
    run_on_lost = _one_off("h1", "run.2")
    release_on_ready = _one_off("h2", "release.1")
    result = plan(_hosts(3, h0=DRAINING, h1=LOST), [_target(web=0)],
                  [run_on_draining, run_on_lost, release_on_ready], 1)
    assert set(result.kept) == {run_on_draining, release_on_ready}
    assert result.removed == (run_on_lost,)


def test_no_ready_host_means_every_dyno_is_unplaceable() -> None:
    result = plan(_hosts(2, h0=LOST, h1=DRAINING), [_target(web=2)], [], 1)
    assert not result.added
    assert [u.name for u in result.unplaceable] == ["web.1", "web.2"]


# ---------------------------------------------------------------- capacity

def test_capacity_runs_out_and_the_rest_is_reported() -> None:
    # Two hosts of 1 GiB hold two 512 MiB dynos each.
    result = plan(_hosts(2, memory_gib=1), [_target(web=5)], [], 1)
    assert sorted(p.name for p in result.added) == ["web.1", "web.2", "web.3", "web.4"]
    assert [(u.name, u.size) for u in result.unplaceable] == [("web.5", "standard-1x")]
    assert "512 MiB" in result.unplaceable[0].reason


def test_spread_gives_way_to_capacity() -> None:
    hosts = [HostView("small", READY, 512 * MIB), HostView("big", READY, 8 * GIB)]
    result = plan(hosts, [_target(web=4)], [], 1)
    assert _per_host(result, "shop", "web") == {"small": 1, "big": 3}


def test_kept_and_one_off_dynos_use_capacity() -> None:
    hosts = _hosts(2, memory_gib=1)
    result = plan(hosts, [_target(web=2)], [_one_off("h0", "run.1"), _one_off("h0", "run.2")],
                  1)
    assert {p.host for p in result.added} == {"h1"}


def test_large_sizes_go_first_so_they_fit() -> None:
    # Two hosts of 1 GiB. Placed first, two 512 MiB web dynos would spread one per host and
    # leave no room anywhere for the 1 GiB worker of another app; placed first, the worker
    # takes one host and both web dynos fit on the other.
    hosts = _hosts(2, memory_gib=1)
    targets = [_target("aaa", web=2), _target("zzz", worker=(1, "standard-2x"))]
    result = plan(hosts, targets, [], 1)
    assert not result.unplaceable
    assert _where(result) == {"zzz/worker.1": "h0", "aaa/web.1": "h1", "aaa/web.2": "h1"}


def test_unknown_sizes_come_from_the_sizes_table() -> None:
    from agent.sizes import Size
    sizes = {"tiny": Size("tiny", 64 * MIB, 16, 10, None, 2.0)}
    result = plan(_hosts(1, memory_gib=0.25), [_target(web=(4, "tiny"))], [], 1, sizes)
    assert len(result.added) == 4 and not result.unplaceable


# ---------------------------------------------------------------- slugs and stacks

def test_hosts_with_the_slug_are_preferred_after_spread() -> None:
    hosts = [HostView("a", READY, 8 * GIB), HostView("b", READY, 8 * GIB),
             HostView("c", READY, 8 * GIB, slugs=frozenset({SLUG}))]
    result = plan(hosts, [_target(web=2)], [], 1)
    assert _where(result)["shop/web.1"] == "c"
    assert _where(result)["shop/web.2"] == "a"  # spread first: c already has one


def test_a_host_running_the_release_counts_as_having_its_slug() -> None:
    hosts = _hosts(3)
    current = [Placement("w1", "shop", "worker.1", 1, "standard-1x", "h2", 1)]
    result = plan(hosts, [_target(web=1, worker=1)], current, 2)
    assert _where(result)["shop/web.1"] == "h2"


def test_a_host_without_the_stack_is_not_used() -> None:
    hosts = [HostView("a", READY, 8 * GIB, stacks=frozenset()),
             HostView("b", READY, 8 * GIB, stacks=frozenset({"heroku-24"})),
             HostView("c", READY, 8 * GIB)]  # stacks unknown: assumed present
    result = plan(hosts, [_target(stack="heroku-24", web=4)], [], 1)
    assert set(_per_host(result, "shop", "web")) == {"b", "c"}
    on_host_stack = plan(hosts, [_target(web=3)], [], 1)
    assert set(_per_host(on_host_stack, "shop", "web")) == {"a", "b", "c"}


# ---------------------------------------------------------------- determinism and ids

def test_the_same_inputs_give_the_same_plan_and_ids() -> None:
    args = (_hosts(5), [_target(web=7, worker=3), _target("blog", web=2)], [], 3)
    assert plan(*args) == plan(*args)
    reordered = plan(list(reversed(args[0])), list(reversed(args[1])), [], 3)
    assert set(reordered.added) == set(plan(*args).added)


def test_ids_differ_across_generations_apps_names_and_releases() -> None:
    ids = {dyno_id(app, name, release, generation)
           for app in ("shop", "blog") for name in ("web.1", "web.11")
           for release in (1, 11) for generation in (1, 11)}
    assert len(ids) == 16
    assert dyno_id("shop", "web.1", 1, 1) == dyno_id("shop", "web.1", 1, 1)


def test_dyno_id_is_the_documented_uuid5() -> None:
    import uuid
    expected = uuid.uuid5(placement_module.DYNO_ID_NAMESPACE, "shop/web.3/2/9")
    assert dyno_id("shop", "web.3", 2, 9) == str(expected)


def test_bad_targets_are_refused() -> None:
    with pytest.raises(ValueError, match="two targets"):
        plan(_hosts(1), [_target(web=1), _target(web=2)], [], 1)
    wrong_app = Target("shop", 1, SLUG, "host", (FormationEntry("blog", "web", 1),))
    with pytest.raises(ValueError, match="does not belong"):
        plan(_hosts(1), [wrong_app], [], 1)


# ---------------------------------------------------------------- rollout

def test_rollout_goes_host_by_host_smallest_first() -> None:
    hosts = _hosts(3)
    current = plan(hosts, [_target(web=4, worker=2)], [], 1).placements
    steps = plan_rollout(current, "shop", 2, 5)
    per_host = Counter(p.host for p in current)
    assert [len(step.replacements) for step in steps] == sorted(
        len(step.replacements) for step in steps)
    assert {step.host for step in steps} == set(per_host)
    replaced = [old for step in steps for old, _ in step.replacements]
    assert sorted(replaced, key=lambda p: p.id) == sorted(current, key=lambda p: p.id)
    for step in steps:
        for old, new in step.replacements:
            assert (new.host, new.name, new.size, new.app) == (old.host, old.name, old.size,
                                                               old.app)
            assert (new.release, new.generation) == (2, 5)
            assert new.id == dyno_id("shop", old.name, 2, 5) != old.id
            assert old.host == step.host


def test_rollout_order_is_by_the_apps_dynos_on_each_host() -> None:
    def web(n: int, host: str) -> Placement:
        return Placement(f"d{n}", "shop", f"web.{n}", 1, "standard-1x", host, 1)
    current = [web(1, "a"), web(2, "a"), web(3, "a"), web(4, "b"), web(5, "c"), web(6, "c"),
               Placement("o1", "blog", "web.1", 1, "standard-1x", "b", 1),
               Placement("o2", "blog", "web.2", 1, "standard-1x", "b", 1)]
    steps = plan_rollout(current, "shop", 2, 5)
    assert [(s.host, [old.name for old, _ in s.replacements]) for s in steps] == [
        ("b", ["web.4"]), ("c", ["web.5", "web.6"]), ("a", ["web.1", "web.2", "web.3"])]


def test_rollout_never_takes_more_than_half_a_type_at_once() -> None:
    # Every web dyno on one host: that host is split into steps of at most 2 of 4.
    current = plan(_hosts(1), [_target(web=4, worker=1)], [], 1).placements
    steps = plan_rollout(current, "shop", 2, 5)
    assert [sorted(old.name for old, _ in step.replacements) for step in steps] == [
        ["web.1", "web.2", "worker.1"], ["web.3", "web.4"]]


def test_rollout_leaves_new_dynos_one_offs_and_other_apps_alone() -> None:
    hosts = _hosts(2)
    first = plan(hosts, [_target(web=2), _target("blog", web=2)], [], 1)
    current = [*first.placements, _one_off("h0", "run.1")]
    already = plan_rollout(current, "shop", 2, 5)[0].replacements[0][1]
    steps = plan_rollout([*current, already], "shop", 2, 6)
    replaced = {old.id for step in steps for old, _ in step.replacements}
    assert replaced == {p.id for p in first.placements if p.app == "shop"}
    assert plan_rollout(current, "shop", 1, 7) == ()
