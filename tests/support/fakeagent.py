"""Simulated dynoagents for coordinator tests: each `FakeAgent` speaks the agent's side of
docs/protocol.md over a real WebSocket (hello, heartbeats, metrics, buffered `dyno.state`
events, every request) and keeps its dynos as a few slots in memory, launching nothing;
`FakeFleet` runs a thousand of them in one process.

Written from docs/protocol.md and checked against the real agent
(tests/unit/agent/test_fakeagent_conformance.py); only the frame codec
(agent/coordinator/frames.py), the spec validator and the signal parser are the agent's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import aiohttp

from agent import errors
from agent.coordinator import appdrains
from agent.coordinator.frames import (
    HARD_FRAME_BYTES,
    MAX_FRAME_BYTES,
    PROTOCOL_VERSION,
    Event,
    Frame,
    FrameError,
    Request,
    Response,
    decode,
    encode,
)
from agent.errors import excerpt
from agent.signals import parse_signal
from agent.sizes import DEFAULT_SIZES, Size
from agent.spec import APP, ID, NAME, DynoSpec, SpecError, parse_spec

log = logging.getLogger(__name__)
T = TypeVar("T")

# docs/protocol.md §1, §3, §8.
SUBPROTOCOL = "dynoagent.v1"
HEARTBEAT_INTERVAL_S = 10.0
METRICS_INTERVAL_S = 20.0
PING_INTERVAL_S = 10.0
HELLO_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 10.0
CLOSE_TIMEOUT_S = 2.0
BACKOFF_MIN_S = 0.5
BACKOFF_MAX_S = 30.0
EVENT_BUFFER = 10_000
MAX_REQUESTS_IN_FLIGHT = 64
MAX_DESIRED_DYNOS = 10_000
MAX_GENERATION = 2**63 - 1
DYNO_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")
# What a dyno's PID 1 exits with when the agent's SIGTERM ends it (128 + 15).
STOP_EXIT_STATUS = 143
# Types a dynos.sync neither plans nor removes (one-off sessions, builds: §4).
UNSYNCED_TYPES = frozenset({"run", "build"})

# The states and edges of agent/supervision/states.py (DESIGN §6), stated again here so
# that a test can compare the two tables.
STARTING, UP, CRASHED, DOWN, COMPLETE = "starting", "up", "crashed", "down", "complete"
TRANSITIONS: Mapping[str, frozenset[str]] = {
    STARTING: frozenset({UP, CRASHED, DOWN, COMPLETE}),
    UP: frozenset({STARTING, CRASHED, DOWN, COMPLETE}),
    CRASHED: frozenset({STARTING, DOWN}),
    DOWN: frozenset({STARTING}),
    COMPLETE: frozenset(),
}

DEFAULT_CAPACITY = {"cpus": 8, "memory_bytes": 32 * 1024**3}
DEFAULT_LABELS = {"arch": "x86_64", "kernel": "6.1.0-fake", "cgroup_mode": "v2"}


def timestamp(at: float) -> str:
    """RFC 3339, UTC, microseconds (docs/protocol.md §2)."""
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="microseconds")


def backoff_delay(attempt: int, rng: random.Random, min_s: float = BACKOFF_MIN_S,
                  max_s: float = BACKOFF_MAX_S) -> float:
    """§1: attempt n waits b/2 + uniform(0, b/2), b = min(max, min · 2ⁿ)."""
    base = min(max_s, min_s * (2.0 ** min(attempt, 32)))
    return base / 2 + rng.uniform(0.0, base / 2)


class FakeError(Exception):
    """An error answer (docs/protocol.md §7): `code`, `message` and, for `invalid_spec`,
    `field`."""

    def __init__(self, code: str, message: str, field: str | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.field = field

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.field is not None:
            out["field"] = self.field
        return out


def _bad(message: str) -> FakeError:
    return FakeError("bad_request", message)


class Dyno:
    """One simulated dyno: a handful of slots, no process (a thousand hosts of a hundred
    dynos each must fit one test process)."""

    __slots__ = ("app", "command", "exit_status", "id", "ip", "name", "one_shot", "pid",
                 "reason", "restarts", "running", "since", "size", "spec_hash", "state", "timer")

    def __init__(self, spec: DynoSpec, ip: str | None, now: float) -> None:
        self.id: str = spec.id
        self.app: str = spec.app
        self.name: str = spec.name
        self.size: Size = spec.size
        self.command: str = spec.command
        # The agent compares whole specs (any field differs: replaced); a hash will do here.
        self.spec_hash: int = hash(spec)
        self.one_shot: bool = spec.restart == "never"
        self.state: str = STARTING
        self.since: float = now
        self.reason: str = "start"
        self.exit_status: int | None = None
        self.restarts: int = 0
        self.pid: int | None = None
        self.ip: str | None = ip
        self.running: bool = True  # desired: False after a stop, until started again
        self.timer: asyncio.TimerHandle | None = None

    @property
    def type(self) -> str:
        return self.name.partition(".")[0]

    def status(self) -> dict[str, Any]:
        """The status map of docs/protocol.md §3 (agent/supervision/dyno.py `status`)."""
        return {"id": self.id, "app": self.app, "name": self.name, "type": self.type,
                "state": self.state, "since": timestamp(self.since), "pid": self.pid,
                "ip": self.ip, "restarts": self.restarts, "size": self.size.name,
                "exit_status": self.exit_status, "reason": self.reason,
                "command": self.command}

    def sort_key(self) -> tuple[str, str, int]:
        _, _, n = self.name.rpartition(".")
        return self.app, self.type, int(n) if n.isdigit() else 0


@dataclass(frozen=True, slots=True)
class Recorded:
    """A frame the fake sent or received, with its connection (1-based) and time."""

    connection: int
    frame: Frame
    at: float = field(default_factory=time.monotonic)

    @property
    def method(self) -> str | None:
        return self.frame.method if isinstance(self.frame, Request | Event) else None

    @property
    def params(self) -> Any:
        if isinstance(self.frame, Request | Event):
            return self.frame.params
        return self.frame.result


def _fields(params: Mapping[str, Any], required: Mapping[str, type | tuple[type, ...]],
            optional: Mapping[str, type | tuple[type, ...]] | None = None) -> dict[str, Any]:
    """§4: every required key, no unknown key, each of its type (bool is no int)."""
    optional = optional or {}
    for key in params:
        if key not in required and key not in optional:
            known = ", ".join([*required, *optional]) or "none"
            raise _bad(f"p: unknown key {excerpt(key)} (known keys: {known})")
    out: dict[str, Any] = {}
    for key, kind in {**required, **optional}.items():
        if key not in params:
            if key in required:
                raise _bad(f"p.{key}: is required")
            continue
        value = params[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds:
            raise _bad(f"p.{key}: must be {kinds[0].__name__}, got boolean")
        if not isinstance(value, kinds):
            raise _bad(f"p.{key}: must be {kinds[0].__name__}, got {_kind(value)}")
        out[key] = value
    return out


_KINDS: dict[type, str] = {dict: "map", list: "array", str: "string", bytes: "binary",
                           bool: "boolean", int: "integer", float: "float", type(None): "nil"}


def _kind(value: Any) -> str:
    return _KINDS.get(type(value), type(value).__name__)


def _dyno_id(value: str) -> str:
    if not 1 <= len(value) <= 64 or not DYNO_ID_CHARS.issuperset(value):
        raise _bad(f"p.id: must match [a-z0-9-]{{1,64}}, got {excerpt(value)}")
    return value


class FakeAgent:
    """One simulated agent on one host.

    `start()` dials `url` and keeps the link up (backoff, hello again on every connection)
    until `close()` (1001, going away) or `kill()` (the socket dropped without a close frame,
    nothing more sent: the agent process died). `restart()` brings a killed or closed agent
    back as a new process on the same host: same boot id and dynos, a new `started_at`,
    `seq` from 1, the event buffer lost, draining off.

    Dynos launch nothing: a start is `starting` at once and `up` after `boot_delay_s`; a
    stop ends the "process" after `stop_delay_s` with status 143. `exit_process()` makes a
    dyno's process exit by itself (crash, or a one-off's completion).
    """

    def __init__(self, url: str | Sequence[str], token: str, agent_id: str, host: str,
                 capacity: Mapping[str, int] | None = None,
                 labels: Mapping[str, str] | None = None, *,
                 session: aiohttp.ClientSession | None = None,
                 version: str = "0.1.0-fake", boot_id: str | None = None,
                 boot_delay_s: float = 0.05, stop_delay_s: float = 0.01,
                 crash_restart_s: float = 0.0, oneoff_run_s: float | None = None,
                 heartbeat_interval_s: float = HEARTBEAT_INTERVAL_S,
                 metrics_interval_s: float | None = METRICS_INTERVAL_S,
                 jitter: float = 0.0, ping_interval_s: float | None = PING_INTERVAL_S,
                 backoff_min_s: float = BACKOFF_MIN_S, backoff_max_s: float = BACKOFF_MAX_S,
                 hello_timeout_s: float = HELLO_TIMEOUT_S, buffer_limit: int = EVENT_BUFFER,
                 sizes: Mapping[str, Size] = DEFAULT_SIZES,
                 record_limit: int | None = None,
                 connect_slots: asyncio.Semaphore | None = None,
                 rng: random.Random | None = None,
                 network: Mapping[str, Any] | None = None,
                 spaces_sync: bool = True, drains_sync: bool = True) -> None:
        # Several URLs are replicas, tried in turn as the real link does.
        self.urls = (url,) if isinstance(url, str) else tuple(url)
        self._url_index = 0
        self.token = token  # read at every connection attempt, like the token file
        self.agent_id = agent_id
        self.host = host
        self.capacity = dict(capacity or DEFAULT_CAPACITY)
        self.labels = dict(labels or DEFAULT_LABELS)
        self.version = version
        self.rng = rng or random.Random(agent_id)
        self.boot_id = boot_id or f"{self.rng.getrandbits(128):032x}"
        self.boot_delay_s = boot_delay_s
        self.stop_delay_s = stop_delay_s
        self.crash_restart_s = crash_restart_s
        self.oneoff_run_s = oneoff_run_s
        self.heartbeat_interval_s = heartbeat_interval_s
        self.metrics_interval_s = metrics_interval_s
        self.jitter = jitter
        self.ping_interval_s = ping_interval_s
        self.backoff_min_s = backoff_min_s
        self.backoff_max_s = backoff_max_s
        self.hello_timeout_s = hello_timeout_s
        self.buffer_limit = buffer_limit
        self.sizes = sizes
        self.connect_slots = connect_slots
        # hello's `network` (underlay, mtu, networks); None: a hello without it, as an agent
        # older than private spaces sends. spaces_sync=False answers `spaces.sync` with
        # unknown_method, as such an agent does.
        self.network = dict(network) if network is not None else None
        self.spaces_sync = spaces_sync
        # The last spaces.sync applied (its params), and every one received (params).
        self.spaces: dict[str, Any] | None = None
        self.spaces_received: list[dict[str, Any]] = []
        # drains.sync (drains_sync=False: unknown_method, as an agent older than it): the last
        # map taken (kept across agent restarts, as the agent keeps app-drains.json), and
        # every request's params.
        self.drains_sync = drains_sync
        self.drains: dict[str, list[str]] | None = None
        self.drains_received: list[dict[str, Any]] = []
        self._space_ips: dict[str, Iterator[int]] = {}
        self._session = session
        self._own_session = session is None
        # What survives the agent process (the host's dynos, desired.json).
        self.dynos_by_id: dict[str, Dyno] = {}
        self.generation: int | None = None
        self.connection = 0  # connections made so far, over every agent process
        # Called with every `dyno.state` event's params as it is published (before it is
        # sent), like the supervisor's state listeners.
        self.state_listeners: list[Callable[[dict[str, Any]], None]] = []
        self._pids = itertools.count(1000 + self.rng.randrange(10_000) * 100)
        self._ips = itertools.count(2)
        # Everything below belongs to one agent process (reset by restart()).
        self.sent: deque[Recorded] = deque(maxlen=record_limit)
        self.received: deque[Recorded] = deque(maxlen=record_limit)
        self.counters: dict[str, int] = {}
        self._reset_process()
        self._changed = asyncio.Event()

    @property
    def url(self) -> str:
        return self.urls[self._url_index]

    def _reset_process(self) -> None:
        self.started_at = time.time()
        self.draining = False
        self.link_state = "disconnected"
        self.connected_since: float | None = None
        self.last_heartbeat_at: float | None = None
        self.last_error: str | None = None
        self.counters = dict.fromkeys(
            ("connects", "connect_failures", "frames_in", "frames_out", "requests",
             "errors_sent", "bad_frames", "events_sent", "events_dropped", "heartbeats"), 0)
        self._outbox: deque[Event] = deque(maxlen=self.buffer_limit)
        self._lost_unreported = 0
        self._seq = itertools.count(1)
        self._ids = itertools.count(1)
        self._outbox_ready = asyncio.Event()
        self._pending: dict[int, asyncio.Future[Response]] = {}
        self._exiting: dict[str, tuple[str, asyncio.Future[None]]] = {}
        self._send_lock = asyncio.Lock()
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._task: asyncio.Task[None] | None = None
        self._attempt = 0

    # -- what tests use --------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            if self._session is None:
                self._session = aiohttp.ClientSession()
            self._task = asyncio.create_task(self._run(), name=f"fakeagent-{self.agent_id}")

    async def close(self) -> None:
        """Close the link (1001) and stop; the dynos stop progressing."""
        await self._stop_process()
        self.link_state = "closed"
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    async def kill(self) -> None:
        """The agent process dies: the socket is dropped without a close frame, nothing more
        is sent (no heartbeat, no pong) and the dynos stop progressing."""
        ws = self._ws
        if ws is not None:
            _abort(ws)
        await self._stop_process()
        self.link_state = "dead"
        self._notify()

    async def restart(self) -> None:
        """A new agent process on the same host (after kill() or close()): it re-adopts the
        dynos as they were, keeps the persisted generation, and says hello again."""
        if self._task is not None:
            await self.kill()
        self._reset_process()
        for dyno in self.dynos_by_id.values():
            if dyno.pid is not None and not dyno.running:
                # A stop the old process began: the process has ended meanwhile.
                dyno.pid = None
                self._transition(dyno, COMPLETE if dyno.one_shot else DOWN, "agent-restart",
                                 STOP_EXIT_STATUS)
            elif dyno.state == STARTING and dyno.pid is not None:
                dyno.timer = self._loop.call_later(self.boot_delay_s, self._booted, dyno)
            elif dyno.state == CRASHED and dyno.running:
                self._schedule_cool_off(dyno)
        self.start()

    def adopt(self, specs: Iterable[Mapping[str, Any]], generation: int | None = None) -> None:
        """Dynos already up on this host before the agent starts (as re-adopted after an
        agent restart), and the desired set they came from; no events."""
        now = time.time()
        for body in specs:
            spec = parse_spec(body, self.sizes)
            dyno = Dyno(spec, self._next_ip(), now)
            dyno.state, dyno.reason, dyno.pid = UP, "booted", next(self._pids)
            self.dynos_by_id[spec.id] = dyno
        self.generation = generation

    def dynos(self) -> list[dict[str, Any]]:
        """Every dyno's status, in the agent's order (app, type, ordinal)."""
        return [d.status() for d in sorted(self.dynos_by_id.values(), key=Dyno.sort_key)]

    def states(self) -> dict[str, str]:
        return {d.id: d.state for d in self.dynos_by_id.values()}

    def counts(self) -> dict[str, Any]:
        by_state: dict[str, int] = {}
        for dyno in self.dynos_by_id.values():
            by_state[dyno.state] = by_state.get(dyno.state, 0) + 1
        return {"total": len(self.dynos_by_id), "by_state": by_state}

    def events(self, method: str = "dyno.state") -> list[dict[str, Any]]:
        """The params of the events of that name this agent sent (all connections)."""
        return [r.frame.params for r in self.sent
                if isinstance(r.frame, Event) and r.frame.method == method]

    def requests(self, method: str | None = None) -> list[Request]:
        return [r.frame for r in self.received if isinstance(r.frame, Request)
                and (method is None or r.frame.method == method)]

    def exit_process(self, dyno_id: str, exit_status: int = 1) -> None:
        """The dyno's process exits by itself: a formation dyno crashes (and is started
        again after `crash_restart_s`), a one-off or release dyno completes."""
        dyno = self.dynos_by_id[dyno_id]
        if dyno.pid is None or dyno.id in self._exiting:
            raise ValueError(f"dyno {dyno_id} has no process of its own to exit")
        self._cancel_timer(dyno)
        dyno.pid = None
        if dyno.one_shot:
            dyno.ip = None
            self._transition(dyno, COMPLETE, "exited", exit_status)
            return
        self._transition(dyno, CRASHED, "crash", exit_status)
        self._schedule_cool_off(dyno)

    async def wait_for(self, predicate: Callable[[], T], timeout_s: float = 10.0,
                       what: str = "condition") -> T:
        """Wait until `predicate()` is truthy (checked at every change of this agent)."""
        deadline = time.monotonic() + timeout_s
        while True:
            self._changed.clear()
            value = predicate()
            if value:
                return value
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{self.agent_id}: {what} not met within {timeout_s}s")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(remaining, 0.5)):
                    await self._changed.wait()

    @property
    def connected(self) -> bool:
        return self.link_state == "connected"

    @property
    def _loop(self) -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()

    def _notify(self) -> None:
        self._changed.set()

    # -- payloads (docs/protocol.md §3, §5) -------------------------------------------------
    def hello(self) -> dict[str, Any]:
        out = {"agent_id": self.agent_id, "host": self.host, "version": self.version,
               "protocol": PROTOCOL_VERSION, "boot_id": self.boot_id,
               "started_at": self.started_at, "capacity": dict(self.capacity),
               "labels": dict(self.labels), "generation": self.generation,
               "draining": self.draining, "dynos": self.dynos()}
        if self.network is not None:
            out["network"] = dict(self.network)
        return out

    def heartbeat(self) -> dict[str, Any]:
        return {"at": timestamp(time.time()), "dynos": self.counts(),
                "generation": self.generation, "draining": self.draining}

    def metrics(self) -> dict[str, Any]:
        rows = []
        for d in self.dynos_by_id.values():
            sampled = d.pid is not None and d.state == UP
            rows.append({"id": d.id, "app": d.app, "name": d.name, "state": d.state,
                         "restarts": d.restarts,
                         "memory_quota_bytes": d.size.memory_quota_bytes,
                         "memory_rss_bytes": 64 * 1024**2 if sampled else None,
                         "memory_bytes": 80 * 1024**2 if sampled else None,
                         "cpu_seconds": 1.5 if sampled else None,
                         "pids": 1 if sampled else None})
        return {"at": timestamp(time.time()), "dynos": rows}

    def info(self) -> dict[str, Any]:
        """`agent.info`: the operator API's GET /v1/info."""
        def stamp(value: float | None) -> str | None:
            return None if value is None else timestamp(value)

        return {"version": self.version, "agent_id": self.agent_id, "host": self.host,
                "boot_id": self.boot_id, "pid": 1, "state": "ready",
                "started_at": self.started_at,
                "uptime_s": round(time.time() - self.started_at, 3),
                "cgroup_mode": self.labels.get("cgroup_mode", "v2"),
                "capacity": dict(self.capacity),
                "coordinator": {"state": self.link_state, "url": self.url,
                                "connected_since": stamp(self.connected_since),
                                "last_heartbeat_at": stamp(self.last_heartbeat_at),
                                "last_error": self.last_error,
                                "events_buffered": len(self._outbox),
                                "counters": dict(self.counters),
                                "generation": self.generation},
                "dynos": self.counts(), "socket": "/run/dynoagent/api.sock",
                "attach_socket": "/run/dynoagent/attach.sock"}

    # -- dynos: one mutator, and the simulated processes -------------------------------------
    def _transition(self, dyno: Dyno, new: str, reason: str,
                    exit_status: int | None = None) -> None:
        if new not in TRANSITIONS[dyno.state]:
            raise AssertionError(f"{dyno.id}: no edge {dyno.state} → {new} ({reason})")
        previous = dyno.state
        dyno.state, dyno.reason, dyno.since = new, reason, time.time()
        if exit_status is not None:
            dyno.exit_status = exit_status
        self._publish(dyno, previous, exit_status)

    def _publish(self, dyno: Dyno, previous: str | None, exit_status: int | None) -> None:
        params = {"id": dyno.id, "app": dyno.app, "name": dyno.name, "state": dyno.state,
                  "previous": previous, "reason": dyno.reason, "exit_status": exit_status,
                  "ip": dyno.ip, "at": timestamp(dyno.since), "seq": next(self._seq)}
        for listener in self.state_listeners:
            listener(params)
        self._queue(Event("dyno.state", params))
        self._notify()

    def _queue(self, event: Event) -> None:
        if len(self._outbox) == self._outbox.maxlen:
            self.counters["events_dropped"] += 1
            self._lost_unreported += 1
        self._outbox.append(event)
        self._outbox_ready.set()

    def _next_ip(self, app: str | None = None) -> str:
        """From the host's slice of the app's space when spaces.sync gave one (after its
        gateway, the slice's first address), else 10.0.0.2 on."""
        entry = next((e for e in (self.spaces or {}).get("spaces", ())
                      if e.get("space") == app), None)
        if entry is not None:
            cut = ipaddress.IPv4Network(entry["slice"])
            numbers = self._space_ips.setdefault(f"{app} {cut}", itertools.count(2))
            return str(cut.network_address + next(numbers))
        n = next(self._ips)
        return f"10.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}"

    def _cancel_timer(self, dyno: Dyno) -> None:
        if dyno.timer is not None:
            dyno.timer.cancel()
            dyno.timer = None

    def _create(self, spec: DynoSpec) -> Dyno:
        dyno = Dyno(spec, self._next_ip(spec.app), time.time())
        self.dynos_by_id[spec.id] = dyno
        self._publish(dyno, None, None)
        self._launch(dyno)
        return dyno

    def _launch(self, dyno: Dyno) -> None:
        dyno.pid = next(self._pids)
        dyno.timer = self._loop.call_later(self.boot_delay_s, self._booted, dyno)

    def _booted(self, dyno: Dyno) -> None:
        dyno.timer = None
        if dyno.state != STARTING or dyno.pid is None:
            return
        self._transition(dyno, UP, "booted")
        if dyno.one_shot and self.oneoff_run_s is not None:
            dyno.timer = self._loop.call_later(self.oneoff_run_s, self.exit_process,
                                               dyno.id, 0)

    def _schedule_cool_off(self, dyno: Dyno) -> None:
        dyno.timer = self._loop.call_later(self.crash_restart_s, self._cooled_off, dyno)

    def _cooled_off(self, dyno: Dyno) -> None:
        dyno.timer = None
        if dyno.state == CRASHED and dyno.running:
            dyno.restarts += 1
            self._transition(dyno, STARTING, "restart")
            self._launch(dyno)

    def _terminate(self, dyno: Dyno, intent: str) -> asyncio.Future[None]:
        """SIGTERM to the dyno's process; done when it has exited (`stop_delay_s`)."""
        current = self._exiting.get(dyno.id)
        if current is not None:
            if intent == "stop" or current[0] == "stop":
                self._exiting[dyno.id] = ("stop", current[1])  # a stop wins
            return current[1]
        future: asyncio.Future[None] = self._loop.create_future()
        self._exiting[dyno.id] = (intent, future)
        self._cancel_timer(dyno)
        dyno.timer = self._loop.call_later(self.stop_delay_s, self._exited, dyno)
        return future

    def _exited(self, dyno: Dyno) -> None:
        dyno.timer = None
        intent, future = self._exiting.pop(dyno.id)
        dyno.pid = None
        if intent == "stop" or dyno.one_shot:
            # One-off dynos are not restarted: a restart ends them (policy.decide_exit).
            if dyno.one_shot:
                dyno.ip = None
            self._transition(dyno, COMPLETE if dyno.one_shot else DOWN, "stopped",
                             STOP_EXIT_STATUS)
        else:
            # No transition carries this exit, so the status keeps the last one that did
            # (agent/supervision/dyno.py records the state machine's exit status).
            dyno.restarts += 1
            self._launch(dyno)
        if not future.done():
            future.set_result(None)

    async def _stop(self, dyno: Dyno) -> None:
        dyno.running = False
        if dyno.pid is not None:
            await asyncio.shield(self._terminate(dyno, "stop"))
        elif dyno.state in (STARTING, CRASHED):
            self._cancel_timer(dyno)
            self._transition(dyno, DOWN, "stopped")

    async def _restart(self, dyno: Dyno) -> None:
        dyno.running = True
        exiting = self._exiting.get(dyno.id)
        if exiting is not None:
            # A restart under way is the same restart; a stop under way ends, then starts.
            await asyncio.shield(exiting[1])
            if exiting[0] == "restart":
                return
        if dyno.state == COMPLETE or not dyno.running:
            return
        if dyno.pid is not None:
            if dyno.state == UP:
                self._transition(dyno, STARTING, "restart")
            await asyncio.shield(self._terminate(dyno, "restart"))
            return
        self._cancel_timer(dyno)
        self._transition(dyno, STARTING, "restart" if dyno.state == CRASHED else "start")
        self._launch(dyno)

    async def _remove(self, dyno: Dyno) -> None:
        await self._stop(dyno)
        if self.dynos_by_id.get(dyno.id) is dyno:
            self._cancel_timer(dyno)
            del self.dynos_by_id[dyno.id]
            self._notify()

    def _parse(self, body: Any) -> DynoSpec:
        return parse_spec(body, self.sizes)

    def _check_start(self, spec: DynoSpec) -> None:
        if self.draining:
            raise FakeError("draining", "the agent is draining and starts no new dynos")
        for other in self.dynos_by_id.values():
            if other.app == spec.app and other.name == spec.name:
                raise FakeError("conflict", f"{spec.app} already has a dyno named "
                                            f"{spec.name} ({other.id})")

    # -- requests (docs/protocol.md §4) -----------------------------------------------------
    async def handle(self, method: str, params: dict[str, Any]) -> Any:
        """Answer one request: its result, or FakeError with the agent's code."""
        call = {"dynos.sync": self._sync, "dyno.start": self._start_one,
                "dyno.stop": self._stop_one, "dyno.restart": self._restart_one,
                "dyno.signal": self._signal_one, "agent.drain": self._drain,
                "agent.info": self._info, "logs.tail": self._logs_tail}.get(method)
        if method == "spaces.sync" and self.spaces_sync:
            call = self._spaces_sync
        if method == "drains.sync" and self.drains_sync:
            call = self._drains_sync
        if call is None:
            raise FakeError("unknown_method", f"unknown method {excerpt(method)}")
        return await call(params)

    def _find(self, params: dict[str, Any]) -> Dyno:
        dyno_id = _dyno_id(_fields(params, {"id": str})["id"])
        dyno = self.dynos_by_id.get(dyno_id)
        if dyno is None:
            raise FakeError("not_found", f"no dyno {dyno_id}")
        return dyno

    def _validate(self, bodies: list[Any]) -> dict[str, DynoSpec]:
        if len(bodies) > MAX_DESIRED_DYNOS:
            raise _bad(f"p.dynos: has {len(bodies)} dynos; the limit is {MAX_DESIRED_DYNOS}")
        desired: dict[str, DynoSpec] = {}
        names: dict[tuple[str, str], str] = {}
        for index, body in enumerate(bodies):
            where = f"dynos[{index}]"
            if not isinstance(body, Mapping) or "id" not in body:
                raise FakeError("invalid_spec", f"{where}.id: is required in a desired set",
                                f"{where}.id")
            try:
                spec = self._parse(body)
            except SpecError as exc:
                raise FakeError("invalid_spec", f"{where}.{exc.field}: {exc.message}",
                                f"{where}.{exc.field}") from None
            if spec.id in desired:
                raise FakeError("invalid_spec", f"{where}.id: {spec.id} appears twice",
                                f"{where}.id")
            other = names.setdefault((spec.app, spec.name), spec.id)
            if other != spec.id:
                raise FakeError("invalid_spec", f"{where}.name: {spec.app} {spec.name} is "
                                                f"also dyno {other}", f"{where}.name")
            desired[spec.id] = spec
        return desired

    async def _sync(self, params: dict[str, Any]) -> dict[str, Any]:
        p = _fields(params, {"generation": int, "dynos": list})
        generation = p["generation"]
        if not 0 <= generation <= MAX_GENERATION:
            raise _bad(f"p.generation: must be an integer from 0 to {MAX_GENERATION}")
        desired = self._validate(p["dynos"])
        report: dict[str, Any] = {"generation": generation, "applied_generation": generation,
                                  "ignored": False, "started": [], "removed": [],
                                  "replaced": [], "resumed": [], "unchanged": [],
                                  "failed": []}
        if self.generation is not None and generation < self.generation:
            report["applied_generation"] = self.generation
            report["ignored"] = True
            return report
        self.generation = generation
        observed = {i: d for i, d in self.dynos_by_id.items() if d.type not in UNSYNCED_TYPES}
        removals = [(d, "remove") for i, d in sorted(observed.items()) if i not in desired]
        starts: list[tuple[DynoSpec, str]] = []
        resumes: list[Dyno] = []
        for dyno_id, spec in sorted(desired.items()):
            current = observed.get(dyno_id)
            if current is None:
                starts.append((spec, "start"))
            elif current.spec_hash != hash(spec):
                removals.append((current, "replace"))
                starts.append((spec, "replace"))
            elif not current.running and current.state != COMPLETE:
                resumes.append(current)
            else:
                report["unchanged"].append(dyno_id)
        done = {"remove": report["removed"], "replace": report["replaced"],
                "start": report["started"], "resume": report["resumed"]}
        removed: set[str] = set()

        async def remove(dyno: Dyno, action: str) -> None:
            await self._remove(dyno)
            removed.add(dyno.id)
            if action == "remove":
                done[action].append(dyno.id)

        await asyncio.gather(*(remove(d, a) for d, a in removals))
        starts.sort(key=lambda item: item[1] == "replace")
        for spec, action in starts:
            if action == "replace" and spec.id not in removed:
                continue
            try:
                self._check_start(spec)
            except FakeError as exc:
                report["failed"].append({"id": spec.id, "action": action, "code": exc.code,
                                         "message": exc.message})
                continue
            self._create(spec)
            done[action].append(spec.id)
        await asyncio.gather(*(self._restart(d) for d in resumes))
        report["resumed"].extend(d.id for d in resumes)
        for ids in done.values():
            ids.sort()
        return report

    async def _start_one(self, params: dict[str, Any]) -> dict[str, Any]:
        if "id" not in params:
            raise FakeError("invalid_spec", "id: is required", "id")
        try:
            spec = self._parse(params)
        except SpecError as exc:
            raise FakeError("invalid_spec", str(exc), exc.field) from None
        current = self.dynos_by_id.get(spec.id)
        if current is not None and current.spec_hash != hash(spec):
            raise FakeError("conflict", f"dyno {spec.id} exists with a different spec")
        if current is None:
            self._check_start(spec)
            current = self._create(spec)
        elif not current.running and current.state != COMPLETE:
            await self._restart(current)
        return current.status()

    async def _stop_one(self, params: dict[str, Any]) -> dict[str, Any]:
        dyno = self._find(params)
        await self._stop(dyno)
        return dyno.status()

    async def _restart_one(self, params: dict[str, Any]) -> dict[str, Any]:
        dyno = self._find(params)
        if dyno.state == COMPLETE:
            raise FakeError("conflict", f"{dyno.name} has completed; one-off dynos do not "
                                        f"restart")
        await self._restart(dyno)
        return dyno.status()

    async def _signal_one(self, params: dict[str, Any]) -> dict[str, Any]:
        p = _fields(params, {"id": str, "signal": (str, int)})
        dyno = self._find({"id": p["id"]})
        try:
            parse_signal(str(p["signal"]))
        except errors.BadRequest as exc:
            raise _bad(exc.message) from None
        if dyno.pid is None:
            raise FakeError("conflict", f"{dyno.name} has no running process")
        return {**dyno.status(), "signalled": 1}

    async def _drain(self, params: dict[str, Any]) -> dict[str, Any]:
        p = _fields(params, {}, {"stop": bool, "cancel": bool})
        if p.get("cancel") and p.get("stop"):
            raise _bad("p: stop and cancel exclude each other")
        self.draining = not p.get("cancel", False)
        stopped: list[str] = []
        if p.get("stop"):
            running = [d for d in sorted(self.dynos_by_id.values(), key=Dyno.sort_key)
                       if d.state in (STARTING, UP, CRASHED)]
            await asyncio.gather(*(self._stop(d) for d in running))
            stopped = [d.id for d in running]
        return {"draining": self.draining, "stopped": stopped, "failed": [],
                "dynos": self.dynos()}

    async def _spaces_sync(self, params: dict[str, Any]) -> dict[str, Any]:
        """Recorded, and applied unless older than the last applied; a space whose subnet
        overlaps one of this host's networks fails (`bad_request`), as on the agent."""
        p = _fields(params, {"generation": int, "port": int, "hosts": list, "pools": list,
                             "spaces": list}, {"partial": bool, "removed": list})
        self.spaces_received.append(params)
        self._notify()
        last = (self.spaces or {}).get("generation")
        if isinstance(last, int) and p["generation"] < last:
            return {"generation": last, "applied": [], "failed": []}
        own = [ipaddress.ip_network(n, strict=False)
               for n in (self.network or {}).get("networks") or ()]
        applied, failed = [], []
        for entry in p["spaces"]:
            subnet = ipaddress.IPv4Network(entry["subnet"])
            clash = next((n for n in own if n.version == 4 and n.overlaps(subnet)), None)
            if clash is not None:
                failed.append({"space": entry["space"], "code": "bad_request",
                               "message": f"space subnet {subnet} overlaps the host's "
                                          f"network {clash}"})
            else:
                applied.append(entry["space"])
        if p.get("partial") and self.spaces is not None:
            # Only the changed spaces and the names of those gone: merged into the last set.
            kept = {e["space"]: e for e in self.spaces["spaces"]
                    if e["space"] not in set(p.get("removed") or ())}
            kept.update({e["space"]: e for e in p["spaces"]})
            params = {**params, "spaces": [kept[name] for name in sorted(kept)]}
            params.pop("partial")
            params.pop("removed", None)
        self.spaces = params
        return {"generation": p["generation"], "applied": applied, "failed": failed}

    async def _drains_sync(self, params: dict[str, Any]) -> dict[str, Any]:
        """Checked and kept as the agent does (agent/coordinator/appdrains.py)."""
        try:
            apps = appdrains.parse(params)
        except errors.AgentError as exc:
            raise FakeError(exc.code, exc.message) from None
        self.drains_received.append(params)
        self._notify()
        before = self.drains or {}
        after = {app: list(urls) for app, urls in apps.items()}
        self.drains = after
        return {"apps": sorted(after), "changed": sorted(
            a for a in {*before, *after} if before.get(a) != after.get(a))}

    async def _info(self, params: dict[str, Any]) -> dict[str, Any]:
        _fields(params, {})
        return self.info()

    async def _logs_tail(self, params: dict[str, Any]) -> list[dict[str, str]]:
        """A fake dyno prints nothing: checked like the agent's, and never a line."""
        p = _fields(params, {"app": str}, {"dyno": str, "tail": int})
        if not APP.fullmatch(p["app"]):
            raise _bad(f"p.app: must match [a-z][a-z0-9-]{{0,29}}, got {excerpt(p['app'])}")
        dyno = p.get("dyno")
        if dyno is not None and not (NAME.fullmatch(dyno) or ID.fullmatch(dyno)):
            raise _bad(f"p.dyno: must be a dyno name (web.1) or id, got {excerpt(dyno)}")
        tail = p.get("tail", 100)
        if not 1 <= tail <= 10_000:
            raise _bad(f"p.tail: must be an integer from 1 to 10000, got {tail}")
        return []

    # -- the link (docs/protocol.md §1 to §3) ---------------------------------------------------
    async def _stop_process(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for dyno in self.dynos_by_id.values():
            self._cancel_timer(dyno)
        for _, future in self._exiting.values():
            future.cancel()
        self._exiting.clear()

    async def _run(self) -> None:
        while True:
            self.link_state = "connecting"
            try:
                await self._connection()
            except asyncio.CancelledError:
                raise
            except (FakeError, aiohttp.ClientError, OSError, TimeoutError) as exc:
                self.counters["connect_failures"] += 1
                self.last_error = str(exc) or type(exc).__name__
            except Exception as exc:
                # The task root: a bug in one connection must not end the agent's link.
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("fake agent %s: connection failed", self.agent_id)
            finally:
                self.link_state = "disconnected"
                self.connected_since = None
                self._url_index = (self._url_index + 1) % len(self.urls)
                self._notify()
            delay = backoff_delay(self._attempt // len(self.urls), self.rng,
                                  self.backoff_min_s, self.backoff_max_s)
            self._attempt += 1
            await asyncio.sleep(delay)

    async def _dial(self) -> aiohttp.ClientWebSocketResponse:
        assert self._session is not None
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                return await self._session.ws_connect(
                    self.url, protocols=(SUBPROTOCOL,),
                    headers={"Authorization": f"Bearer {self.token.strip()}"},
                    heartbeat=self.ping_interval_s, max_msg_size=HARD_FRAME_BYTES + 1,
                    timeout=aiohttp.ClientWSTimeout(ws_close=CLOSE_TIMEOUT_S),
                    autoclose=True, autoping=True)
        except aiohttp.WSServerHandshakeError as exc:
            raise FakeError("handshake", f"handshake refused: {exc.status} {exc.message}") \
                from None

    async def _connection(self) -> None:
        slots = self.connect_slots or contextlib.nullcontext()
        async with slots:
            ws = await self._dial()
        try:
            self.connection += 1
            if ws.protocol != SUBPROTOCOL:
                await ws.close(code=aiohttp.WSCloseCode.PROTOCOL_ERROR,
                               message=f"subprotocol {SUBPROTOCOL} required".encode())
                raise FakeError("handshake", f"subprotocol {SUBPROTOCOL} not accepted")
            self._ws = ws
            await self._serve(ws)
        finally:
            self._ws = None
            for future in self._pending.values():
                future.cancel()
            self._pending.clear()
            # After kill() the transport is gone: this sends nothing, it only frees the
            # connection.
            if not ws.closed:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(CLOSE_TIMEOUT_S):
                        await ws.close(code=aiohttp.WSCloseCode.GOING_AWAY,
                                       message=b"agent going away")

    async def _serve(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        handlers: set[asyncio.Task[None]] = set()
        name = self.agent_id
        reader = asyncio.create_task(self._read(ws, handlers), name=f"fakeagent-read-{name}")
        hello = asyncio.create_task(self._request("hello", self.hello()),
                                    name=f"fakeagent-hello-{name}")
        others: list[asyncio.Task[None]] = []
        try:
            await asyncio.wait([reader, hello], timeout=self.hello_timeout_s,
                               return_when=asyncio.FIRST_COMPLETED)
            if not hello.done():
                raise FakeError("hello", "no answer to hello" if not reader.done()
                                else "connection closed before hello was answered")
            hello.result()
            self.link_state = "connected"
            self.connected_since = time.time()
            self.counters["connects"] += 1
            self._attempt = 0
            self.last_error = None
            self._notify()
            others = [asyncio.create_task(self._write(), name=f"fakeagent-write-{name}"),
                      asyncio.create_task(self._tick(self.heartbeat_interval_s, self._beat),
                                          name=f"fakeagent-heartbeat-{name}")]
            if self.metrics_interval_s is not None:
                others.append(asyncio.create_task(
                    self._tick(self.metrics_interval_s, self._metrics),
                    name=f"fakeagent-metrics-{name}"))
            done, _ = await asyncio.wait([reader, *others], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                failure = None if task.cancelled() else task.exception()
                if failure is not None:
                    raise failure
        finally:
            for task in [reader, hello, *others, *handlers]:
                task.cancel()
            await asyncio.gather(reader, hello, *others, *handlers, return_exceptions=True)

    async def _send(self, frame: Frame) -> None:
        ws = self._ws
        if ws is None or ws.closed:
            raise ConnectionResetError("not connected to the coordinator")
        data = encode(frame)
        async with self._send_lock:
            await ws.send_bytes(data)
        self.counters["frames_out"] += 1
        self.sent.append(Recorded(self.connection, frame))
        self._notify()

    async def _request(self, method: str, params: dict[str, Any]) -> Any:
        request_id = next(self._ids)
        future: asyncio.Future[Response] = self._loop.create_future()
        self._pending[request_id] = future
        try:
            await self._send(Request(request_id, method, params))
            response = await future
        finally:
            self._pending.pop(request_id, None)
        if response.error is not None:
            raise FakeError(str(response.error.get("code")), f"{method} refused: "
                            f"{response.error.get('message', '')}")
        return response.result

    async def _write(self) -> None:
        """Buffered events in order; one leaves the buffer only once sent (§5)."""
        while True:
            if self._lost_unreported:
                lost, self._lost_unreported = self._lost_unreported, 0
                await self._send(Event("agent.events_lost",
                                       {"count": lost, "at": timestamp(time.time())}))
            if not self._outbox:
                self._outbox_ready.clear()
                await self._outbox_ready.wait()
                continue
            event = self._outbox[0]
            await self._send(event)
            if self._outbox and self._outbox[0] is event:
                self._outbox.popleft()
            self.counters["events_sent"] += 1

    async def _tick(self, interval_s: float, call: Callable[[], Any]) -> None:
        while True:
            await call()
            spread = interval_s * self.jitter
            await asyncio.sleep(interval_s + self.rng.uniform(-spread, spread))

    async def _beat(self) -> None:
        await self._send(Event("agent.heartbeat", self.heartbeat()))
        self.last_heartbeat_at = time.time()
        self.counters["heartbeats"] += 1

    async def _metrics(self) -> None:
        await self._send(Event("dyno.metrics", self.metrics()))

    async def _read(self, ws: aiohttp.ClientWebSocketResponse,
                    handlers: set[asyncio.Task[None]]) -> None:
        async for message in ws:
            self.counters["frames_in"] += 1
            if message.type is aiohttp.WSMsgType.ERROR:
                return
            if message.type not in (aiohttp.WSMsgType.BINARY, aiohttp.WSMsgType.TEXT):
                continue
            try:
                frame = decode(message.data, MAX_FRAME_BYTES)
            except FrameError as exc:
                self.counters["bad_frames"] += 1
                await self._reply(exc.request_id, FakeError(exc.code, exc.message))
                continue
            self.received.append(Recorded(self.connection, frame))
            self._notify()
            if isinstance(frame, Response):
                future = self._pending.get(frame.id) if frame.id is not None else None
                if future is not None and not future.done():
                    future.set_result(frame)
            elif isinstance(frame, Event):
                continue  # protocol 1 defines no coordinator events
            elif len(handlers) >= MAX_REQUESTS_IN_FLIGHT:
                await self._reply(frame.id, FakeError(
                    "busy", f"more than {MAX_REQUESTS_IN_FLIGHT} requests in flight"))
            else:
                task = asyncio.create_task(self._answer(frame),
                                           name=f"fakeagent-req-{self.agent_id}-{frame.id}")
                handlers.add(task)
                task.add_done_callback(handlers.discard)

    async def _answer(self, request: Request) -> None:
        self.counters["requests"] += 1
        try:
            result = await self.handle(request.method, request.params)
        except FakeError as exc:
            await self._reply(request.id, exc)
            return
        except Exception as exc:
            # The root of a request task, as in the agent: answer `internal`.
            log.exception("fake agent %s: request %s failed", self.agent_id, request.method)
            await self._reply(request.id, FakeError("internal", f"{type(exc).__name__}: {exc}"))
            return
        with contextlib.suppress(ConnectionError, TimeoutError, aiohttp.ClientError):
            await self._send(Response(request.id, result))

    async def _reply(self, request_id: int | None, error: FakeError) -> None:
        self.counters["errors_sent"] += 1
        with contextlib.suppress(ConnectionError, TimeoutError, aiohttp.ClientError):
            await self._send(Response(request_id, error=error.body()))


def _abort(ws: aiohttp.ClientWebSocketResponse) -> None:
    """Drop the TCP connection at once: no close frame, no FIN handshake."""
    # aiohttp has no public way to abort a client WebSocket; its connection is `_conn`.
    conn = getattr(ws, "_conn", None)
    transport = getattr(conn, "transport", None)
    if transport is not None:
        transport.abort()


class FakeFleet:
    """`n_hosts` FakeAgents in one process on one ClientSession (no connection limit),
    their handshakes at most `concurrency` at a time, heartbeats jittered by 10 %.

    Agents are `fake-00000`… on hosts `host-00000`…; `agent_options` go to every FakeAgent.
    """

    def __init__(self, url: str, token: str, n_hosts: int, *, unix_path: str | None = None,
                 concurrency: int = 50, prefix: str = "fake", seed: int = 0,
                 **agent_options: Any) -> None:
        self.url = url
        self.token = token
        self.n_hosts = n_hosts
        self.unix_path = unix_path
        self.concurrency = concurrency
        self.prefix = prefix
        self.seed = seed
        self.agent_options = {"jitter": 0.1, "record_limit": 0, **agent_options}
        self.agents: list[FakeAgent] = []
        self.session: aiohttp.ClientSession | None = None

    def build(self) -> list[FakeAgent]:
        """Make the agents (not yet connected): adopt() dynos on them before start()."""
        if self.session is None:
            connector: aiohttp.BaseConnector = (
                aiohttp.UnixConnector(path=self.unix_path, limit=0)
                if self.unix_path is not None else aiohttp.TCPConnector(limit=0))
            self.session = aiohttp.ClientSession(connector=connector)
            slots = asyncio.Semaphore(self.concurrency)
            self.agents = [
                FakeAgent(self.url, self.token, f"{self.prefix}-{n:05d}",
                          f"host-{n:05d}", session=self.session, connect_slots=slots,
                          rng=random.Random(self.seed * 1_000_003 + n), **self.agent_options)
                for n in range(self.n_hosts)]
        return self.agents

    async def start(self) -> None:
        for agent in self.build():
            agent.start()

    def by_id(self, agent_id: str) -> FakeAgent:
        return next(a for a in self.agents if a.agent_id == agent_id)

    @property
    def connected(self) -> int:
        return sum(1 for a in self.agents if a.connected)

    async def wait_for(self, predicate: Callable[[], T], timeout_s: float = 60.0,
                       what: str = "condition", poll_s: float = 0.05) -> T:
        """Poll `predicate()` (over a thousand agents, one event each would cost more)."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"fleet: {what} not met within {timeout_s}s")
            await asyncio.sleep(poll_s)

    async def wait_connected(self, timeout_s: float = 60.0) -> None:
        await self.wait_for(lambda: self.connected == len(self.agents), timeout_s,
                            f"all {len(self.agents)} agents connected")

    async def close(self) -> None:
        await asyncio.gather(*(agent.close() for agent in self.agents))
        if self.session is not None:
            await self.session.close()
            self.session = None

    async def __aenter__(self) -> FakeFleet:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
