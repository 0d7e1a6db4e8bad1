"""Dyno records on disk: one JSON file per dyno under `<state_dir>/dynos/`, replaced atomically.

A record is what a restarted agent needs to find, adopt or clean up a dyno: its spec, where it
was placed (cgroup, namespace, address, user), its process identity and its last state.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

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


@dataclass
class Record:
    spec: dict[str, Any]
    state: str
    since: str
    reason: str
    exit_status: int | None = None
    placement: Placement | None = None
    pid: int | None = None
    start_time: int | None = None
    restarts: int = 0
    crashes: int = 0
    desired: str = "running"  # running | stopped
    up_since: float | None = None  # wall clock, for the 10-minute crash-count reset
    restart_at: float | None = None  # wall clock: a crashed dyno's end of cool-off
    # Of the running process, so that a re-adopting agent keeps its deadlines and baselines
    # instead of starting them over: wall-clock launch time (boot timeout), cycle deadline
    # (its random jitter is drawn once) and the cgroup's OOM-kill count at launch.
    launched_at: float | None = None
    cycle_at: float | None = None
    oom_base: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return str(self.spec["id"])

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Record:
        placement = data.get("placement")
        return cls(**{**data, "placement": Placement(**placement) if placement else None})


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
        """`save` of a record already encoded."""
        path = self._path(dyno_id)
        tmp = path.with_name(f".{path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        os.replace(tmp, path)

    def delete(self, dyno_id: str) -> None:
        self._path(dyno_id).unlink(missing_ok=True)

    def load_all(self) -> Iterator[Record]:
        for path in sorted(self.dir.glob("*.json")):
            try:
                yield Record.from_json(json.loads(path.read_bytes()))
            except (OSError, ValueError, TypeError, KeyError) as exc:
                # Keep the file for a human: renaming it aside makes the problem visible
                # without letting one bad record stop every other dyno from being adopted.
                aside = path.with_suffix(".corrupt")
                log.error("unreadable dyno record %s moved to %s: %s", path, aside, exc)
                os.replace(path, aside)


def encode(record: Record) -> bytes:
    return json.dumps(record.to_json(), separators=(",", ":")).encode()


class RecordWriter:
    """Saves and deletes of records on one thread of their own, in order, so the event loop
    never waits for the disk: a rename over an existing file can take milliseconds on ext4
    (it starts the new file's writeback), and a mass delete saves thousands of records.

    A record is encoded when it is saved (a snapshot), and only the newest pending version
    of each record is written. A crash loses at most the last few milliseconds of changes,
    which adoption already copes with (a record saved before the holder's launch, or a
    placement not yet recorded, is what an agent killed at that moment leaves too).
    """

    def __init__(self, store: RecordStore, *, background: bool = True) -> None:
        self.store = store
        # False: every save is written at once, on the caller's thread (unit tests).
        self.background = background
        self._pending: dict[str, bytes | None] = {}
        self._lock = threading.Lock()
        self._idle = threading.Event()
        self._idle.set()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="records")
        self._closed = False

    def save(self, record: Record) -> None:
        self._put(record.id, encode(record))

    def delete(self, dyno_id: str) -> None:
        self._put(dyno_id, None)

    def _put(self, dyno_id: str, data: bytes | None) -> None:
        self.store._path(dyno_id)  # a bad id fails here, in the caller
        with self._lock:
            queued = self.background and not self._closed
            if queued:
                self._pending[dyno_id] = data
                if self._idle.is_set():
                    self._idle.clear()
                    self._executor.submit(self._drain)
        if not queued:
            self._write(dyno_id, data)

    def _drain(self) -> None:
        while True:
            with self._lock:
                if not self._pending:
                    self._idle.set()
                    return
                dyno_id = next(iter(self._pending))
                data = self._pending.pop(dyno_id)
            self._write(dyno_id, data)

    def _write(self, dyno_id: str, data: bytes | None) -> None:
        try:
            if data is None:
                self.store.delete(dyno_id)
            else:
                self.store.write(dyno_id, data)
        except OSError as exc:
            # The dyno goes on; its record is written again at its next change.
            log.error("cannot %s the record of %s: %s",
                      "delete" if data is None else "save", dyno_id, exc,
                      extra={"DYNO_ID": dyno_id})

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until everything saved so far is on disk; False on timeout."""
        return self._idle.wait(timeout_s)

    def close(self) -> None:
        """Flush and stop the thread; later saves are written at once."""
        self.flush()
        with self._lock:
            self._closed = True
        self._executor.shutdown(wait=True)  # runs a drain queued since the flush
