"""Supervision decisions on a fake clock: restart cool-offs and resets, what an exit means,
R10, R14/R15, cycling bounds and the stop sequence."""

from __future__ import annotations

import math
import random
import signal

import pytest

from agent.supervision.policy import (
    EXIT_SIGKILL,
    BootCheck,
    Intent,
    MemoryVerdict,
    PolicyError,
    RestartMode,
    RestartPolicy,
    StopStep,
    StopTarget,
    boot_check,
    boot_deadline,
    boot_timeout_lines,
    cycle_deadline,
    decide_exit,
    memory_check,
    memory_usage_bytes,
    needs_port_check,
    oom_kill_check,
    reported_exit_status,
    stop_next,
    stop_plan,
)
from agent.supervision.states import DynoState, Reason

MIN = 60.0
MIB = 2**20


# --- restart schedule ----------------------------------------------------------------------

@pytest.mark.parametrize(("crashes", "delay_s"), [
    (1, 0.0), (2, 20 * MIN), (3, 40 * MIN), (4, 60 * MIN), (5, 180 * MIN), (6, 320 * MIN),
    (7, 320 * MIN), (100, 320 * MIN),
])
def test_heroku_schedule(crashes: int, delay_s: float) -> None:
    assert RestartPolicy().next_restart_delay(crashes) == delay_s


@pytest.mark.parametrize("crashes", [1, 2, 3, 50])
def test_none_schedule_always_restarts_at_once(crashes: int) -> None:
    assert RestartPolicy.none().next_restart_delay(crashes) == 0.0
    assert RestartPolicy.from_config("none").next_restart_delay(crashes) == 0.0


def test_custom_schedule_last_entry_repeats() -> None:
    policy = RestartPolicy.from_config([0.5, 2])
    assert [policy.next_restart_delay(n) for n in range(1, 6)] == [0.0, 0.5, 2.0, 2.0, 2.0]
    assert RestartPolicy.from_config(None) == RestartPolicy()


@pytest.mark.parametrize("bad", [[-1.0], [math.inf], [math.nan], [True], ["10"], "never"])
def test_bad_schedules_are_refused(bad: object) -> None:
    with pytest.raises(PolicyError) as caught:
        RestartPolicy.from_config(bad)  # type: ignore[arg-type]
    assert caught.value.name == "restart_schedule_s"


def test_crash_count_starts_at_one() -> None:
    with pytest.raises(PolicyError):
        RestartPolicy().next_restart_delay(0)


@pytest.mark.parametrize(("up_for_s", "before", "expected"), [
    (None, 3, 3),  # never got up: keeps counting
    (0.0, 3, 3),
    (599.999, 3, 3),
    (600.0, 3, 0),  # up 10 minutes: "started correctly"
    (5000.0, 7, 0),
])
def test_counter_resets_after_ten_minutes_up(up_for_s: float | None, before: int,
                                             expected: int) -> None:
    assert RestartPolicy().crashes_before(before, up_for_s) == expected


# --- what an exit means ---------------------------------------------------------------------

def exit_(mode: RestartMode = RestartMode.ALWAYS, status: int = 1, intent: Intent = Intent.NONE,
          oom: bool = False, crashes: int = 0, up_for_s: float | None = 5.0,
          policy: RestartPolicy | None = None) -> tuple[object, ...]:
    d = decide_exit(mode=mode, exit_status=status, intent=intent, oom_killed=oom,
                    crashes_since_reset=crashes, up_for_s=up_for_s,
                    policy=policy or RestartPolicy())
    return (d.state, d.reason, d.exit_status, d.restart_in_s, d.crashes)


A, N = RestartMode.ALWAYS, RestartMode.NEVER
C = DynoState.CRASHED


