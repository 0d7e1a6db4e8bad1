"""Fakes shared by the agent's unit tests: a Runtime that runs nothing (`FakeRuntime`) and
the Supervisor harness built on it; the operator API's Backend (`FakeBackend`); the
coordinator's DynoHost and Fleet (`FakeSupervisor`); a settable log clock (`FakeClock`)."""

from __future__ import annotations

import asyncio
import itertools
import re
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import cgroups
from agent import errors
from agent.builds.service import parse_build
from agent.config import Config
from agent.errors import Conflict, InvalidSpec, NotFound
from agent.holder import ExitEvent
from agent.observability.logs import LogHub
from agent.peercred import PeerCred
from agent.signals import parse_signal
from agent.sizes import DEFAULT_SIZES, MIB, apply_overrides
from agent.spec import DynoSpec, SpecError, parse_spec
from agent.supervision.clock import Clock, LoopClock
from agent.supervision.events import EventBus, EventFollower, to_wire
from agent.supervision.reconcile import Observed
from agent.supervision.records import Placement, RecordStore
from agent.supervision.runtime import DynoStartError, Launch
from agent.supervision.supervisor import Supervisor
from tests.support.virtualtime import VirtualClock, VirtualTimeLoop, until

# -- supervision -----------------------------------------------------------------------------------

# A harness on a real loop runs on short timings, so that its tests wait little; one on the
# virtual-time loop (`virtual_harness`) on the agent's defaults, Heroku's own (a 20-minute
# cool-off, a 30-second stop timeout), which cost nothing there.
SHORT_TIMINGS: dict[str, Any] = {"restart_schedule_s": (0.3, 0.6), "stop_timeout_s": 1.0,
                                 "boot_timeout_s": 1.0}
METRICS = re.compile(r"^source=")


@dataclass
class Proc:
    pid: int
    ignores_term: bool = False
    exited: bool = False


