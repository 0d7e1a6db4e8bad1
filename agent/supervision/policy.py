"""Supervision decisions as pure functions: restart cool-offs, what an exit means, boot
timeout (R10), memory quota (R14/R15), daily cycling and the stop sequence (R12).

Times are plain float seconds of one monotonic clock (the caller's `loop.time()`); nothing here
reads a clock, sleeps, signals or logs, so every rule is tested with a fake clock.
"""

from __future__ import annotations

import math
import random
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

from agent.heroku import BOOT_TIMEOUT_S as BOOT_TIMEOUT_S
from agent.heroku import CYCLE_BASE_S as CYCLE_BASE_S
from agent.heroku import CYCLE_JITTER_S as CYCLE_JITTER_S
from agent.heroku import HEROKU_SCHEDULE_S as HEROKU_SCHEDULE_S
from agent.heroku import RESET_AFTER_UP_S as RESET_AFTER_UP_S
from agent.heroku import SAMPLE_PERIOD_S as SAMPLE_PERIOD_S
from agent.heroku import STOP_TIMEOUT_S as STOP_TIMEOUT_S
from agent.observability import logs
from agent.signals import EXIT_SIGKILL as EXIT_SIGKILL  # the status after R15
from agent.supervision.states import DynoState, Reason


class PolicyError(ValueError):
    """A policy parameter is out of range; names the parameter and carries the value."""

    def __init__(self, name: str, value: object, why: str) -> None:
        super().__init__(f"{name}={value!r}: {why}")
        self.name = name
        self.value = value


def _check_duration(name: str, value: float) -> None:
    if not math.isfinite(value) or value < 0:
        raise PolicyError(name, value, "must be a finite number of seconds >= 0")


# --- restarts --------------------------------------------------------------------------------

class RestartMode(StrEnum):
    """`restart` of the dyno spec: formation dynos always, one-off and release never."""

    ALWAYS = "always"
    NEVER = "never"


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    """Cool-offs after crashes. An empty schedule is Heroku's Private Spaces rule (`none`):
    every crash restarts at once."""

    schedule_s: tuple[float, ...] = HEROKU_SCHEDULE_S
    reset_after_up_s: float = RESET_AFTER_UP_S

    def __post_init__(self) -> None:
        for delay in self.schedule_s:
            _check_duration("restart_schedule_s", delay)
        _check_duration("reset_after_up_s", self.reset_after_up_s)

    @classmethod
    def none(cls, reset_after_up_s: float = RESET_AFTER_UP_S) -> RestartPolicy:
        return cls((), reset_after_up_s)

    @classmethod
    def from_config(cls, schedule: Sequence[float] | Literal["none"] | None,
                    reset_after_up_s: float = RESET_AFTER_UP_S) -> RestartPolicy:
        """`restart_schedule_s` from agent.toml: a list of seconds, "none", or absent."""
        if schedule is None:
            return cls(HEROKU_SCHEDULE_S, reset_after_up_s)
        if isinstance(schedule, str):
            if schedule != "none":
                raise PolicyError("restart_schedule_s", schedule, 'a list of seconds or "none"')
            return cls.none(reset_after_up_s)
        values: list[float] = []
        for value in schedule:
            # bool is an int; a TOML `true` here is a mistake, not 1 second.
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise PolicyError("restart_schedule_s", list(schedule), "entries must be numbers")
            values.append(float(value))
        return cls(tuple(values), reset_after_up_s)

    def next_restart_delay(self, crashes_since_reset: int) -> float:
        """Seconds to wait before restarting after the `crashes_since_reset`-th crash (1 =
        the first since the last reset, restarted at once)."""
        if crashes_since_reset < 1:
            raise PolicyError("crashes_since_reset", crashes_since_reset, "counts from 1")
        if crashes_since_reset == 1 or not self.schedule_s:
            return 0.0
        return self.schedule_s[min(crashes_since_reset - 2, len(self.schedule_s) - 1)]

    def crashes_before(self, crashes_since_reset: int, up_for_s: float | None) -> int:
        """The crash count to build on when the dyno exits after being up for `up_for_s`
        (None: never got up): it restarts from 0 once the dyno stayed up long enough."""
        if up_for_s is not None and up_for_s >= self.reset_after_up_s:
            return 0
        return crashes_since_reset