@pytest.mark.parametrize(("kwargs", "expected"), [
    # A formation dyno's exit is a crash, whatever the status (Heroku: "including 0").
    ({"status": 0}, (C, Reason.CRASH, 0, 0.0, 1)),
    ({"status": 1, "crashes": 1}, (C, Reason.CRASH, 1, 20 * MIN, 2)),
    ({"crashes": 5}, (C, Reason.CRASH, 1, 320 * MIN, 6)),
    # Up ten minutes before crashing: counts as the first crash again.
    ({"crashes": 5, "up_for_s": 600.0}, (C, Reason.CRASH, 1, 0.0, 1)),
    # OOM is never a plain crash, whether we killed it (R15) or the kernel did.
    ({"status": 137, "intent": Intent.OOM}, (C, Reason.OOM, 137, 0.0, 1)),
    ({"status": 137, "oom": True, "crashes": 1}, (C, Reason.OOM, 137, 20 * MIN, 2)),
    ({"status": 137, "intent": Intent.BOOT_TIMEOUT, "up_for_s": None},
     (C, Reason.BOOT_TIMEOUT, 137, 0.0, 1)),
    # Stops and restarts asked for by the agent.
    ({"status": 143, "intent": Intent.STOP, "crashes": 2},
     (DynoState.DOWN, Reason.STOPPED, 143, None, 2)),
    ({"status": 143, "intent": Intent.RESTART, "crashes": 4},
     (None, Reason.RESTART, 143, 0.0, 0)),
    ({"status": 0, "intent": Intent.CYCLE, "crashes": 4}, (None, Reason.CYCLING, 0, 0.0, 0)),
    # "none" schedule: restart at once however many crashes.
    ({"crashes": 9, "policy": RestartPolicy.none()}, (C, Reason.CRASH, 1, 0.0, 10)),
    # One-off and release dynos end complete and never restart.
    ({"mode": N, "status": 0}, (DynoState.COMPLETE, Reason.EXITED, 0, None, 0)),
    ({"mode": N, "status": 2}, (DynoState.COMPLETE, Reason.EXITED, 2, None, 0)),
    ({"mode": N, "status": 137, "oom": True}, (DynoState.COMPLETE, Reason.OOM, 137, None, 0)),
    ({"mode": N, "status": 143, "intent": Intent.STOP},
     (DynoState.COMPLETE, Reason.STOPPED, 143, None, 0)),
    ({"mode": N, "status": 143, "intent": Intent.RESTART},
     (DynoState.COMPLETE, Reason.STOPPED, 143, None, 0)),
])
def test_decide_exit(kwargs: dict[str, object], expected: tuple[object, ...]) -> None:
    assert exit_(**kwargs) == expected  # type: ignore[arg-type]


def test_crash_loop_on_a_fake_clock() -> None:
    """A dyno that crashes 3 s after every start follows the schedule; one that then stays
    up 10 minutes is restarted at once again."""
    policy = RestartPolicy()
    now, crashes, delays = 0.0, 0, []
    for _ in range(7):
        started = now
        now += 3.0
        d = decide_exit(mode=A, exit_status=1, intent=Intent.NONE, oom_killed=False,
                        crashes_since_reset=crashes, up_for_s=now - started, policy=policy)
        assert d.restart_in_s is not None
        delays.append(d.restart_in_s)
        crashes = d.crashes
        now += d.restart_in_s
    assert delays == [0.0, 1200.0, 2400.0, 3600.0, 10800.0, 19200.0, 19200.0]
    d = decide_exit(mode=A, exit_status=1, intent=Intent.NONE, oom_killed=False,
                    crashes_since_reset=crashes, up_for_s=601.0, policy=policy)
    assert (d.restart_in_s, d.crashes) == (0.0, 1)


# --- boot -----------------------------------------------------------------------------------

def test_only_web_waits_for_port() -> None:
    assert needs_port_check("web")
    for other in ("worker", "clock", "run", "release", "webhook"):
        assert not needs_port_check(other)


@pytest.mark.parametrize(("ptype", "now", "accepting", "expected"), [
    ("web", 100.0, False, BootCheck.WAITING),
    ("web", 100.0, True, BootCheck.UP),
    ("web", 159.999, False, BootCheck.WAITING),
    ("web", 160.0, True, BootCheck.UP),  # accepted right at the deadline still counts
    ("web", 160.0, False, BootCheck.TIMED_OUT),
    ("web", 160.001, True, BootCheck.TIMED_OUT),
    ("web", 500.0, False, BootCheck.TIMED_OUT),
    ("worker", 100.0, False, BootCheck.UP),
    ("worker", 500.0, False, BootCheck.UP),  # workers have no boot timeout
])
def test_boot_check(ptype: str, now: float, accepting: bool, expected: BootCheck) -> None:
    assert boot_check(process_type=ptype, started_at=100.0, now=now, accepting=accepting,
                      timeout_s=60.0) == expected


