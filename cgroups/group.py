"""One cgroup in every hierarchy of the layout: attach, limits, stats, freeze, kill, remove."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable

from cgroups.discovery import Hierarchy, Layout
from cgroups.errors import (
    Busy,
    CgroupError,
    ControllerMissing,
    NotEmpty,
    NotFound,
    NotSupported,
    Timeout,
)
from cgroups.fs import normalise
from cgroups.limits import Limits, Mode, plan_writes
from cgroups.notify import EventKind, GroupEvent, GroupWatch
from cgroups.stats import (
    PRESSURE_FILES,
    V1_COUNTER_FILES,
    V1_FILES,
    V1_SAMPLE_FILES,
    V1_SAMPLE_UNIFIED_FILES,
    V2_COUNTER_FILES,
    V2_FILES,
    V2_SAMPLE_FILES,
    Stats,
    parse_flat,
    stats_v1,
    stats_v2,
)

# First and last pause between rmdir attempts while the kernel still holds the group (EBUSY
# right after the last task exited, until its css references are dropped).
_RETRY_FIRST_S = 0.001
_RETRY_MAX_S = 0.05


def _sigkill(pid: int) -> None:
    """The fallback kill's only signal: a seam so unit tests on a fake tree never signal
    real processes with made-up pids."""
    os.kill(pid, signal.SIGKILL)


class Group:
    """The group at relative path `rel` in every hierarchy of `layout` (no I/O on construction).

    Every method is a few cgroupfs syscalls; the ones that take a deadline (freeze, kill's
    fallback, remove) block at most that long and have async variants or belong in a thread.
    """

    def __init__(self, layout: Layout, rel: str) -> None:
        self.layout = layout
        self.rel = normalise(rel)
        if not self.rel:
            raise CgroupError("a group may not be the top of the hierarchy", path=rel)

    def __repr__(self) -> str:
        return f"Group({self.rel!r}, mode={self.layout.mode.value})"

    @property
    def name(self) -> str:
        return self.rel.rsplit("/", 1)[-1]

    @property
    def _unified(self) -> Hierarchy:
        return self.layout.unified

    def directories(self) -> dict[str, str]:
        """Hierarchy name -> absolute directory of this group."""
        return {h.name: str(h.fs.path(self.rel)) for h in self.layout.hierarchies}

    # -- membership ---------------------------------------------------------------------------

    def procs_paths(self) -> tuple[str, ...]:
        """The cgroup.procs files a forked child writes "0" into, in order, before it execs:
        limit hierarchies first so it is never tracked without its limits in force."""
        return tuple(str(h.fs.path(self.rel, "cgroup.procs")) for h in self.layout.hierarchies)

    def attach(self, pid: int) -> None:
        """Move a process (all its threads) into the group in every hierarchy."""
        for h in self.layout.hierarchies:
            h.fs.write(self.rel, "cgroup.procs", str(pid))

    def exists(self) -> bool:
        return self._unified.fs.exists(self.rel)

    def pids(self) -> list[int]:
        """Every process in the group in any hierarchy (a half-attached one counts too)."""
        found: set[int] = set()
        for h in self.layout.hierarchies:
            try:
                found.update(h.fs.procs(self.rel))
            except NotFound:
                continue
        return sorted(found)

    def events(self) -> dict[str, int]:
        """cgroup.events of the unified group: populated, frozen."""
        return parse_flat(self._unified.fs.read(self.rel, "cgroup.events"),
                          file="cgroup.events")

    def populated(self) -> bool:
        return self.events().get("populated", 0) == 1

    # -- limits -------------------------------------------------------------------------------

    def swap_accounting(self) -> bool:
        """Whether swap can be capped per group on this host (needs the group to exist)."""
        try:
            memory = self.layout.hierarchy_for("memory")
        except ControllerMissing:
            return False
        name = "memory.swap.max" if self.layout.mode is Mode.V2 else "memory.memsw.limit_in_bytes"
        return memory.fs.exists(self.rel, name)

    def apply(self, limits: Limits) -> None:
        """Write the limits; the first write the kernel refuses raises, naming file and value."""
        writes = plan_writes(limits, self.layout.mode, swap_accounting=self.swap_accounting())
        targets = [(self.layout.hierarchy_for(w.controller), w) for w in writes]
        for hierarchy, write in targets:
            hierarchy.fs.write(self.rel, write.file, write.value)

    # -- stats --------------------------------------------------------------------------------

    def stats(self) -> Stats:
        """Current statistics; files this kernel lacks leave their fields None."""
        return self._stats(V2_FILES, V1_FILES, ("cpu.stat", *PRESSURE_FILES))

    def counters(self) -> Stats:
        """The OOM-kill count and the memory peak alone (every other field None): counters
        read without a lock or a statistics flush, cheap enough for an event loop."""
        return self._stats(V2_COUNTER_FILES, V1_COUNTER_FILES, ())

    def sample(self) -> Stats:
        """What a periodic sample needs: memory use (current, peak, rss, cache, swap), the
        OOM-kill count, CPU time and pids; limits and pressure stay None (about half the reads
        of stats())."""
        return self._stats(V2_SAMPLE_FILES, V1_SAMPLE_FILES, V1_SAMPLE_UNIFIED_FILES)

    def _stats(self, v2_files: tuple[str, ...], v1_files: tuple[str, ...],
               v1_unified_files: tuple[str, ...]) -> Stats:
        if not self.exists():
            raise NotFound("group does not exist", path=str(self._unified.fs.path(self.rel)))
        if self.layout.mode is Mode.V2:
            return stats_v2(self._read_present(self._unified, v2_files))
        by_hierarchy: dict[str, str] = {}
        for file in v1_files:
            try:
                hierarchy = self.layout.hierarchy_for(file.split(".", 1)[0])
            except ControllerMissing:
                continue
            by_hierarchy.update(self._read_present(hierarchy, (file,)))
        unified = self._read_present(self._unified, v1_unified_files)
        return stats_v1(by_hierarchy, unified)

    def sample_files(self) -> SampleFiles:
        """sample()'s control files opened once, for samples read through them (see
        SampleFiles); NotFound when the group does not exist."""
        return SampleFiles(self)

    def _read_present(self, hierarchy: Hierarchy, files: tuple[str, ...]) -> dict[str, str]:
        out = {}
        for file in files:
            try:
                out[file] = hierarchy.fs.read(self.rel, file)
            except (NotFound, NotSupported):
                continue
        return out

    # -- freeze, kill -------------------------------------------------------------------------

    def freeze(self, timeout_s: float = 1.0) -> None:
        """Freeze every task and wait until the kernel says the group is frozen."""
        self._write_freeze("1")
        deadline = time.monotonic() + timeout_s
        pause = _RETRY_FIRST_S
        while self.events().get("frozen", 0) != 1:
            if time.monotonic() >= deadline:
                raise Timeout(f"not frozen within {timeout_s}s",
                              path=str(self._unified.fs.path(self.rel)), file="cgroup.events")
            # cgroup.events changes are also inotify-visible, but a freeze is sub-millisecond
            # and only used on the rare kill fallback: a short bounded poll is simpler.
            time.sleep(pause)
            pause = min(pause * 2, _RETRY_MAX_S)

    def thaw(self) -> None:
        self._write_freeze("0")

    def _write_freeze(self, value: str) -> None:
        if not self._unified.fs.exists(self.rel, "cgroup.freeze"):
            # cgroup.freeze appeared in kernel 5.2.
            raise ControllerMissing("freezer", "cgroup.freeze not available",
                                    path=str(self._unified.fs.path(self.rel)))
        self._unified.fs.write(self.rel, "cgroup.freeze", value)

    def kill(self, timeout_s: float = 5.0) -> None:
        """SIGKILL every process in the group at once. Does not wait for them to be gone: the
        group's EMPTY notification (or populated()) says when they are."""
        if self._unified.fs.exists(self.rel, "cgroup.kill"):
            # cgroup.kill (kernel 5.14) kills atomically, including tasks forked meanwhile.
            self._unified.fs.write(self.rel, "cgroup.kill", "1")
            return
        self._kill_by_pid(timeout_s)

    def _kill_by_pid(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        can_freeze = self._unified.fs.exists(self.rel, "cgroup.freeze")
        while True:
            if can_freeze:
                self.freeze(max(0.0, deadline - time.monotonic()))
            try:
                victims = self.pids()
                for pid in victims:
                    with contextlib.suppress(ProcessLookupError):
                        _sigkill(pid)
            finally:
                if can_freeze:
                    # Always thaw: a SIGKILLed task that is frozen does not die until thawed
                    # (true of the v1 freezer and of v2 before the kill reaches it).
                    self.thaw()
            # Frozen, nobody could fork between listing and killing: one pass is enough.
            # Unfrozen, a forking process can outrun us, so go again until nothing is new.
            if can_freeze or not victims:
                return
            if time.monotonic() >= deadline:
                raise Timeout(f"processes still forking after {timeout_s}s",
                              path=str(self._unified.fs.path(self.rel)))
            remaining = set(self.pids())
            if not remaining - set(victims):
                return

    # -- removal ------------------------------------------------------------------------------

    def try_remove(self) -> bool:
        """One removal attempt: True when gone from every hierarchy, False if the kernel still
        says EBUSY. Refuses (NotEmpty) while any process remains in the group."""
        pids = self.pids()
        if pids:
            raise NotEmpty(f"group still has {len(pids)} process(es)",
                           path=str(self._unified.fs.path(self.rel)), value=str(pids[:10]))
        done = True
        # Unified last: it is how a restarted agent finds the group, so it goes only once the
        # limit hierarchies are gone (a crash in between leaves a findable leftover).
        for h in self.layout.hierarchies:
            try:
                h.fs.rmdir(self.rel)
            except NotFound:
                continue
            except Busy:
                done = False
        return done

    def remove(self, timeout_s: float = 5.0) -> None:
        """Remove the group, retrying EBUSY until `timeout_s`; blocks (use remove_async on a
        loop). Read stats() first if its counters matter: they go with the group."""
        deadline = time.monotonic() + timeout_s
        pause = _RETRY_FIRST_S
        while not self.try_remove():
            if time.monotonic() >= deadline:
                raise Busy(f"still busy after {timeout_s}s",
                           path=str(self._unified.fs.path(self.rel)))
            time.sleep(pause)
            pause = min(pause * 2, _RETRY_MAX_S)

    async def remove_async(self, timeout_s: float = 5.0) -> None:
        """remove() for the event loop: the retries wait with asyncio.sleep."""
        deadline = time.monotonic() + timeout_s
        pause = _RETRY_FIRST_S
        while not self.try_remove():
            if time.monotonic() >= deadline:
                raise Busy(f"still busy after {timeout_s}s",
                           path=str(self._unified.fs.path(self.rel)))
            await asyncio.sleep(pause)
            pause = min(pause * 2, _RETRY_MAX_S)

    async def destroy(self, timeout_s: float = 10.0) -> Stats | None:
        """Free the group whatever state it is in: kill what is left, wait for the kernel's
        EMPTY notification, read the final stats (counters die with the group), remove it.
        Returns those stats, or None if the group was already gone. One deadline for all."""
        deadline = time.monotonic() + timeout_s
        if not self.exists():
            return None
        try:
            async with self.watch() as watch:
                if watch.populated:
                    # kill() then remove() alone would race: for a few ms after cgroup.kill
                    # the dying tasks are still listed and remove() refuses (NotEmpty).
                    self.kill(max(0.1, deadline - time.monotonic()))
                    await watch.wait_for(EventKind.EMPTY,
                                         max(0.0, deadline - time.monotonic()))
            final = self.stats()
        except NotFound:
            return None
        await self.remove_async(max(0.0, deadline - time.monotonic()))
        return final

    def destroy_blocking(self, timeout_s: float = 10.0) -> None:
        """destroy() for a thread (blocks; never call it on a loop): kill what is left, poll
        until the group is empty, remove it. Removing groups by the thousand (a mass delete)
        costs the kernel milliseconds each, which a loop cannot spare; the final counters
        are not read (a dozen files per group, for a caller that has them already)."""
        deadline = time.monotonic() + timeout_s
        pause = _RETRY_FIRST_S
        try:
            if not self.exists():
                return
            if self.populated():
                self.kill(max(0.1, deadline - time.monotonic()))
                while self.populated():
                    if time.monotonic() >= deadline:
                        raise Timeout(f"not empty within {timeout_s}s",
                                      path=str(self._unified.fs.path(self.rel)),
                                      file="cgroup.events")
                    time.sleep(pause)
                    pause = min(pause * 2, _RETRY_MAX_S)
        except NotFound:
            return
        self.remove(max(0.0, deadline - time.monotonic()))

    # -- notifications ------------------------------------------------------------------------

    def watch(self, on_event: Callable[[GroupEvent], None] | None = None) -> GroupWatch:
        """Async notifications for this group; use as `async with group.watch() as w:`.
        `on_event` is called with each event as well (see GroupWatch)."""
        return GroupWatch(self, on_event=on_event)


class SampleFiles:
    """Group.sample() through the group's control files kept open: a sample is then one
    pread(2) per file, with no path walk, open, second read or close, nor the check that the
    group exists (1,000 dynos sampled every 20 s read some 350 files a second).

    The same Stats as Group.sample(). A file the kernel lacks (or a v1 controller not
    mounted) is left out when opened, as sample() leaves it out of every read. Once the group
    is removed its files answer ENODEV: read() raises NotFound, as sample() does, and a group
    made again under the same path is not followed (open another SampleFiles). Holds up to
    seven fds until close(); not for concurrent use from several threads (an fd closed under
    a read could be another file's by then)."""

    def __init__(self, group: Group) -> None:
        self.group = group
        # (hierarchy, file, fd): the files of the mode's sample, then (hybrid) those of the
        # tracking group.
        self._main: list[tuple[Hierarchy, str, int]] = []
        self._unified: list[tuple[Hierarchy, str, int]] = []
        self._v2 = group.layout.mode is Mode.V2
        self._closed = False
        if not group.exists():
            raise NotFound("group does not exist",
                           path=str(group.layout.unified.fs.path(group.rel)))
        try:
            if self._v2:
                self._open(self._main, group.layout.unified, V2_SAMPLE_FILES)
            else:
                for file in V1_SAMPLE_FILES:
                    try:
                        hierarchy = group.layout.hierarchy_for(file.split(".", 1)[0])
                    except ControllerMissing:
                        continue
                    self._open(self._main, hierarchy, (file,))
                self._open(self._unified, group.layout.unified, V1_SAMPLE_UNIFIED_FILES)
        except BaseException:
            self.close()
            raise

    def _open(self, into: list[tuple[Hierarchy, str, int]], hierarchy: Hierarchy,
              files: tuple[str, ...]) -> None:
        for file in files:
            try:
                into.append((hierarchy, file, hierarchy.fs.open_fd(self.group.rel, file)))
            except (NotFound, NotSupported):
                continue

    @property
    def fds(self) -> int:
        """How many fds it holds (none once closed)."""
        return len(self._main) + len(self._unified)

    def read(self) -> Stats:
        """The group's sample now; NotFound once the group is gone."""
        if self._closed:
            raise CgroupError("sample files closed", path=self.group.rel)
        if self._v2:
            return stats_v2(self._read(self._main))
        return stats_v1(self._read(self._main), self._read(self._unified))

    def _read(self, files: list[tuple[Hierarchy, str, int]]) -> dict[str, str]:
        out = {}
        rel = self.group.rel
        for hierarchy, file, fd in files:
            try:
                out[file] = hierarchy.fs.pread(fd, rel, file)
            except NotSupported:
                continue
        return out

    def close(self) -> None:
        """Close the files (idempotent)."""
        self._closed = True
        files, self._main, self._unified = self._main + self._unified, [], []
        for hierarchy, _file, fd in files:
            hierarchy.fs.close_fd(fd)
