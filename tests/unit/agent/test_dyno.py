"""Dyno and Supervisor on a fake Runtime: the lines, states, events and records Heroku's rules
give for starts, crashes and cool-offs, stops (143, R12), R10, R14/R15, cycling, one-offs,
deletes, launch failures, adoption after an agent restart and the start concurrency limit."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import signal
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import cgroups
from agent.config import Config
from agent.holder import ExitEvent, HeldProcess, OutputEvent
from agent.observability.logs import LogHub
from agent.sizes import DEFAULT_SIZES, MIB, apply_overrides
from agent.spec import DynoSpec
from agent.supervision.dyno import Command
from agent.supervision.events import EventBus
from agent.supervision.records import Placement, RecordStore
from agent.supervision.runtime import DynoStartError, Launch
from agent.supervision.supervisor import MAX_CONCURRENT_STARTS, Supervisor

COOL_OFF_S = 0.3
SAMPLE_S = 0.05
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
    ignores_term: bool = False
    fail_launch: str | None = None
    stats_value: cgroups.Stats | None = field(default_factory=cgroups.Stats)
    oom_at_exit: bool = False
    launch_delay_s: float = 0.0
    launches: list[str] = field(default_factory=list)
    signals: list[tuple[int, signal.Signals]] = field(default_factory=list)
    kills: int = 0
    unplaced: list[str] = field(default_factory=list)
    alive: set[tuple[int, int]] = field(default_factory=set)
    concurrent: int = 0
    max_concurrent: int = 0
    procs: dict[str, Proc] = field(default_factory=dict)
    oom_watchers: dict[str, Callable[[int], None]] = field(default_factory=dict)
    _pids: itertools.count[int] = field(default_factory=lambda: itertools.count(1000))

    async def place(self, spec: DynoSpec) -> Placement:
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

    def _id_of(self, placement: Placement) -> str:
        return placement.netns.removeprefix("dyno-")

    def signal_all(self, placement: Placement, sig: signal.Signals) -> int:
        dyno_id = self._id_of(placement)
        proc = self.procs[dyno_id]
        self.signals.append((proc.pid, sig))
        if sig is signal.SIGTERM and not proc.ignores_term:
            self.exit(dyno_id, 143)
        return 1

    def kill(self, placement: Placement) -> None:
        self.kills += 1
        dyno_id = self._id_of(placement)
        if dyno_id in self.procs:
            self.exit(dyno_id, 137)

    def populated(self, placement: Placement) -> bool:
        return not self.procs[self._id_of(placement)].exited

    async def wait_empty(self, placement: Placement, timeout_s: float) -> bool:
        return not self.populated(placement)

    def stats(self, placement: Placement) -> cgroups.Stats | None:
        return self.stats_value

    async def accepting(self, ip: str, port: int) -> bool:
        assert (ip, port) == ("10.1.2.3", 5000)
        return self.accepting_port

    async def unplace(self, placement: Placement) -> None:
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


def make_config(tmp_path: Path, **overrides: Any) -> Config:
    settings: dict[str, Any] = {"state_dir": tmp_path / "state", "run_dir": tmp_path / "run",
                                "restart_schedule_s": (COOL_OFF_S, 2 * COOL_OFF_S),
                                "stop_timeout_s": 1.0, "boot_timeout_s": 1.0, "sizes": SIZES,
                                # The fake runtime mounts nothing: any slug path will do.
                                "slug_roots": (Path("/"),)}
    settings.update(overrides)
    return Config(**settings)


@dataclass
class Harness:
    supervisor: Supervisor
    runtime: FakeRuntime
    hub: LogHub
    events: list[dict[str, Any]]
    records: RecordStore
    released: list[tuple[str, int]]

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
        deadline = time.monotonic() + timeout_s
        while True:
            status = self.supervisor.dynos[dyno_id].status()
            if status["state"] == state:
                return status
            if time.monotonic() > deadline:
                raise TimeoutError(f"{dyno_id} not {state} within {timeout_s}s: {status}")
            await asyncio.sleep(0.005)

    async def event(self, dyno_id: str, state: str, timeout_s: float = 5.0) -> dict[str, Any]:
        """The first event that moved the dyno to `state` (states may pass quickly)."""
        def find() -> dict[str, Any] | None:
            return next((e for e in self.events
                         if e["id"] == dyno_id and e["state"] == state), None)
        await self.until(lambda: find() is not None, timeout_s, f"event {state}")
        found = find()
        assert found is not None
        return found

    async def until(self, predicate: Any, timeout_s: float = 5.0, what: str = "") -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} not met within {timeout_s}s")
            await asyncio.sleep(0.005)


async def _harness(tmp_path: Path, runtime: FakeRuntime | None = None,
                   **config: Any) -> Harness:
    runtime = runtime or FakeRuntime()
    hub, bus = LogHub(), EventBus()
    records = RecordStore(tmp_path / "state")
    released: list[tuple[str, int]] = []

    async def release(dyno_id: str, pid: int) -> None:
        released.append((dyno_id, pid))
    sample_interval_s = config.pop("sample_interval_s", 3600.0)
    supervisor = Supervisor(make_config(tmp_path, **config), runtime, records, hub, bus,
                            release=release, sample_interval_s=sample_interval_s)
    runtime.supervisor = supervisor
    events: list[dict[str, Any]] = []
    supervisor.state_listeners.append(lambda change: events.append(change.as_event()))
    return Harness(supervisor, runtime, hub, events, records, released)


@pytest.fixture
async def h(tmp_path: Path) -> AsyncIterator[Harness]:
    harness = await _harness(tmp_path)
    yield harness
    await harness.supervisor.detach_all()


async def test_worker_is_up_once_running_and_its_record_is_on_disk(h: Harness) -> None:
    dyno_id = await h.create("worker.1")
    status = await h.state(dyno_id, "up")
    assert status["pid"] == 1000
    assert h.lines("worker.1") == ["Starting process with command `run-it`",
                                   "State changed from starting to up"]
    record = json.loads((h.records.dir / f"{dyno_id}.json").read_text())
    assert (record["state"], record["pid"], record["start_time"]) == ("up", 1000, 1)
    assert [(e["previous"], e["state"], e["reason"]) for e in h.events] == [
        (None, "starting", "start"), ("starting", "up", "booted")]


async def test_crash_restarts_at_once_then_waits_the_cool_off(h: Harness) -> None:
    dyno_id = await h.create("worker.1")
    await h.state(dyno_id, "up")
    h.runtime.exit(dyno_id, 1)
    await h.until(lambda: len(h.runtime.launches) == 2, what="immediate restart")
    await h.state(dyno_id, "up")
    crashed_at = time.monotonic()
    h.runtime.exit(dyno_id, 1)
    await h.until(lambda: len(h.runtime.launches) == 3, what="restart after cool-off")
    waited = time.monotonic() - crashed_at
    assert COOL_OFF_S * 0.9 <= waited < COOL_OFF_S + 0.5, waited
    assert h.lines("worker.1")[:10] == [
        "Starting process with command `run-it`", "State changed from starting to up",
        "Process exited with status 1", "State changed from up to crashed",
        "State changed from crashed to starting",
        "Starting process with command `run-it`", "State changed from starting to up",
        "Process exited with status 1", "State changed from up to crashed",
        "State changed from crashed to starting"]
    crashes = [e for e in h.events if e["state"] == "crashed"]
    assert [(e["reason"], e["exit_status"]) for e in crashes] == [("crash", 1)] * 2
    assert h.supervisor.dynos[dyno_id].record.crashes == 2


async def test_explicit_restart_resets_the_crash_count(h: Harness) -> None:
    dyno_id = await h.create("worker.1")
    await h.state(dyno_id, "up")
    for launches in (2, 3):
        h.runtime.exit(dyno_id, 1)
        await h.until(lambda n=launches: len(h.runtime.launches) == n, what="restart")
        await h.state(dyno_id, "up")
    assert h.supervisor.dynos[dyno_id].record.crashes == 2
    await h.supervisor.restart_dyno(dyno_id)
    await h.state(dyno_id, "up")
    assert h.supervisor.dynos[dyno_id].record.crashes == 0
    assert "Restarting" in h.lines("worker.1")
    # The next crash is again a "first" one: restarted at once.
    h.runtime.exit(dyno_id, 1)
    await h.until(lambda: len(h.runtime.launches) == 5, timeout_s=COOL_OFF_S * 0.8,
                  what="immediate restart after a reset")


async def test_normal_stop_is_143_and_down(h: Harness) -> None:
    dyno_id = await h.create("worker.1")
    await h.state(dyno_id, "up")
    status = await h.supervisor.stop_dyno(dyno_id)
    assert (status["state"], status["exit_status"], status["pid"]) == ("down", 143, None)
    assert h.lines("worker.1")[-3:] == ["Stopping all processes with SIGTERM",
                                        "Process exited with status 143",
                                        "State changed from up to down"]
    assert h.runtime.signals == [(1000, signal.SIGTERM)]
    assert h.runtime.kills == 0
    assert h.events[-1]["reason"] == "stopped"
    # Stopped stays stopped; a start request brings it back.
    assert len(h.runtime.launches) == 1
    await h.supervisor.dynos[dyno_id].request(Command.START)
    await h.state(dyno_id, "up")
    assert len(h.runtime.launches) == 2


async def test_sigterm_ignored_gives_r12_then_sigkill_137(h: Harness) -> None:
    h.runtime.ignores_term = True
    dyno_id = await h.create("worker.1")
    await h.state(dyno_id, "up")
    started = time.monotonic()
    status = await h.supervisor.stop_dyno(dyno_id)
    took = time.monotonic() - started
    assert 0.95 <= took < 1.5, took
    assert (status["state"], status["exit_status"]) == ("down", 137)
    assert h.lines("worker.1")[-5:] == [
        "Stopping all processes with SIGTERM",
        "Error R12 (Exit timeout) -> At least one process failed to exit within 1 seconds "
        "of SIGTERM",
        "Stopping remaining processes with SIGKILL",
        "Process exited with status 137",
        "State changed from up to down"]
    assert h.runtime.kills == 1


async def test_web_that_never_accepts_gets_r10_and_crashes_boot_timeout(h: Harness) -> None:
    h.runtime.accepting_port = False
    dyno_id = await h.create("web.1")
    crashed = await h.event(dyno_id, "crashed", timeout_s=3)
    assert h.lines("web.1")[:5] == [
        "Starting process with command `run-it`",
        "Error R10 (Boot timeout) -> Web process failed to bind to $PORT within 1 seconds "
        "of launch",
        "Stopping process with SIGKILL",
        "Process exited with status 137",
        "State changed from starting to crashed"]
    assert (crashed["reason"], crashed["exit_status"]) == ("boot-timeout", 137)


async def test_web_is_up_only_once_it_accepts(h: Harness) -> None:
    h.runtime.accepting_port = False
    dyno_id = await h.create("web.1")
    await h.until(lambda: len(h.runtime.launches) == 1, what="launched")
    await asyncio.sleep(0.2)  # several probe intervals: still starting
    assert h.supervisor.dynos[dyno_id].state == "starting"
    h.runtime.accepting_port = True
    await h.state(dyno_id, "up")


async def test_r14_over_quota_keeps_running_r15_at_kill_point_kills(tmp_path: Path) -> None:
    h = await _harness(tmp_path, sample_interval_s=SAMPLE_S)
    try:
        h.runtime.stats_value = cgroups.Stats(memory_rss_bytes=96 * MIB)
        dyno_id = await h.create("worker.1", size="tiny")
        await h.state(dyno_id, "up")
        await h.until(lambda: sum(line.text == "Error R14 (Memory quota exceeded)"
                                  for line in h.hub.tail()) >= 2, what="two R14")
        texts = [line.text for line in h.hub.tail(dyno="worker.1")]
        first = texts.index("Error R14 (Memory quota exceeded)")
        assert texts[first - 1] == "Process running mem=96M(150.0%)"
        assert any(t.startswith("source=worker.1 dyno=") for t in texts)
        assert h.supervisor.dynos[dyno_id].state == "up"
        assert h.runtime.kills == 0
        h.runtime.stats_value = cgroups.Stats(memory_rss_bytes=128 * MIB)
        crashed = await h.event(dyno_id, "crashed")
        lines = h.lines("worker.1")
        r15 = lines.index("Error R15 (Memory quota vastly exceeded)")
        assert lines[r15 + 1:r15 + 4] == [
            "Stopping process with SIGKILL", "Process exited with status 137",
            "State changed from up to crashed"]
        assert (crashed["reason"], crashed["exit_status"]) == ("oom", 137)
    finally:
        await h.supervisor.detach_all()


async def test_kernel_oom_kill_is_reported_as_r15_and_oom(h: Harness) -> None:
    h.runtime.oom_at_exit = True
    dyno_id = await h.create("worker.1")
    await h.state(dyno_id, "up")
    h.runtime.exit(dyno_id, 137)
    crashed = await h.event(dyno_id, "crashed")
    assert (crashed["reason"], crashed["exit_status"]) == ("oom", 137)
    lines = h.lines("worker.1")
    assert lines[2:6] == ["Error R15 (Memory quota vastly exceeded)",
                          "Stopping process with SIGKILL", "Process exited with status 137",
                          "State changed from up to crashed"]


def _agent_texts(h: Harness, name: str) -> list[str]:
    """The agent's lines about a dyno including `Process running mem=`, without metrics."""
    return [line.text for line in h.hub.tail(dyno=name)
            if line.source == "agent" and not METRICS.match(line.text)]


