"""A running dyno's supervision as a pure step: `step(watch, event, now) -> actions`.

`Watch` is everything supervision knows about one running process between events: its
deadlines (boot, next sample, next probe, daily cycle), the stop under way, what the agent
asked of it (`Intent`) and the kernel's OOM-kill count. Events are what happened (an exit,
an operator command, an OOM kill, a probe or sample result, time passing); actions are what
the shell in `agent.supervision.dyno` must do (say lines, change state, signal, probe,
sample). Nothing here reads a clock, sleeps, signals or does I/O: `now` is a float of the
caller's monotonic clock, so every rule is tested on a fake clock, and the shell cannot loop
without awaiting because only it waits (until `watch.deadline()` or the next event).

The rules themselves are `agent.supervision.policy`'s; this module sequences them.
"""

from __future__ import annotations

import enum
import math
import signal
from collections.abc import Sequence
from dataclasses import dataclass, field

from agent.observability import logs, metrics
from agent.supervision import policy
from agent.supervision.policy import Intent
from agent.supervision.states import DynoState, Reason
from cgroups import Stats

BOOT_PROBE_INTERVAL_S = 0.05
# Samples fall due on multiples of this (the clock's seconds): the dynos due in the same
# tick wake together, on one timer (agent.supervision.dyno.Alarms).
SAMPLE_TICK_S = 0.25


class Command(enum.Enum):
    """An operator's (or the engine's) lifecycle request for one dyno."""

    START = "start"
    STOP = "stop"
    RESTART = "restart"
    DELETE = "delete"


# --- events ------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Exited:
    """PID 1 exited with `status`; `lost` when it went with the holder (the platform's
    doing, not the app's)."""

    status: int
    lost: bool = False


@dataclass(frozen=True, slots=True)
class Asked:
    command: Command


@dataclass(frozen=True, slots=True)
class OomKilled:
    """The kernel's OOM-kill counter of the dyno's cgroup is now `count`; `peak_bytes` is the
    group's peak memory (None: the kernel has none)."""

    count: int
    peak_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class Probed:
    """Whether something accepts on the dyno's $PORT (answer to `Probe`)."""

    accepting: bool


@dataclass(frozen=True, slots=True)
class Listening:
    """The kernel saw a process of the dyno start to listen on its $PORT: probe now, not at
    the next interval."""


@dataclass(frozen=True, slots=True)
class Sampled:
    """The cgroup's counters (answer to `Sample`); None when the cgroup could not be read."""

    stats: Stats | None


@dataclass(frozen=True, slots=True)
class Tick:
    """Time has passed: do what is due."""


Event = Exited | Asked | OomKilled | Probed | Listening | Sampled | Tick


# --- actions -----------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Say:
    lines: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Transition:
    state: DynoState
    reason: Reason


@dataclass(frozen=True, slots=True)
class MarkUp:
    """The dyno is up (web: its port accepts; others: running)."""


@dataclass(frozen=True, slots=True)
class SignalAll:
    """Send `signal` to every process of the dyno."""

    signal: signal.Signals


@dataclass(frozen=True, slots=True)
class KillAll:
    """SIGKILL the whole cgroup at once."""


@dataclass(frozen=True, slots=True)
class Probe:
    """Check whether the dyno's $PORT accepts; answer with `Probed`."""


@dataclass(frozen=True, slots=True)
class Sample:
    """Read the cgroup's counters; answer with `Sampled`."""


@dataclass(frozen=True, slots=True)
class Desire:
    """Record that the dyno should be `running` or `stopped` after this process."""

    running: bool


Action = Say | Transition | MarkUp | SignalAll | KillAll | Probe | Sample | Desire


# --- the state ---------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Limits:
    """What the rules need to know of the dyno itself."""

    name: str
    dyno_id: str
    process_type: str
    quota_bytes: int
    kill_at: float
    boot_timeout_s: float
    sample_period_s: float
    stop_timeout_s: float