@dataclass
class FakeRuntime:
    """A kernel that runs nothing: processes are numbers, exits are reported to the
    supervisor like the holder would (`on_holder_event`), stats are what the test sets."""

    supervisor: Supervisor | None = None
    accepting_port: bool = True
    probes: int = 0
    ignores_term: bool = False
    fail_launch: str | None = None
    stats_value: cgroups.Stats | None = field(default_factory=cgroups.Stats)
    oom_at_exit: bool = False
    launch_delay_s: float = 0.0
    launches: list[str] = field(default_factory=list)
    signals: list[tuple[int, signal.Signals]] = field(default_factory=list)
    kills: int = 0
    unplaced: list[str] = field(default_factory=list)
    # Dynos whose placement the kernel no longer has (a reboot).
    vanished: set[str] = field(default_factory=set)
    alive: set[tuple[int, int]] = field(default_factory=set)
    concurrent: int = 0
    max_concurrent: int = 0
    procs: dict[str, Proc] = field(default_factory=dict)
    oom_watchers: dict[str, Callable[[int], None]] = field(default_factory=dict)
    listen_watchers: dict[str, Callable[[int], None]] = field(default_factory=dict)
    _pids: itertools.count[int] = field(default_factory=lambda: itertools.count(1000))

    async def place(self, spec: DynoSpec,
                    timings: dict[str, float] | None = None) -> Placement:
        if timings is not None:
            timings.update({"slug": 0.5, "uid": 0.25, "dir": 0.125, "cgroup": 2.0,
                            "netns": 4.0})
        return Placement(cgroup=f"app-{spec.app}.slice/dyno-{spec.id}.scope",
                         netns=f"dyno-{spec.id}", netns_path=f"/run/netns/dyno-{spec.id}",
                         space=spec.space, ip="10.1.2.3", uid=100000, gid=100000,
                         slug_dir="/slug", dyno_dir=f"/run/dynos/{spec.id}")

    async def launch(self, spec: DynoSpec, placement: Placement,
                     env: Mapping[str, str]) -> Launch:
        self.concurrent += 1
        self.max_concurrent = max(self.max_concurrent, self.concurrent)
        try:
            await asyncio.sleep(self.launch_delay_s)
        finally:
            self.concurrent -= 1
        if self.fail_launch is not None:
            raise DynoStartError(self.fail_launch)
        assert env["DYNO"] == spec.name
        pid = next(self._pids)
        self.launches.append(spec.id)
        self.procs[spec.id] = Proc(pid, self.ignores_term)
        return Launch(pid, 1, {"total": 1.0})

    def exit(self, dyno_id: str, status: int) -> None:
        """The dyno's PID 1 exits with `status` (as the holder would report it)."""
        proc = self.procs[dyno_id]
        if proc.exited:
            return
        proc.exited = True
        if self.oom_at_exit and self.stats_value is not None:
            self.stats_value = cgroups.Stats(
                memory_rss_bytes=self.stats_value.memory_rss_bytes,
                oom_kill_events=(self.stats_value.oom_kill_events or 0) + 1)
        assert self.supervisor is not None
        event = ExitEvent(dyno_id, "launch", proc.pid, status, None, time.time())
        asyncio.get_running_loop().call_soon(self.supervisor.on_holder_event, event)

    def oom_kill_child(self, dyno_id: str, *, notify: bool = True,
                       peak_bytes: int | None = 128 * MIB) -> None:
        """The kernel OOM-kills a process of the dyno that is not its PID 1 (a v1 hierarchy
        has no memory.oom.group): the counter moves, the watch hears of it unless `notify`
        is False, and PID 1 runs on."""
        stats = self.stats_value or cgroups.Stats()
        count = (stats.oom_kill_events or 0) + 1
        self.stats_value = cgroups.Stats(memory_rss_bytes=stats.memory_rss_bytes,
                                         memory_peak_bytes=peak_bytes, oom_kill_events=count)
        watcher = self.oom_watchers.get(dyno_id)
        if notify and watcher is not None:
            asyncio.get_running_loop().call_soon(watcher, count)

    def watch_oom_kills(self, placement: Placement,
                        on_kill: Callable[[int], None]) -> _Unwatch:
        dyno_id = self._id_of(placement)
        self.oom_watchers[dyno_id] = on_kill
        return _Unwatch(lambda: self.oom_watchers.pop(dyno_id, None))

    def watch_listens(self, placement: Placement,
                      on_listen: Callable[[int], None]) -> _Unwatch:
        dyno_id = self._id_of(placement)
        self.listen_watchers[dyno_id] = on_listen
        return _Unwatch(lambda: self.listen_watchers.pop(dyno_id, None))

    def _id_of(self, placement: Placement) -> str:
        return placement.netns.removeprefix("dyno-")

    def signal_all(self, placement: Placement, sig: signal.Signals) -> int:
        dyno_id = self._id_of(placement)
        proc = self.procs[dyno_id]
        self.signals.append((proc.pid, sig))
        if sig is signal.SIGTERM and not proc.ignores_term:
            self.exit(dyno_id, 143)
        return 1

    async def signal_all_async(self, placement: Placement, sig: signal.Signals) -> int:
        return self.signal_all(placement, sig)

    def kill(self, placement: Placement) -> None:
        self.kills += 1
        dyno_id = self._id_of(placement)
        if dyno_id in self.procs:
            self.exit(dyno_id, 137)

    def populated(self, placement: Placement) -> bool:
        proc = self.procs.get(self._id_of(placement))
        return proc is not None and not proc.exited

    def emptied(self, placement: Placement) -> bool:
        return not self.populated(placement)

    async def populated_async(self, placement: Placement) -> bool:
        return self.populated(placement)

    async def placement_intact_async(self, placement: Placement) -> bool:
        return self._id_of(placement) not in self.vanished

    async def wait_empty(self, placement: Placement, timeout_s: float) -> bool:
        return not self.populated(placement)

    def stats(self, placement: Placement) -> cgroups.Stats | None:
        return self.stats_value

    async def stats_async(self, placement: Placement) -> cgroups.Stats | None:
        return self.stats_value

    async def sample_async(self, placement: Placement) -> cgroups.Stats | None:
        return self.stats_value

    def counters(self, placement: Placement) -> cgroups.Stats | None:
        return self.stats_value

    async def accepting(self, ip: str, port: int) -> bool:
        assert (ip, port) == ("10.1.2.3", 5000)
        self.probes += 1
        return self.accepting_port

    async def unplace(self, placement: Placement) -> None:
        self.unplaced.append(self._id_of(placement))

    def unplace_later(self, placement: Placement) -> None:
        self.unplaced.append(self._id_of(placement))

    def pid_alive(self, pid: int, start_time: int) -> bool:
        return (pid, start_time) in self.alive

    def seccomp_mode(self, pid: int, start_time: int) -> int | None:
        # As the launcher leaves every dyno's PID 1: filtered while it runs.
        running = any(p.pid == pid and not p.exited for p in self.procs.values())
        return 2 if running else None


@dataclass
class _Unwatch:
    undo: Callable[[], object]

    def close(self) -> None:
        self.undo()