class Intent(StrEnum):
    """What the agent itself asked of the dyno before its process exited."""

    NONE = "none"  # nothing: the exit is the process's own doing (or the kernel's)
    STOP = "stop"  # stop/delete: stay down
    RESTART = "restart"  # explicit restart: start again at once, crash count reset
    CYCLE = "cycle"  # daily cycling: like a restart
    BOOT_TIMEOUT = "boot-timeout"  # we killed it after R10
    OOM = "oom"  # we killed it after R15
    HOLDER_LOST = "holder-lost"  # the holder died: the process went with it (or cannot be
    # followed any more) or its launch never reached a holder; not the app's doing


@dataclass(frozen=True, slots=True)
class ExitDecision:
    """What to do when a dyno's PID 1 has exited.

    `state` is the state to move to, or None to stay (a restart or cycle already moved the dyno
    to `starting` when it was asked for). `restart_in_s` is None when the dyno must not run
    again. `crashes` is the new count since the last reset, to be stored with the dyno.
    """

    state: DynoState | None
    reason: Reason
    exit_status: int
    restart_in_s: float | None
    crashes: int


def decide_exit(*, mode: RestartMode, exit_status: int, intent: Intent, oom_killed: bool,
                crashes_since_reset: int, up_for_s: float | None,
                policy: RestartPolicy) -> ExitDecision:
    """Heroku's rules for an exit. `oom_killed` is the kernel's word (memory.events or
    oom_control moved); an OOM kill is never reported as a plain crash."""
    crashes_before = policy.crashes_before(crashes_since_reset, up_for_s)
    if intent is Intent.STOP:
        state = DynoState.COMPLETE if mode is RestartMode.NEVER else DynoState.DOWN
        return ExitDecision(state, Reason.STOPPED, exit_status, None, crashes_before)
    if intent in (Intent.RESTART, Intent.CYCLE):
        if mode is RestartMode.NEVER:
            # One-off dynos are not restarted (Heroku's ps:restart just ends them).
            return ExitDecision(DynoState.COMPLETE, Reason.STOPPED, exit_status, None,
                                crashes_before)
        reason = Reason.RESTART if intent is Intent.RESTART else Reason.CYCLING
        return ExitDecision(None, reason, exit_status, 0.0, 0)
    if intent is Intent.HOLDER_LOST and not oom_killed:
        # A platform failure never costs an app a crash, a cool-off or its restart: a
        # formation dyno starts again at once with its crash count as it was; a one-off
        # has ended (its caller's session went with the process).
        if mode is RestartMode.NEVER:
            return ExitDecision(DynoState.COMPLETE, Reason.HOLDER_LOST, exit_status, None,
                                crashes_before)
        return ExitDecision(DynoState.STARTING, Reason.HOLDER_LOST, exit_status, 0.0,
                            crashes_before)
    if intent is Intent.OOM or oom_killed:
        reason = Reason.OOM
    elif intent is Intent.BOOT_TIMEOUT:
        reason = Reason.BOOT_TIMEOUT
    elif mode is RestartMode.NEVER:
        reason = Reason.EXITED
    else:
        reason = Reason.CRASH
    if mode is RestartMode.NEVER:
        return ExitDecision(DynoState.COMPLETE, reason, exit_status, None, crashes_before)
    crashes = crashes_before + 1
    return ExitDecision(DynoState.CRASHED, reason, exit_status,
                        policy.next_restart_delay(crashes), crashes)


# --- boot (R10) --------------------------------------------------------------------------------