R15_THEN_137 = ["Error R15 (Memory quota vastly exceeded)", "Stopping process with SIGKILL",
                "Process exited with status 137", "State changed from up to crashed"]


async def test_oom_kill_of_a_child_kills_the_whole_dyno_with_r15_then_137(h: Harness) -> None:
    dyno_id = await h.create("worker.1", size="tiny")
    await h.state(dyno_id, "up")
    # Only a child dies; PID 1 would run on if the agent did not end the dyno.
    h.runtime.oom_kill_child(dyno_id)
    crashed = await h.event(dyno_id, "crashed")
    assert (crashed["reason"], crashed["exit_status"]) == ("oom", 137)
    assert h.runtime.kills == 1
    texts = _agent_texts(h, "worker.1")
    r15 = texts.index(R15_THEN_137[0])
    # The peak (128 MiB) is the kill point of the 64 MiB quota.
    assert texts[r15 - 1:r15 + 4] == ["Process running mem=128M(200.0%)", *R15_THEN_137]
    assert texts.count(R15_THEN_137[0]) == 1
    # The watch of that run is closed; the restart (the first crash restarts at once) has
    # its own.
    await h.until(lambda: len(h.runtime.launches) == 2, what="restarted")


async def test_pid1_exiting_0_after_an_unheard_oom_kill_still_reports_r15_and_137(
        h: Harness) -> None:
    dyno_id = await h.create("worker.1", size="tiny")
    await h.state(dyno_id, "up")
    # The exit arrives before the OOM event does: the counter read at the exit decides.
    h.runtime.oom_kill_child(dyno_id, notify=False, peak_bytes=None)
    h.runtime.exit(dyno_id, 0)
    crashed = await h.event(dyno_id, "crashed")
    assert (crashed["reason"], crashed["exit_status"]) == ("oom", 137)
    texts = _agent_texts(h, "worker.1")
    r15 = texts.index(R15_THEN_137[0])
    # Without a peak from the kernel, the kill point is what was reached.
    assert texts[r15 - 1:r15 + 4] == ["Process running mem=128M(200.0%)", *R15_THEN_137]
    assert "Process exited with status 0" not in texts


