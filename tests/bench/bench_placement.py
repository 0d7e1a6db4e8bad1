"""Placement planner (dynocoord.placement) at fleet size: 1,000 hosts, 1,000 apps of web=60
worker=40, i.e. 100,000 dynos. Times, as medians of several runs of the pure function: the
first plan from nothing, a plan where nothing changed, 10,000 more dynos (one app, 100 apps,
1,000 apps), 10,000 fewer, one host lost (its ~100 dynos placed elsewhere), one host
draining, and a rollout plan of one app. Prints figures; asserts nothing.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

from dynocoord.model import FormationEntry, HostState, Placement
from dynocoord.placement import HostView, Plan, Target, plan, plan_rollout

HOSTS = 1000
APPS = 1000
WEB = 60
WORKER = 40
ROUNDS = 7
GIB = 1024**3


def _hosts(lost: int = -1, draining: int = -1) -> list[HostView]:
    return [HostView(f"host-{i:04d}", HostState.LOST if i == lost
                     else HostState.DRAINING if i == draining else HostState.READY,
                     64 * GIB) for i in range(HOSTS)]


def _targets(extra: dict[int, int] | None = None, web: int = WEB) -> list[Target]:
    extra = extra or {}
    return [Target(f"app-{a:04d}", 1, f"{a:064x}", "host",
                   (FormationEntry(f"app-{a:04d}", "web", web + extra.get(a, 0)),
                    FormationEntry(f"app-{a:04d}", "worker", WORKER)))
            for a in range(APPS)]


def _time(call: Callable[[], Plan]) -> tuple[float, Plan]:
    samples = []
    result = None
    for _ in range(ROUNDS):
        t0 = time.perf_counter()
        result = call()
        samples.append(time.perf_counter() - t0)
    assert result is not None
    return statistics.median(samples), result


def _line(what: str, seconds: float, result: Plan) -> None:
    print(f"{what:<44} median {seconds * 1000:8.1f} ms   kept {len(result.kept):6d}  "
          f"added {len(result.added):6d}  removed {len(result.removed):6d}  "
          f"unplaceable {len(result.unplaceable):5d}  hosts changed "
          f"{len(result.changed_hosts):4d}", flush=True)


def main() -> None:
    hosts = _hosts()
    targets = _targets()
    seconds, first = _time(lambda: plan(hosts, targets, [], 1))
    _line(f"first plan: {APPS} apps x {WEB + WORKER} dynos", seconds, first)
    current: list[Placement] = list(first.placements)
    per_host = [len(v) for v in first.by_host().values()]
    print(f"  dynos per host: min {min(per_host)} max {max(per_host)}")

    seconds, result = _time(lambda: plan(hosts, targets, current, 2))
    _line("nothing changed", seconds, result)

    cases = {
        "+10,000 dynos: one app web 60 -> 10,000": {0: 10_000 - WEB},
        "+10,000 dynos: 100 apps web +100": {a: 100 for a in range(100)},
        "+10,000 dynos: 1,000 apps web +10": {a: 10 for a in range(APPS)},
    }
    for what, extra in cases.items():
        changed = _targets(extra)
        seconds, result = _time(lambda changed=changed: plan(hosts, changed, current, 2))
        _line(what, seconds, result)
    fewer = _targets(web=WEB - 10)
    seconds, result = _time(lambda: plan(hosts, fewer, current, 2))
    _line("-10,000 dynos: 1,000 apps web -10", seconds, result)

    lost = _hosts(lost=7)
    seconds, result = _time(lambda: plan(lost, targets, current, 2))
    _line("one host lost", seconds, result)
    draining = _hosts(draining=7)
    seconds, result = _time(lambda: plan(draining, targets, current, 2))
    _line("one host draining", seconds, result)

    samples = []
    steps = ()
    for _ in range(ROUNDS):
        t0 = time.perf_counter()
        steps = plan_rollout(current, "app-0000", 2, 3)
        samples.append(time.perf_counter() - t0)
    print(f"{'rollout of one app (100 dynos, 100k placed)':<44} median "
          f"{statistics.median(samples) * 1000:8.1f} ms   steps {len(steps)}")
    encoded = [p.to_json() for p in current[:1000]]
    print(f"placement record: {statistics.mean(len(e) for e in encoded):.0f} bytes of JSON "
          f"on average (one etcd key per dyno)")


if __name__ == "__main__":
    main()
