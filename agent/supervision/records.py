"""Dyno records on disk: one JSON file per dyno under `<state_dir>/dynos/`, replaced atomically.

A record is what a restarted agent needs to find, adopt or clean up a dyno: its spec, where it
was placed (cgroup, namespace, address, user), its process identity and its last state.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import threading
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from agent.atomicfile import exchange_in
from agent.sizes import Size
from agent.spec import DynoSpec, parse_spec
from agent.supervision.policy import Intent
from agent.supervision.states import DynoState, Reason

log = logging.getLogger(__name__)

_ID = re.compile(r"[a-z0-9-]{1,64}")


@dataclass(frozen=True)
class Placement:
    """The host resources a dyno holds for its whole life (kept across restarts)."""

    cgroup: str  # relative to the agent's cgroup root
    netns: str  # namespace name under the netns dir
    netns_path: str
    space: str
    ip: str
    uid: int
    gid: int
    slug_dir: str
    dyno_dir: str


class Desired(StrEnum):
    """What the dyno should be doing once its current process (if any) is gone."""

    RUNNING = "running"
    STOPPED = "stopped"


@dataclass(frozen=True)
class Record:
    """Everything persisted about one dyno. Frozen: a change is a new record, made by the one
    writer (`Dyno.update` for a supervised dyno), which saves it."""

    spec: DynoSpec
    state: DynoState
    since: datetime
    reason: Reason
    exit_status: int | None = None
    placement: Placement | None = None
    pid: int | None = None
    start_time: int | None = None
    restarts: int = 0
    crashes: int = 0
    desired: Desired = Desired.RUNNING
    up_since: float | None = None  # wall clock, for the 10-minute crash-count reset
    restart_at: float | None = None  # wall clock: a crashed dyno's end of cool-off
    # Of the running process, so that a re-adopting agent keeps its deadlines and baselines
    # instead of starting them over: wall-clock launch time (boot timeout), cycle deadline
    # (its random jitter is drawn once) and the cgroup's OOM-kill count at launch.
    launched_at: float | None = None
    cycle_at: float | None = None
    oom_base: int | None = None
    # What the agent asked of the running process and since when (wall clock): saved before
    # its signal goes, so that an agent killed meanwhile is succeeded by one that reads the
    # exit as the stop, restart or kill it was and finishes it, never as the app's crash.
    intent: Intent = Intent.NONE
    stop_at: float | None = None

    @property
    def id(self) -> str:
        return self.spec.id

    def to_json(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data.update(spec=self.spec.to_dict(), state=str(self.state), reason=str(self.reason),
                    since=self.since.isoformat(), desired=str(self.desired),
                    intent=str(self.intent),
                    placement=asdict(self.placement) if self.placement else None)
        return data


@dataclass(frozen=True)
class Stored:
    """A record as read from disk, before its spec is parsed (with the agent's sizes, which
    may have changed since it was written). What adoption needs before that is here."""

    id: str
    data: dict[str, Any]

    @property
    def app(self) -> str:
        return str(self.data.get("spec", {}).get("app", ""))

    @property
    def name(self) -> str:
        return str(self.data.get("spec", {}).get("name", ""))

    @property
    def pid(self) -> int | None:
        pid = self.data.get("pid")
        return pid if isinstance(pid, int) else None

    @property
    def state(self) -> str:
        return str(self.data.get("state", ""))

    @property
    def placement(self) -> Placement | None:
        placement = self.data.get("placement")
        return Placement(**placement) if placement else None

    def parse(self, sizes: Mapping[str, Size]) -> Record:
        """The typed record; SpecError when its spec no longer validates, ValueError (or
        TypeError) when the rest is malformed."""
        data = self.data
        known = {f.name for f in fields(Record)}
        values = {key: value for key, value in data.items() if key in known}
        values.update(spec=parse_spec(data["spec"], sizes), state=DynoState(data["state"]),
                      reason=Reason(data["reason"]), since=datetime.fromisoformat(data["since"]),
                      desired=Desired(data.get("desired", Desired.RUNNING)),
                      intent=Intent(data.get("intent", Intent.NONE)),
                      placement=self.placement)
        return Record(**values)


class RecordStore:
    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir / "dynos"
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    def _path(self, dyno_id: str) -> Path:
        if not _ID.fullmatch(dyno_id):
            raise ValueError(f"not a dyno id: {dyno_id!r}")
        return self.dir / f"{dyno_id}.json"

    def save(self, record: Record) -> None:
        """Write-then-rename: a reader (or a restarted agent) sees the old or the new record,
        never half of one. No fsync: the records protect against an agent crash; after a
        power loss there are no dynos left to adopt."""
        self.write(record.id, encode(record))

    def write(self, dyno_id: str, data: bytes) -> None:
        """`save` of a record already encoded: a spare copy beside it (`.<id>.json.tmp`, the
        previous version) is overwritten and exchanged with it (atomicfile.exchange_in)."""
        path = self._path(dyno_id)
        exchange_in(str(path), str(self._spare(path)), data)

    def delete(self, dyno_id: str) -> None:
        path = self._path(dyno_id)
        path.unlink(missing_ok=True)
        self._spare(path).unlink(missing_ok=True)

    @staticmethod
    def _spare(path: Path) -> Path:
        return path.with_name(f".{path.name}.tmp")

    def load_all(self) -> Iterator[Stored]:
        for path in sorted(self.dir.glob("*.json")):
            try:
                data = json.loads(path.read_bytes())
                if not isinstance(data, dict) or not isinstance(data.get("spec"), dict):
                    raise ValueError("not a dyno record")
                stored = Stored(path.stem, data)
                stored.placement  # noqa: B018 -- a malformed placement fails here
                yield stored
            except (OSError, ValueError, TypeError, KeyError) as exc:
                # Keep the file for a human: renaming it aside makes the problem visible
                # without letting one bad record stop every other dyno from being adopted.
                aside = path.with_suffix(".corrupt")
                log.error("unreadable dyno record %s moved to %s: %s", path, aside, exc)
                os.replace(path, aside)


def _resolve_soon(future: asyncio.Future[None]) -> None:
    """Complete a future of a loop from another thread (unless that loop is gone)."""
    def resolve() -> None:
        if not future.done():
            future.set_result(None)

    with contextlib.suppress(RuntimeError):  # the loop is closed
        future.get_loop().call_soon_threadsafe(resolve)


def encode(record: Record) -> bytes:
    return json.dumps(record.to_json(), separators=(",", ":")).encode()


class RecordWriter:
    """Saves and deletes of records on one thread of their own, in order, so the event loop
    never waits for the disk: a rename over an existing file can take milliseconds on ext4
    (it starts the new file's writeback), and a mass delete saves thousands of records.

    A Record is immutable, so the thread encodes it (a dyno's several changes in one step
    cost one encoding, off the loop), and only the newest pending version of each record is
    written. Saved on an idle writer, a record waits only for the loop to finish what that
    turn woke: every save of the turn goes in one batch, and the thread does not contend for
    the GIL while a state change's event goes out. A crash loses at most the last few
    milliseconds of changes, which adoption already copes with (a record saved before the
    holder's launch, or a placement not yet recorded, is what an agent killed at that moment
    leaves too). What must not be lost is waited for with `persisted`: a stop's intent before
    its signal goes, a delete before its caller is told.
    """

    def __init__(self, store: RecordStore, *, background: bool = True) -> None:
        self.store = store
        # False: every save is written at once, on the caller's thread (unit tests).
        self.background = background
        self._pending: dict[str, Record | None] = {}
        self._lock = threading.Lock()
        # Clear from the first save of a batch until everything saved is on disk.
        self._idle = threading.Event()
        self._idle.set()
        # A batch is waiting for its turn of the loop to end before the thread starts on it.
        self._due = False
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="records")
        self._closed = False
        # The record being written by the thread, and who waits for records to be on disk.
        self._writing: str | None = None
        self._waiters: list[tuple[str, asyncio.Future[None]]] = []

    def save(self, record: Record) -> None:
        self._put(record.id, record)

    def save_now(self, record: Record) -> None:
        """The first version of a record, written before this returns (a created dyno is on
        disk before its creator is told it exists)."""
        with self._lock:
            self._pending.pop(record.id, None)
        self._write(record.id, record)

    def delete(self, dyno_id: str) -> None:
        self._put(dyno_id, None)

    def _put(self, dyno_id: str, data: Record | None) -> None:
        self.store._path(dyno_id)  # a bad id fails here, in the caller
        with self._lock:
            queued = self.background and not self._closed
            begins = queued and self._idle.is_set()
            if queued:
                self._pending[dyno_id] = data
                if begins:
                    self._idle.clear()
                    self._due = True
        if begins:
            self._start_after_turn()
        if not queued:
            self._write(dyno_id, data)

    def _start_after_turn(self) -> None:
        """Start the thread on the batch once this turn of the loop, and what it woke, have
        run (two `call_soon`s: the tasks this turn woke run in the next); at once when not
        called on a loop."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._start()
            return
        loop.call_soon(loop.call_soon, self._start)

    def _start(self) -> None:
        with self._lock:
            if not self._due:
                return
            self._due = False
        self._executor.submit(self._drain)

    async def persisted(self, dyno_id: str) -> None:
        """Return once every version of the record saved (or its deletion) so far is on
        disk, without blocking the loop or a thread."""
        future = asyncio.get_running_loop().create_future()
        with self._lock:
            if not self._unwritten(dyno_id):
                return
            self._waiters.append((dyno_id, future))
        await future

    def _unwritten(self, dyno_id: str) -> bool:
        return dyno_id in self._pending or self._writing == dyno_id

    def _drain(self) -> None:
        while True:
            with self._lock:
                self._writing = None
                waiters = self._waiters
                ready: list[tuple[str, asyncio.Future[None]]] = []
                self._waiters = []
                for waiter in waiters:
                    (self._waiters if self._unwritten(waiter[0]) else ready).append(waiter)
                if not self._pending:
                    self._idle.set()
                dyno_id = next(iter(self._pending), None)
                if dyno_id is not None:
                    self._writing = dyno_id
                    data = self._pending.pop(dyno_id)
            for _, future in ready:
                _resolve_soon(future)
            if dyno_id is None:
                return
            self._write(dyno_id, data)

    def _write(self, dyno_id: str, data: Record | None) -> None:
        try:
            if data is None:
                self.store.delete(dyno_id)
            else:
                self.store.write(dyno_id, encode(data))
        except OSError as exc:
            # The dyno goes on; its record is written again at its next change.
            log.error("cannot %s the record of %s: %s",
                      "delete" if data is None else "save", dyno_id, exc,
                      extra={"DYNO_ID": dyno_id})

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until everything saved so far is on disk; False on timeout. A batch still
        waiting for its turn of the loop starts now: the caller may be that loop's thread."""
        self._start()
        return self._idle.wait(timeout_s)

    def close(self) -> None:
        """Flush and stop the thread; later saves are written at once."""
        self.flush()
        with self._lock:
            self._closed = True
        self._executor.shutdown(wait=True)  # runs a drain queued since the flush