async def test_an_oom_kill_the_watch_missed_is_caught_by_the_next_sample(
        tmp_path: Path) -> None:
    h = await _harness(tmp_path, sample_interval_s=SAMPLE_S)
    try:
        dyno_id = await h.create("worker.1", size="tiny")
        await h.state(dyno_id, "up")
        h.runtime.oom_kill_child(dyno_id, notify=False)
        crashed = await h.event(dyno_id, "crashed", timeout_s=1.0)
        assert (crashed["reason"], crashed["exit_status"]) == ("oom", 137)
        lines = h.lines("worker.1")
        r15 = lines.index(R15_THEN_137[0])
        assert lines[r15:r15 + 4] == R15_THEN_137
    finally:
        await h.supervisor.detach_all()


async def test_oom_kill_during_a_stop_ends_it_at_once_and_it_stays_a_stop(h: Harness) -> None:
    h.runtime.ignores_term = True
    dyno_id = await h.create("worker.1", size="tiny")
    await h.state(dyno_id, "up")
    stopping = asyncio.ensure_future(h.supervisor.stop_dyno(dyno_id))
    await h.until(lambda: h.runtime.signals, what="SIGTERM sent")
    started = time.monotonic()
    h.runtime.oom_kill_child(dyno_id)
    status = await stopping
    # Well before the 1 s stop timeout: no R12, the R15 kill ended it.
    assert time.monotonic() - started < 0.5
    assert (status["state"], status["exit_status"], status["reason"]) == ("down", 137,
                                                                          "stopped")
    lines = h.lines("worker.1")
    assert not any(line.startswith("Error R12") for line in lines)
    assert lines[-4:] == ["Error R15 (Memory quota vastly exceeded)",
                          "Stopping process with SIGKILL", "Process exited with status 137",
                          "State changed from up to down"]


