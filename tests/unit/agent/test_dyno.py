"""Dyno and Supervisor on a fake Runtime: the lines, states, events and records Heroku's rules
give for starts, crashes and cool-offs, stops (143, R12), R10, R14/R15, cycling, one-offs,
deletes, launch failures, adoption after an agent restart and the start concurrency limit."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

import cgroups
from agent.holder import ExitEvent, HeldProcess, OutputEvent
from agent.sizes import MIB
from agent.supervision.policy import (
    BOOT_TIMEOUT_S,
    CYCLE_BASE_S,
    HEROKU_SCHEDULE_S,
    SAMPLE_PERIOD_S,
    STOP_TIMEOUT_S,
)
from agent.supervision.states import DynoState, StateChange
from agent.supervision.supervisor import MAX_CONCURRENT_STARTS
from agent.supervision.watch import BOOT_PROBE_INTERVAL_S, Command
from tests.support.virtualtime import VirtualClock
from tests.unit.agent.conftest import VIRTUAL_TIME
from tests.unit.agent.fakes import METRICS, FakeRuntime, Harness, Proc, virtual_harness

# On virtual time (tests/support/virtualtime.py), with Heroku's own timings: a 20-minute
# cool-off, a 30-second stop timeout, a 60-second boot timeout, a sample every 20 seconds and
# a cycle a day cost no real time.
pytestmark = pytest.mark.asyncio(loop_factories=[VIRTUAL_TIME])
COOL_OFF_S = HEROKU_SCHEDULE_S[0]


@pytest.fixture
async def h(tmp_path: Path) -> AsyncIterator[Harness]:
    harness = await virtual_harness(tmp_path)
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
    crashed_at = h.clock.monotonic()
    h.runtime.exit(dyno_id, 1)
    await h.until(lambda: len(h.runtime.launches) == 3, COOL_OFF_S + 60,
                  what="restart after cool-off")
    waited = h.clock.monotonic() - crashed_at
    assert waited == pytest.approx(COOL_OFF_S), waited
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


def _launched(h: Harness, count: int) -> Callable[[], bool]:
    return lambda: len(h.runtime.launches) == count


async def test_explicit_restart_resets_the_crash_count(h: Harness) -> None:
    dyno_id = await h.create("worker.1")
    await h.state(dyno_id, "up")
    for launches in (2, 3):
        h.runtime.exit(dyno_id, 1)
        await h.until(_launched(h, launches), COOL_OFF_S + 60, what="restart")
        await h.state(dyno_id, "up")
    assert h.supervisor.dynos[dyno_id].record.crashes == 2
    await h.supervisor.restart_dyno(dyno_id)
    await h.state(dyno_id, "up")
    assert h.supervisor.dynos[dyno_id].record.crashes == 0
    assert "Restarting" in h.lines("worker.1")
    # The next crash is again a "first" one: restarted at once.
    h.runtime.exit(dyno_id, 1)
    await h.until(lambda: len(h.runtime.launches) == 5, timeout_s=1.0,
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
    started = h.clock.monotonic()
    status = await h.supervisor.stop_dyno(dyno_id)
    took = h.clock.monotonic() - started
    assert took == pytest.approx(STOP_TIMEOUT_S), took
    assert (status["state"], status["exit_status"]) == ("down", 137)
    assert h.lines("worker.1")[-5:] == [
        "Stopping all processes with SIGTERM",
        "Error R12 (Exit timeout) -> At least one process failed to exit within 30 seconds "
        "of SIGTERM",
        "Stopping remaining processes with SIGKILL",
        "Process exited with status 137",
        "State changed from up to down"]
    assert h.runtime.kills == 1


async def test_web_that_never_accepts_gets_r10_and_crashes_boot_timeout(h: Harness) -> None:
    h.runtime.accepting_port = False
    dyno_id = await h.create("web.1")
    crashed = await h.event(dyno_id, "crashed", timeout_s=BOOT_TIMEOUT_S + 10)
    assert h.lines("web.1")[:5] == [
        "Starting process with command `run-it`",
        "Error R10 (Boot timeout) -> Web process failed to bind to $PORT within 60 seconds "
        "of launch",
        "Stopping process with SIGKILL",
        "Process exited with status 137",
        "State changed from starting to crashed"]
    assert (crashed["reason"], crashed["exit_status"]) == ("boot-timeout", 137)


async def test_web_is_up_only_once_it_accepts(h: Harness) -> None:
    h.runtime.accepting_port = False
    dyno_id = await h.create("web.1")
    await h.until(lambda: len(h.runtime.launches) == 1, what="launched")
    await asyncio.sleep(BOOT_TIMEOUT_S / 2)  # many probe intervals: still starting
    assert h.supervisor.dynos[dyno_id].state == "starting"
    h.runtime.accepting_port = True
    await h.state(dyno_id, "up")


async def test_web_is_up_as_soon_as_the_kernel_hears_it_listen(h: Harness) -> None:
    h.runtime.accepting_port = False
    dyno_id = await h.create("web.1")
    await h.until(lambda: dyno_id in h.runtime.listen_watchers, what="its listens watched")
    await asyncio.sleep(1.0 + BOOT_PROBE_INTERVAL_S * 0.4)  # between two probes
    probes = h.runtime.probes
    # Listening (it accepts from now on): probed at once, not at the next interval.
    h.runtime.accepting_port = True
    loop = asyncio.get_running_loop()
    heard_at = loop.time()
    h.runtime.listen_watchers[dyno_id](5000)
    await h.state(dyno_id, "up")
    assert loop.time() - heard_at < BOOT_PROBE_INTERVAL_S / 10
    assert h.runtime.probes == probes + 1
    # Up: the watch is closed; a listen on another port meanwhile was no reason to probe.
    assert dyno_id not in h.runtime.listen_watchers


async def test_a_listen_on_another_port_is_no_reason_to_probe(h: Harness) -> None:
    h.runtime.accepting_port = False
    dyno_id = await h.create("web.1")
    await h.until(lambda: dyno_id in h.runtime.listen_watchers, what="its listens watched")
    await asyncio.sleep(1.0 + BOOT_PROBE_INTERVAL_S * 0.4)  # between two probes
    probes = h.runtime.probes
    h.runtime.listen_watchers[dyno_id](5001)
    await asyncio.sleep(BOOT_PROBE_INTERVAL_S / 10)
    assert h.runtime.probes == probes
    assert h.supervisor.dynos[dyno_id].state == "starting"


async def test_r14_over_quota_keeps_running_r15_at_kill_point_kills(tmp_path: Path) -> None:
    h = await virtual_harness(tmp_path, sample_interval_s=SAMPLE_PERIOD_S)
    try:
        h.runtime.stats_value = cgroups.Stats(memory_rss_bytes=96 * MIB)
        dyno_id = await h.create("worker.1", size="tiny")
        await h.state(dyno_id, "up")
        await h.until(lambda: sum(line.text == "Error R14 (Memory quota exceeded)"
                                  for line in h.hub.tail()) >= 2, 3 * SAMPLE_PERIOD_S,
                      what="two R14")
        texts = [line.text for line in h.hub.tail(dyno="worker.1")]
        first = texts.index("Error R14 (Memory quota exceeded)")
        assert texts[first - 1] == "Process running mem=96M(150.0%)"
        assert any(t.startswith("source=worker.1 dyno=") for t in texts)
        assert h.supervisor.dynos[dyno_id].state == "up"
        assert h.runtime.kills == 0
        h.runtime.stats_value = cgroups.Stats(memory_rss_bytes=128 * MIB)
        crashed = await h.event(dyno_id, "crashed", timeout_s=SAMPLE_PERIOD_S + 1)
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


async def test_an_exit_is_decided_without_waiting_for_a_thread(h: Harness) -> None:
    """Whether the cgroup is empty and its OOM-kill count are read at once (counters, cheap
    on the loop): the exit's state change waits for no thread, whose hop costs about a
    millisecond before the exit is visible."""
    dyno_id = await h.create("worker.1")
    await h.state(dyno_id, "up")
    never = asyncio.Event()

    async def thread_hop(*_args: object) -> Any:
        await never.wait()

    h.runtime.stats_async = thread_hop  # type: ignore[method-assign,assignment]
    h.runtime.populated_async = thread_hop  # type: ignore[method-assign,assignment]
    h.runtime.wait_empty = thread_hop  # type: ignore[method-assign,assignment]
    h.runtime.exit(dyno_id, 1)
    crashed = await h.event(dyno_id, "crashed")
    assert (crashed["reason"], crashed["exit_status"]) == ("crash", 1)


async def test_a_start_reads_its_oom_base_without_a_thread(h: Harness) -> None:
    """The OOM-kill count a watch starts from comes from the counters, read on the loop: a
    start waits for no thread (nor for full statistics)."""
    never = asyncio.Event()

    async def thread_hop(*_args: object) -> Any:
        await never.wait()

    h.runtime.stats_async = thread_hop  # type: ignore[method-assign,assignment]
    dyno_id = await h.create("worker.1")
    await h.state(dyno_id, "up")


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
    h = await virtual_harness(tmp_path, sample_interval_s=SAMPLE_PERIOD_S)
    try:
        dyno_id = await h.create("worker.1", size="tiny")
        await h.state(dyno_id, "up")
        h.runtime.oom_kill_child(dyno_id, notify=False)
        crashed = await h.event(dyno_id, "crashed", timeout_s=SAMPLE_PERIOD_S + 1)
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
    started = h.clock.monotonic()
    h.runtime.oom_kill_child(dyno_id)
    status = await stopping
    # Well before the 30 s stop timeout: no R12, the R15 kill ended it.
    assert h.clock.monotonic() - started < 1.0
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
    h = await virtual_harness(tmp_path)
    try:
        dyno_id = await h.create("worker.1")
        await h.state(dyno_id, "up")
        await h.until(lambda: len(h.runtime.launches) == 2, CYCLE_BASE_S + 60, what="cycled")
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
    await asyncio.sleep(2 * COOL_OFF_S)  # a window in which no restart may happen
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
    await asyncio.sleep(2 * COOL_OFF_S)  # past the cool-off: nothing starts it again
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
    first = await virtual_harness(tmp_path)
    running = await first.create("worker.1")
    died = await first.create("worker.2")
    gone = await first.create("worker.3")
    for dyno_id in (running, died, gone):
        await first.state(dyno_id, "up")
    pids = {d: first.supervisor.dynos[d].record.pid for d in (running, died, gone)}
    await first.supervisor.detach_all()  # the agent goes away; the records stay

    second = await virtual_harness(tmp_path)
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
    h = await virtual_harness(tmp_path, runtime)
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
    first = await virtual_harness(tmp_path)
    dyno_id = await first.create("worker.1")
    await first.state(dyno_id, "up")
    await first.supervisor.detach_all()
    # As if the agent died between the holder's launch and the record's save.
    stored = next(r for r in first.records.load_all() if r.id == dyno_id)
    pid = stored.pid
    assert pid is not None
    first.records.save(replace(stored.parse(first.supervisor.config.sizes), pid=None,
                               start_time=None, state=DynoState.STARTING))

    second = await virtual_harness(tmp_path)
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
    h = await virtual_harness(tmp_path)
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
    first = await virtual_harness(tmp_path)
    dyno_id = await first.create(name)
    await first.state(dyno_id, "up")
    await first.supervisor.detach_all()
    stored = next(r for r in first.records.load_all() if r.id == dyno_id)
    record = stored.parse(first.supervisor.config.sizes)
    assert record.launched_at is not None and record.cycle_at is not None
    assert record.up_since is not None and record.oom_base == 0
    record = replace(record, **record_changes)
    first.records.save(record)
    pid = record.pid
    assert pid is not None
    second = await virtual_harness(tmp_path)
    second.runtime.procs[dyno_id] = Proc(pid, exited=not running)
    second.supervisor.restore([_held(dyno_id, pid, running, status)])
    return second, dyno_id, pid


async def test_adopted_dyno_keeps_its_time_up_for_the_crash_count_reset(
        tmp_path: Path) -> None:
    # Up for 11 minutes (Heroku resets the count after 10) across the agent's restart.
    h, dyno_id, _pid = await _adopt_with(tmp_path, "worker.1", True, None, crashes=3,
                                         up_since=VirtualClock().wall() - 660)
    try:
        await h.state(dyno_id, "up")
        h.runtime.exit(dyno_id, 1)
        # A reset count makes this a first crash: restarted at once, not after a cool-off.
        await h.until(lambda: len(h.runtime.launches) == 1, timeout_s=1.0,
                      what="immediate restart")
        assert h.supervisor.dynos[dyno_id].record.crashes == 1
    finally:
        await h.supervisor.detach_all()


async def test_adopted_dyno_keeps_its_cycle_deadline(tmp_path: Path) -> None:
    h, _dyno_id, _pid = await _adopt_with(tmp_path, "worker.1", True, None,
                                         cycle_at=VirtualClock().wall() - 1)
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
    first = await virtual_harness(tmp_path)
    one_off = await first.create("run.1")
    worker = await first.create("worker.1")
    await first.state(worker, "up")
    first.runtime.exit(one_off, 0)
    await first.state(one_off, "complete")
    await first.supervisor.detach_all()

    second = await virtual_harness(tmp_path)
    try:
        restored = second.supervisor.restore([])
        assert one_off not in restored and worker in restored
        assert not (second.records.dir / f"{one_off}.json").exists()
    finally:
        await second.supervisor.detach_all()


async def test_a_stop_during_a_restart_wins(tmp_path: Path) -> None:
    h = await virtual_harness(tmp_path, FakeRuntime(ignores_term=True))
    try:
        dyno_id = await h.create("worker.1")
        await h.state(dyno_id, "up")
        restarting = asyncio.create_task(h.supervisor.restart_dyno(dyno_id))
        await h.until(lambda: bool(h.runtime.signals), what="SIGTERM of the restart")
        stopping = asyncio.create_task(h.supervisor.stop_dyno(dyno_id))
        await asyncio.wait_for(asyncio.gather(restarting, stopping), 3 * STOP_TIMEOUT_S)
        await h.state(dyno_id, "down")
        assert h.runtime.launches == [dyno_id], "not launched again"
    finally:
        await h.supervisor.detach_all()


async def test_wait_ended_survives_a_dropped_end_event(tmp_path: Path) -> None:
    h = await virtual_harness(tmp_path)
    try:
        dyno_id = await h.create("run.1")
        await h.state(dyno_id, "up")
        def crowd_out(change: StateChange) -> None:
            # Right behind the `complete` event, before the waiter can read it: the follower
            # keeps one event, so `complete` is among those lost.
            if change.id == dyno_id and change.state == "complete":
                for n in range(3):
                    h.supervisor.bus.publish(replace(change, id=f"other-{n}",
                                                     name=f"run.{n + 2}"))

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
    h = await virtual_harness(tmp_path)
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


async def test_a_restored_dyno_whose_placement_is_gone_is_placed_again(tmp_path: Path) -> None:
    """After a reboot the records name namespaces, runtime dirs and cgroups that no longer
    exist: the dyno is placed anew (what is left of the old placement freed), not launched
    into a namespace that is gone over and over."""
    first = await virtual_harness(tmp_path)
    dyno_id = await first.create("worker.1")
    await first.state(dyno_id, "up")
    await first.supervisor.detach_all()

    second = await virtual_harness(tmp_path)
    runtime = second.runtime
    runtime.vanished.add(dyno_id)  # and no holder holds its process: the host rebooted
    try:
        second.supervisor.restore([])
        await second.until(lambda: runtime.launches == [dyno_id], what="launched again")
        assert runtime.unplaced == [dyno_id]
        status = await second.state(dyno_id, "up")
        assert status["pid"] is not None
    finally:
        await second.supervisor.detach_all()


async def test_a_start_and_its_exit_are_timed_phase_by_phase(h: Harness) -> None:
    """timings_ms has each phase of the start in the order they happen (the record write at
    creation, the wait for a start slot, the placement's steps, the launch and its own steps
    in the holder, the state up), then the exit until `complete` is visible; each phase is
    counted once in the start-phase histogram of /metrics."""
    dyno_id = await h.create("run.1")
    await h.state(dyno_id, "up")
    h.runtime.exit(dyno_id, 0)
    await h.state(dyno_id, "complete")
    timings = h.supervisor.get_dyno(dyno_id)["timings_ms"]
    phases = ["record", "queue", "slug", "uid", "dir", "cgroup", "netns", "prepare", "launch",
              "launch.total", "up", "run", "exit_event", "exit"]
    assert list(timings) == phases
    assert all(isinstance(ms, float) and ms >= 0 for ms in timings.values())
    assert timings["netns"] == 4.0  # the runtime's own measure, as it gave it
    text = h.supervisor.metrics_text()
    for phase in phases:
        if "." not in phase:
            assert f'dynoagent_start_phase_seconds_count{{phase="{phase}"}} 1\n' in text
    assert "launch.total" not in text
