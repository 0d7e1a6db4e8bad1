"""The convergence engine: a desired set of dyno specs with a generation, turned into start,
remove, replace and resume actions on the dynos of this host; the last applied set on disk.

Two sources feed it (the coordinator's `dynos.sync`, and the local controller); it acts only
when asked, so a restarted agent kills nothing until a fresh desired set arrives.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from agent import errors
from agent.atomicfile import write_atomically
from agent.spec import BUILD_TYPE, DynoSpec, SpecError
from agent.supervision.states import DynoState

log = logging.getLogger(__name__)

DESIRED_FILE = "desired.json"
# A desired set is one host's formation; far more would not fit the host anyway, and the
# bound keeps one message from making the agent plan (and persist) without limit.
MAX_DESIRED_DYNOS = 10_000
# Removals asked of the dynos per loop turn (see Engine._execute).
REMOVE_BATCH = 16
# Generations are msgpack's signed 64-bit range: a coordinator that sent 2**64 - 1 would
# otherwise leave no newer generation to send (docs/protocol.md §4 says how to recover).
MAX_GENERATION = 2**63 - 1


class ReconcileError(Exception):
    """Base of the engine's errors."""


class InvalidDesiredSet(ReconcileError):
    """A desired set does not validate; nothing of it was applied. `field` is the dotted
    path of the offending value (e.g. `dynos[2].env.X`)."""

    def __init__(self, field: str, message: str, value: Any = None) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.value = value


class DesiredStateError(ReconcileError):
    """The desired set could not be persisted or read back; carries the path and errno."""

    def __init__(self, path: Path, message: str, errno: int | None = None) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.errno = errno


@dataclass(frozen=True)
class Observed:
    """What the engine needs to know of an existing dyno."""

    spec: DynoSpec
    running: bool  # meant to run (False after an explicit stop)
    complete: bool  # a one-off or release dyno that has exited: never started again


class Fleet(Protocol):
    """The dynos of this host as the engine drives them (the supervisor, or a fake)."""

    def parse(self, body: Any) -> DynoSpec:
        """Validate a spec exactly as the operator API does; raises SpecError."""
        ...

    def observe(self) -> Mapping[str, Observed]: ...

    def observe_one(self, dyno_id: str) -> Observed | None:
        """`observe().get(dyno_id)`, without looking at every other dyno."""
        ...

    async def start(self, spec: DynoSpec) -> None: ...

    async def resume(self, dyno_id: str) -> None: ...

    async def remove(self, dyno_id: str) -> None: ...


@dataclass(frozen=True)
class Plan:
    """What converging takes: removals run first (they free names and addresses that the
    starts may need), then starts, replacements' starts and resumes."""

    remove: tuple[str, ...] = ()
    replace: tuple[DynoSpec, ...] = ()
    start: tuple[DynoSpec, ...] = ()
    resume: tuple[str, ...] = ()
    unchanged: tuple[str, ...] = ()


def plan(desired: Mapping[str, DynoSpec], observed: Mapping[str, Observed]) -> Plan:
    """The actions that make `observed` match `desired` (a pure function, by dyno id)."""
    remove = sorted(dyno_id for dyno_id in observed if dyno_id not in desired)
    replace: list[DynoSpec] = []
    start: list[DynoSpec] = []
    resume: list[str] = []
    unchanged: list[str] = []
    for dyno_id, spec in sorted(desired.items()):
        current = observed.get(dyno_id)
        if current is None:
            start.append(spec)
        elif current.spec != spec:
            replace.append(spec)
        elif not current.running and not current.complete:
            resume.append(dyno_id)
        else:
            unchanged.append(dyno_id)
    return Plan(tuple(remove), tuple(replace), tuple(start), tuple(resume), tuple(unchanged))


@dataclass(frozen=True)
class Failure:
    id: str
    action: str
    code: str
    message: str

    def as_dict(self) -> dict[str, str]:
        return {"id": self.id, "action": self.action, "code": self.code,
                "message": self.message}


@dataclass
class Report:
    """The outcome of one `apply`; `ignored` when its generation was older than the last."""

    generation: int
    applied_generation: int | None
    ignored: bool = False
    started: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    failed: list[Failure] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"generation": self.generation, "applied_generation": self.applied_generation,
                "ignored": self.ignored, "started": self.started, "removed": self.removed,
                "replaced": self.replaced, "resumed": self.resumed,
                "unchanged": self.unchanged, "failed": [f.as_dict() for f in self.failed]}


