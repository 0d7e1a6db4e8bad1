"""`dynocoord serve`: the fleet coordinator. Agents connect with the protocol of
docs/protocol.md; people and tools use the platform API of DESIGN §9. Everything that matters
lives in etcd (dynocoord/keys.py); this process holds a copy while it leads and nothing else.

Replicas: every replica serves HTTP, one leads (dynocoord/election.py). A follower answers
both the API and agents with 503 `not_leader`, so agents (several `coordinator_url`s) and the
CLI (`--coordinator A,B`) move on to the next replica. Every write of a leader is a
transaction fenced on its own leader key (`create_revision` of the term): a leader that lost
its lease without noticing cannot overwrite its successor's state; its write fails and it
steps down.

Liveness: the leader pings every agent each second and hears every frame it sends; a host
unheard of for `--host-ttl` seconds (5) is `lost`, and its dynos are placed elsewhere at once.
Its connection is dropped after half that silence, and the host is lost when the rest has
passed without it reconnecting, so an agent restart does not move its dynos. Each connected
host has a key `/alive/{host}`, all of them on one lease of the leader's: etcd shows which
hosts the leader hears, and the keys vanish with a leader that dies. (A lease per host, kept
alive per host, cost one etcd request per host every TTL/3 — 590 a second at 1,000 hosts —
to learn what the leader already knows from the connection.) An agent back after that is
`ready` again, and its first `dynos.sync` (its desired set, now without what moved away)
removes its stale dynos. A new leader gives every host `--takeover-grace` seconds to reconnect
before it counts a host that has not as lost.

One decision loop: every change (API write, host state, hello) marks the fleet dirty; the
loop plans (dynocoord/placement.py) from the whole view, writes the changed placements and
the changed hosts' generations, then tells each changed host its complete desired set.

Private spaces (dynocoord/spaces.py): a space (an app) gets its subnet and VNI when created or
first placed, a host its slice of it in the transaction that first places one of the space's
dynos there; each host is told its view with `spaces.sync` whenever the view changes
(placements, a dyno's state or ip, a host lost or back; debounced, the latest only), and
always before the `dynos.sync` that would start a dyno of a space it has not heard of.
`spaces.sync` generations are microseconds of the wall clock (at least the last + 1), so they
grow across a leader's life and, clocks agreeing, across leaders. An agent that answers
`unknown_method` (older than spaces) is not asked again on that connection.

Log drains set per app (`drains:add`, the app record's `log_drains`) reach its hosts with
`drains.sync`, never in the dynos' specs (a spec change replaces dynos): each host gets the map
of the apps placed on it (or still running there), when it connects, before each `dynos.sync`
and when an app's drains change, only when its map differs from the last it took. An agent
that answers `unknown_method` (older than such drains) is not asked again on that connection.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import itertools
import json
import logging
import signal
import socket
import ssl
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import aiohttp
from aiohttp import WSMsgType, web

from agent.coordinator.frames import (
    Event,
    FrameError,
    Request,
    Response,
    decode,
    encode,
)
from agent.drainurl import MAX_DRAINS
from agent.sizes import DEFAULT_SIZE, DEFAULT_SIZES
from dynocoord import keys as keyspace
from dynocoord import model, placement, spaces
from dynocoord.election import Election, Term
from dynocoord.etcd import (
    Compare,
    Delete,
    EtcdClient,
    EtcdError,
    LeaseKeeper,
    Op,
    Put,
)

log = logging.getLogger("dynocoord")

SUBPROTOCOL: Final = "dynoagent.v1"
AGENT_PATH: Final = "/v1/agents/connect"
DEFAULT_LISTEN: Final = "127.0.0.1:7500"
HOST_TTL_S: Final = 5
TAKEOVER_GRACE_S: Final = 10.0
# WebSocket pings to agents: a host whose connection stops answering is noticed in about
# this long (aiohttp closes after heartbeat + heartbeat / 2 without a pong).
PING_INTERVAL_S: Final = 1.0
HELLO_TIMEOUT_S: Final = 10.0
SYNC_TIMEOUT_S: Final = 120.0
REQUEST_TIMEOUT_S: Final = 60.0
# etcd's default --max-txn-ops is 128; one op is the fence's companion, keep room.
TXN_OPS: Final = 100
MAX_BODY_BYTES: Final = 4 << 20
ONE_OFF_KEEP_S: Final = 3600.0
RELEASE_PHASE_TIMEOUT_S: Final = 3600.0
# How long a rollout step waits for its new dynos to be up (a web dyno's boot timeout is 60 s).
ROLLOUT_STEP_S: Final = 120.0
DECIDE_DEBOUNCE_S: Final = 0.05
# Placement writes in flight at once (each a transaction of at most TXN_OPS operations).
WRITES_IN_FLIGHT: Final = 8
# A burst of dyno state changes is one `spaces.sync` per host (at least this long apart, or as
# long as the last view took to make, on a fleet where that is longer).
SPACES_DEBOUNCE_S: Final = 0.05
SPACES_TIMEOUT_S: Final = 30.0
LIVE_STATES: Final = frozenset({"starting", "up", "crashed"})


def now_text() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.extra = extra

    def response(self) -> web.Response:
        return web.json_response({"error": {"code": self.code, "message": self.message,
                                            **self.extra}}, status=self.status)


class NotLeader(Exception):
    """A fenced write failed: another replica leads now."""


@dataclass(frozen=True)
class Settings:
    etcd: tuple[str, ...]
    listen_host: str = "127.0.0.1"
    listen_port: int = 7500
    api_token: str = ""
    agent_token: str = ""
    prefix: str = keyspace.DEFAULT_PREFIX
    node_id: str = ""
    host_ttl_s: int = HOST_TTL_S
    leader_ttl_s: int = 5
    takeover_grace_s: float = TAKEOVER_GRACE_S
    ping_interval_s: float = PING_INTERVAL_S
    # TLS: the server's certificate chain and key; with a client CA, agents must present a
    # certificate it signed (mutual TLS). API clients may, but need not.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    addressing: spaces.Addressing = spaces.DEFAULT_ADDRESSING

    def ssl_context(self) -> ssl.SSLContext | None:
        if self.tls_cert is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH,
                                             cafile=str(self.tls_client_ca)
                                             if self.tls_client_ca else None)
        context.load_cert_chain(str(self.tls_cert), str(self.tls_key) if self.tls_key else None)
        if self.tls_client_ca is not None:
            context.verify_mode = ssl.CERT_OPTIONAL
        return context


# ---------------------------------------------------------------------------- agent sessions

class Session:
    """One agent's WebSocket, seen from the coordinator: requests out, answers and events in."""

    def __init__(self, host_id: str, ws: web.WebSocketResponse) -> None:
        self.host_id = host_id
        self.ws = ws
        self.dynos: dict[str, dict[str, Any]] = {}
        self.last_heard = time.monotonic()
        self.transport: asyncio.Transport | None = None
        self.sync_wanted = asyncio.Event()
        self.synced_generation: int | None = None
        # spaces.sync: the last view the agent took, and whether it knows the method at all.
        self.spaces_wanted = asyncio.Event()
        self.spaces_lock = asyncio.Lock()
        self.spaces_sent: dict[str, Any] | None = None
        self.spaces_generation = 0
        self.spaces_supported = True
        # drains.sync: the last map the agent took, and whether it knows the method at all.
        self.drains_wanted = asyncio.Event()
        self.drains_lock = asyncio.Lock()
        self.drains_sent: dict[str, list[str]] | None = None
        self.drains_supported = True
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Response]] = {}
        self._send_lock = asyncio.Lock()

    async def send(self, frame: Request | Response | Event) -> None:
        async with self._send_lock:
            await self.ws.send_bytes(encode(frame))

    async def request(self, method: str, params: dict[str, Any],
                      timeout_s: float = REQUEST_TIMEOUT_S) -> Any:
        request_id = next(self._ids)
        future: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            await self.send(Request(request_id, method, params))
            async with asyncio.timeout(timeout_s):
                response = await future
        finally:
            self._pending.pop(request_id, None)
        if response.error is not None:
            raise ApiError(502, str(response.error.get("code", "agent_error")),
                           f"host {self.host_id}: {response.error.get('message', '')}")
        return response.result

    def answered(self, response: Response) -> None:
        future = self._pending.get(response.id) if response.id is not None else None
        if future is not None and not future.done():
            future.set_result(response)

    def close_pending(self) -> None:
        for future in self._pending.values():
            if not future.done():
                future.cancel()


# ---------------------------------------------------------------------------- the leader