@dataclass(slots=True)
class Watch:
    limits: Limits
    started_at: float  # monotonic time of the launch (an adopted process keeps its own)
    cycle_at: float
    next_sample: float
    oom_base: int  # the OOM-kill count before this process ran
    oom_kills: int
    up: bool
    boot_pending: bool
    next_probe: float
    plan: tuple[policy.StopStep, ...] = ()
    intent: Intent = Intent.NONE
    stop_started: float | None = None
    stop_steps: int = 0
    r15: bool = False  # R15 has been said: once, and the exit is then reported as 137
    last_r14: float | None = None
    deleting: bool = False  # a delete waits for the exit (the lifecycle finishes it)
    exit_status: int | None = None
    last_stats: Stats | None = field(default=None, repr=False)

    @property
    def exited(self) -> bool:
        return self.exit_status is not None

    def deadline(self) -> float:
        """When a `Tick` is next due, if no event comes first."""
        due = [self.next_sample]
        if self.stop_started is None:
            due.append(self.cycle_at)
            if self.boot_pending:
                due.append(self.next_probe)
        elif self.stop_steps < len(self.plan):
            due.append(self.stop_started + self.plan[self.stop_steps].after_s)
        return min(due)


def begin(limits: Limits, *, now: float, started_at: float, cycle_at: float, oom_base: int,
          oom_kills: int, state: DynoState, intent: Intent = Intent.NONE,
          stop_started: float | None = None) -> tuple[Watch, list[Action]]:
    """The watch of a process launched (or adopted) at `started_at`, the dyno being in
    `state`; and what to do at once (a non-web dyno is up as soon as it runs).

    An adopted process may be under a stop, restart or kill the last agent began at
    `stop_started` (`intent`): it goes on. Its SIGTERM is sent again (the last agent may
    have died before sending it; a second one is harmless), its R12 deadline kept; a kill
    is sent again at once."""
    starting = state is DynoState.STARTING
    needs_port = policy.needs_port_check(limits.process_type)
    watch = Watch(
        limits=limits, started_at=started_at, cycle_at=cycle_at,
        next_sample=_next_sample(now, limits.sample_period_s), oom_base=oom_base,
        oom_kills=max(oom_kills, oom_base), up=state is DynoState.UP,
        boot_pending=starting and needs_port, next_probe=now,
        plan=policy.stop_plan(limits.stop_timeout_s))
    actions: list[Action] = []
    if intent is not Intent.NONE and intent is not Intent.HOLDER_LOST:
        watch.intent = intent
        watch.stop_started = now if stop_started is None else stop_started
        watch.boot_pending = False
        if intent in (Intent.OOM, Intent.BOOT_TIMEOUT):
            watch.r15 = intent is Intent.OOM
            watch.stop_steps = len(watch.plan)
            actions.append(KillAll())
        return watch, actions
    if starting and not needs_port:
        watch.up = True
        actions.append(MarkUp())
    return watch, actions


# --- the step ----------------------------------------------------------------------------------

def step(watch: Watch, event: Event, now: float) -> list[Action]:
    """Apply `event` at `now` to `watch` (in place) and return what to do, in order."""
    match event:
        case Exited(status=status, lost=lost):
            watch.exit_status = status
            if lost and watch.intent is Intent.NONE:
                # A stop, restart or kill of ours under way keeps its outcome.
                watch.intent = Intent.HOLDER_LOST
            return []
        case Asked(command=command):
            return _asked(watch, command, now)
        case OomKilled(count=count, peak_bytes=peak):
            watch.oom_kills = max(watch.oom_kills, count)
            return _oom_kill(watch, peak, now)
        case Probed(accepting=accepting):
            return _probed(watch, accepting, now)
        case Listening():
            if not watch.boot_pending or watch.stop_started is not None:
                return []
            watch.next_probe = now + BOOT_PROBE_INTERVAL_S
            return [Probe()]
        case Sampled(stats=stats):
            return _sampled(watch, stats, now)
        case Tick():
            return _due(watch, now)