class DesiredStore:
    """`<state_dir>/desired.json`: the last applied generation and its specs, replaced
    atomically (mode 0600: specs carry config vars, which are often secrets)."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / DESIRED_FILE

    def load(self) -> tuple[int, list[dict[str, Any]]] | None:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise DesiredStateError(self.path, f"cannot read: {exc.strerror}",
                                    exc.errno) from None
        try:
            data = json.loads(raw)
            generation = data["generation"]
            dynos = data["dynos"]
            if (isinstance(generation, bool) or not isinstance(generation, int)
                    or not 0 <= generation <= MAX_GENERATION or not isinstance(dynos, list)):
                raise ValueError(f"generation must be an integer from 0 to {MAX_GENERATION} "
                                 "and dynos a list")
        except (ValueError, KeyError, TypeError) as exc:
            raise DesiredStateError(self.path, f"unreadable: {exc}") from None
        return generation, [d for d in dynos if isinstance(d, dict)]

    def save(self, generation: int, specs: Sequence[DynoSpec]) -> None:
        data = json.dumps({"generation": generation, "dynos": [s.to_dict() for s in specs]},
                          separators=(",", ":")).encode()
        # Unlike dyno records, the generation must survive a power loss: a host that came
        # back with an older generation would accept a stale, replayed sync.
        try:
            write_atomically(self.path, data)
        except OSError as exc:
            raise DesiredStateError(self.path, f"cannot write: {exc.strerror}",
                                    exc.errno) from None


def _failure(dyno_id: str, action: str, exc: BaseException) -> Failure:
    if isinstance(exc, errors.AgentError):
        return Failure(dyno_id, action, exc.code, exc.message)
    log.error("%s of dyno %s failed", action, dyno_id, exc_info=exc)
    return Failure(dyno_id, action, errors.AgentError.code, f"{type(exc).__name__}: {exc}")


class Engine:
    """One convergence engine per agent. `apply` and `start` are serialised, so generations
    are applied in the order they arrive and a stale one never undoes a newer one."""

    def __init__(self, fleet: Fleet, store: DesiredStore | None = None) -> None:
        self.fleet = fleet
        self.store = store
        self.generation: int | None = None
        self.desired: dict[str, DynoSpec] = {}
        self._lock = asyncio.Lock()
        if store is not None:
            self._load(store)

    def _load(self, store: DesiredStore) -> None:
        try:
            loaded = store.load()
        except DesiredStateError as exc:
            log.error("ignoring the persisted desired set: %s", exc)
            return
        if loaded is None:
            return
        self.generation, bodies = loaded
        for body in bodies:
            try:
                spec = self.fleet.parse(body)
            except SpecError as exc:
                log.error("persisted desired spec %s is invalid (%s); skipped",
                          body.get("id"), exc)
                continue
            self.desired[spec.id] = spec
        log.info("desired set of generation %d (%d dynos) loaded; waiting for a fresh one "
                 "before acting", self.generation, len(self.desired))

    def validate(self, bodies: Any) -> dict[str, DynoSpec]:
        """Parse a whole desired set or raise InvalidDesiredSet naming the first bad value."""
        if not isinstance(bodies, list | tuple):
            raise InvalidDesiredSet("dynos", f"must be a list, got {type(bodies).__name__}")
        if len(bodies) > MAX_DESIRED_DYNOS:
            raise InvalidDesiredSet("dynos", f"has {len(bodies)} dynos; the limit is "
                                             f"{MAX_DESIRED_DYNOS}")
        desired: dict[str, DynoSpec] = {}
        names: dict[tuple[str, str], str] = {}
        for index, body in enumerate(bodies):
            where = f"dynos[{index}]"
            if not isinstance(body, Mapping) or "id" not in body:
                # Idempotency is by id: a generated one would start a new dyno on every sync.
                raise InvalidDesiredSet(f"{where}.id", "is required in a desired set")
            try:
                spec = self.fleet.parse(body)
            except SpecError as exc:
                raise InvalidDesiredSet(f"{where}.{exc.field}", exc.message, exc.value) from None
            if spec.id in desired:
                raise InvalidDesiredSet(f"{where}.id", f"{spec.id} appears twice", spec.id)
            other = names.setdefault((spec.app, spec.name), spec.id)
            if other != spec.id:
                raise InvalidDesiredSet(f"{where}.name", f"{spec.app} {spec.name} is also "
                                                         f"dyno {other}", spec.name)
            desired[spec.id] = spec
        return desired

    async def apply(self, generation: int, bodies: Any) -> Report:
        """Converge to `bodies` (the complete desired set) unless `generation` is older than
        the last applied one. The same generation again converges again (idempotent)."""
        if (isinstance(generation, bool) or not isinstance(generation, int)
                or not 0 <= generation <= MAX_GENERATION):
            raise InvalidDesiredSet("generation", f"must be an integer from 0 to "
                                                  f"{MAX_GENERATION}", generation)
        desired = self.validate(bodies)
        async with self._lock:
            if self.generation is not None and generation < self.generation:
                log.info("ignoring desired set of generation %d: %d is already applied",
                         generation, self.generation)
                return Report(generation, self.generation, ignored=True)
            if self.store is not None:
                self.store.save(generation, list(desired.values()))
            self.generation, self.desired = generation, desired
            steps = plan(desired, self.fleet.observe())
            report = Report(generation, generation, unchanged=list(steps.unchanged))
            await self._execute(steps, report)
        log.info("applied generation %d: %d started, %d removed, %d replaced, %d resumed, "
                 "%d failed", generation, len(report.started), len(report.removed),
                 len(report.replaced), len(report.resumed), len(report.failed))
        return report

    async def start(self, body: Any) -> DynoSpec:
        """Start one dyno outside a full set (`dyno.start`), idempotent by id: the same spec
        again is a no-op (or resumes it after a stop); another spec under that id conflicts."""
        if not isinstance(body, Mapping) or "id" not in body:
            raise errors.InvalidSpec("id: is required", "id")
        try:
            spec = self.fleet.parse(body)
        except SpecError as exc:
            raise errors.InvalidSpec(str(exc), exc.field) from None
        async with self._lock:
            current = self.fleet.observe_one(spec.id)
            if current is not None and current.spec != spec:
                raise errors.Conflict(f"dyno {spec.id} exists with a different spec")
            if current is None:
                await self.fleet.start(spec)
            elif not current.running and not current.complete:
                await self.fleet.resume(spec.id)
            if self.desired.get(spec.id) != spec:
                self.desired[spec.id] = spec
                if self.store is not None and self.generation is not None:
                    self.store.save(self.generation, list(self.desired.values()))
        return spec

    async def _execute(self, steps: Plan, report: Report) -> None:
        async def run(dyno_id: str, action: str, call: Awaitable[None],
                      done: list[str]) -> None:
            try:
                await call
            except Exception as exc:
                report.failed.append(_failure(dyno_id, action, exc))
                return
            done.append(dyno_id)

        fleet = self.fleet
        replaced: list[str] = []
        removals = [(i, "remove", report.removed) for i in steps.remove]
        removals += [(s.id, "replace", replaced) for s in steps.replace]
        tasks = []
        for n, (dyno_id, action, done) in enumerate(removals):
            if n and n % REMOVE_BATCH == 0:
                # Every stop begins at once for the dynos, but the agent's share (signalling
                # each dyno's processes) is spread over loop turns: a thousand in one turn
                # would keep the operator API and the coordinator link waiting.
                await asyncio.sleep(0)
            tasks.append(asyncio.ensure_future(run(dyno_id, action, fleet.remove(dyno_id),
                                                   done)))
        await asyncio.gather(*tasks)
        await asyncio.gather(
            *(run(s.id, "start", fleet.start(s), report.started) for s in steps.start),
            *(run(s.id, "replace", fleet.start(s), report.replaced)
              for s in steps.replace if s.id in replaced),
            *(run(i, "resume", fleet.resume(i), report.resumed) for i in steps.resume))
        for names in (report.started, report.removed, report.replaced, report.resumed):
            names.sort()


class SupervisorFleet:
    """The supervisor as the engine's Fleet (duck-typed to keep this module import-light)."""

    def __init__(self, supervisor: Any) -> None:
        self.supervisor = supervisor

    def parse(self, body: Any) -> DynoSpec:
        # The supervisor's own parse: slug roots are checked before a desired set is kept.
        spec: DynoSpec = self.supervisor.parse(body)
        return spec

    def observe(self) -> dict[str, Observed]:
        # One-off dynos (`dynoctl run`, `run.N`) and builds are not the desired set's to
        # remove: they end by themselves, and a sync must not cut a session or a build.
        return {dyno_id: Observed(dyno.spec, dyno.record.desired == "running",
                                  dyno.state is DynoState.COMPLETE)
                for dyno_id, dyno in self.supervisor.dynos.items()
                if dyno.spec.type not in ("run", BUILD_TYPE)}

    def observe_one(self, dyno_id: str) -> Observed | None:
        dyno = self.supervisor.dynos.get(dyno_id)
        if dyno is None or dyno.spec.type in ("run", BUILD_TYPE):
            return None
        return Observed(dyno.spec, dyno.record.desired == "running",
                        dyno.state is DynoState.COMPLETE)

    async def start(self, spec: DynoSpec) -> None:
        # Parsed by self.parse (the supervisor's) already: not parsed again.
        self.supervisor.create_parsed(spec)

    async def resume(self, dyno_id: str) -> None:
        await self.supervisor.restart_dyno(dyno_id)

    async def remove(self, dyno_id: str) -> None:
        await self.supervisor.delete_dyno(dyno_id)