@dataclass
class Fleet:
    """The leader's copy of etcd's state."""

    apps: dict[str, model.App] = field(default_factory=dict)
    releases: dict[str, dict[int, model.Release]] = field(default_factory=dict)
    formation: dict[str, dict[str, model.FormationEntry]] = field(default_factory=dict)
    hosts: dict[str, model.Host] = field(default_factory=dict)
    placements: dict[str, dict[str, model.Placement]] = field(default_factory=dict)
    generations: dict[str, int] = field(default_factory=dict)
    commands: dict[str, dict[str, Any]] = field(default_factory=dict)  # one-offs by dyno id
    # A release whose release phase runs: not current until that phase succeeds.
    pending: dict[str, model.Release] = field(default_factory=dict)
    # The outcome of each release phase, by app and version (kept in etcd too).
    phases: dict[str, dict[int, dict[str, Any]]] = field(default_factory=dict)
    spaces: dict[str, model.Space] = field(default_factory=dict)
    slices: dict[str, dict[str, model.SpaceSlice]] = field(default_factory=dict)  # space, host

    def release(self, app: str, version: int) -> model.Release | None:
        found = self.releases.get(app, {}).get(version)
        if found is None:
            pending = self.pending.get(app)
            found = pending if pending is not None and pending.version == version else None
        return found

    def current_release(self, app: str) -> model.Release | None:
        versions = self.releases.get(app)
        return versions[max(versions)] if versions else None

    def all_placements(self) -> Iterable[model.Placement]:
        for by_id in self.placements.values():
            yield from by_id.values()


