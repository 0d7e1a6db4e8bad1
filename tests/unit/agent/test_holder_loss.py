"""The holder's death is the platform's failure, never the app's: no crash counted, no cool-off,
a restart at once; a launch that finds the holder gone waits for it (an event with a deadline)
and never loops without awaiting, so the daemon's reconnect always gets to run."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.holder import HeldProcess
from agent.spec import DynoSpec
from agent.supervision.policy import Intent, RestartMode, RestartPolicy, decide_exit
from agent.supervision.records import Placement
from agent.supervision.runtime import HolderUnavailable, Launch
from agent.supervision.states import DynoState, Reason
from tests.unit.agent.conftest import VIRTUAL_TIME
from tests.unit.agent.fakes import FakeRuntime, virtual_harness

A, N = RestartMode.ALWAYS, RestartMode.NEVER
VIRTUAL = pytest.mark.asyncio(loop_factories=[VIRTUAL_TIME])
HEROKU = RestartPolicy()


@pytest.mark.parametrize("policy", [HEROKU, RestartPolicy.none()])
def test_a_lost_holder_restarts_at_once_and_counts_no_crash(policy: RestartPolicy) -> None:
    # Three crashes already: one more would mean a cool-off (none under "none").
    d = decide_exit(mode=A, exit_status=137, intent=Intent.HOLDER_LOST, oom_killed=False,
                    crashes_since_reset=3, up_for_s=5.0, policy=policy)
    assert (d.state, d.reason, d.restart_in_s, d.crashes) == (
        DynoState.STARTING, Reason.HOLDER_LOST, 0.0, 3)


def test_a_lost_holder_keeps_the_crash_count_reset_of_a_dyno_up_long_enough() -> None:
    d = decide_exit(mode=A, exit_status=137, intent=Intent.HOLDER_LOST, oom_killed=False,
                    crashes_since_reset=3, up_for_s=HEROKU.reset_after_up_s, policy=HEROKU)
    assert d.crashes == 0


def test_a_one_off_lost_with_its_holder_has_ended_not_crashed() -> None:
    d = decide_exit(mode=N, exit_status=137, intent=Intent.HOLDER_LOST, oom_killed=False,
                    crashes_since_reset=0, up_for_s=None, policy=HEROKU)
    assert (d.state, d.reason, d.restart_in_s) == (DynoState.COMPLETE, Reason.HOLDER_LOST, None)


def test_the_kernel_oom_kill_is_still_r15_even_if_the_holder_died_meanwhile() -> None:
    d = decide_exit(mode=A, exit_status=137, intent=Intent.HOLDER_LOST, oom_killed=True,
                    crashes_since_reset=0, up_for_s=1.0, policy=HEROKU)
    assert (d.state, d.reason, d.crashes) == (DynoState.CRASHED, Reason.OOM, 1)


@dataclass
class GoneHolderRuntime(FakeRuntime):
    """The holder is gone: a launch fails at once, without awaiting (as `HolderClient.request`
    does on a closed connection)."""

    holder_gone: bool = False
    attempts: int = 0

    async def launch(self, spec: DynoSpec, placement: Placement,
                     env: Mapping[str, str]) -> Launch:
        self.attempts += 1
        if self.holder_gone:
            raise HolderUnavailable("Error: the host's process holder is gone")
        return await super().launch(spec, placement, env)


# A loop that never awaits freezes the event loop: only the timeout's signal ends the test.
@pytest.mark.timeout(10, method="signal")
@VIRTUAL
async def test_a_launch_without_holder_waits_for_it_and_never_loops_hot(tmp_path: Path) -> None:
    runtime = GoneHolderRuntime(holder_gone=True)
    h = await virtual_harness(tmp_path, runtime, restart_schedule_s=())
    ticks = 0

    async def other_task() -> None:  # the daemon's holder reconnect, say
        nonlocal ticks
        while True:
            ticks += 1
            # A millisecond, not sleep(0): virtual time stands still while work is ready.
            await asyncio.sleep(0.001)

    other = asyncio.create_task(other_task())
    try:
        dyno_id = await h.create("worker.1")
        await h.until(lambda: ticks >= 200, 2.0, "the other task running")
        # One attempt, then waiting for the holder (not tens of thousands of attempts).
        assert runtime.attempts == 1, runtime.attempts
        dyno = h.supervisor.dynos[dyno_id]
        assert dyno.state is DynoState.STARTING
        runtime.holder_gone = False
        h.supervisor.holder_gate.back()
        status = await h.state(dyno_id, "up", 2.0)
        assert runtime.attempts == 2
        assert (status["restarts"], dyno.record.crashes) == (0, 0)
        assert "crashed" not in [e["state"] for e in h.events]
        assert "Error: the host's process holder is gone" in h.lines("worker.1")
    finally:
        other.cancel()
        await h.supervisor.detach_all()


@VIRTUAL
async def test_a_stop_while_waiting_for_the_holder_is_carried_out(tmp_path: Path) -> None:
    runtime = GoneHolderRuntime(holder_gone=True)
    h = await virtual_harness(tmp_path, runtime, restart_schedule_s=())
    try:
        dyno_id = await h.create("worker.1")
        await h.until(lambda: runtime.attempts == 1, 2.0, "the first attempt")
        await asyncio.wait_for(h.supervisor.stop_dyno(dyno_id), 2.0)
        assert h.supervisor.dynos[dyno_id].state is DynoState.DOWN
        h.supervisor.holder_gate.back()
        await asyncio.sleep(60)  # a window in which no launch may happen
        assert runtime.attempts == 1
    finally:
        await h.supervisor.detach_all()


@VIRTUAL
async def test_a_process_the_new_holder_does_not_know_restarts_at_once_uncounted(
        tmp_path: Path) -> None:
    # A cool-off schedule and a crash already counted: were the holder's death counted as a
    # crash, the dyno would sit `crashed` for the cool-off.
    h = await virtual_harness(tmp_path)
    try:
        dyno_id = await h.create("worker.1")
        await h.state(dyno_id, "up")
        h.runtime.exit(dyno_id, 1)
        await h.until(lambda: len(h.runtime.launches) == 2, what="the first crash's restart")
        await h.state(dyno_id, "up")
        dyno = h.supervisor.dynos[dyno_id]
        assert dyno.record.crashes == 1
        old_pid = dyno.record.pid
        events_before = len(h.events)
        # The holder died and a new one holds nothing; the old process still ran outside it.
        assert old_pid is not None
        h.runtime.alive.add((old_pid, 1))
        h.supervisor.resync([HeldProcess("other", "launch", 1, 1, True, None, None, 0, 0, 0,
                                         None)])
        await h.until(lambda: len(h.runtime.launches) == 3, 1.0, "the restart")
        status = await h.state(dyno_id, "up")
        assert status["pid"] != old_pid
        assert dyno.record.crashes == 1
        moves = [(e["state"], e["reason"]) for e in h.events[events_before:]]
        assert moves == [("starting", "holder-lost"), ("up", "booted")]
        lines = h.lines("worker.1")
        said = ("Error: the host's process holder died with the process; restarting it (not "
                "a crash)")
        at = lines.index(said)
        assert lines[at:at + 4] == [said, "Process exited with status 137",
                                    "State changed from up to starting",
                                    "Starting process with command `run-it`"]
    finally:
        await h.supervisor.detach_all()
