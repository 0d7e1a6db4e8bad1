"""Where dynos run: deterministic placement of every app's formation across hosts, and the
host-by-host order of a release's rollout — pure functions of their inputs, no I/O.

Rules of `plan()`, in order of precedence:
1. Nothing is placed on a host that is not `ready` (draining, lost, or unknown). Formation
   dynos on such a host are removed and placed again elsewhere; one-off, release and build
   dynos (`run.N`, `release.N`, `build.N`) are left where they are on a draining host (they
   end by themselves) and dropped from a lost one (they are never run twice).
2. A placement that is still valid is kept as it is (minimal churn): valid means a ready
   host, a process type in its app's formation, a number within the quantity, and the
   formation's size. Its release is not checked: moving dynos to a new release is the
   rollout's job (`plan_rollout`), not placement's. Kept dynos are never moved to even out a
   spread — scaling web 3→4 moves nothing. Of two placements with one app + name (which no
   plan makes), the one with the smaller id stays.
3. Each missing name (`type.N`, N in 1…quantity) goes, in increasing N, to the ready host that
   minimises, in this order: the number of dynos of that app and type already on it (the
   spread: the max per host is minimal), not having the release's slug (a host that has it
   starts the dyno without a download), the memory it would have left (most free first), its
   id. A host must have the size's memory quota free (capacity minus every placement kept or
   added on it) and, when it reports its stacks, the release's stack.
4. Scale-down removes the dynos numbered above the new quantity, as Heroku does, so names stay
   1…quantity and no surviving dyno is renamed (a rename is a new spec, i.e. a restart).
   Because rule 3 hands out numbers in spread order, the highest numbers sit on the hosts
   with the most dynos of the type, so this also removes from the most loaded hosts first.
   (Preferring the most loaded host *over* the highest number would leave gaps that only
   renaming, i.e. restarting, survivors could close.)
5. A name that fits on no host is reported in `Plan.unplaceable`, not raised: the rest of
   the plan still holds, and a later plan (more hosts, fewer dynos) places it.

New dyno ids are derived, not random: `dyno_id(app, name, release, generation)`, a uuid5.
The caller passes a `generation` that is new for every plan whose result it writes (the etcd
revision of the snapshot the plan was computed from is one): a coordinator that dies after
planning and plans again from the same snapshot makes the very same ids, so writing the plan
is idempotent, and tests can state exact expected results. A rollout takes a generation of its
own, like a plan. (Ids passed in by a generator would make a retried plan write new ids for
the same dynos, and tests would have to fake the generator.)

Speed: hosts are kept in heaps keyed by free memory, so a missing dyno costs O(log hosts)
plus the hosts of its own type it has to step over; 10,000 new dynos on 1,000 hosts holding
100,000 plan in a fraction of a second (tests/bench/bench_placement.py).
"""

from __future__ import annotations

import hashlib
import heapq
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from agent.sizes import DEFAULT_SIZES, MIB, Size
from agent.spec import HOST_STACK, ONE_SHOT_TYPES
from dynocoord.model import FormationEntry, HostState, Placement

# uuid5 namespace of dyno ids made by the coordinator (a fixed, random uuid).
DYNO_ID_NAMESPACE = uuid.UUID("6f1c0bd4-2a57-4c35-9a61-5f3b2e0d7c18")
_NAMESPACE_BYTES = DYNO_ID_NAMESPACE.bytes
# A group (one app's process type) whose hosts plus missing dynos number at most
# max(_SHARED_SPAN_MIN, ready hosts // _SHARED_SPAN_DIVISOR) looks hosts up in the shared
# free-memory heaps, where each pick steps over at most that many of the group's own hosts;
# a larger one builds a heap of its own over every ready host (one O(hosts) pass). Both give
# the same answer; tests force each path.
_SHARED_SPAN_MIN = 64
_SHARED_SPAN_DIVISOR = 8