SIZES = apply_overrides(DEFAULT_SIZES, {"tiny": {"memory_mb": 64, "pids_max": 64,
                                                 "kill_at": 2}})


def make_config(tmp_path: Path, *, heroku_timings: bool = False, **overrides: Any) -> Config:
    """A Config for a harness in `tmp_path`: on SHORT_TIMINGS unless `heroku_timings`."""
    settings: dict[str, Any] = {"state_dir": tmp_path / "state", "run_dir": tmp_path / "run",
                                "sizes": SIZES,
                                # The fake runtime mounts nothing: any slug path will do.
                                "slug_roots": (Path("/"),)}
    if not heroku_timings:
        settings.update(SHORT_TIMINGS)
    settings.update(overrides)
    return Config(**settings)


@dataclass
class Harness:
    """A real Supervisor on a FakeRuntime, with what it published (`events`, the hub's lines)
    and what it released; `clock` is the one its dynos read."""

    supervisor: Supervisor
    runtime: FakeRuntime
    hub: LogHub
    events: list[dict[str, Any]]
    records: RecordStore
    released: list[tuple[str, int]]
    clock: Clock

    def lines(self, name: str) -> list[str]:
        return [line.text for line in self.hub.tail(dyno=name)
                if line.source == "agent" and not METRICS.match(line.text)
                and not line.text.startswith("Process running mem=")]

    async def create(self, name: str, command: str = "run-it", **extra: Any) -> str:
        body = {"app": "demo", "name": name, "command": command,
                "release": {"version": 1, "slug": {"path": "/slug"}}, **extra}
        status = await self.supervisor.create_dyno(body)
        return str(status["id"])

    async def state(self, dyno_id: str, state: str, timeout_s: float = 5.0) -> dict[str, Any]:
        def status() -> dict[str, Any]:
            return self.supervisor.dynos[dyno_id].status()
        try:
            await until(lambda: status()["state"] == state, timeout_s)
        except TimeoutError:
            raise TimeoutError(f"{dyno_id} not {state} within {timeout_s}s: {status()}") from None
        return status()

    async def event(self, dyno_id: str, state: str, timeout_s: float = 5.0) -> dict[str, Any]:
        """The first event that moved the dyno to `state` (states may pass quickly)."""
        def find() -> dict[str, Any] | None:
            return next((e for e in self.events
                         if e["id"] == dyno_id and e["state"] == state), None)
        await self.until(lambda: find() is not None, timeout_s, f"event {state}")
        found = find()
        assert found is not None
        return found

    async def until(self, predicate: Callable[[], object], timeout_s: float = 5.0,
                    what: str = "") -> None:
        await until(predicate, timeout_s, what)


async def make_harness(tmp_path: Path, runtime: FakeRuntime | None = None,
                       **config: Any) -> Harness:
    runtime = runtime or FakeRuntime()
    hub, bus = LogHub(), EventBus()
    records = RecordStore(tmp_path / "state")
    released: list[tuple[str, int]] = []

    async def release(dyno_id: str, pid: int) -> None:
        released.append((dyno_id, pid))
    sample_interval_s = config.pop("sample_interval_s", 3600.0)
    clock: Clock = (VirtualClock() if isinstance(asyncio.get_running_loop(), VirtualTimeLoop)
                    else LoopClock())
    supervisor = Supervisor(make_config(tmp_path, **config), runtime, records, hub, bus,
                            release=release, sample_interval_s=sample_interval_s, clock=clock)
    runtime.supervisor = supervisor
    events: list[dict[str, Any]] = []
    supervisor.state_listeners.append(lambda change: events.append(to_wire(change)))
    return Harness(supervisor, runtime, hub, events, records, released, clock)


async def virtual_harness(tmp_path: Path, runtime: FakeRuntime | None = None,
                          **config: Any) -> Harness:
    """A harness for a test on the virtual-time loop (tests/support/virtualtime.py): Heroku's
    own timings."""
    assert isinstance(asyncio.get_running_loop(), VirtualTimeLoop), "mark the test virtual-time"
    return await make_harness(tmp_path, runtime, heroku_timings=True, **config)


# -- the operator API -----------------------------------------------------------------------------

T0 = datetime(2026, 11, 26, 10, 0, 0, tzinfo=UTC)


def as_root(_request: Any) -> PeerCred:
    """The API's peer reader for tests that serve over TCP, where no peer credentials exist:
    the peer is root."""
    return PeerCred(pid=1, uid=0, gid=0)


