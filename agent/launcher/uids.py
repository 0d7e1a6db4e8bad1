"""UidAllocator: one unprivileged uid/gid per dyno id, persisted in the state dir.

A unique uid per dyno keeps per-user kernel limits (RLIMIT_NPROC, inotify, keyrings) and
signal/ptrace permission checks from crossing dynos. The file is rewritten atomically
(temp file, fsync, rename) under an flock, so a crash never leaves it half-written.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager

from agent.launcher.errors import UidAllocationError

DEFAULT_FIRST = 400000
DEFAULT_LAST = 465535
FILE_NAME = "uids.json"


class UidAllocator:
    def __init__(self, state_dir: str, first: int = DEFAULT_FIRST,
                 last: int = DEFAULT_LAST) -> None:
        if not 0 < first <= last:
            raise UidAllocationError(f"bad uid range {first}-{last}")
        self.first = first
        self.last = last
        self.path = os.path.join(state_dir, FILE_NAME)
        self._lock_path = self.path + ".lock"
        os.makedirs(state_dir, mode=0o700, exist_ok=True)

    def allocate(self, dyno_id: str) -> tuple[int, int]:
        """(uid, gid) of `dyno_id`, allocating the lowest free one on first use."""
        with self._locked():
            table = self._load()
            if dyno_id in table:
                return table[dyno_id], table[dyno_id]
            used = set(table.values())
            uid = next((u for u in range(self.first, self.last + 1) if u not in used), None)
            if uid is None:
                raise UidAllocationError(
                    f"uid range {self.first}-{self.last} exhausted ({len(used)} dynos)",
                    self.path)
            table[dyno_id] = uid
            self._store(table)
            return uid, uid

    def lookup(self, dyno_id: str) -> tuple[int, int] | None:
        uid = self._load().get(dyno_id)
        return None if uid is None else (uid, uid)

    def release(self, dyno_id: str) -> None:
        """Forget the dyno's uid (no-op when it has none); the uid may be reused later."""
        with self._locked():
            table = self._load()
            if table.pop(dyno_id, None) is not None:
                self._store(table)

    def allocations(self) -> dict[str, int]:
        return self._load()

    @contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _load(self) -> dict[str, int]:
        try:
            with open(self.path, encoding="utf-8") as f:
                raw = json.load(f)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            raise UidAllocationError(f"unreadable uid table: {e}", self.path,
                                     getattr(e, "errno", None)) from e
        if not isinstance(raw, dict) or not all(
                isinstance(k, str) and isinstance(v, int) for k, v in raw.items()):
            raise UidAllocationError("uid table is not a {dyno_id: uid} map", self.path)
        return raw

    def _store(self, table: dict[str, int]) -> None:
        tmp = f"{self.path}.tmp.{os.getpid()}"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(table, f, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            dir_fd = os.open(os.path.dirname(self.path) or ".", os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as e:
            raise UidAllocationError(f"cannot write uid table: {e.strerror}", self.path,
                                     e.errno) from e
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
