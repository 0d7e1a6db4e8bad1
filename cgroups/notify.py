"""Async notifications for one group on an asyncio loop: became empty, OOM, OOM kill, high.

inotify on cgroup.events and (v2) memory.events, through one inotify instance per loop shared by
every watch; on hybrid an eventfd registered on the v1 memory.oom_control through
cgroup.event_control. No polling except the short v1 follow-up below.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import ctypes
import enum
import errno
import os
import struct
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING

from cgroups.errors import CgroupError, ControllerMissing, NotFound, Timeout, from_os_error
from cgroups.limits import Mode
from cgroups.stats import parse_flat

if TYPE_CHECKING:
    from cgroups.group import Group

_IN_MODIFY = 0x00000002
_IN_IGNORED = 0x00008000  # the watch is gone (its file was removed, or inotify_rm_watch)
_EVENT_HEADER = struct.Struct("iIII")
# v1 raises the OOM eventfd *before* the OOM killer picks a victim (mem_cgroup_oom notifies,
# then calls out_of_memory), so the oom_kill counter is re-read for a short while after it.
_V1_FOLLOW_UP_S = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4, 0.8)
# How long a watch descriptor nobody listens to any more is kept before inotify_rm_watch.
_RETIRE_AFTER_S = 5.0


class EventKind(enum.Enum):
    POPULATED = "populated"
    EMPTY = "empty"
    OOM = "oom"              # the group hit its memory limit and the OOM killer was invoked
    OOM_KILL = "oom_kill"    # a process of the group was OOM-killed
    HIGH = "high"            # v2 only: memory.high was breached (reclaim/throttle)
    REMOVED = "removed"      # the group went away while watched


@dataclass(frozen=True)
class GroupEvent:
    """One notification. `count` is the counter after the event (populated: 1/0); the
    oom_kill count is a snapshot read at that moment, so it survives the group's removal."""

    kind: EventKind
    group: str
    count: int
    oom_kill_events: int
    at_monotonic: float


_libc = ctypes.CDLL(None, use_errno=True)


_CLOSER: concurrent.futures.ThreadPoolExecutor | None = None
_CLOSER_LOCK = threading.Lock()


def _closer() -> concurrent.futures.ThreadPoolExecutor:
    """One thread that closes the fds of finished watches, in order."""
    global _CLOSER
    with _CLOSER_LOCK:
        if _CLOSER is None:
            _CLOSER = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="cgroup-watch-close")
        return _CLOSER


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _inotify_init() -> int:
    fd: int = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    if fd < 0:
        err = ctypes.get_errno()
        raise from_os_error(OSError(err, os.strerror(err)), "inotify_init1", path="")
    return fd


def _inotify_watch(fd: int, path: str) -> int:
    wd: int = _libc.inotify_add_watch(fd, os.fsencode(path), _IN_MODIFY)
    if wd < 0:
        err = ctypes.get_errno()
        raise from_os_error(OSError(err, os.strerror(err)), "inotify_add_watch", path=path)
    return wd