class Leader:
    """What one term of leadership does: load, decide, write, tell the agents."""

    def __init__(self, client: EtcdClient, keys: keyspace.Keys, term: Term,
                 settings: Settings) -> None:
        self.client = client
        self.keys = keys
        self.term = term
        self.settings = settings
        self.fleet = Fleet()
        self.sessions: dict[str, Session] = {}
        self.revision = 0
        self.started = time.monotonic()
        self.dirty = asyncio.Event()
        self.lock = asyncio.Lock()
        self.stopped = asyncio.Event()
        self.rollouts: dict[str, asyncio.Task[None]] = {}
        # New web dynos of a rollout, booting beside the old ones they replace (preboot):
        # not part of any plan until the swap.
        self.prebooting: dict[str, model.Placement] = {}
        self.states_changed = asyncio.Event()  # set at every dyno.state an agent reports
        self.loaded = asyncio.Event()  # the fleet read from etcd: only then may anyone act on it
        self.alive_keeper: LeaseKeeper | None = None
        self.lost_timers: dict[str, asyncio.TimerHandle] = {}
        self._tasks: list[asyncio.Task[Any]] = []
        # Private spaces: the fleet's view, made again after any change that may alter it.
        self.spaces_dirty = asyncio.Event()
        self._space_view: spaces.FleetView | None = None
        self._space_view_s = 0.0
        # What changed since the last push: these spaces (their hosts' views), or all.
        self._spaces_touched: set[str] = set()
        self._spaces_all = True
        self._pushed_view: spaces.FleetView | None = None
        # The last statuses of hosts that are gone but not yet lost: their dynos stay members
        # of their spaces (an agent restarting does not withdraw them from other hosts).
        self.last_dynos: dict[str, dict[str, dict[str, Any]]] = {}
        self._allocation_errors: dict[str, str] = {}
        self.log_waiters: dict[str, list[asyncio.Queue[dict[str, Any]]]] = {}

    # -- etcd ---------------------------------------------------------------------------
    def _fence(self) -> Compare:
        return Compare.create_revision(self.keys.leader().encode(), self.term.revision)

    async def commit(self, ops: list[Op]) -> None:
        """Write `ops` in fenced transactions of at most TXN_OPS operations each, a few at a
        time (each key is written by one of them only, so their order does not matter)."""
        slots = asyncio.Semaphore(WRITES_IN_FLIGHT)

        async def one(chunk: list[Op]) -> None:
            async with slots:
                result = await self.client.txn([self._fence()], chunk)
            if not result.succeeded:
                self.term.lost.set()
                raise NotLeader("the leader key is no longer this term's")
            self.revision = max(self.revision, result.revision)
        await asyncio.gather(*(one(ops[start:start + TXN_OPS])
                               for start in range(0, len(ops), TXN_OPS)))

    async def load(self) -> None:
        k = self.keys
        found = await self.client.get_prefix(f"{k.prefix}/".encode())
        self.revision = found.revision
        fleet = self.fleet
        for kv in found.kvs:
            key = kv.key.decode()
            try:
                if key.startswith(k.apps()):
                    app = model.App.from_json(kv.value)
                    fleet.apps[app.name] = app
                elif key.startswith(f"{k.prefix}/releases/"):
                    release = model.Release.from_json(kv.value)
                    fleet.releases.setdefault(release.app, {})[release.version] = release
                elif key.startswith(k.formations()):
                    entry = model.FormationEntry.from_json(kv.value)
                    fleet.formation.setdefault(entry.app, {})[entry.type] = entry
                elif key.startswith(k.hosts()):
                    host = model.Host.from_json(kv.value)
                    fleet.hosts[host.id] = host
                elif key.startswith(k.placements()):
                    p = model.Placement.from_json(kv.value)
                    fleet.placements.setdefault(p.host, {})[p.id] = p
                elif key.startswith(k.generations()):
                    fleet.generations[k.parse_generation(key)] = \
                        keyspace.decode_generation(kv.value)
                elif key.startswith(k.runs()):
                    data = json.loads(kv.value)
                    fleet.commands[data["id"]] = data
                elif key.startswith(k.spaces()):
                    space = model.Space.from_json(kv.value)
                    fleet.spaces[space.space] = space
                elif key.startswith(k.slices()):
                    cut = model.SpaceSlice.from_json(kv.value)
                    fleet.slices.setdefault(cut.space, {})[cut.host] = cut
                elif key.startswith(k.phases()):
                    data = json.loads(kv.value)
                    fleet.phases.setdefault(data["app"], {})[data["version"]] = data
                    if data["status"] == "pending":
                        release = model.Release.from_dict(data["release"])
                        fleet.pending[release.app] = release
            except (model.Invalid, keyspace.BadKey, ValueError, KeyError) as exc:
                log.error("ignoring a bad etcd value at %s: %s", key, exc)
        log.info("leading: %d apps, %d hosts, %d placements at revision %d",
                 len(fleet.apps), len(fleet.hosts),
                 sum(len(v) for v in fleet.placements.values()), self.revision)

    # -- lifetime -----------------------------------------------------------------------
    async def run(self) -> None:
        try:
            await self.load()
            lease = await self.client.grant(max(self.settings.leader_ttl_s,
                                                self.settings.host_ttl_s))
            self.alive_keeper = self.client.keep_alive(lease)
            # Apps and dynos from before private spaces (or a pool freed since): addresses now.
            allocation = self.allocate(self.fleet.apps, {(p.app, p.host) for p in
                                                         self.fleet.all_placements()})
            if allocation.spaces or allocation.slices:
                await self.commit(self.allocation_ops(allocation))
                self.adopt_allocation(allocation)
            self.loaded.set()
            self._tasks = [asyncio.create_task(self._decide(), name="decide"),
                           asyncio.create_task(self._takeover(), name="takeover"),
                           asyncio.create_task(self._watch_lease(), name="alive-lease"),
                           asyncio.create_task(self._push_spaces(), name="spaces")]
        except BaseException:
            await self.stop()
            raise
        self.dirty.set()
        for app, release in list(self.fleet.pending.items()):
            self.rollouts[app] = asyncio.create_task(self.release_phase(release),
                                                     name=f"release-{app}")
        # A rollout the last leader left half done goes on.
        for app in self.fleet.apps:
            current = self.fleet.current_release(app)
            if app not in self.rollouts and current is not None and any(
                    p.app == app and p.release < current.version and
                    p.type not in ("run", "release") for p in self.fleet.all_placements()):
                self.rollouts[app] = asyncio.create_task(self.roll(app), name=f"rollout-{app}")
        try:
            await self.term.lost.wait()
        finally:
            await self.stop()

    async def stop(self) -> None:
        self.stopped.set()
        for task in [*self._tasks, *self.rollouts.values()]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self.rollouts.values(), return_exceptions=True)
        for timer in self.lost_timers.values():
            timer.cancel()
        for session in list(self.sessions.values()):
            with contextlib.suppress(Exception):
                await session.ws.close(code=aiohttp.WSCloseCode.SERVICE_RESTART,
                                       message=b"coordinator stepping down")
        if self.alive_keeper is not None:
            await self.alive_keeper.stop()

    async def _watch_lease(self) -> None:
        """The alive keys' lease lost (etcd away longer than its TTL): they are gone, so this
        term cannot vouch for its hosts any more; end it, and the next term starts afresh."""
        assert self.alive_keeper is not None
        await self.alive_keeper.lost.wait()
        log.warning("the hosts' lease was lost (%s): stepping down", self.alive_keeper.reason)
        self.term.lost.set()

    async def _takeover(self) -> None:
        """Hosts the last leader knew that did not come back within the grace are lost."""
        await asyncio.sleep(self.settings.takeover_grace_s)
        for host_id, host in list(self.fleet.hosts.items()):
            if host.state is not model.HostState.LOST and host_id not in self.sessions:
                await self.set_host_state(host_id, model.HostState.LOST)

    def session_ended(self, session: Session) -> None:
        """The host is lost once `host_ttl_s` has passed since it was last heard, unless it
        reconnected by then."""
        host_id = session.host_id
        self.last_dynos[host_id] = session.dynos
        delay = max(0.0, session.last_heard + self.settings.host_ttl_s - time.monotonic())
        old = self.lost_timers.pop(host_id, None)
        if old is not None:
            old.cancel()
        self.lost_timers[host_id] = asyncio.get_running_loop().call_later(
            delay, lambda: self._spawn(self._unheard(host_id)))

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.append(task)
        task.add_done_callback(lambda done: self._tasks.remove(done)
                               if done in self._tasks else None)

    async def _unheard(self, host_id: str) -> None:
        self.lost_timers.pop(host_id, None)
        if host_id in self.sessions or self.stopped.is_set():
            return
        log.warning("host %s: unheard for %ss, lost", host_id, self.settings.host_ttl_s)
        with contextlib.suppress(EtcdError, NotLeader):
            await self.commit([Delete(self.keys.alive(host_id).encode())])
        try:
            await self.set_host_state(host_id, model.HostState.LOST)
        except (EtcdError, NotLeader) as exc:
            log.warning("host %s: could not record it lost (%s); retrying", host_id, exc)
            self.lost_timers[host_id] = asyncio.get_running_loop().call_later(
                1.0, lambda: self._spawn(self._unheard(host_id)))

    # -- decisions ----------------------------------------------------------------------
    async def _decide(self) -> None:
        while True:
            await self.dirty.wait()
            # A burst of changes (many PATCHes, a host's hello and its state) is one plan.
            await asyncio.sleep(DECIDE_DEBOUNCE_S)
            self.dirty.clear()
            try:
                await self.converge()
            except NotLeader:
                return
            except EtcdError as exc:
                log.warning("could not write a plan (retrying): %s", exc)
                await asyncio.sleep(1)
                self.dirty.set()

    def targets(self) -> list[placement.Target]:
        out = []
        for app in self.fleet.apps:
            release = self.fleet.current_release(app)
            if release is None:
                continue
            entries = tuple(e for e in self.fleet.formation.get(app, {}).values()
                            if e.type in release.process_types and e.type != "release")
            out.append(placement.Target(app, release.version, release.slug_key, release.stack,
                                        entries))
        return out

    async def converge(self) -> None:
        async with self.lock:
            fleet = self.fleet
            began = time.monotonic()
            booting: dict[str, int] = {}
            for p in self.prebooting.values():
                booting[p.host] = booting.get(p.host, 0) + _memory(p.size)
            views = [placement.HostView(h.id, h.state,
                                        h.capacity.memory_bytes - booting.get(h.id, 0))
                     for h in fleet.hosts.values()]
            current = [p for p in fleet.all_placements() if p.id not in self.prebooting]
            # Pure, on immutable inputs: off the event loop, which keeps answering agents.
            plan = await asyncio.to_thread(placement.plan, views, self.targets(), current,
                                           self.revision)
            if not plan.added and not plan.removed:
                return
            planned = time.monotonic()
            await self._apply(plan.removed, plan.added)
            # tests/bench/bench_fleet.py reads this line: keep its shape.
            log.info("converged: +%d -%d dynos on %d hosts, planned in %.3f s, written in "
                     "%.3f s", len(plan.added), len(plan.removed), len(plan.changed_hosts),
                     planned - began, time.monotonic() - planned)
            if plan.unplaceable:
                log.warning("%d dynos fit on no host: %s", len(plan.unplaceable),
                            ", ".join(f"{u.app}/{u.name}" for u in plan.unplaceable[:10]))

    async def _apply(self, removed: Iterable[model.Placement],
                     added: Iterable[model.Placement]) -> None:
        """Write placement changes and the changed hosts' new generations; sync those hosts.
        The caller holds the lock."""
        ops: list[Op] = []
        changed: set[str] = set()
        removed, added = list(removed), list(added)
        for p in removed:
            ops.append(Delete(self.keys.placement(p.host, p.id).encode()))
            changed.add(p.host)
        for p in added:
            ops.append(Put(self.keys.placement(p.host, p.id).encode(), p.to_json()))
            changed.add(p.host)
        allocation = self.allocate((), {(p.app, p.host) for p in added})
        ops.extend(self.allocation_ops(allocation))
        generations = {}
        for host in changed:
            session = self.sessions.get(host)
            seen = session.synced_generation if session else None
            generations[host] = max(self.fleet.generations.get(host, 0), seen or 0) + 1
            ops.append(Put(self.keys.generation(host).encode(),
                           keyspace.encode_generation(generations[host])))
        await self.commit(ops)
        for p in removed:
            self.fleet.placements.get(p.host, {}).pop(p.id, None)
        for p in added:
            self.fleet.placements.setdefault(p.host, {})[p.id] = p
        self.fleet.generations.update(generations)
        self.adopt_allocation(allocation)
        for app in {p.app for p in [*removed, *added]}:
            self.spaces_changed(app)
        for host in changed:
            self.want_sync(host)

    def want_sync(self, host: str) -> None:
        session = self.sessions.get(host)
        if session is not None:
            session.sync_wanted.set()

    def spec(self, p: model.Placement) -> dict[str, Any]:
        release = self.fleet.release(p.app, p.release)
        assert release is not None
        one_off = self.fleet.commands.get(p.id)
        command = one_off["command"] if one_off else release.process_types[p.type]
        return {"id": p.id, "app": p.app, "name": p.name, "command": command,
                "env": dict(release.env), "size": p.size,
                "release": {"version": release.version, "slug": release.slug.to_dict(),
                            "stack": release.stack}}

    def desired(self, host: str) -> list[dict[str, Any]]:
        placed = self.fleet.placements.get(host, {}).values()
        return [self.spec(p) for p in sorted(placed, key=lambda p: (p.app, p.name))
                if self.fleet.release(p.app, p.release) is not None]

    async def sync_loop(self, session: Session) -> None:
        """Tell one host its desired set whenever it changed (the latest only)."""
        while True:
            await session.sync_wanted.wait()
            session.sync_wanted.clear()
            # Its spaces first, so a dyno of a space new to the host starts in it; the spaces
            # it leaves stay until the dynos.sync has stopped their dynos (the spaces loop
            # then sends the view without them).
            # A set that brings no space new to the host goes at once: a host back from
            # being lost must stop its stale copies without waiting for its spaces.
            sent = session.spaces_sent or {}
            known = {e["space"] for e in sent.get("spaces", ())}
            desired = self.desired(session.host_id)
            # The drains of the apps it runs, so that a new dyno's first lines reach them.
            try:
                await self.send_drains(session)
            except (ApiError, TimeoutError, ConnectionError) as exc:
                log.warning("host %s: drains.sync failed before dynos.sync: %s",
                            session.host_id, exc)
                session.drains_wanted.set()
            if session.spaces_supported and not {d["app"] for d in desired} <= known:
                try:
                    await self.send_spaces(session, known)
                except (ApiError, TimeoutError, ConnectionError) as exc:
                    log.warning("host %s: spaces.sync failed before dynos.sync: %s",
                                session.host_id, exc)
                desired = self.desired(session.host_id)
            generation = max(self.fleet.generations.get(session.host_id, 0),
                             session.synced_generation or 0)
            try:
                result = await session.request(
                    "dynos.sync", {"generation": generation, "dynos": desired},
                    SYNC_TIMEOUT_S)
            except (ApiError, TimeoutError, ConnectionError) as exc:
                log.warning("host %s: dynos.sync failed: %s", session.host_id, exc)
                await asyncio.sleep(1)
                session.sync_wanted.set()
                continue
            applied = result.get("applied_generation") if isinstance(result, dict) else None
            if isinstance(applied, int):
                session.synced_generation = applied
                if result.get("ignored"):
                    # The agent is ahead (protocol §4 "Recovering the generation").
                    session.sync_wanted.set()
            failed = result.get("failed") if isinstance(result, dict) else None
            if failed:
                log.warning("host %s: sync failures: %s", session.host_id, failed[:5])
            if session.spaces_supported:
                session.spaces_wanted.set()

    # -- log drains ---------------------------------------------------------------------
    def drains_for(self, session: Session) -> dict[str, list[str]]:
        """`drains.sync`'s map for the host: the drains of each app placed on it, or with a
        dyno still running there (its last lines go to them too)."""
        apps = {p.app for p in self.fleet.placements.get(session.host_id, {}).values()}
        apps.update(str(d.get("app")) for d in session.dynos.values()
                    if d.get("state") in LIVE_STATES)
        found = (self.fleet.apps.get(name) for name in sorted(apps))
        return {app.name: list(app.log_drains) for app in found
                if app is not None and app.log_drains}

    def drains_changed(self) -> None:
        """An app's drains changed: every host whose map that changes is told."""
        for session in self.sessions.values():
            if session.drains_supported:
                session.drains_wanted.set()

    async def drains_loop(self, session: Session) -> None:
        await _resend_loop(session, "drains.sync", session.drains_wanted,
                           lambda: session.drains_supported, self.send_drains)

    async def send_drains(self, session: Session) -> None:
        """`drains.sync` to the host, unless it has this map already (or does not know the
        method). Errors other than `unknown_method` are the caller's."""
        if not session.drains_supported:
            return
        async with session.drains_lock:
            wanted = self.drains_for(session)
            if wanted == session.drains_sent:
                return
            known, _ = await _request_if_known(
                session, "drains.sync", {"apps": wanted}, REQUEST_TIMEOUT_S,
                "app log drains", "its apps' lines reach only the drains of their specs")
            if not known:
                session.drains_supported = False
                return
            session.drains_sent = wanted

    # -- private spaces -----------------------------------------------------------------
    def host_networks(self) -> list[model.IPNetwork]:
        return [n for h in self.fleet.hosts.values() if h.network is not None
                for n in h.network.networks]

    def allocate(self, spaces_wanted: Iterable[str],
                 slices_wanted: Iterable[tuple[str, str]]) -> spaces.Allocation:
        allocation = spaces.allocate(self.settings.addressing, spaces_wanted, slices_wanted,
                                     self.fleet.spaces, self.fleet.slices, self.host_networks())
        for name, error in allocation.errors.items():
            if self._allocation_errors.get(name) != error:
                log.error("space %s: no addresses: %s (its dynos run without a private "
                          "network across hosts)", name, error)
            self._allocation_errors[name] = error
        return allocation

    def allocation_ops(self, allocation: spaces.Allocation) -> list[Op]:
        return [*(Put(self.keys.space(s.space).encode(), s.to_json())
                  for s in allocation.spaces),
                *(Put(self.keys.slice(s.space, s.host).encode(), s.to_json())
                  for s in allocation.slices)]

    def adopt_allocation(self, allocation: spaces.Allocation) -> None:
        """The allocation written: the leader's copy follows."""
        for space in allocation.spaces:
            self.fleet.spaces[space.space] = space
            self._allocation_errors.pop(space.space, None)
            log.info("space %s: subnet %s, VNI %d", space.space, space.subnet, space.vni)
        for cut in allocation.slices:
            self.fleet.slices.setdefault(cut.space, {})[cut.host] = cut

    def spaces_changed(self, space: str | None = None) -> None:
        """Something the space views are made of changed (of one space, or of the fleet:
        hosts): make them again, and tell the hosts whose view it changed (debounced)."""
        self._space_view = None
        if space is None:
            self._spaces_all = True
        else:
            self._spaces_touched.add(space)
        self.spaces_dirty.set()

    def space_view(self) -> spaces.FleetView:
        if self._space_view is None:
            began = time.monotonic()
            statuses = {**self.last_dynos,
                        **{h: s.dynos for h, s in self.sessions.items()}}
            self._space_view = spaces.fleet_view(
                self.settings.addressing, self.fleet.hosts, self.fleet.all_placements(),
                statuses, self.fleet.spaces, self.fleet.slices)
            self._space_view_s = time.monotonic() - began
        return self._space_view

    async def _push_spaces(self) -> None:
        while True:
            await self.spaces_dirty.wait()
            await asyncio.sleep(max(SPACES_DEBOUNCE_S, self._space_view_s))
            self.spaces_dirty.clear()
            everyone, touched = self._spaces_all, self._spaces_touched
            self._spaces_all, self._spaces_touched = False, set()
            old, new = self._pushed_view, self.space_view()
            self._pushed_view = new
            if everyone or old is None:
                hosts: Iterable[str] = list(self.sessions)
            else:
                # Only hosts that run (or ran) a changed space: a dyno's state seldom
                # changes the view of the whole fleet.
                hosts = {h for view in (old, new) for h, names in view.on_host.items()
                         if not names.isdisjoint(touched)}
            for host_id in hosts:
                session = self.sessions.get(host_id)
                if session is not None and session.spaces_supported:
                    session.spaces_wanted.set()

    async def spaces_loop(self, session: Session) -> None:
        """Tell one host its spaces whenever its view changed (the latest only)."""
        await _resend_loop(session, "spaces.sync", session.spaces_wanted,
                           lambda: session.spaces_supported, self.send_spaces)

    async def send_spaces(self, session: Session, keep: Iterable[str] = ()) -> None:
        """`spaces.sync` to the host, unless it has this view already (or does not know
        the method). Errors other than `unknown_method` are the caller's."""
        if not session.spaces_supported:
            return
        # A space stays while the host still runs a dyno of it, whatever the plan says: it
        # leaves once the dynos.sync that removes them has stopped them.
        keep = {*keep, *(str(d.get("app")) for d in session.dynos.values()
                         if d.get("state") in LIVE_STATES)}
        async with session.spaces_lock:
            view = self.space_view().for_host(session.host_id, keep)
            if view == session.spaces_sent:
                return
            generation = max(session.spaces_generation + 1, time.time_ns() // 1000)
            session.spaces_generation = generation
            known, result = await _request_if_known(
                session, "spaces.sync",
                {"generation": generation, **_spaces_change(session.spaces_sent, view)},
                SPACES_TIMEOUT_S,
                "private spaces", "its dynos get no private network across hosts")
            if not known:
                session.spaces_supported = False
                return
            session.spaces_sent = view
            failed = result.get("failed") if isinstance(result, dict) else None
            if failed:
                log.warning("host %s: spaces.sync failures: %s", session.host_id,
                            failed[:5])

    # -- hosts --------------------------------------------------------------------------
    async def set_host_state(self, host_id: str, state: model.HostState) -> None:
        host = self.fleet.hosts.get(host_id)
        if host is None or host.state is state:
            return
        updated = replace(host, state=state, last_seen=now_text())
        await self.commit([Put(self.keys.host(host_id).encode(), updated.to_json())])
        self.fleet.hosts[host_id] = updated
        if state is model.HostState.LOST:
            self.last_dynos.pop(host_id, None)
        log.warning("host %s (%s): %s -> %s", host_id, host.host, host.state, state)
        self.dirty.set()
        self.spaces_changed()

    async def hello(self, session: Session, params: dict[str, Any]) -> None:
        old = self.fleet.hosts.get(session.host_id)
        state = old.state if old is not None and old.state is model.HostState.DRAINING \
            else model.HostState.READY
        host = model.Host.from_hello(params, state, now_text())
        timer = self.lost_timers.pop(host.id, None)
        if timer is not None:
            timer.cancel()
        assert self.alive_keeper is not None
        await self.commit([Put(self.keys.host(host.id).encode(), host.to_json()),
                           Put(self.keys.alive(host.id).encode(), host.boot_id.encode(),
                               self.alive_keeper.lease.id)])
        self.fleet.hosts[host.id] = host
        generation = params.get("generation")
        session.synced_generation = generation if isinstance(generation, int) else None
        for status in params.get("dynos") or []:
            if isinstance(status, dict) and isinstance(status.get("id"), str):
                session.dynos[status["id"]] = status
        if old is None or old.state is not host.state or old.capacity != host.capacity:
            self.dirty.set()
        self.last_dynos.pop(host.id, None)
        self.spaces_changed()
        session.sync_wanted.set()

    def event(self, session: Session, method: str, params: dict[str, Any]) -> None:
        if method == "dyno.state" and isinstance(params.get("id"), str):
            dyno_id = params["id"]
            status = session.dynos.setdefault(dyno_id, {"id": dyno_id})
            before = (status.get("state"), status.get("ip"))
            status.update({k: params.get(k) for k in ("app", "name", "state", "reason",
                                                       "exit_status")})
            if "ip" in params:  # agents older than private spaces send none
                status["ip"] = params["ip"]
            status["since"] = params.get("at")
            self.states_changed.set()
            if (status.get("state"), status.get("ip")) != before:
                app = status.get("app")
                self.spaces_changed(app if isinstance(app, str) else None)
            if params.get("state") == "complete" and dyno_id in self.fleet.commands:
                asyncio.get_running_loop().call_later(
                    ONE_OFF_KEEP_S, lambda: asyncio.ensure_future(self.forget_one_off(dyno_id)))
        elif method == "log.line":
            for queue in self.log_waiters.get(str(params.get("app")), []):
                with contextlib.suppress(asyncio.QueueFull):
                    queue.put_nowait(params)

    async def forget_one_off(self, dyno_id: str) -> None:
        async with self.lock:
            for placed in self.fleet.placements.values():
                if dyno_id in placed:
                    p = placed[dyno_id]
                    await self.commit([Delete(self.run_key(p.app, p.id))])
                    self.fleet.commands.pop(dyno_id, None)
                    await self._apply([p], [])
                    return

    # -- one-shot dynos -----------------------------------------------------------------
    def run_key(self, app: str, dyno_id: str) -> bytes:
        return self.keys.run(app, dyno_id).encode()

    def phase_key(self, app: str, version: int) -> bytes:
        return self.keys.phase(app, version).encode()

    def room_for(self, memory: int) -> str:
        """The connected ready host with the most memory left, if it has `memory` left."""
        best: tuple[int, str] | None = None
        for host in self.fleet.hosts.values():
            if host.state is not model.HostState.READY or host.id not in self.sessions:
                continue
            free = self._free_memory(host)
            if free >= memory and (best is None or free > best[0]):
                best = (free, host.id)
        if best is None:
            raise ApiError(409, "no_capacity", "no connected host has room for that dyno")
        return best[1]

    async def start_one_shot(self, release: model.Release, kind: str, command: str,
                             size: str) -> model.Placement:
        """A `run.N` or `release.N` dyno of `release` on a host with room. Holds the lock."""
        app = release.app
        host = self.room_for(DEFAULT_SIZES[size].memory_quota_bytes)
        used = {_number(p.name) for p in self.fleet.all_placements()
                if p.app == app and p.type == kind}
        name = f"{kind}.{next(n for n in itertools.count(1) if n not in used)}"
        dyno_id = placement.dyno_id(app, name, release.version, self.revision)
        p = model.Placement(dyno_id, app, name, release.version, size, host, self.revision)
        record = {"id": dyno_id, "app": app, "command": command}
        await self.commit([Put(self.run_key(app, dyno_id), json.dumps(record).encode())])
        self.fleet.commands[dyno_id] = record
        await self._apply([], [p])
        return p

    async def wait_ended(self, p: model.Placement, timeout_s: float) -> dict[str, Any]:
        """The status of a one-shot dyno once it ended (`complete` or `crashed`)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not self.stopped.is_set():
            status = self.status_of(p.id, p.host)
            if status.get("state") in ("complete", "crashed", "down"):
                return status
            await asyncio.sleep(0.2)
        return {"state": "timeout"}

    async def _record_phase(self, release: model.Release, status: str,
                            **details: Any) -> None:
        entry = {"app": release.app, "version": release.version, "status": status,
                 "release": release.to_dict(), "at": now_text(), **details}
        ops: list[Op] = [Put(self.phase_key(release.app, release.version),
                             json.dumps(entry).encode())]
        if status == "succeeded":
            ops.append(Put(self.keys.release(release.app, release.version).encode(),
                           release.to_json()))
        await self.commit(ops)
        self.fleet.phases.setdefault(release.app, {})[release.version] = entry

    async def release_phase(self, release: model.Release) -> None:
        """Run the release's `release` command once; only if it exits 0 does the release
        become current and roll out (Heroku's release phase)."""
        app = release.app
        try:
            async with self.lock:
                p = await self.start_one_shot(release, "release",
                                              release.process_types["release"], DEFAULT_SIZE)
            status = await self.wait_ended(p, RELEASE_PHASE_TIMEOUT_S)
            ok = status.get("state") == "complete" and status.get("exit_status") == 0
            async with self.lock:
                await self._record_phase(release, "succeeded" if ok else "failed",
                                         dyno=p.name, exit_status=status.get("exit_status"),
                                         state=status.get("state"))
                self.fleet.pending.pop(app, None)
                if ok:
                    self.fleet.releases.setdefault(app, {})[release.version] = release
            await self.forget_one_off(p.id)
        except ApiError as exc:
            async with self.lock:
                await self._record_phase(release, "failed", error=exc.message)
                self.fleet.pending.pop(app, None)
            return
        if ok:
            log.info("%s v%d: release phase succeeded, rolling out", app, release.version)
            await self.roll(app)
        else:
            log.warning("%s v%d: release phase failed (%s): not deployed", app,
                        release.version, status)

    async def new_release(self, release: model.Release) -> dict[str, Any]:
        """Store a new release and deploy it: through its release phase when it has one.
        Holds the lock."""
        app = release.app
        running = self.rollouts.get(app)
        if running is not None and not running.done():
            running.cancel()
        if "release" in release.process_types:
            await self._record_phase(release, "pending")
            self.fleet.pending[app] = release
            self.rollouts[app] = asyncio.create_task(self.release_phase(release),
                                                     name=f"release-{app}")
            return {"version": release.version, "status": "pending"}
        await self.commit([Put(self.keys.release(app, release.version).encode(),
                               release.to_json())])
        self.fleet.releases.setdefault(app, {})[release.version] = release
        self.rollouts[app] = asyncio.create_task(self.roll(app), name=f"rollout-{app}")
        self.dirty.set()
        return {"version": release.version, "status": "succeeded"}

    def latest_version(self, app: str) -> int:
        known = [*self.fleet.releases.get(app, {}), *self.fleet.phases.get(app, {})]
        return max(known, default=0)

    # -- releases -----------------------------------------------------------------------
    async def roll(self, app: str) -> None:
        """Move `app`'s formation dynos to its current release, host by host: each step's new
        dynos must be up before the next step starts."""
        release = self.fleet.current_release(app)
        if release is None:
            return
        async with self.lock:
            steps = placement.plan_rollout(self.fleet.all_placements(), app, release.version,
                                           self.revision)
        for step in steps:
            async with self.lock:
                current = self.fleet.placements.get(step.host, {})
                pairs = [(old, new) for old, new in step.replacements if old.id in current]
                if not pairs:
                    continue
                # Web dynos preboot on another host; the rest are replaced where they run.
                booted = [(old, moved) for old, new in pairs if old.type == "web"
                          and (moved := self._preboot_target(new, old.host)) is not None]
                booted_ids = {old.id for old, _ in booted}
                in_place = [(old, new) for old, new in pairs if old.id not in booted_ids]
                for _, new in booted:
                    self.prebooting[new.id] = new
                await self._apply([old for old, _ in in_place],
                                  [new for _, new in [*in_place, *booted]])
            await self._wait_up([new for _, new in [*in_place, *booted]], ROLLOUT_STEP_S)
            async with self.lock:
                up = {new.id for _, new in booted if self._is_up(new)}
                for _, new in booted:
                    self.prebooting.pop(new.id, None)
                # A new web dyno up: its old one goes. Not up in time: it goes, and the old
                # one stays (the plan will not see two of one name).
                await self._apply([old if new.id in up else new for old, new in booted], [])
            if len(up) < len(booted):
                log.warning("%s v%d: %d web dynos did not boot; rollout stopped", app,
                            release.version, len(booted) - len(up))
                return
        self.dirty.set()

    def _preboot_target(self, new: model.Placement, avoid: str) -> model.Placement | None:
        """`new` on a ready host other than `avoid` with room, holding the fewest of the
        app's web dynos; None when there is none."""
        memory = _memory(new.size)
        best: tuple[int, int, str] | None = None
        for host in self.fleet.hosts.values():
            if host.id == avoid or host.state is not model.HostState.READY \
                    or host.id not in self.sessions:
                continue
            free = self._free_memory(host)
            if free < memory:
                continue
            webs = sum(1 for p in self._on(host.id) if p.app == new.app and p.type == "web")
            if best is None or (webs, -free, host.id) < best:
                best = (webs, -free, host.id)
        if best is None:
            return None
        return model.Placement(new.id, new.app, new.name, new.release, new.size, best[2],
                               new.generation)

    def _on(self, host_id: str) -> list[model.Placement]:
        """The host's placements, and the new dynos prebooting there."""
        return [*self.fleet.placements.get(host_id, {}).values(),
                *(p for p in self.prebooting.values() if p.host == host_id)]

    def _free_memory(self, host: model.Host) -> int:
        return host.capacity.memory_bytes - sum(_memory(p.size) for p in self._on(host.id))

    def _is_up(self, p: model.Placement) -> bool:
        return self.status_of(p.id, p.host).get("state") == "up"

    async def _wait_up(self, placements: list[model.Placement], timeout_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while not all(self._is_up(p) for p in placements):
                    self.states_changed.clear()
                    await self.states_changed.wait()

    # -- views --------------------------------------------------------------------------
    def status_of(self, dyno_id: str, host: str) -> dict[str, Any]:
        session = self.sessions.get(host)
        return session.dynos.get(dyno_id, {}) if session is not None else {}

    def dynos_of(self, app: str) -> list[dict[str, Any]]:
        out = []
        for host_id, placed in self.fleet.placements.items():
            host = self.fleet.hosts.get(host_id)
            for p in placed.values():
                if p.app != app:
                    continue
                status = self.status_of(p.id, host_id)
                one_off = self.fleet.commands.get(p.id)
                out.append({"id": p.id, "name": p.name, "type": p.type,
                            "state": status.get("state", "pending"),
                            "host": host.host if host else host_id, "host_id": host_id,
                            "ip": status.get("ip"), "since": status.get("since"),
                            "release": p.release, "size": p.size,
                            "command": one_off["command"] if one_off else
                            self._command(app, p),
                            "exit_status": status.get("exit_status")})
        return sorted(out, key=lambda d: (d["type"], _number(d["name"])))

    def _command(self, app: str, p: model.Placement) -> str | None:
        release = self.fleet.release(app, p.release)
        return release.process_types.get(p.type) if release else None


async def _resend_loop(session: Session, method: str, wanted: asyncio.Event,
                       supported: Callable[[], bool],
                       send: Callable[[Session], Awaitable[None]]) -> None:
    """While the host knows `method`: `send` it each time `wanted` is set (the latest state
    only), again a second later when it failed."""
    while supported():
        await wanted.wait()
        wanted.clear()
        try:
            await send(session)
        except (ApiError, TimeoutError, ConnectionError) as exc:
            log.warning("host %s: %s failed (retrying): %s", session.host_id, method, exc)
            await asyncio.sleep(1)
            wanted.set()


async def _request_if_known(session: Session, method: str, params: dict[str, Any],
                            timeout_s: float, feature: str, without: str) -> tuple[bool, Any]:
    """(True, the answer) to `method`; (False, None) if the host's agent does not know it
    (older than `feature`: logged, with what the host goes `without`). Other errors raise."""
    try:
        return True, await session.request(method, params, timeout_s)
    except ApiError as exc:
        if exc.code != "unknown_method":
            raise
        log.warning("host %s: its agent does not know %s (older than %s): %s",
                    session.host_id, method, feature, without)
        return False, None


def _spaces_change(sent: dict[str, Any] | None, view: dict[str, Any]) -> dict[str, Any]:
    """What `spaces.sync` carries: the whole view on a connection's first, then only the
    spaces whose entry changed (`partial`) and the names of those gone (`removed`), so that a
    dyno's state change costs its own space's members, not every space of the host."""
    if sent is None:
        return view
    before = {entry["space"]: entry for entry in sent["spaces"]}
    after = {entry["space"]: entry for entry in view["spaces"]}
    return {**view, "partial": True,
            "spaces": [entry for name, entry in after.items() if before.get(name) != entry],
            "removed": sorted(set(before) - set(after))}


def _memory(size: str) -> int:
    known = DEFAULT_SIZES.get(size)
    return known.memory_quota_bytes if known is not None else 0


def _number(name: str) -> int:
    digits = name.partition(".")[2]
    return int(digits) if digits.isdigit() else 0


# ---------------------------------------------------------------------------- HTTP server

class Coordinator:
    """One replica: the HTTP server, the campaign, and the leader while it leads."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.keys = keyspace.Keys(settings.prefix)
        self.client = EtcdClient(list(settings.etcd))
        self.election = Election(self.client, settings.prefix.encode(), settings.node_id,
                                 ttl_s=settings.leader_ttl_s)
        self.leader: Leader | None = None
        self.app = web.Application(client_max_size=MAX_BODY_BYTES,
                                   middlewares=[self._errors])
        self._routes()

    # -- lifetime -----------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        runner = web.AppRunner(self.app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.settings.listen_host, self.settings.listen_port,
                           reuse_address=True, ssl_context=self.settings.ssl_context())
        await site.start()
        log.info("dynocoord %s listening on %s:%d", self.settings.node_id,
                 self.settings.listen_host, self.settings.listen_port)
        campaign = asyncio.create_task(self._lead_forever(), name="campaign")
        try:
            await stop.wait()
        finally:
            campaign.cancel()
            await asyncio.gather(campaign, return_exceptions=True)
            with contextlib.suppress(Exception):
                await self.election.resign()
            await runner.cleanup()
            await self.client.close()

    async def _lead_forever(self) -> None:
        while True:
            term = await self.election.campaign()
            log.info("%s leads (term at revision %d)", self.settings.node_id, term.revision)
            leader = Leader(self.client, self.keys, term, self.settings)
            self.leader = leader
            try:
                await leader.run()
            except (EtcdError, NotLeader) as exc:
                log.warning("leadership ended: %s", exc)
            finally:
                self.leader = None
                if not term.lost.is_set():
                    with contextlib.suppress(Exception):
                        await self.election.resign()
            log.warning("%s no longer leads: %s", self.settings.node_id, term.reason)

    def _lead(self) -> Leader:
        leader = self.leader
        if leader is None or not leader.loaded.is_set() or leader.stopped.is_set():
            raise ApiError(503, "not_leader", f"{self.settings.node_id} does not lead; try "
                                              "another replica")
        return leader

    # -- HTTP plumbing ------------------------------------------------------------------
    @web.middleware
    async def _errors(self, request: web.Request,
                      handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                      ) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as exc:
            return exc.response()
        except model.Invalid as exc:
            return ApiError(422, "invalid", str(exc), field=exc.field).response()
        except NotLeader:
            return ApiError(503, "not_leader", "leadership moved; try again").response()
        except EtcdError as exc:
            return ApiError(503, "store_unavailable", f"etcd: {exc}").response()
        except web.HTTPException:
            raise
        except Exception:
            log.exception("%s %s failed", request.method, request.path)
            return ApiError(500, "internal", "internal error (see the coordinator's log)"
                            ).response()

    def _auth(self, request: web.Request, token: str) -> None:
        given = request.headers.get("Authorization", "")
        if not token or not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise ApiError(401, "unauthorized", "bad or missing bearer token")

    async def _body(self, request: web.Request) -> Any:
        try:
            return await request.json()
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "bad_request", "the body is not JSON") from None

    def _routes(self) -> None:
        r = self.app.router
        r.add_get(AGENT_PATH, self.agent_connect)
        r.add_get("/v1/hosts", self.api(self.hosts))
        r.add_post("/v1/hosts/{host}/drain", self.api(self.drain))
        r.add_get("/v1/apps", self.api(self.apps))
        r.add_post("/v1/apps", self.api(self.app_create))
        r.add_get("/v1/apps/{app}", self.api(self.app_info))
        r.add_delete("/v1/apps/{app}", self.api(self.app_delete))
        r.add_get("/v1/apps/{app}/releases", self.api(self.releases))
        r.add_post("/v1/apps/{app}/releases", self.api(self.release_create))
        r.add_get("/v1/apps/{app}/config", self.api(self.config))
        r.add_patch("/v1/apps/{app}/config", self.api(self.config_patch))
        r.add_get("/v1/apps/{app}/formation", self.api(self.formation))
        r.add_patch("/v1/apps/{app}/formation", self.api(self.formation_patch))
        r.add_get("/v1/apps/{app}/dynos", self.api(self.dynos))
        r.add_post("/v1/apps/{app}/dynos", self.api(self.one_off))
        r.add_get("/v1/apps/{app}/logs", self.logs)
        r.add_get("/v1/apps/{app}/log-drains", self.api(self.log_drains))
        r.add_post("/v1/apps/{app}/log-drains", self.api(self.log_drain_add))
        r.add_delete("/v1/apps/{app}/log-drains", self.api(self.log_drain_remove))
        r.add_get("/v1/spaces", self.api(self.space_list))
        r.add_get("/v1/leader", self.leader_info)

    def api(self, handler: Callable[[web.Request, Leader], Awaitable[Any]]
            ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def wrapped(request: web.Request) -> web.StreamResponse:
            self._auth(request, self.settings.api_token)
            leader = self._lead()
            result = await handler(request, leader)
            if isinstance(result, web.StreamResponse):
                return result
            status = 201 if request.method == "POST" and request.path.count("/") in (2, 4) \
                and not request.path.endswith("/drain") else 200
            return web.json_response(result, status=status)
        return wrapped

    async def leader_info(self, request: web.Request) -> web.Response:
        self._auth(request, self.settings.api_token)
        leader = await self.election.leader()
        return web.json_response({"node": self.settings.node_id,
                                  "leading": self.leader is not None,
                                  "leader": leader.decode() if leader else None})

    # -- the platform API ---------------------------------------------------------------
    def _app(self, leader: Leader, request: web.Request) -> model.App:
        name = request.match_info["app"]
        app = leader.fleet.apps.get(name)
        if app is None:
            raise ApiError(404, "not_found", f"no app {name!r}")
        return app

    async def hosts(self, request: web.Request, leader: Leader) -> Any:
        out = []
        for host in sorted(leader.fleet.hosts.values(), key=lambda h: h.host):
            out.append({"id": host.id, "host": host.host, "state": str(host.state),
                        "dynos": len(leader.fleet.placements.get(host.id, {})),
                        "capacity": host.capacity.to_dict(), "labels": dict(host.labels),
                        "connected": host.id in leader.sessions, "version": host.version,
                        "last_seen": host.last_seen})
        return out

    async def drain(self, request: web.Request, leader: Leader) -> Any:
        host_id = request.match_info["host"]
        if host_id not in leader.fleet.hosts:
            raise ApiError(404, "not_found", f"no host {host_id!r}")
        await leader.set_host_state(host_id, model.HostState.DRAINING)
        return {"id": host_id, "state": "draining"}

    async def apps(self, request: web.Request, leader: Leader) -> Any:
        return [self._app_view(leader, a) for a in sorted(leader.fleet.apps)]

    def _app_view(self, leader: Leader, name: str) -> dict[str, Any]:
        app = leader.fleet.apps[name]
        release = leader.fleet.current_release(name)
        return {"name": app.name, "created": app.created,
                "release": release.version if release else None,
                "stack": release.stack if release else None,
                "formation": [e.to_dict() for e in leader.fleet.formation.get(name, {})
                              .values()],
                "space": self._space_view(leader, name)}

    def _space_view(self, leader: Leader, name: str) -> dict[str, Any] | None:
        space = leader.fleet.spaces.get(name)
        if space is None:
            return None
        return {"name": space.space, "subnet": str(space.subnet), "vni": space.vni,
                "slices": {host: str(s.slice) for host, s in
                           sorted(leader.fleet.slices.get(name, {}).items())}}

    async def space_list(self, request: web.Request, leader: Leader) -> Any:
        """`GET /v1/spaces`: every space's subnet, VNI and hosts' slices."""
        return [self._space_view(leader, name) for name in sorted(leader.fleet.spaces)]

    async def app_create(self, request: web.Request, leader: Leader) -> Any:
        app = model.parse_app_create(await self._body(request), now_text())
        async with leader.lock:
            if app.name in leader.fleet.apps:
                raise ApiError(409, "conflict", f"app {app.name!r} exists")
            allocation = leader.allocate([app.name], ())
            await leader.commit([Put(self.keys.app(app.name).encode(), app.to_json()),
                                 *leader.allocation_ops(allocation)])
            leader.fleet.apps[app.name] = app
            leader.adopt_allocation(allocation)
        return self._app_view(leader, app.name)

    async def app_info(self, request: web.Request, leader: Leader) -> Any:
        return self._app_view(leader, self._app(leader, request).name)

    async def app_delete(self, request: web.Request, leader: Leader) -> Any:
        app = self._app(leader, request)
        async with leader.lock:
            ops: list[Op] = [Delete(self.keys.app(app.name).encode()),
                             Delete(self.keys.releases(app.name).encode(), prefix=True),
                             Delete(self.keys.formation(app.name).encode(), prefix=True),
                             Delete(self.keys.runs(app.name).encode(),
                                    prefix=True),
                             Delete(self.keys.phases(app.name).encode(),
                                    prefix=True),
                             # Its space goes with it (a space is an app for now).
                             Delete(self.keys.space(app.name).encode()),
                             Delete(self.keys.slices(app.name).encode(), prefix=True)]
            await leader.commit(ops)
            mine = [p for p in leader.fleet.all_placements() if p.app == app.name]
            await leader._apply(mine, [])
            leader.fleet.apps.pop(app.name, None)
            leader.fleet.formation.pop(app.name, None)
            leader.fleet.releases.pop(app.name, None)
            leader.fleet.phases.pop(app.name, None)
            leader.fleet.pending.pop(app.name, None)
            leader.fleet.spaces.pop(app.name, None)
            leader.fleet.slices.pop(app.name, None)
            leader.spaces_changed()
        return {"name": app.name, "deleted": True}

    async def log_drains(self, request: web.Request, leader: Leader) -> Any:
        """`GET /v1/apps/{app}/log-drains`: `[{"url"}]`, in the order they were added."""
        return [{"url": url} for url in self._app(leader, request).log_drains]

    async def _set_drains(self, leader: Leader, app: model.App,
                          drains: tuple[str, ...]) -> None:
        updated = replace(app, log_drains=drains)
        await leader.commit([Put(self.keys.app(app.name).encode(), updated.to_json())])
        leader.fleet.apps[app.name] = updated
        leader.drains_changed()

    async def log_drain_add(self, request: web.Request, leader: Leader) -> Any:
        """`POST /v1/apps/{app}/log-drains` `{"url"}`: 201; 409 if the app has it, 422 if the
        URL is not a drain or the app has MAX_DRAINS already."""
        url = model.parse_drain_add(await self._body(request))
        async with leader.lock:
            app = self._app(leader, request)
            if url in app.log_drains:
                raise ApiError(409, "conflict", f"app {app.name!r} has this drain already")
            if len(app.log_drains) >= MAX_DRAINS:
                raise ApiError(422, "invalid", f"app {app.name!r} has {MAX_DRAINS} drains "
                               "already, the most an app may have", field="url")
            await self._set_drains(leader, app, (*app.log_drains, url))
        return {"url": url}

    async def log_drain_remove(self, request: web.Request, leader: Leader) -> Any:
        """`DELETE /v1/apps/{app}/log-drains?url=URL`: 200, or 404 if the app has no such
        drain."""
        url = request.query.get("url")
        if not url:
            raise ApiError(400, "bad_request", "the drain to remove is ?url=URL "
                                               "(URL-encoded)")
        async with leader.lock:
            app = self._app(leader, request)
            if url not in app.log_drains:
                raise ApiError(404, "not_found", f"app {app.name!r} has no such drain")
            await self._set_drains(leader, app, tuple(u for u in app.log_drains if u != url))
        return {"url": url, "removed": True}

    async def releases(self, request: web.Request, leader: Leader) -> Any:
        app = self._app(leader, request)
        versions = dict(leader.fleet.releases.get(app.name, {}))
        phases = leader.fleet.phases.get(app.name, {})
        for version, phase in phases.items():
            versions.setdefault(version, model.Release.from_dict(phase["release"]))
        out = []
        for r in sorted(versions.values(), key=lambda r: r.version):
            outcome = phases.get(r.version)
            out.append({"version": r.version, "slug": r.slug.to_dict(), "stack": r.stack,
                        "process_types": dict(r.process_types), "created": r.created,
                        "status": outcome["status"] if outcome else "succeeded",
                        "release_phase": {k: outcome.get(k) for k in
                                          ("dyno", "exit_status", "state", "error")}
                        if outcome else None})
        return out

    async def release_create(self, request: web.Request, leader: Leader) -> Any:
        app = self._app(leader, request)
        body = await self._body(request)
        async with leader.lock:
            version = leader.latest_version(app.name) + 1
            release = model.parse_release_create(body, app.name, version, now_text())
            return await leader.new_release(release)

    async def config(self, request: web.Request, leader: Leader) -> Any:
        release = leader.fleet.current_release(self._app(leader, request).name)
        return dict(release.env) if release else {}

    async def config_patch(self, request: web.Request, leader: Leader) -> Any:
        app = self._app(leader, request)
        body = await self._body(request)
        async with leader.lock:
            current = leader.fleet.current_release(app.name)
            if current is None:
                raise ApiError(409, "conflict", f"app {app.name!r} has no release yet")
            env = model.apply_config_patch(current.env, body)
            release = model.Release(app.name, leader.latest_version(app.name) + 1,
                                    current.slug, current.stack, current.process_types, env,
                                    now_text())
            return await leader.new_release(release)

    async def formation(self, request: web.Request, leader: Leader) -> Any:
        app = self._app(leader, request)
        return [e.to_dict() for e in leader.fleet.formation.get(app.name, {}).values()]

    async def formation_patch(self, request: web.Request, leader: Leader) -> Any:
        app = self._app(leader, request)
        body = await self._body(request)
        async with leader.lock:
            current = leader.fleet.formation.get(app.name, {})
            release = leader.fleet.current_release(app.name)
            entries = model.parse_formation_patch(
                app.name, body, current, release.process_types if release else None)
            await leader.commit([Put(self.keys.formation_entry(app.name, e.type).encode(),
                                     e.to_json()) for e in entries])
            for entry in entries:
                leader.fleet.formation.setdefault(app.name, {})[entry.type] = entry
        leader.dirty.set()
        return [e.to_dict() for e in leader.fleet.formation[app.name].values()]

    async def dynos(self, request: web.Request, leader: Leader) -> Any:
        return leader.dynos_of(self._app(leader, request).name)

    async def one_off(self, request: web.Request, leader: Leader) -> Any:
        app = self._app(leader, request)
        body = await self._body(request)
        if not isinstance(body, dict) or set(body) - {"command", "size"} or \
                not isinstance(body.get("command"), str) or not body["command"].strip():
            raise ApiError(422, "invalid", 'the body is {"command": str, "size"?: str}',
                           field="command")
        size = body.get("size", DEFAULT_SIZE)
        if not isinstance(size, str) or size.lower() not in DEFAULT_SIZES:
            raise ApiError(422, "invalid", f"unknown size {size!r}", field="size")
        size = size.lower()
        async with leader.lock:
            release = leader.fleet.current_release(app.name)
            if release is None:
                raise ApiError(409, "conflict", f"app {app.name!r} has no release yet")
            p = await leader.start_one_shot(release, "run", body["command"], size)
        return {"id": p.id, "name": p.name, "state": "starting", "size": size,
                "host": leader.fleet.hosts[p.host].host}

    async def logs(self, request: web.Request) -> web.StreamResponse:
        """Lines from every host with a dyno of the app, merged by time (`logs.tail`), then,
        with follow=1, new lines as they come (`logs.follow`)."""
        self._auth(request, self.settings.api_token)
        leader = self._lead()
        app = self._app(leader, request)
        try:
            tail = int(request.query.get("tail", "100"))
        except ValueError:
            raise ApiError(400, "bad_request", "tail must be an integer") from None
        if not 1 <= tail <= 10_000:
            raise ApiError(400, "bad_request", "tail must be within 1…10000")
        dyno = request.query.get("dyno")
        follow = request.query.get("follow") in ("1", "true")
        params: dict[str, Any] = {"app": app.name, "tail": tail}
        if dyno:
            params["dyno"] = dyno
        hosts = {p.host for p in leader.fleet.all_placements() if p.app == app.name}
        sessions = [leader.sessions[h] for h in hosts if h in leader.sessions]
        answers = await asyncio.gather(*(s.request("logs.tail", params, 10) for s in sessions),
                                       return_exceptions=True)
        lines = [line for answer in answers if isinstance(answer, list) for line in answer
                 if isinstance(line, dict)]
        lines.sort(key=lambda line: str(line.get("at", "")))
        response = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
        await response.prepare(request)
        for line in lines[-tail:]:
            await response.write(_log_text(line).encode())
        if not follow:
            await response.write_eof()
            return response
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=10_000)
        leader.log_waiters.setdefault(app.name, []).append(queue)
        subscriptions = []
        try:
            for session in sessions:
                with contextlib.suppress(ApiError, TimeoutError, ConnectionError):
                    subscriptions.append((session, await session.request(
                        "logs.follow", {k: v for k, v in params.items() if k != "tail"}, 10))
                    )
            while not leader.stopped.is_set():
                line = await queue.get()
                if dyno and dyno not in (line.get("dyno"), line.get("id")):
                    continue
                await response.write(_log_text(line).encode())
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            leader.log_waiters.get(app.name, []).remove(queue)
            for session, answer in subscriptions:
                if isinstance(answer, dict) and "subscription" in answer:
                    with contextlib.suppress(Exception):
                        await session.request("logs.unfollow",
                                              {"subscription": answer["subscription"]}, 5)
        return response

    # -- agents -------------------------------------------------------------------------
    async def agent_connect(self, request: web.Request) -> web.StreamResponse:
        self._auth(request, self.settings.agent_token)
        if self.settings.tls_client_ca is not None and request.transport is not None \
                and not request.transport.get_extra_info("peercert"):
            raise ApiError(403, "forbidden", "agents must present a client certificate")
        leader = self._lead()
        # Pings and pongs are ours (autoping off): every frame from the agent, pongs
        # included, is news that the host lives, and silence past half the host TTL ends
        # the connection (aiohttp's own heartbeat gives up after half a ping interval).
        ws = web.WebSocketResponse(protocols=(SUBPROTOCOL,), autoping=False,
                                   max_msg_size=64 << 20)
        await ws.prepare(request)
        session: Session | None = None
        tasks: list[asyncio.Task[Any]] = []
        try:
            async with asyncio.timeout(HELLO_TIMEOUT_S):
                message = await ws.receive()
            frame = decode(message.data) if message.type is WSMsgType.BINARY else None
            if not isinstance(frame, Request) or frame.method != "hello":
                await ws.close(code=aiohttp.WSCloseCode.POLICY_VIOLATION,
                               message=b"hello must come first")
                return ws
            try:
                host_id = model.Host.from_hello(frame.params, model.HostState.READY,
                                                now_text()).id
            except model.Invalid as exc:
                await ws.send_bytes(encode(Response(frame.id, error={
                    "code": "bad_request", "message": str(exc)})))
                await ws.close()
                return ws
            session = Session(host_id, ws)
            session.transport = request.transport
            previous = leader.sessions.get(host_id)
            leader.sessions[host_id] = session
            if previous is not None:
                await previous.ws.close(code=aiohttp.WSCloseCode.POLICY_VIOLATION,
                                        message=b"replaced by a newer connection")
            await leader.hello(session, frame.params)
            await session.send(Response(frame.id, result={"coordinator": self.settings.node_id}))
            tasks.append(asyncio.create_task(leader.sync_loop(session)))
            tasks.append(asyncio.create_task(leader.spaces_loop(session)))
            tasks.append(asyncio.create_task(leader.drains_loop(session)))
            tasks.append(asyncio.create_task(self._pinger(session)))
            log.info("host %s (%s) connected", host_id, frame.params.get("host"))
            async for message in ws:
                session.last_heard = time.monotonic()
                if message.type is WSMsgType.PING:
                    await ws.pong(message.data)
                    continue
                if message.type is not WSMsgType.BINARY:
                    continue
                try:
                    frame = decode(message.data)
                except FrameError:
                    continue
                if isinstance(frame, Response):
                    session.answered(frame)
                elif isinstance(frame, Event):
                    leader.event(session, frame.method, frame.params)
                elif isinstance(frame, Request):
                    await session.send(Response(frame.id, error={
                        "code": "unknown_method", "message": f"{frame.method!r}"}))
        except (TimeoutError, FrameError, EtcdError, NotLeader) as exc:
            log.warning("agent connection ended: %s", exc)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if session is not None:
                session.close_pending()
                if leader.sessions.get(session.host_id) is session:
                    del leader.sessions[session.host_id]
                    log.warning("host %s disconnected", session.host_id)
                    if not leader.stopped.is_set():
                        leader.session_ended(session)
            if not ws.closed:
                await ws.close()
        return ws


    async def _pinger(self, session: Session) -> None:
        """A ping every `ping_interval_s`; the connection closed once the agent has been
        silent for half the host TTL."""
        silence_s = max(self.settings.ping_interval_s * 1.5, self.settings.host_ttl_s / 2)
        while not session.ws.closed:
            if time.monotonic() - session.last_heard > silence_s:
                log.warning("host %s: silent for %.1fs, dropping the connection",
                            session.host_id, time.monotonic() - session.last_heard)
                # No close handshake with a peer that does not answer: the reader sees the
                # connection end at once.
                if session.transport is not None:
                    session.transport.abort()
                return
            with contextlib.suppress(ConnectionError, RuntimeError):
                await session.ws.ping()
            await asyncio.sleep(self.settings.ping_interval_s)


def _log_text(line: dict[str, Any]) -> str:
    """A log line map (docs/protocol.md, `logs.tail`) as its DESIGN §6 text line."""
    text = line.get("line")
    if not isinstance(text, str):
        text = f"{line.get('at', '')} {line.get('source', 'app')}[{line.get('dyno', '')}]: " \
               f"{line.get('text', '')}"
    return text.replace("\n", " ") + "\n"


# ---------------------------------------------------------------------------- command line

def _read_token(path: str | None, what: str) -> str:
    if path is None:
        return ""
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise SystemExit(f"dynocoord: cannot read the {what} token file {path}: "
                         f"{exc.strerror}") from None
    if not token:
        raise SystemExit(f"dynocoord: the {what} token file {path} is empty")
    return token


def _listen(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def _parser() -> argparse.ArgumentParser:
    """`dynocoord serve`'s options (also read by packaging/mkman.py for the manual page)."""
    parser = argparse.ArgumentParser(prog="dynocoord serve",
                                     description="Run the fleet coordinator (one replica).")
    parser.add_argument("--etcd", required=True, metavar="URL[,URL...]",
                        help="etcd endpoints (http://HOST:2379)")
    parser.add_argument("--listen", type=_listen, default=DEFAULT_LISTEN, metavar="HOST:PORT",
                        help=f"platform API and agent endpoint (default {DEFAULT_LISTEN})")
    parser.add_argument("--token-file", required=True, metavar="PATH",
                        help="the platform API's bearer token (and the agents', unless "
                             "--agent-token-file)")
    parser.add_argument("--agent-token-file", metavar="PATH",
                        help="a separate bearer token for agents")
    parser.add_argument("--prefix", default=keyspace.DEFAULT_PREFIX,
                        help=f"etcd key prefix (default {keyspace.DEFAULT_PREFIX})")
    parser.add_argument("--id", default=None,
                        help="this replica's name in the election (default HOSTNAME:PORT)")
    parser.add_argument("--host-ttl", type=int, default=HOST_TTL_S, metavar="SECONDS",
                        help=f"a host unheard of this long is lost (default {HOST_TTL_S})")
    parser.add_argument("--takeover-grace", type=float, default=TAKEOVER_GRACE_S,
                        metavar="SECONDS", help="how long a new leader waits for agents to "
                        f"reconnect before it counts them lost (default {TAKEOVER_GRACE_S:g})")
    parser.add_argument("--tls-cert", type=Path, metavar="PEM",
                        help="serve HTTPS and WSS with this certificate (chain)")
    parser.add_argument("--tls-key", type=Path, metavar="PEM",
                        help="its private key (default: in --tls-cert)")
    parser.add_argument("--tls-client-ca", type=Path, metavar="PEM",
                        help="agents must present a client certificate signed by this CA")
    parser.add_argument("--space-pool", default=spaces.DEFAULT_POOL, metavar="CIDR",
                        help="the private spaces' addresses: one subnet of it per space "
                             f"(default {spaces.DEFAULT_POOL})")
    parser.add_argument("--space-prefix", type=int, default=spaces.DEFAULT_SPACE_PREFIX,
                        metavar="N", help="each space's subnet is a /N of the pool "
                                          f"(default {spaces.DEFAULT_SPACE_PREFIX})")
    parser.add_argument("--slice-prefix", type=int, default=spaces.DEFAULT_SLICE_PREFIX,
                        metavar="N", help="each host's slice of a space is a /N, at most /"
                                          f"{spaces.SLICE_PREFIX_MAX} (default "
                                          f"{spaces.DEFAULT_SLICE_PREFIX})")
    parser.add_argument("--overlay-port", type=int, default=spaces.DEFAULT_OVERLAY_PORT,
                        metavar="N", help="the spaces' VXLAN UDP port, fleet-wide (default "
                                          f"{spaces.DEFAULT_OVERLAY_PORT})")
    parser.add_argument("--log-level", default="info",
                        choices=("debug", "info", "warning", "error"))
    return parser


def parse_args(argv: list[str]) -> Settings:
    parser = _parser()
    args = parser.parse_args(argv)
    if (args.tls_key or args.tls_client_ca) and not args.tls_cert:
        parser.error("--tls-key and --tls-client-ca need --tls-cert")
    try:
        addressing = spaces.Addressing.parse(args.space_pool, args.space_prefix,
                                             args.slice_prefix, args.overlay_port)
    except ValueError as exc:
        parser.error(f"--space-pool/--space-prefix/--slice-prefix/--overlay-port: {exc}")
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    api_token = _read_token(args.token_file, "API")
    host, port = args.listen
    return Settings(etcd=tuple(u.strip() for u in args.etcd.split(",") if u.strip()),
                    listen_host=host, listen_port=port, api_token=api_token,
                    agent_token=_read_token(args.agent_token_file, "agent") or api_token,
                    prefix=args.prefix, node_id=args.id or f"{socket.gethostname()}:{port}",
                    host_ttl_s=max(2, args.host_ttl), takeover_grace_s=args.takeover_grace,
                    tls_cert=args.tls_cert, tls_key=args.tls_key,
                    tls_client_ca=args.tls_client_ca, addressing=addressing)


async def serve(settings: Settings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await Coordinator(settings).run(stop)


def main(argv: list[str]) -> int:
    settings = parse_args(argv)
    try:
        settings.ssl_context()
    except (OSError, ssl.SSLError) as exc:
        print(f"dynocoord: cannot use the TLS files: {exc}", file=sys.stderr)
        return 2
    asyncio.run(serve(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