class BootCheck(StrEnum):
    UP = "up"  # mark the dyno up
    WAITING = "waiting"  # keep probing $PORT
    TIMED_OUT = "timed-out"  # R10, SIGKILL, crashed with reason boot-timeout


def needs_port_check(process_type: str) -> bool:
    """Only web dynos must accept on $PORT before they are up; others are up once running."""
    return process_type == "web"


def boot_deadline(started_at: float, timeout_s: float = BOOT_TIMEOUT_S) -> float:
    _check_duration("boot_timeout_s", timeout_s)
    return started_at + timeout_s


def boot_check(*, process_type: str, started_at: float, now: float, accepting: bool,
               timeout_s: float = BOOT_TIMEOUT_S) -> BootCheck:
    """The R10 decision. A probe that succeeds exactly at the deadline still counts; one seen
    after it does not (the timeout already fired)."""
    if not needs_port_check(process_type):
        return BootCheck.UP
    deadline = boot_deadline(started_at, timeout_s)
    if now > deadline or (now == deadline and not accepting):
        return BootCheck.TIMED_OUT
    return BootCheck.UP if accepting else BootCheck.WAITING


def boot_timeout_lines(timeout_s: float = BOOT_TIMEOUT_S) -> tuple[str, str]:
    """What Heroku prints before the SIGKILL of a web dyno that never bound $PORT."""
    return logs.r10_boot_timeout(timeout_s), logs.stopping_process_sigkill()


# --- memory (R14/R15) ------------------------------------------------------------------------

class MemoryVerdict(StrEnum):
    OK = "ok"  # nothing to say (under quota, or R14 already said this sample period)
    R14 = "r14"  # over quota: `Process running mem=…` + R14, keep running
    R15 = "r15"  # at or over the kill point: `Process running mem=…` + R15 + SIGKILL


@dataclass(frozen=True, slots=True)
class MemoryDecision:
    verdict: MemoryVerdict
    usage_bytes: int
    quota_bytes: int
    lines: tuple[str, ...]  # the platform lines to print, in order

    @property
    def percent(self) -> float:
        return self.usage_bytes * 100 / self.quota_bytes


def memory_usage_bytes(rss_bytes: int, swap_bytes: int) -> int:
    """Heroku counts rss + swap toward the quota; page cache is not included."""
    return rss_bytes + swap_bytes


def memory_check(*, quota_bytes: int, kill_at: float, usage_bytes: int,
                 last_r14_at: float | None, now: float,
                 sample_period_s: float = SAMPLE_PERIOD_S) -> MemoryDecision:
    """R15 at or over `quota_bytes * kill_at` (every time: the dyno is killed), R14 over the
    quota at most once per `sample_period_s`, else nothing."""
    if quota_bytes <= 0:
        raise PolicyError("memory_quota_bytes", quota_bytes, "must be positive")
    if not math.isfinite(kill_at) or kill_at < 1:
        raise PolicyError("kill_at", kill_at, "must be a multiple of the quota >= 1")
    _check_duration("sample_period_s", sample_period_s)
    running = logs.process_running_mem(usage_bytes, quota_bytes)
    if usage_bytes >= quota_bytes * kill_at:
        return MemoryDecision(MemoryVerdict.R15, usage_bytes, quota_bytes,
                              (running, logs.r15_memory_quota_vastly_exceeded(),
                               logs.stopping_process_sigkill()))
    if usage_bytes > quota_bytes and (last_r14_at is None
                                      or now - last_r14_at >= sample_period_s):
        return MemoryDecision(MemoryVerdict.R14, usage_bytes, quota_bytes,
                              (running, logs.r14_memory_quota_exceeded()))
    return MemoryDecision(MemoryVerdict.OK, usage_bytes, quota_bytes, ())