def test_boot_deadline_and_r10_lines() -> None:
    assert boot_deadline(100.0) == 160.0
    assert boot_deadline(100.0, 2.5) == 102.5
    with pytest.raises(PolicyError):
        boot_deadline(0.0, -1.0)
    assert boot_timeout_lines() == (
        "Error R10 (Boot timeout) -> Web process failed to bind to $PORT within 60 seconds "
        "of launch", "Stopping process with SIGKILL")
    assert boot_timeout_lines(2.5)[0].endswith("within 2.5 seconds of launch")


# --- memory ---------------------------------------------------------------------------------

QUOTA = 512 * MIB


@pytest.mark.parametrize(("usage", "last_r14_at", "now", "verdict"), [
    (100 * MIB, None, 0.0, MemoryVerdict.OK),
    (QUOTA, None, 0.0, MemoryVerdict.OK),  # at the quota is not over it
    (QUOTA + 1, None, 0.0, MemoryVerdict.R14),
    (QUOTA + 1, 0.0, 19.999, MemoryVerdict.OK),  # once per 20 s sample period
    (QUOTA + 1, 0.0, 20.0, MemoryVerdict.R14),
    (2 * QUOTA - 1, 10.0, 15.0, MemoryVerdict.OK),
    (2 * QUOTA, 10.0, 15.0, MemoryVerdict.R15),  # R15 is never rate-limited
    (3 * QUOTA, None, 0.0, MemoryVerdict.R15),
])
def test_memory_check(usage: int, last_r14_at: float | None, now: float,
                      verdict: MemoryVerdict) -> None:
    d = memory_check(quota_bytes=QUOTA, kill_at=2.0, usage_bytes=usage,
                     last_r14_at=last_r14_at, now=now)
    assert d.verdict is verdict


def test_memory_lines_use_heroku_wording() -> None:
    r14 = memory_check(quota_bytes=QUOTA, kill_at=2.0, usage_bytes=int(528.9 * MIB),
                       last_r14_at=None, now=0.0)
    assert r14.lines == ("Process running mem=529M(103.3%)", "Error R14 (Memory quota exceeded)")
    r15 = memory_check(quota_bytes=QUOTA, kill_at=2.0, usage_bytes=1029 * MIB,
                       last_r14_at=None, now=0.0)
    assert r15.lines == ("Process running mem=1029M(201.0%)",
                         "Error R15 (Memory quota vastly exceeded)",
                         "Stopping process with SIGKILL")
    assert r15.percent == pytest.approx(200.97656)
    assert memory_check(quota_bytes=QUOTA, kill_at=2.0, usage_bytes=1, last_r14_at=None,
                        now=0.0).lines == ()


def test_private_kill_at_quota_skips_r14() -> None:
    d = memory_check(quota_bytes=QUOTA, kill_at=1.0, usage_bytes=QUOTA, last_r14_at=None,
                     now=0.0)
    assert d.verdict is MemoryVerdict.R15


def test_r14_once_per_period_on_a_fake_clock() -> None:
    """Sampled every 5 s while over quota for a minute: R14 at 0, 20, 40, 60 s only."""
    last: float | None = None
    reported = []
    for tick in range(13):
        now = tick * 5.0
        d = memory_check(quota_bytes=QUOTA, kill_at=2.0, usage_bytes=QUOTA + MIB,
                         last_r14_at=last, now=now)
        if d.verdict is MemoryVerdict.R14:
            reported.append(now)
            last = now
    assert reported == [0.0, 20.0, 40.0, 60.0]


@pytest.mark.parametrize(("quota", "kill_at"), [(0, 2.0), (-5, 2.0), (QUOTA, 0.5),
                                                (QUOTA, math.nan)])
def test_memory_check_refuses_bad_parameters(quota: int, kill_at: float) -> None:
    with pytest.raises(PolicyError):
        memory_check(quota_bytes=quota, kill_at=kill_at, usage_bytes=1, last_r14_at=None,
                     now=0.0)


def test_usage_excludes_cache() -> None:
    assert memory_usage_bytes(rss_bytes=100, swap_bytes=20) == 120


R15_LINES = ("Error R15 (Memory quota vastly exceeded)", "Stopping process with SIGKILL")