def _begin_stop(watch: Watch, intent: Intent, now: float) -> None:
    if watch.stop_started is None:
        watch.intent = intent
        watch.stop_started = now


def _kill_now(watch: Watch, intent: Intent, now: float) -> list[Action]:
    watch.intent = intent
    if watch.stop_started is None:
        watch.stop_started = now
    watch.stop_steps = len(watch.plan)
    return [KillAll()]


def _asked(watch: Watch, command: Command, now: float) -> list[Action]:
    if command in (Command.STOP, Command.DELETE):
        watch.deleting = watch.deleting or command is Command.DELETE
        _begin_stop(watch, Intent.STOP, now)
        # A stop asked for during a restart, a cycle or a kill wins: the dyno ends down,
        # not started again.
        watch.intent = Intent.STOP
        return [Desire(running=False)]
    if command is Command.RESTART and watch.stop_started is None:
        actions: list[Action] = [Say((logs.restarting(),))]
        if watch.up:
            watch.up = False
            actions.append(Transition(DynoState.STARTING, Reason.RESTART))
        _begin_stop(watch, Intent.RESTART, now)
        return actions
    if command is Command.RESTART and watch.intent is Intent.STOP and not watch.deleting:
        # Asked to run again while stopping: finish the stop, then start.
        watch.intent = Intent.RESTART
        return [Desire(running=True)]
    return []


def _oom_kill(watch: Watch, peak_bytes: int | None, now: float) -> list[Action]:
    """R15 once the kernel has OOM-killed any process of the dyno. On v2 memory.oom.group took
    the whole dyno already; on a v1 hierarchy only the victim died and the rest would run on,
    so the whole dyno is killed here, as Heroku's R15 does."""
    if watch.r15 or watch.oom_kills <= watch.oom_base:
        return []
    decision = policy.oom_kill_check(
        oom_kills=watch.oom_kills, oom_base=watch.oom_base,
        quota_bytes=watch.limits.quota_bytes, kill_at=watch.limits.kill_at,
        peak_bytes=peak_bytes)
    watch.r15 = True
    # A stop, restart or cycle under way keeps its outcome; only its grace period ends.
    _begin_stop(watch, Intent.OOM, now)
    watch.stop_steps = len(watch.plan)
    return [Say(decision.lines), KillAll()]


def _probed(watch: Watch, accepting: bool, now: float) -> list[Action]:
    if not watch.boot_pending or watch.stop_started is not None:
        return []
    check = policy.boot_check(process_type=watch.limits.process_type,
                              started_at=watch.started_at, now=now, accepting=accepting,
                              timeout_s=watch.limits.boot_timeout_s)
    if check is policy.BootCheck.UP:
        watch.boot_pending = False
        watch.up = True
        return [MarkUp()]
    if check is policy.BootCheck.TIMED_OUT:
        watch.boot_pending = False
        return [Say(policy.boot_timeout_lines(watch.limits.boot_timeout_s)),
                *_kill_now(watch, Intent.BOOT_TIMEOUT, now)]
    return []