def make_status(dyno_id: str, app: str, name: str, *, state: str = "up",
                command: str = "python3 -m http.server $PORT", size: str = "standard-1x",
                since: datetime = T0, **extra: Any) -> dict[str, Any]:
    return {"id": dyno_id, "app": app, "name": name, "type": name.split(".")[0],
            "state": state, "since": since.isoformat(), "pid": 4242, "ip": "10.0.0.2",
            "restarts": 0, "size": size, "exit_status": None, "reason": "started",
            "command": command, **extra}


def require_fields(body: Any) -> None:
    """FakeBackend's default check of a create body: app, name and command are there."""
    for key in ("app", "name", "command"):
        if key not in body:
            raise InvalidSpec(f"{key}: required", field=key)


def parse_strictly(body: Any) -> None:
    """The check the real Supervisor makes of a create body: `parse_spec`, its errors as the
    API's `invalid_spec`."""
    try:
        parse_spec(body)
    except SpecError as exc:
        raise InvalidSpec(str(exc), exc.field) from None


def accept_anything(body: Any) -> None:
    """No check of a create body at all: tests of what the API layer refuses by itself."""


class FakeBackend:
    """The operator API's Backend: dynos as plain status dicts, a real LogHub and EventBus;
    records every lifecycle call. `check_spec` judges create bodies (`require_fields`,
    `parse_strictly` or `accept_anything`)."""

    socket_gid: int | None = None

    def __init__(self, check_spec: Callable[[Any], None] = require_fields) -> None:
        self.check_spec = check_spec
        self.dynos: dict[str, dict[str, Any]] = {}
        self.calls: list[tuple[str, ...]] = []
        self.hub = LogHub()
        self.bus = EventBus()
        self.metrics = ('# HELP dyno_memory_bytes Memory in use.\n'
                        '# TYPE dyno_memory_bytes gauge\n'
                        'dyno_memory_bytes{app="shop",dyno="web.1"} 1048576\n')
        self.gate: asyncio.Event | None = None  # when set, create_dyno waits for it
        self.gated = 0  # create calls that reached the gate
        self._ids = itertools.count(100)
        self.builds: dict[str, dict[str, Any]] = {}

    def add(self, status: dict[str, Any]) -> dict[str, Any]:
        self.dynos[status["id"]] = status
        return status

    # -- Backend --------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        return {"version": "test", "dynos": {"total": len(self.dynos)}}

    def list_dynos(self, app: str | None = None) -> list[dict[str, Any]]:
        return [dict(d) for d in self.dynos.values() if app is None or d["app"] == app]

    def _find(self, ref: str, app: str | None) -> dict[str, Any]:
        if ref in self.dynos and (app is None or self.dynos[ref]["app"] == app):
            return self.dynos[ref]
        named = [d for d in self.dynos.values()
                 if d["name"] == ref and (app is None or d["app"] == app)]
        if not named:
            raise NotFound(f"no dyno {ref}" + (f" in app {app}" if app else ""))
        if len(named) > 1:
            raise Conflict(f"{ref} names dynos of several apps; give the app")
        return named[0]

    def get_dyno(self, ref: str, app: str | None = None) -> dict[str, Any]:
        status = self._find(ref, app)
        return {**status, "spec": {"app": status["app"], "name": status["name"],
                                   "command": status["command"]},
                "cgroup": f"/dynoagent/app-{status['app']}.slice/dyno-{status['id']}.scope",
                "netns": f"/run/netns/dyno-{status['id']}",
                "limits": {"memory_max_bytes": 512 * 2**20, "pids_max": 256},
                "stats": status.get("stats", {"memory_bytes": 64 * 2**20,
                                              "memory_quota_bytes": 512 * 2**20,
                                              "cpu_seconds": 1.5, "pids": 3}),
                "timings_ms": {"launch": 5.5}}

    async def create_dyno(self, body: Any) -> dict[str, Any]:
        if self.gate is not None:
            self.gated += 1
            await self.gate.wait()
        self.check_spec(body)
        given = body.get("id")
        dyno_id = given if isinstance(given, str) and given else f"d{next(self._ids)}"
        if dyno_id in self.dynos:
            raise Conflict(f"dyno {dyno_id} exists with another spec")
        self.calls.append(("create", dyno_id))
        return self.add(make_status(dyno_id, str(body.get("app", "demo")),
                                    str(body.get("name", "web.1")), state="starting",
                                    command=str(body.get("command", "true"))))

    async def restart_dyno(self, ref: str, app: str | None = None) -> dict[str, Any]:
        status = self._find(ref, app)
        self.calls.append(("restart", status["id"]))
        status["restarts"] += 1
        status["state"] = "starting"
        return dict(status)

    async def stop_dyno(self, ref: str, app: str | None = None) -> dict[str, Any]:
        status = self._find(ref, app)
        self.calls.append(("stop", status["id"]))
        status["state"] = "down"
        return dict(status)

    async def signal_dyno(self, ref: str, signal: str, app: str | None = None) -> dict[str, Any]:
        status = self._find(ref, app)
        self.calls.append(("signal", status["id"], signal))
        return dict(status)

    async def delete_dyno(self, ref: str, app: str | None = None) -> None:
        status = self._find(ref, app)
        self.calls.append(("delete", status["id"]))
        del self.dynos[status["id"]]

    @property
    def log_hub(self) -> LogHub:
        return self.hub

    def subscribe_events(self) -> EventFollower:
        return self.bus.subscribe()

    def metrics_text(self) -> str:
        return self.metrics

    async def start_build(self, body: Any) -> dict[str, Any]:
        request = parse_build(body)
        build_id = f"00000000-0000-4000-8000-{next(self._ids):012d}"
        self.calls.append(("build", build_id))
        self.builds[build_id] = {"id": build_id, "app": request.app, "status": "pending",
                                 "dyno": None, "source": request.source.to_dict(),
                                 "result": None, "error": None}
        return dict(self.builds[build_id])

    def get_build(self, build_id: str) -> dict[str, Any]:
        if build_id not in self.builds:
            raise NotFound(f"no build {build_id}")
        return dict(self.builds[build_id])

    def list_builds(self, app: str | None = None) -> list[dict[str, Any]]:
        return [dict(b) for b in self.builds.values() if app is None or b["app"] == app]