def oom_kill_check(*, oom_kills: int | None, oom_base: int, quota_bytes: int, kill_at: float,
                   peak_bytes: int | None) -> MemoryDecision:
    """R15 once the kernel has OOM-killed any process of the dyno since it started.

    The cgroup's memory limit is the kill point, so a kernel OOM kill there is the kill point
    reached, whichever process was the victim. On Heroku R15 ends the dyno; the kernel kills
    only one process on a v1 hierarchy (there is no memory.oom.group), so the caller must kill
    the whole dyno. `oom_kills` is the kernel's counter now (None: unknown), `oom_base` its
    value when the process started. Usage is reported as the group's peak (the moment of the
    kill; the victim's memory is already freed), or the kill point when the kernel has no peak.
    """
    if quota_bytes <= 0:
        raise PolicyError("memory_quota_bytes", quota_bytes, "must be positive")
    if oom_kills is None or oom_kills <= oom_base:
        return MemoryDecision(MemoryVerdict.OK, 0, quota_bytes, ())
    usage = peak_bytes if peak_bytes else int(quota_bytes * kill_at)
    return MemoryDecision(MemoryVerdict.R15, usage, quota_bytes,
                          (logs.process_running_mem(usage, quota_bytes),
                           logs.r15_memory_quota_vastly_exceeded(),
                           logs.stopping_process_sigkill()))


def reported_exit_status(exit_status: int, *, r15: bool) -> int:
    """The status printed and stored for an exit. After R15 it is always 137, as on Heroku:
    the dyno was ended with SIGKILL, even if its PID 1 managed to exit on its own (say,
    with 0 after its OOM-killed child) before the kill reached it."""
    return EXIT_SIGKILL if r15 else exit_status


# --- cycling ---------------------------------------------------------------------------------

def cycle_deadline(up_since: float, rng: random.Random, base_s: float = CYCLE_BASE_S,
                   jitter_s: float = CYCLE_JITTER_S) -> float:
    """When to cycle a dyno that started at `up_since`: after `base_s` plus a uniform
    random 0…`jitter_s` (Heroku: 24 h + up to 216 min), so a host's dynos do not all cycle
    together."""
    _check_duration("cycle_after_s", base_s)
    _check_duration("cycle_jitter_s", jitter_s)
    return up_since + base_s + rng.uniform(0.0, jitter_s)


# --- stop (R12) ------------------------------------------------------------------------------

class StopTarget(StrEnum):
    ALL_PROCESSES = "all-processes"  # every pid in the cgroup (SIGTERM; processes may trap it)
    CGROUP = "cgroup"  # the whole cgroup at once (cgroup.kill / freeze-kill-thaw)


@dataclass(frozen=True, slots=True)
class StopStep:
    """Send `signal` to `target` once `after_s` have passed since the stop began, unless the
    cgroup is already empty; print `lines` first."""

    after_s: float
    signal: signal.Signals
    target: StopTarget
    lines: tuple[str, ...]


def stop_plan(stop_timeout_s: float = STOP_TIMEOUT_S) -> tuple[StopStep, StopStep]:
    """Heroku's stop: SIGTERM to every process, then after the timeout R12 and SIGKILL."""
    _check_duration("stop_timeout_s", stop_timeout_s)
    return (
        StopStep(0.0, signal.SIGTERM, StopTarget.ALL_PROCESSES, (logs.stopping_all_sigterm(),)),
        StopStep(stop_timeout_s, signal.SIGKILL, StopTarget.CGROUP,
                 (logs.r12_exit_timeout(stop_timeout_s), logs.stopping_remaining_sigkill())),
    )


def stop_next(plan: Sequence[StopStep], *, started_at: float, now: float, done_steps: int,
              cgroup_empty: bool) -> StopStep | float | None:
    """The next move of a stop in progress: a step to take now, the time at which to look
    again, or None when the stop is over (the cgroup is empty; a dyno is `down` only then)."""
    if cgroup_empty:
        return None
    if done_steps >= len(plan):
        return math.inf  # everything sent; only the cgroup emptying ends the wait
    step = plan[done_steps]
    due = started_at + step.after_s
    return step if now >= due else due