@pytest.mark.parametrize(("oom_kills", "oom_base", "peak", "expected"), [
    (None, 0, None, None),  # counter unknown: nothing to say
    (0, 0, 1024 * MIB, None),
    (3, 3, 1024 * MIB, None),  # kills from before this process started are not its own
    (4, 3, 1024 * MIB, "Process running mem=1024M(200.0%)"),
    (1, 0, 1029 * MIB, "Process running mem=1029M(201.0%)"),  # Heroku's own example
    (1, 0, None, "Process running mem=1024M(200.0%)"),  # no peak: the kill point was reached
    (1, 0, 0, "Process running mem=1024M(200.0%)"),
])
def test_kernel_oom_kill_is_r15_with_the_usage_at_the_kill(
        oom_kills: int | None, oom_base: int, peak: int | None, expected: str | None) -> None:
    d = oom_kill_check(oom_kills=oom_kills, oom_base=oom_base, quota_bytes=QUOTA, kill_at=2.0,
                       peak_bytes=peak)
    if expected is None:
        assert (d.verdict, d.lines) == (MemoryVerdict.OK, ())
    else:
        assert d.verdict is MemoryVerdict.R15
        assert d.lines == (expected, *R15_LINES)


def test_kernel_oom_kill_refuses_a_bad_quota() -> None:
    with pytest.raises(PolicyError):
        oom_kill_check(oom_kills=1, oom_base=0, quota_bytes=0, kill_at=2.0, peak_bytes=None)


@pytest.mark.parametrize(("status", "r15", "expected"), [
    (0, True, 137), (1, True, 137), (137, True, 137), (143, True, 137),
    (0, False, 0), (3, False, 3), (143, False, 143),
])
def test_after_r15_the_exit_is_always_137(status: int, r15: bool, expected: int) -> None:
    assert reported_exit_status(status, r15=r15) == expected == (EXIT_SIGKILL if r15 else status)


# --- cycling --------------------------------------------------------------------------------

def test_cycle_deadline_stays_within_the_window() -> None:
    rng = random.Random(1234)
    deadlines = [cycle_deadline(1000.0, rng) for _ in range(2000)]
    assert min(deadlines) >= 1000.0 + 86400.0
    assert max(deadlines) <= 1000.0 + 86400.0 + 216 * 60.0
    # Spread over the window, not bunched: both ends of it are reached.
    assert min(deadlines) < 1000.0 + 86400.0 + 216 * 6.0
    assert max(deadlines) > 1000.0 + 86400.0 + 216 * 54.0


def test_cycle_deadline_extremes_and_config() -> None:
    class Fixed(random.Random):
        def __init__(self, value: float) -> None:
            super().__init__()
            self.value = value

        def uniform(self, a: float, b: float) -> float:
            return a + (b - a) * self.value

    assert cycle_deadline(0.0, Fixed(0.0)) == 86400.0
    assert cycle_deadline(0.0, Fixed(1.0)) == 86400.0 + 12960.0
    assert cycle_deadline(5.0, Fixed(0.5), base_s=10.0, jitter_s=2.0) == 16.0
    assert cycle_deadline(5.0, random.Random(), base_s=10.0, jitter_s=0.0) == 15.0
    with pytest.raises(PolicyError):
        cycle_deadline(0.0, random.Random(), base_s=-1.0)


# --- stop -----------------------------------------------------------------------------------

def test_stop_plan_is_sigterm_all_then_r12_and_sigkill_cgroup() -> None:
    term, kill = stop_plan(30.0)
    assert term == StopStep(0.0, signal.SIGTERM, StopTarget.ALL_PROCESSES,
                            ("Stopping all processes with SIGTERM",))
    assert kill == StopStep(30.0, signal.SIGKILL, StopTarget.CGROUP, (
        "Error R12 (Exit timeout) -> At least one process failed to exit within 30 seconds "
        "of SIGTERM", "Stopping remaining processes with SIGKILL"))


def test_stop_on_a_fake_clock() -> None:
    plan = stop_plan(2.0)
    # t=10: begin; SIGTERM now.
    assert stop_next(plan, started_at=10.0, now=10.0, done_steps=0, cgroup_empty=False) \
        == plan[0]
    # Still running: look again at the deadline.
    assert stop_next(plan, started_at=10.0, now=10.5, done_steps=1, cgroup_empty=False) == 12.0
    assert stop_next(plan, started_at=10.0, now=12.0, done_steps=1, cgroup_empty=False) \
        == plan[1]
    # After SIGKILL only the cgroup emptying ends it.
    assert stop_next(plan, started_at=10.0, now=13.0, done_steps=2, cgroup_empty=False) \
        == math.inf
    # Processes that leave on SIGTERM: no R12, no SIGKILL.
    assert stop_next(plan, started_at=10.0, now=11.0, done_steps=1, cgroup_empty=True) is None