def dyno_id(app: str, name: str, release: int, generation: int) -> str:
    """The id of the dyno `app`/`name` of `release` placed in planning round `generation`:
    `uuid.uuid5(DYNO_ID_NAMESPACE, "app/name/release/generation")`, spelled out because
    building UUID objects was a third of the time of planning 10,000 dynos."""
    digest = bytearray(hashlib.sha1(_NAMESPACE_BYTES + f"{app}/{name}/{release}/{generation}"
                                    .encode()).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = digest.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


@dataclass(frozen=True, slots=True)
class HostView:
    """A host as placement sees it. `memory_bytes` is what dynos may use there (the agent's
    reported capacity less whatever the caller reserves for the host itself); `slugs` holds
    the slug keys (model.Release.slug_key) it already has; `stacks` the stacks it has, or
    None when unknown (then any stack is assumed)."""

    id: str
    state: HostState
    memory_bytes: int
    slugs: frozenset[str] = frozenset()
    stacks: frozenset[str] | None = None


@dataclass(frozen=True, slots=True)
class Target:
    """What one app should run: its current release (version, slug key, stack) and its
    formation, one entry per process type."""

    app: str
    release: int
    slug: str
    stack: str
    formation: tuple[FormationEntry, ...]


@dataclass(frozen=True, slots=True)
class Unplaceable:
    app: str
    name: str
    size: str
    reason: str


@dataclass(frozen=True, slots=True)
class Plan:
    """The new placement set: `kept` + `added`; `removed` are current placements that go."""

    kept: tuple[Placement, ...]
    added: tuple[Placement, ...]
    removed: tuple[Placement, ...]
    unplaceable: tuple[Unplaceable, ...]

    @property
    def placements(self) -> tuple[Placement, ...]:
        return self.kept + self.added

    @property
    def changed_hosts(self) -> frozenset[str]:
        """Hosts whose desired set changed: each needs a new generation and a `dynos.sync`."""
        return frozenset(p.host for p in self.added) | frozenset(p.host for p in self.removed)

    def by_host(self) -> dict[str, list[Placement]]:
        out: dict[str, list[Placement]] = {}
        for placement in self.placements:
            out.setdefault(placement.host, []).append(placement)
        return out


@dataclass(slots=True)
class _Fleet:
    """The mutable bookkeeping of one `plan()` call: free memory and slugs per ready host,
    and one heap of (-free, host) per stack, shared by every group and kept lazily: free
    memory only shrinks during a plan, so an entry whose free is no longer the host's
    surfaces too early and is pushed again with the current figure then (a decrease-key on
    demand, so placing a dyno costs no heap update)."""

    free: dict[str, int]
    stacks: dict[str, frozenset[str] | None]
    slugs: dict[str, set[str]] = field(default_factory=dict)  # host -> slug keys
    slug_hosts: dict[str, set[str]] = field(default_factory=dict)  # slug key -> hosts
    stack_heaps: dict[str, list[tuple[int, str]]] = field(default_factory=dict)

    def add_slug(self, host: str, slug: str) -> None:
        self.slugs.setdefault(host, set()).add(slug)
        self.slug_hosts.setdefault(slug, set()).add(host)

    def has_slug(self, host: str, slug: str) -> bool:
        return slug in self.slugs.get(host, ())

    def has_stack(self, host: str, stack: str) -> bool:
        stacks = self.stacks[host]
        return stacks is None or stack == HOST_STACK or stack in stacks

    def hosts_with_stack(self, stack: str) -> Iterable[str]:
        if stack == HOST_STACK or all(s is None for s in self.stacks.values()):
            return self.free
        return [h for h in self.free if self.has_stack(h, stack)]

    def stack_heap(self, stack: str) -> list[tuple[int, str]]:
        heap = self.stack_heaps.get(stack)
        if heap is None:
            heap = [(-self.free[h], h) for h in self.hosts_with_stack(stack)]
            heapq.heapify(heap)
            self.stack_heaps[stack] = heap
        return heap

    def take(self, host: str, memory: int, slug: str) -> None:
        self.free[host] -= memory
        self.add_slug(host, slug)

    def best_fresh(self, heap: list[tuple[int, str]], memory: int,
                   counts: Mapping[str, int]) -> str | None:
        """The host with the most free memory in the shared `heap` that has none of the
        group yet (`counts`) and room for `memory`, or None."""
        skipped: list[tuple[int, str]] = []
        found = None
        while heap:
            negative_free, host = heap[0]
            free = self.free[host]
            if free != -negative_free:
                heapq.heapreplace(heap, (-free, host))  # stale: too high, sink it
                continue
            if free < memory:
                break  # the host with the most free memory has no room: none has
            if counts.get(host, 0):
                skipped.append(heapq.heappop(heap))
                continue
            found = host
            break
        for entry in skipped:
            heapq.heappush(heap, entry)
        return found


def plan(hosts: Iterable[HostView], targets: Iterable[Target], current: Iterable[Placement],
         generation: int, sizes: Mapping[str, Size] = DEFAULT_SIZES) -> Plan:
    """The placements every app's formation needs, from the `current` ones (module doc)."""
    views = {h.id: h for h in hosts}
    ready = {h.id for h in views.values() if h.state is HostState.READY}
    runnable = {h.id for h in views.values() if h.state is not HostState.LOST}
    by_app: dict[str, Target] = {}
    for target in targets:
        if target.app in by_app:
            raise ValueError(f"two targets for app {target.app!r}")
        by_app[target.app] = target
    wanted: dict[tuple[str, str], FormationEntry] = {}
    for target in by_app.values():
        for entry in target.formation:
            if entry.app != target.app or (entry.app, entry.type) in wanted:
                raise ValueError(f"formation entry {entry.app}/{entry.type} does not belong "
                                 f"to target {target.app!r} or is given twice")
            wanted[entry.app, entry.type] = entry
    memory_of = {name: size.memory_quota_bytes for name, size in sizes.items()}

    fleet = _Fleet(free={h: views[h].memory_bytes for h in ready},
                   stacks={h: views[h].stacks for h in ready})
    for h in ready:
        for slug in views[h].slugs:
            fleet.add_slug(h, slug)
    free = fleet.free
    # Valid placements, one per app + name (of two, the smaller id stays: any rule would do,
    # this one does not depend on the input's order). One pass, as it runs over every dyno.
    removed: list[Placement] = []
    chosen: dict[tuple[str, str], Placement] = {}
    one_shots: list[Placement] = []
    counts: dict[tuple[str, str], dict[str, int]] = {}
    for p in current:
        kind, _, digits = p.name.partition(".")
        host = p.host
        if kind in ONE_SHOT_TYPES:
            if host in runnable:
                one_shots.append(p)
                if host in free:
                    free[host] -= memory_of.get(p.size, 0)
            else:
                removed.append(p)
            continue
        group = (p.app, kind)
        want = wanted.get(group)
        if (host not in ready or want is None or p.size != want.size
                or int(digits) > want.quantity):
            removed.append(p)
            continue
        key = (p.app, p.name)
        other = chosen.get(key)
        if other is not None:
            if other.id < p.id:
                removed.append(p)
                continue
            removed.append(other)
            counts[group][other.host] -= 1
            free[other.host] += memory_of[other.size]
        chosen[key] = p
        free[host] -= memory_of[p.size]
        per_host = counts.get(group)
        if per_host is None:
            counts[group] = {host: 1}
        else:
            per_host[host] = per_host.get(host, 0) + 1
    for per_host in counts.values():
        for host in [h for h, n in per_host.items() if not n]:
            del per_host[host]
    for p in chosen.values():
        # A host running a dyno of the app's current release has that release's slug.
        target = by_app[p.app]
        if p.release == target.release:
            fleet.add_slug(p.host, target.slug)

    added: list[Placement] = []
    unplaceable: list[Unplaceable] = []
    groups = sorted(wanted.values(), key=lambda e: (-memory_of.get(e.size, 0), e.app, e.type))
    for entry in groups:
        per_host = counts.setdefault((entry.app, entry.type), {})
        if sum(per_host.values()) >= entry.quantity:
            continue
        missing = [n for n in range(1, entry.quantity + 1)
                   if (entry.app, f"{entry.type}.{n}") not in chosen]
        target = by_app[entry.app]
        _place_group(fleet, entry, target, missing, per_host, memory_of[entry.size],
                     generation, added, unplaceable)

    kept = tuple(one_shots) + tuple(chosen.values())
    return Plan(kept=kept, added=tuple(added), removed=tuple(removed),
                unplaceable=tuple(unplaceable))


def _place_group(fleet: _Fleet, entry: FormationEntry, target: Target, missing: list[int],
                 per_host: dict[str, int], memory: int, generation: int,
                 added: list[Placement], unplaceable: list[Unplaceable]) -> None:
    """Place `missing` numbers of one app + type; `per_host` counts its dynos per host."""
    slug, stack = target.slug, target.stack
    placed = 0
    span = len(per_host) + len(missing)
    if span <= max(_SHARED_SPAN_MIN, len(fleet.free) // _SHARED_SPAN_DIVISOR):
        # Small group: while a host without any of its dynos fits, that host wins (count 0):
        # first one with the slug (from a heap of this group's own, as those hosts are
        # mostly the app's, i.e. the group's own), then any (from the shared heap).
        free = fleet.free
        with_slug = [(-free[h], h) for h in fleet.slug_hosts.get(slug, ())
                     if h not in per_host and h in free and fleet.has_stack(h, stack)]
        heapq.heapify(with_slug)
        stack_heap = fleet.stack_heap(stack)
        while placed < len(missing):
            host = None
            # Free memory changes only on hosts this group takes, which leave the heap.
            if with_slug and -with_slug[0][0] >= memory:
                host = heapq.heappop(with_slug)[1]
            else:
                with_slug = []
                host = fleet.best_fresh(stack_heap, memory, per_host)
            if host is None:
                break
            _add(fleet, entry, target, missing[placed], host, per_host, memory, generation,
                 added)
            placed += 1
        candidates: Iterable[str] = per_host  # no fresh host fits: only the group's own may
    else:
        candidates = fleet.hosts_with_stack(stack)
    if placed < len(missing):
        free, hosts_with_slug = fleet.free, fleet.slug_hosts.get(slug, set())
        heap = [(per_host.get(h, 0), 0 if h in hosts_with_slug else 1, -free[h], h)
                for h in candidates if free[h] >= memory and fleet.has_stack(h, stack)]
        heapq.heapify(heap)
        while placed < len(missing) and heap:
            count, _, negative_free, host = heapq.heappop(heap)
            if -negative_free < memory:
                continue  # free memory only shrinks while this group is placed
            _add(fleet, entry, target, missing[placed], host, per_host, memory, generation,
                 added)
            heapq.heappush(heap, (count + 1, 0, -fleet.free[host], host))
            placed += 1
    if placed < len(missing):
        reason = (f"no ready host{'' if stack == HOST_STACK else f' with stack {stack!r}'} "
                  f"has {memory // MIB} MiB free for a {entry.size} dyno")
        for number in missing[placed:]:
            unplaceable.append(Unplaceable(entry.app, f"{entry.type}.{number}", entry.size,
                                           reason))


def _add(fleet: _Fleet, entry: FormationEntry, target: Target, number: int, host: str,
         per_host: dict[str, int], memory: int, generation: int,
         added: list[Placement]) -> None:
    name = f"{entry.type}.{number}"
    fleet.take(host, memory, target.slug)
    per_host[host] = per_host.get(host, 0) + 1
    added.append(Placement(id=dyno_id(entry.app, name, target.release, generation),
                           app=entry.app, name=name, release=target.release, size=entry.size,
                           host=host, generation=generation))


# ---------------------------------------------------------------- rollout

@dataclass(frozen=True, slots=True)
class RolloutStep:
    """Replace, on `host`, each old placement by its new one (same name, size and host; the
    new release; a new id). The agent applies a step as one `dynos.sync`."""

    host: str
    replacements: tuple[tuple[Placement, Placement], ...]


def plan_rollout(placements: Iterable[Placement], app: str, release: int,
                 generation: int) -> tuple[RolloutStep, ...]:
    """The order in which `app`'s formation dynos move to `release`, host by host.

    Hosts with the fewest of the app's old dynos go first (the smallest blast radius while
    the new release is unproven); ties by host id. A dyno is replaced on its own host: its
    memory is freed as the new one takes it, so a rollout needs no spare capacity and keeps
    the spread. No step replaces more than half (at least one) of a process type's dynos, so
    a type with two or more dynos always has some running; a host holding more is split into
    consecutive steps. One-off, release and build dynos, and dynos already at `release` or
    newer, are left alone. The agent refuses two dynos with one name on a host, so on a host
    the old dyno stops before its replacement starts; the "new before old" of Heroku's preboot
    holds across hosts (the rest of the type keeps serving), not within one.
    """
    mine = [p for p in placements if p.app == app and p.type not in ONE_SHOT_TYPES]
    total: dict[str, int] = {}
    for p in mine:
        total[p.type] = total.get(p.type, 0) + 1
    old: dict[str, list[Placement]] = {}
    for p in mine:
        if p.release < release:
            old.setdefault(p.host, []).append(p)
    steps: list[RolloutStep] = []
    for host in sorted(old, key=lambda h: (len(old[h]), h)):
        pending = sorted(old[host], key=lambda p: (p.type, p.number))
        while pending:
            batch: list[Placement] = []
            rest: list[Placement] = []
            per_type: dict[str, int] = {}
            for p in pending:
                limit = max(1, total[p.type] // 2)
                if per_type.get(p.type, 0) < limit:
                    per_type[p.type] = per_type.get(p.type, 0) + 1
                    batch.append(p)
                else:
                    rest.append(p)
            steps.append(RolloutStep(host, tuple(
                (p, Placement(id=dyno_id(app, p.name, release, generation), app=app,
                              name=p.name, release=release, size=p.size, host=host,
                              generation=generation)) for p in batch)))
            pending = rest
    return tuple(steps)