def _sampled(watch: Watch, stats: Stats | None, now: float) -> list[Action]:
    """Memory check and runtime-metrics line; R15 kills the dyno."""
    watch.last_stats = stats
    if stats is None:
        return []
    limits = watch.limits
    actions: list[Action] = []
    rss = stats.memory_rss_bytes if stats.memory_rss_bytes is not None else (
        stats.memory_current_bytes or 0)
    swap = stats.memory_swap_bytes or 0
    actions.append(Say((metrics.memory_metrics_line(limits.name, limits.dyno_id,
                                                    metrics.MemorySample(
        rss_bytes=rss, cache_bytes=stats.memory_cache_bytes or 0, swap_bytes=swap,
        pgpgin_pages=0, pgpgout_pages=0, quota_bytes=limits.quota_bytes)),)))
    decision = policy.memory_check(quota_bytes=limits.quota_bytes, kill_at=limits.kill_at,
                                   usage_bytes=policy.memory_usage_bytes(rss, swap),
                                   last_r14_at=watch.last_r14, now=now,
                                   sample_period_s=limits.sample_period_s)
    if decision.lines:
        actions.append(Say(decision.lines))
    if decision.verdict is policy.MemoryVerdict.R14:
        watch.last_r14 = now
    if (decision.verdict is policy.MemoryVerdict.R15 and watch.stop_started is None
            and not watch.r15):
        watch.r15 = True
        actions.extend(_kill_now(watch, Intent.OOM, now))
    elif stats.oom_kill_events is not None and stats.oom_kill_events > watch.oom_kills:
        # A kill the OOM watch did not report (or no watch): the sample is the safety net.
        watch.oom_kills = stats.oom_kill_events
        actions.extend(_oom_kill(watch, stats.memory_peak_bytes, now))
    return actions


def _next_sample(now: float, period_s: float) -> float:
    """`period_s` after `now`, put off to the next multiple of SAMPLE_TICK_S; a period
    under 8 ticks (tests) is kept exact, the tick being too large a share of it."""
    at = now + period_s
    if period_s < 8 * SAMPLE_TICK_S:
        return at
    return math.ceil(at / SAMPLE_TICK_S) * SAMPLE_TICK_S


def _due(watch: Watch, now: float) -> list[Action]:
    actions: list[Action] = []
    if watch.boot_pending and watch.stop_started is None and now >= watch.next_probe:
        watch.next_probe = now + BOOT_PROBE_INTERVAL_S
        actions.append(Probe())
    if now >= watch.next_sample:
        watch.next_sample = _next_sample(now, watch.limits.sample_period_s)
        actions.append(Sample())
    if now >= watch.cycle_at and watch.stop_started is None and watch.up:
        watch.up = False
        _begin_stop(watch, Intent.CYCLE, now)
        actions += [Say((logs.cycling(),)), Transition(DynoState.STARTING, Reason.CYCLING)]
    if watch.stop_started is not None:
        while True:
            move = policy.stop_next(watch.plan, started_at=watch.stop_started, now=now,
                                    done_steps=watch.stop_steps, cgroup_empty=False)
            if not isinstance(move, policy.StopStep):
                break
            watch.stop_steps += 1
            actions.append(Say(move.lines))
            if move.target is policy.StopTarget.ALL_PROCESSES:
                actions.append(SignalAll(move.signal))
            else:
                actions.append(KillAll())
    return actions


@dataclass(frozen=True, slots=True)
class Outcome:
    """How the process ended, once its cgroup is empty."""

    exit_status: int  # as reported: 137 after R15
    intent: Intent
    oom_killed: bool
    lines: tuple[str, ...]  # R15 lines still to say, before the exit status


def conclude(watch: Watch, final_oom_kills: int | None, peak_bytes: int | None) -> Outcome:
    """The exit as reported, given the kernel's OOM-kill count once the cgroup is empty: PID 1
    itself may have been the victim (or the whole group, on v2) with its exit heard before
    the OOM event."""
    assert watch.exit_status is not None, "conclude() before the exit"
    lines: Sequence[str] = ()
    r15 = watch.r15
    if not r15 and (final_oom_kills or 0) > watch.oom_base:
        lines = policy.oom_kill_check(
            oom_kills=final_oom_kills, oom_base=watch.oom_base,
            quota_bytes=watch.limits.quota_bytes, kill_at=watch.limits.kill_at,
            peak_bytes=peak_bytes).lines
        r15 = True
    return Outcome(policy.reported_exit_status(watch.exit_status, r15=r15), watch.intent, r15,
                   tuple(lines))