def sample_backend() -> FakeBackend:
    backend = FakeBackend()
    backend.add(make_status("a1", "shop", "web.1"))
    backend.add(make_status("a2", "shop", "web.2", state="starting"))
    backend.add(make_status("a3", "shop", "worker.1", command="python3 worker.py"))
    backend.add(make_status("b1", "blog", "web.1"))
    return backend


# -- the coordinator -------------------------------------------------------------------------------

class FakeSupervisor:
    """DynoHost and Fleet at once: dynos as specs with a state."""

    def __init__(self) -> None:
        self.draining = False
        self.specs: dict[str, DynoSpec] = {}
        self.state: dict[str, str] = {}
        self.signals: list[tuple[str, str]] = []

    # Fleet
    def parse(self, body: Any) -> DynoSpec:
        return parse_spec(body)

    def observe(self) -> Mapping[str, Observed]:
        return {i: Observed(s, self.state[i] != "down", False) for i, s in self.specs.items()}

    def observe_one(self, dyno_id: str) -> Observed | None:
        return self.observe().get(dyno_id)

    async def start(self, spec: DynoSpec) -> None:
        if self.draining:
            raise errors.Draining("draining")
        if any((s.app, s.name) == (spec.app, spec.name) for s in self.specs.values()):
            raise errors.Conflict("name taken")
        self.specs[spec.id] = spec
        self.state[spec.id] = "up"

    async def resume(self, dyno_id: str) -> None:
        self.state[dyno_id] = "up"

    async def remove(self, dyno_id: str) -> None:
        del self.specs[dyno_id], self.state[dyno_id]

    # DynoHost
    def list_dynos(self, app: str | None = None) -> list[dict[str, Any]]:
        return [{"id": i, "state": self.state[i], "name": s.name}
                for i, s in self.specs.items()]

    def _get(self, ref: str) -> dict[str, Any]:
        if ref not in self.specs:
            raise errors.NotFound(f"no dyno {ref}")
        return {"id": ref, "state": self.state[ref]}

    async def stop_dyno(self, ref: str, app: str | None = None) -> dict[str, Any]:
        self._get(ref)
        self.state[ref] = "down"
        return self._get(ref)

    async def restart_dyno(self, ref: str, app: str | None = None) -> dict[str, Any]:
        self._get(ref)
        self.state[ref] = "up"
        return self._get(ref)

    async def signal_dyno(self, ref: str, signal_name: str,
                          app: str | None = None) -> dict[str, Any]:
        self._get(ref)
        parse_signal(signal_name)
        self.signals.append((ref, signal_name))
        return {**self._get(ref), "signalled": 1}


# -- logs ------------------------------------------------------------------------------------------

class FakeClock:
    """A LogHub clock that stands still until the test moves it."""

    def __init__(self, start: datetime = T0) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)