class _Inotify:
    """The one inotify instance of an event loop, shared by every GroupWatch on it.

    fs.inotify.max_user_instances (128 by default) counts instances per user across the whole
    host, and every agent runs as root: an instance per watched group would stop a host at
    about a hundred dynos. Watches are cheap (max_user_watches is in the hundreds of
    thousands), adding and removing one costs about a microsecond, and closing an instance
    with watches waits for an SRCU grace period that a shared instance pays once.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.fd = _inotify_init()
        self._loop = loop
        # inotify gives a file watched twice in one instance the same descriptor: each wd
        # keeps every watch that asked for it, and is removed with the last of them.
        self._watches: dict[int, list[GroupWatch]] = {}
        # Descriptors the last watch has left, removed a while later: a group is mostly
        # removed right after its last watch closes (a dyno's exit, then its delete), and
        # the kernel then drops the descriptor by itself (IN_IGNORED). A mass delete would
        # otherwise make a syscall per group on the loop. Watched again meanwhile (a
        # restart), the file gets the same descriptor back and it is kept.
        self._retiring: set[int] = set()
        self._sweep: asyncio.TimerHandle | None = None
        loop.add_reader(self.fd, self._on_readable)
        weakref.finalize(loop, _close_all, [self.fd])

    def add(self, path: str, watch: GroupWatch) -> int:
        wd = _inotify_watch(self.fd, path)
        self._retiring.discard(wd)
        self._watches.setdefault(wd, []).append(watch)
        return wd

    def remove(self, wd: int, watch: GroupWatch) -> None:
        watches = self._watches.get(wd)
        if watches is None or watch not in watches:
            return
        watches.remove(watch)
        if not watches:
            del self._watches[wd]
            self._retiring.add(wd)
            if self._sweep is None:
                self._sweep = self._loop.call_later(_RETIRE_AFTER_S, self._remove_retired)

    def _remove_retired(self) -> None:
        self._sweep = None
        # inotify numbers descriptors cyclically (idr_alloc_cyclic), so one the kernel has
        # dropped is not another file's by now; EINVAL for those: nothing to do.
        for wd in self._retiring:
            _libc.inotify_rm_watch(self.fd, wd)
        self._retiring.clear()

    def _on_readable(self) -> None:
        woken: dict[int, GroupWatch] = {}
        gone: set[int] = set()
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                raise
            offset = 0
            while offset + _EVENT_HEADER.size <= len(data):
                wd, mask, _cookie, name_len = _EVENT_HEADER.unpack_from(data, offset)
                offset += _EVENT_HEADER.size + name_len
                for watch in self._watches.get(wd, ()):
                    woken[id(watch)] = watch
                if mask & _IN_IGNORED:
                    gone.add(wd)
        for wd in gone:
            # The kernel dropped the watch, and may hand its number out again.
            self._watches.pop(wd, None)
            self._retiring.discard(wd)
        # Which file or why does not matter: _refresh re-reads everything and sees a removal
        # as NotFound (a watch may close itself, and others, while being refreshed).
        for watch in woken.values():
            watch._refresh()


_INOTIFY: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Inotify] = \
    weakref.WeakKeyDictionary()


def _inotify_of(loop: asyncio.AbstractEventLoop) -> _Inotify:
    instance = _INOTIFY.get(loop)
    if instance is None:
        instance = _INOTIFY[loop] = _Inotify(loop)
    return instance


class GroupWatch:
    """Notifications of one group, queued for `next()` / `wait_for()` on the running loop.

    Counters are compared with the values read when the watch started, so only changes from
    then on are reported. The queue keeps the newest `max_queued` events. `on_event`, if
    given, is also called with each event as it is queued (on the loop, from the kernel's
    wake-up), for a caller that reacts to events without a task of its own waiting on them.
    """

    def __init__(self, group: Group, max_queued: int = 256,
                 on_event: Callable[[GroupEvent], None] | None = None) -> None:
        self.group = group
        self._on_event = on_event
        self._queue: collections.deque[GroupEvent] = collections.deque(maxlen=max_queued)
        self._wakeup: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inotify: _Inotify | None = None
        self._wds: list[int] = []
        self._eventfd = -1
        self._follow_up: asyncio.TimerHandle | None = None
        self._closed = False
        self.populated = False
        self.counters: dict[str, int] = {"oom": 0, "oom_kill": 0, "high": 0}

    async def __aenter__(self) -> GroupWatch:
        self.start()
        return self

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.close()

    # -- set-up -------------------------------------------------------------------------------

    def start(self) -> None:
        """Open the fds and register them with the running loop (call on the loop)."""
        self._loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        try:
            self._inotify = _inotify_of(self._loop)
            unified = self.group.layout.unified.fs
            files = ["cgroup.events"]
            if self.group.layout.mode is Mode.V2 and unified.exists(self.group.rel,
                                                                      "memory.events"):
                files.append("memory.events")
            for name in files:
                self._wds.append(self._inotify.add(str(unified.path(self.group.rel, name)), self))
            if self.group.layout.mode is Mode.HYBRID:
                self._start_v1_oom()
            # Baseline after the watches are in place: a change in between is then seen
            # either here or as an event, never lost.
            self.populated = self.group.populated()
            self.counters.update(self._read_counters())
        except BaseException:
            self.close()
            raise

    def _start_v1_oom(self) -> None:
        try:
            memory = self.group.layout.hierarchy_for("memory")
        except ControllerMissing:
            return
        assert self._loop is not None
        self._eventfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        control = memory.fs.open_fd(self.group.rel, "memory.oom_control")
        try:
            # The kernel keeps its own reference to both files once registered.
            memory.fs.write(self.group.rel, "cgroup.event_control",
                            f"{self._eventfd} {control}")
        finally:
            os.close(control)
        self._loop.add_reader(self._eventfd, self._on_eventfd)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._follow_up is not None:
            self._follow_up.cancel()
        if self._inotify is not None:
            for wd in self._wds:
                self._inotify.remove(wd, self)
            self._wds = []
        if self._eventfd >= 0:
            if self._loop is not None:
                self._loop.remove_reader(self._eventfd)
            # An eventfd registered on memory.oom_control is released by the kernel's cgroup
            # event work: kept off the loop, where a mass delete closes thousands of them.
            _closer().submit(_close_all, [self._eventfd])
            self._eventfd = -1
        if self._wakeup is not None:
            self._wakeup.set()

    # -- waiting ------------------------------------------------------------------------------

    async def next(self, timeout_s: float | None = None) -> GroupEvent:
        """The next event; Timeout when none came within `timeout_s`."""
        assert self._wakeup is not None, "GroupWatch.start() not called"
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not self._queue:
            if self._closed:
                raise CgroupError("watch closed", path=self.group.rel)
            self._wakeup.clear()
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                raise Timeout(f"no event within {timeout_s}s", path=self.group.rel) from None
        return self._queue.popleft()

    async def wait_for(self, kind: EventKind, timeout_s: float) -> GroupEvent:
        """Skip events until one of `kind`. For EMPTY, returns at once if already empty."""
        deadline = time.monotonic() + timeout_s
        if kind is EventKind.EMPTY and not self.populated and not self._queue:
            return self._event(EventKind.EMPTY, 0)
        while True:
            event = await self.next(max(0.0, deadline - time.monotonic()))
            if event.kind is kind:
                return event

    # -- kernel callbacks ---------------------------------------------------------------------

    def _on_eventfd(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._eventfd)
        kills_before = self.counters["oom_kill"]
        # The eventfd also fires when the v1 group is removed: _refresh then reports REMOVED.
        if not self._refresh(v1_oom=True):
            return
        if self._follow_up is None and self.counters["oom_kill"] == kills_before:
            self._schedule_follow_up(0, kills_before)

    def _schedule_follow_up(self, step: int, kills_before: int) -> None:
        assert self._loop is not None
        if step >= len(_V1_FOLLOW_UP_S) or self._closed:
            self._follow_up = None
            return

        def check() -> None:
            self._follow_up = None
            if self._refresh() and self.counters["oom_kill"] == kills_before:
                self._schedule_follow_up(step + 1, kills_before)

        self._follow_up = self._loop.call_later(_V1_FOLLOW_UP_S[step], check)

    def _refresh(self, *, v1_oom: bool = False) -> bool:
        """Re-read the state, queue what changed; False (and close) if the group is gone."""
        if self._closed:
            return False
        try:
            populated = self.group.populated()
            counters = self._read_counters()
        except NotFound:
            self._emit(EventKind.REMOVED, 0)
            self.close()
            return False
        if v1_oom:
            # v1 has no OOM counter: each eventfd wake-up is one OOM episode.
            counters["oom"] = self.counters["oom"] + 1
        for name, kind in (("oom", EventKind.OOM), ("oom_kill", EventKind.OOM_KILL),
                           ("high", EventKind.HIGH)):
            if counters.get(name, 0) > self.counters.get(name, 0):
                self.counters[name] = counters[name]
                self._emit(kind, counters[name])
        if populated != self.populated:
            self.populated = populated
            self._emit(EventKind.POPULATED if populated else EventKind.EMPTY, int(populated))
        return True

    def _read_counters(self) -> dict[str, int]:
        layout = self.group.layout
        if layout.mode is Mode.V2:
            fs = layout.unified.fs
            if not fs.exists(self.group.rel, "memory.events"):
                return {}
            events = parse_flat(fs.read(self.group.rel, "memory.events"), file="memory.events")
            return {k: events.get(k, 0) for k in ("oom", "oom_kill", "high")}
        try:
            memory = layout.hierarchy_for("memory")
        except ControllerMissing:
            return {}
        control = parse_flat(memory.fs.read(self.group.rel, "memory.oom_control"),
                             file="memory.oom_control")
        return {"oom_kill": control.get("oom_kill", 0)}

    def _emit(self, kind: EventKind, count: int) -> None:
        event = self._event(kind, count)
        self._queue.append(event)
        if self._wakeup is not None:
            self._wakeup.set()
        if self._on_event is not None:
            self._on_event(event)

    def _event(self, kind: EventKind, count: int) -> GroupEvent:
        return GroupEvent(kind, self.group.rel, count, self.counters.get("oom_kill", 0),
                          time.monotonic())