async def test_oom_watch_is_closed_once_the_process_is_gone(h: Harness) -> None:
    dyno_id = await h.create("run.1", restart="never")
    await h.state(dyno_id, "up")
    assert dyno_id in h.runtime.oom_watchers
    h.runtime.exit(dyno_id, 0)
    await h.state(dyno_id, "complete")
    assert dyno_id not in h.runtime.oom_watchers


async def test_cycling_says_cycling_and_restarts(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("agent.supervision.supervisor.CYCLE_JITTER_S", 0.0)
    h = await _harness(tmp_path, cycle_after_s=0.2)
    try:
        dyno_id = await h.create("worker.1")
        await h.state(dyno_id, "up")
        await h.until(lambda: len(h.runtime.launches) == 2, what="cycled")
        await h.state(dyno_id, "up")
        assert h.lines("worker.1")[2:8] == [
            "Cycling", "State changed from up to starting",
            "Stopping all processes with SIGTERM", "Process exited with status 143",
            "Starting process with command `run-it`", "State changed from starting to up"]
        assert any(e["reason"] == "cycling" for e in h.events)
        assert h.supervisor.dynos[dyno_id].record.crashes == 0
    finally:
        await h.supervisor.detach_all()


async def test_one_off_completes_with_its_status_and_is_not_restarted(h: Harness) -> None:
    dyno_id = await h.create("run.1")
    await h.state(dyno_id, "up")
    h.runtime.exit(dyno_id, 7)
    status = await h.state(dyno_id, "complete")
    assert (status["exit_status"], status["restarts"]) == (7, 0)
    await asyncio.sleep(COOL_OFF_S)  # a window in which no restart may happen
    assert h.runtime.launches == [dyno_id]
    assert h.events[-1]["reason"] == "exited"


async def test_launch_failure_is_logged_and_counts_as_a_crash(h: Harness) -> None:
    h.runtime.fail_launch = "Error: no such slug"
    dyno_id = await h.create("worker.1")
    await h.event(dyno_id, "crashed")
    assert "Error: no such slug" in h.lines("worker.1")
    assert h.runtime.launches == []


async def test_delete_stops_unplaces_and_forgets(h: Harness) -> None:
    dyno_id = await h.create("worker.1")
    await h.state(dyno_id, "up")
    await h.supervisor.delete_dyno(dyno_id)
    assert dyno_id not in h.supervisor.dynos
    assert h.runtime.unplaced == [dyno_id]
    assert not (h.records.dir / f"{dyno_id}.json").exists()
    assert h.lines("worker.1")[-1] == "State changed from up to down"


async def test_delete_during_cool_off(h: Harness) -> None:
    dyno_id = await h.create("worker.1")
    await h.state(dyno_id, "up")
    h.runtime.exit(dyno_id, 1)
    await h.until(lambda: len(h.runtime.launches) == 2, what="restart")
    await h.state(dyno_id, "up")
    h.runtime.exit(dyno_id, 1)
    await h.state(dyno_id, "crashed")
    await h.supervisor.delete_dyno(dyno_id)
    assert h.runtime.unplaced == [dyno_id]
    await asyncio.sleep(COOL_OFF_S + 0.1)  # past the cool-off: nothing starts it again
    assert len(h.runtime.launches) == 2


async def test_output_and_holder_drops_reach_the_hub(h: Harness) -> None:
    dyno_id = await h.create("worker.1")
    await h.state(dyno_id, "up")
    h.supervisor.on_holder_event(OutputEvent(dyno_id, 1000, 0, 5,
                                             ((time.time(), b"hello\n"),)))
    texts = [(line.source, line.text) for line in h.hub.tail(dyno="worker.1")]
    assert texts[-2:] == [("agent", "Error L10 (output buffer overflow): 5 messages dropped"),
                          ("app", "hello")]
    assert h.supervisor.get_dyno(dyno_id)["output_dropped"] == 5


async def test_restore_adopts_running_and_handles_exits_seen_while_away(
        tmp_path: Path) -> None:
    first = await _harness(tmp_path)
    running = await first.create("worker.1")
    died = await first.create("worker.2")
    gone = await first.create("worker.3")
    for dyno_id in (running, died, gone):
        await first.state(dyno_id, "up")
    pids = {d: first.supervisor.dynos[d].record.pid for d in (running, died, gone)}
    await first.supervisor.detach_all()  # the agent goes away; the records stay

    second = await _harness(tmp_path)
    runtime = second.runtime
    held = [
        HeldProcess(running, "launch", pids[running] or 0, 1, True, None, None, 0, 0, 0, None),
        HeldProcess(died, "launch", pids[died] or 0, 1, False, 1, None, 0, 0, 0, None),
    ]
    # What the fake kernel knows about processes adopted from the first agent.
    for dyno_id in (running, died):
        runtime.procs[dyno_id] = first.runtime.procs[dyno_id]
        runtime.procs[dyno_id].exited = dyno_id == died
    runtime.procs[gone] = Proc(pids[gone] or 0, exited=True)
    try:
        restored = second.supervisor.restore(held)
        assert sorted(restored) == sorted([running, died, gone])
        status = await second.state(running, "up")
        assert status["pid"] == pids[running]
        # The one that exited while we were away and the one nobody holds any more are
        # crashes by policy: restarted (first crash: at once).
        await second.until(lambda: sorted(runtime.launches) == sorted([died, gone]),
                           what="restarts of the dead")
        assert "Process exited with status 1" in second.lines("worker.2")
        assert "Process exited with status 137" in second.lines("worker.3")
        assert runtime.launches.count(running) == 0
    finally:
        await second.supervisor.detach_all()


async def test_start_concurrency_is_bounded_and_200_starts_all_come_up(
        tmp_path: Path) -> None:
    runtime = FakeRuntime(launch_delay_s=0.01)
    h = await _harness(tmp_path, runtime)
    try:
        ids = await asyncio.gather(*(h.create(f"worker.{n}") for n in range(1, 201)))
        await h.until(lambda: all(h.supervisor.dynos[i].state == "up" for i in ids),
                      timeout_s=20, what="200 up")
        assert runtime.max_concurrent == MAX_CONCURRENT_STARTS
        assert len(set(runtime.launches)) == 200
    finally:
        await h.supervisor.detach_all()


def _held(dyno_id: str, pid: int, running: bool, status: int | None = None) -> HeldProcess:
    return HeldProcess(dyno_id, "launch", pid, 1, running, status, None, 0, 0, 0, None)


async def test_restore_adopts_a_process_launched_before_its_record_was_saved(
        tmp_path: Path) -> None:
    first = await _harness(tmp_path)
    dyno_id = await first.create("worker.1")
    await first.state(dyno_id, "up")
    await first.supervisor.detach_all()
    # As if the agent died between the holder's launch and the record's save.
    record = next(r for r in first.records.load_all() if r.id == dyno_id)
    pid = record.pid
    assert pid is not None
    record.pid, record.start_time, record.state = None, None, "starting"
    first.records.save(record)

    second = await _harness(tmp_path)
    second.runtime.procs[dyno_id] = Proc(pid)
    try:
        second.supervisor.restore([_held(dyno_id, pid, True)])
        status = await second.state(dyno_id, "up")
        assert status["pid"] == pid
        assert second.runtime.launches == [], "adopted, not launched a second time"
        assert second.runtime.kills == 0
    finally:
        await second.supervisor.detach_all()


async def test_restore_releases_held_processes_no_record_owns(tmp_path: Path) -> None:
    h = await _harness(tmp_path)
    try:
        h.supervisor.restore([_held("gone-1", 4000, False, 0), _held("gone-2", 4001, True)])
        await h.until(lambda: ("gone-1", 4000) in h.released, what="exited stray released")
        assert ("gone-2", 4001) not in h.released  # still running: the sweep kills it
        h.supervisor.on_holder_event(ExitEvent("gone-2", "launch", 4001, 137, 9, time.time()))
        await h.until(lambda: ("gone-2", 4001) in h.released, what="stray released on exit")
        assert h.supervisor.dynos == {}
    finally:
        await h.supervisor.detach_all()


async def _adopt_with(tmp_path: Path, name: str, running: bool, status: int | None,
                      **record_changes: Any) -> tuple[Harness, str, int]:
    """Start a dyno under one agent, let that agent go, edit its record, restore it under a
    second agent with the holder reporting the process as given."""
    first = await _harness(tmp_path)
    dyno_id = await first.create(name)
    await first.state(dyno_id, "up")
    await first.supervisor.detach_all()
    record = next(r for r in first.records.load_all() if r.id == dyno_id)
    assert record.launched_at is not None and record.cycle_at is not None
    assert record.up_since is not None and record.oom_base == 0
    for key, value in record_changes.items():
        setattr(record, key, value)
    first.records.save(record)
    pid = record.pid
    assert pid is not None
    second = await _harness(tmp_path)
    second.runtime.procs[dyno_id] = Proc(pid, exited=not running)
    second.supervisor.restore([_held(dyno_id, pid, running, status)])
    return second, dyno_id, pid


async def test_adopted_dyno_keeps_its_time_up_for_the_crash_count_reset(
        tmp_path: Path) -> None:
    # Up for 11 minutes (Heroku resets the count after 10) across the agent's restart.
    h, dyno_id, _pid = await _adopt_with(tmp_path, "worker.1", True, None, crashes=3,
                                         up_since=time.time() - 660)
    try:
        await h.state(dyno_id, "up")
        h.runtime.exit(dyno_id, 1)
        # A reset count makes this a first crash: restarted at once, not after a cool-off.
        await h.until(lambda: len(h.runtime.launches) == 1, timeout_s=COOL_OFF_S * 0.8,
                      what="immediate restart")
        assert h.supervisor.dynos[dyno_id].record.crashes == 1
    finally:
        await h.supervisor.detach_all()


async def test_adopted_dyno_keeps_its_cycle_deadline(tmp_path: Path) -> None:
    h, _dyno_id, _pid = await _adopt_with(tmp_path, "worker.1", True, None,
                                         cycle_at=time.time() - 1)
    try:
        await h.until(lambda: len(h.runtime.launches) == 1, what="cycled at once")
        assert "Cycling" in h.lines("worker.1")
    finally:
        await h.supervisor.detach_all()


async def test_oom_kill_while_no_agent_watched_is_still_oom(tmp_path: Path) -> None:
    h, dyno_id, _pid = await _adopt_with(tmp_path, "worker.1", False, 137)
    try:
        h.runtime.stats_value = cgroups.Stats(oom_kill_events=1)
        crashed = await h.event(dyno_id, "crashed")
        assert (crashed["reason"], crashed["exit_status"]) == ("oom", 137)
    finally:
        await h.supervisor.detach_all()


async def test_child_oom_killed_while_no_agent_watched_ends_the_adopted_dyno(
        tmp_path: Path) -> None:
    h, dyno_id, _pid = await _adopt_with(tmp_path, "worker.1", True, None)
    try:
        # The kill happened before this agent's watch began: the counter is past the base
        # the record kept, and PID 1 still runs.
        h.runtime.stats_value = cgroups.Stats(oom_kill_events=1)
        crashed = await h.event(dyno_id, "crashed")
        assert (crashed["reason"], crashed["exit_status"]) == ("oom", 137)
        assert h.runtime.kills == 1
        lines = h.lines("worker.1")
        r15 = lines.index(R15_THEN_137[0])
        assert lines[r15:r15 + 4] == R15_THEN_137
    finally:
        await h.supervisor.detach_all()


async def test_restore_forgets_one_off_dynos_that_completed_while_no_agent_ran(
        tmp_path: Path) -> None:
    first = await _harness(tmp_path)
    one_off = await first.create("run.1")
    worker = await first.create("worker.1")
    await first.state(worker, "up")
    first.runtime.exit(one_off, 0)
    await first.state(one_off, "complete")
    await first.supervisor.detach_all()

    second = await _harness(tmp_path)
    try:
        restored = second.supervisor.restore([])
        assert one_off not in restored and worker in restored
        assert not (second.records.dir / f"{one_off}.json").exists()
    finally:
        await second.supervisor.detach_all()


async def test_a_stop_during_a_restart_wins(tmp_path: Path) -> None:
    h = await _harness(tmp_path, FakeRuntime(ignores_term=True))
    try:
        dyno_id = await h.create("worker.1")
        await h.state(dyno_id, "up")
        restarting = asyncio.create_task(h.supervisor.restart_dyno(dyno_id))
        await h.until(lambda: bool(h.runtime.signals), what="SIGTERM of the restart")
        stopping = asyncio.create_task(h.supervisor.stop_dyno(dyno_id))
        await asyncio.wait_for(asyncio.gather(restarting, stopping), 10.0)
        await h.state(dyno_id, "down")
        assert h.runtime.launches == [dyno_id], "not launched again"
    finally:
        await h.supervisor.detach_all()


async def test_wait_ended_survives_a_dropped_end_event(tmp_path: Path) -> None:
    h = await _harness(tmp_path)
    try:
        dyno_id = await h.create("run.1")
        await h.state(dyno_id, "up")
        def crowd_out(change: Any) -> None:
            # Right behind the `complete` event, before the waiter can read it: the follower
            # keeps one event, so `complete` is among those lost.
            if change.id == dyno_id and change.state == "complete":
                for n in range(3):
                    h.supervisor.bus.publish({"id": "other", "state": "up", "n": n})

        h.supervisor.state_listeners.append(crowd_out)
        with h.supervisor.bus.subscribe(max_queue=1) as follower:
            waiting = asyncio.create_task(h.supervisor.wait_ended(dyno_id, follower))
            await asyncio.sleep(0)  # the waiter is now reading the follower
            h.runtime.exit(dyno_id, 7)
            status = await asyncio.wait_for(waiting, 5)
        assert status == 7
    finally:
        await h.supervisor.detach_all()


async def test_output_sent_again_after_a_resubscribe_is_published_once(
        tmp_path: Path) -> None:
    h = await _harness(tmp_path)
    try:
        dyno_id = await h.create("worker.1")
        await h.state(dyno_id, "up")
        now = time.time()
        first = OutputEvent(dyno_id, 1000, 10, 2, ((now, b"a\n"), (now, b"b\n")))
        again = OutputEvent(dyno_id, 1000, 10, 2, ((now, b"a\n"), (now, b"b\n"), (now, b"c\n")))
        for event in (first, first, again):
            h.supervisor.on_holder_event(event)
        texts = [line.text for line in h.hub.tail(dyno="worker.1") if line.source == "app"]
        assert texts == ["a", "b", "c"]
        assert h.supervisor.get_dyno(dyno_id)["output_dropped"] == 2
    finally:
        await h.supervisor.detach_all()
