"""Dyno records on disk: one JSON file per dyno under `<state_dir>/dynos/`, replaced atomically.

A record is what a restarted agent needs to find, adopt or clean up a dyno: its spec, where it
was placed (cgroup, namespace, address, user), its process identity and its last state.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
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
        path = self._path(record.id)
        tmp = path.with_name(f".{path.name}.tmp")
        data = json.dumps(record.to_json(), separators=(",", ":")).encode()
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
