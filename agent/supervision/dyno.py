"""One dyno's supervision: a task that launches its process, watches it (boot, memory,
cycling, stop requests) and decides what happens when it exits, by Heroku's rules.

All decisions come from `agent.supervision.policy`; every state change goes through `_transition()`.
The kernel is reached only through the `Runtime` protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from agent.daemon.journal import extra
from agent.observability import logs, metrics
from agent.spec import DEFAULT_PORT, DynoSpec, dyno_env
from agent.supervision import policy
from agent.supervision.policy import Intent, RestartMode, RestartPolicy
from agent.supervision.records import Placement, Record
from agent.supervision.runtime import DynoStartError, HolderUnavailable, Launch, Runtime
from agent.supervision.states import DynoState, Reason, StateChange, StateMachine

log = logging.getLogger(__name__)

BOOT_PROBE_INTERVAL_S = 0.05
EMPTY_AFTER_EXIT_TIMEOUT_S = 5.0
MAX_RESUME_PAUSE_S = 30.0
# A dyno whose launch found no holder waits this long for one to be back before it tries
# again (the holder's return wakes it at once).
HOLDER_WAIT_S = 5.0


class HolderGate:
    """The holder's comings back. A dyno whose launch found the holder gone waits here for a
    newer one (generation) instead of launching again at once, which would fail at once: with
    restarts at once (`restart_schedule_s = "none"`) that loop never awaited, and the daemon
    never got to reconnect the holder."""

    def __init__(self) -> None:
        self.generation = 0
        self._back = asyncio.Event()

    @property
    def event(self) -> asyncio.Event:
        """Set when a holder newer than the current generation is back."""
        return self._back

    def back(self) -> None:
        """A holder is reachable again (after its loss): wake every dyno waiting for it."""
        self.generation += 1
        back, self._back = self._back, asyncio.Event()
        back.set()


class Command(enum.Enum):
    START = "start"
    STOP = "stop"
    RESTART = "restart"
    DELETE = "delete"


@dataclass(frozen=True)
class Timing:
    """Supervision timings from the agent's configuration."""

    restart: RestartPolicy
    cycle_after_s: float
    cycle_jitter_s: float
    sample_interval_s: float
    boot_timeout_s: float
    stop_timeout_s: float


class Sink(Protocol):
    """Where a dyno reports (the supervisor)."""

    def line(self, dyno: Dyno, text: str) -> None: ...

    def changed(self, dyno: Dyno, change: StateChange) -> None: ...

    def save(self, dyno: Dyno) -> None: ...

    def forget_process(self, dyno: Dyno, pid: int) -> None: ...

    def forget(self, dyno: Dyno) -> None:
        """The dyno is deleted and its resources freed: drop it and its record."""
        ...


@dataclass(frozen=True)
class ExitInfo:
    status: int
    intent: Intent
    oom_killed: bool
    up_for_s: float | None
    # False when no process was started (the launch failed): there is no exit to report.
    launched: bool = True


class Dyno:
    def __init__(self, spec: DynoSpec, record: Record, runtime: Runtime, sink: Sink,
                 timing: Timing, start_slots: asyncio.Semaphore,
                 rng: random.Random | None = None,
                 holder_gate: HolderGate | None = None) -> None:
        self.spec = spec
        self.record = record
        self.runtime = runtime
        self.sink = sink
        self.timing = timing
        self.start_slots = start_slots
        self.rng = rng or random.Random()
        self.holder_gate = holder_gate or HolderGate()
        # Set while the dyno waits for a holder newer than this generation, until the
        # monotonic deadline (then it launches again).
        self._holder_wait: tuple[int, float] | None = None
        # Processes the holder took with it (or that no holder can follow any more).
        self._lost: set[int] = set()
        self.machine = StateMachine(
            spec.id, spec.app, spec.name, at=datetime.fromisoformat(record.since),
            state=DynoState(record.state), reason=Reason(record.reason),
            exit_status=record.exit_status)
        self.timings_ms: dict[str, float] = {}
        self.last_stats: Any = None
        # Output lines the holder had to drop before this agent read them (reported as L10).
        self.output_dropped = 0
        self._exits: dict[int, int] = {}
        self._wakeup = asyncio.Event()
        self._commands: list[tuple[Command, asyncio.Future[None]]] = []
        self._task: asyncio.Task[None] | None = None
        self._up_mono: float | None = None
        self._last_r14: float | None = None
        # The kernel's OOM-kill count of the dyno's cgroup, as its watch last reported it.
        self._oom_kills: int | None = None
        self.deleted = asyncio.Event()

    # -- what the owner calls ----------------------------------------------------------------
    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def state(self) -> DynoState:
        return self.machine.state

    @property
    def boot_timeout_s(self) -> float:
        """The spec's own, else the agent's configured default."""
        given = self.spec.boot_timeout_s
        return float(given) if given is not None else self.timing.boot_timeout_s

    @property
    def stop_timeout_s(self) -> float:
        given = self.spec.stop_timeout_s
        return float(given) if given is not None else self.timing.stop_timeout_s

    @property
    def placement(self) -> Placement | None:
        return self.record.placement

    def start(self, adopt: bool) -> None:
        self._task = asyncio.create_task(self._main(adopt), name=f"dyno-{self.id}")

    async def detach(self) -> None:
        """Stop supervising without touching the process (agent shutdown: dynos live on)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def on_exit(self, pid: int, status: int) -> None:
        self._exits[pid] = status
        self._wakeup.set()

    def on_holder_lost(self, pid: int) -> None:
        """The process is gone with its holder, or a new holder does not know it (it has been
        ended): an exit that is the platform's doing, not the app's."""
        self._lost.add(pid)
        self.on_exit(pid, policy.EXIT_SIGKILL)

    def request(self, command: Command) -> asyncio.Future[None]:
        """Queue a lifecycle command; the future completes once it has been carried out."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._commands.append((command, future))
        self._wakeup.set()
        return future

    # -- state -------------------------------------------------------------------------------
    def _transition(self, new: DynoState, reason: Reason, exit_status: int | None = None) -> None:
        change = self.machine.transition(new, reason, exit_status)
        self.record.state = str(new)
        self.record.since = change.at.isoformat()
        self.record.reason = str(reason)
        self.record.exit_status = self.machine.exit_status
        self.sink.line(self, change.message)
        self.sink.changed(self, change)
        self.sink.save(self)
        log.info("%s: %s (%s)", self.spec.name, change.message, reason,
                 extra=extra(dyno_id=self.id, app=self.spec.app))

    def _say(self, *lines: str) -> None:
        for text in lines:
            self.sink.line(self, text)

    def _take_command(self) -> tuple[Command, asyncio.Future[None]] | None:
        return self._commands.pop(0) if self._commands else None

    # -- the task ----------------------------------------------------------------------------
    async def _main(self, adopt: bool) -> None:
        """Supervise until deleted. An unexpected error (a full disk, a kernel refusal) does
        not end supervision: it is logged and the lifecycle resumes from the record, adopting
        the process if one runs, after a growing pause."""
        pause_s = 1.0
        while True:
            try:
                await self._lifecycle(adopt)
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("supervision of %s failed; resuming in %gs", self.spec.name,
                              pause_s, extra=extra(dyno_id=self.id))
            await asyncio.sleep(pause_s)
            pause_s = min(pause_s * 2, MAX_RESUME_PAUSE_S)
            adopt = self.record.pid is not None

    async def _lifecycle(self, adopt: bool) -> None:
        now = time.monotonic
        next_start: float | None
        if adopt and self.record.pid is not None:
            next_start = await self._finish(await self._supervise(adopted=True))
        elif self.record.desired == "running" and self.state is not DynoState.COMPLETE:
            # A cool-off survives an agent restart: it is kept in wall-clock time.
            wait_s = (self.record.restart_at or 0.0) - time.time()
            next_start = now() + max(0.0, wait_s)
        else:
            next_start = None
        done: list[asyncio.Future[None]] = []
        while True:
            for future in done:
                if not future.done():
                    future.set_result(None)
            done = []
            taken = self._take_command()
            if taken is None:
                timeout = None if next_start is None else max(0.0, next_start - now())
                if timeout == 0.0 and self._holder_wait is not None:
                    generation, until = self._holder_wait
                    if self.holder_gate.generation <= generation and now() < until:
                        # Its launch found the holder gone: wait for it to be back (or a
                        # command, or the deadline), never retry hot.
                        self._wakeup.clear()
                        await _first_set((self._wakeup, self.holder_gate.event),
                                         until - now())
                        continue
                    self._holder_wait = None
                if timeout == 0.0:
                    # Every start gives the loop a turn first: nothing loops without awaiting.
                    await asyncio.sleep(0)
                    if self._commands:
                        continue
                    next_start = await self._finish(await self._start_and_supervise())
                    continue
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await self._wakeup.wait()
                continue
            command, future = taken
            done.append(future)
            if command is Command.DELETE:
                await self._destroy()
                if not future.done():
                    future.set_result(None)
                return
            if command is Command.STOP:
                self.record.desired = "stopped"
                next_start = None
                self._holder_wait = None
                # Crashed in a cool-off, or starting but with no process (waiting for the
                # holder): down at once.
                if self.state in (DynoState.CRASHED, DynoState.STARTING):
                    self._transition(DynoState.DOWN, Reason.STOPPED)
                self.sink.save(self)
            elif command in (Command.START, Command.RESTART):
                if self.state is DynoState.COMPLETE:
                    continue
                self.record.desired = "running"
                if command is Command.RESTART:
                    self.record.crashes = 0
                    self._say(logs.restarting())
                next_start = now()
                self.sink.save(self)

    async def _start_and_supervise(self) -> ExitInfo:
        self.record.restart_at = None
        if self.state is not DynoState.STARTING:
            reason = Reason.RESTART if self.state is DynoState.CRASHED else Reason.START
            self._transition(DynoState.STARTING, reason)
        try:
            async with self.start_slots:
                if self.record.placement is None:
                    self.record.placement = await self.runtime.place(self.spec)
                    self.sink.save(self)
                placement = self.record.placement
                env = dyno_env(self.spec, placement.ip, DEFAULT_PORT)
                self._say(logs.starting_process(self.spec.command))
                launched: Launch = await self.runtime.launch(self.spec, placement, env)
        except HolderUnavailable as exc:
            self._say(exc.line)
            self._holder_wait = (self.holder_gate.generation, time.monotonic() + HOLDER_WAIT_S)
            # No process, so no exit status: the last one stays; a one-off that never ran
            # has failed (1), not succeeded.
            last = self.record.exit_status
            return ExitInfo(1 if last is None else last, Intent.HOLDER_LOST, False, None,
                            launched=False)
        except DynoStartError as exc:
            self._say(exc.line)
            return ExitInfo(1, Intent.NONE, False, None)
        self.record.pid = launched.pid
        self.record.start_time = launched.start_time
        self.timings_ms = dict(launched.timings_ms)
        self.sink.save(self)
        return await self._supervise(adopted=False)

    async def _supervise(self, adopted: bool) -> ExitInfo:
        """Watch the running process until it has exited and its cgroup is empty, hearing of
        the kernel's OOM kills as they happen (an event from the cgroup, not a sample)."""
        placement = self.record.placement
        assert placement is not None
        self._oom_kills = None

        def on_oom_kill(count: int) -> None:
            self._oom_kills = count
            self._wakeup.set()

        watch = self.runtime.watch_oom_kills(placement, on_oom_kill)
        try:
            return await self._watch_process(adopted)
        finally:
            if watch is not None:
                watch.close()

    async def _watch_process(self, adopted: bool) -> ExitInfo:
        placement = self.record.placement
        pid = self.record.pid
        assert placement is not None and pid is not None
        clock = time.monotonic
        record = self.record
        stats = self.runtime.stats(placement)
        oom_now = (stats.oom_kill_events or 0) if stats is not None else 0
        wall = time.time()
        if not adopted or record.launched_at is None:
            record.launched_at = wall
            record.cycle_at = wall + self.timing.cycle_after_s + self.rng.uniform(
                0.0, self.timing.cycle_jitter_s)
            record.oom_base = oom_now
            self.sink.save(self)
        # An adopted process keeps the clocks it started with: its boot deadline, its cycle
        # time and the OOM-kill count from before it ran (an OOM kill while no agent watched
        # is still an OOM kill), and its time up for the crash-count reset.
        oom_base = record.oom_base if record.oom_base is not None else oom_now
        if self._oom_kills is None or oom_now > self._oom_kills:
            self._oom_kills = oom_now
        # Set once R15 has been said: it is said once, and the exit is then reported as 137.
        r15 = False
        started = clock() - max(0.0, wall - record.launched_at)
        if adopted and self.state is DynoState.UP:
            up_s = 0.0 if record.up_since is None else max(0.0, wall - record.up_since)
            self._up_mono = clock() - up_s
        boot_pending = self.state is DynoState.STARTING and self.spec.is_web
        if self.state is DynoState.STARTING and not self.spec.is_web:
            self._mark_up()
        boot_deadline = started + self.boot_timeout_s
        next_probe = clock()
        next_sample = clock() + self.timing.sample_interval_s
        cycle_at = clock() + ((record.cycle_at or wall) - wall)
        intent = Intent.NONE
        plan = policy.stop_plan(self.stop_timeout_s)
        stop_started: float | None = None
        stop_steps = 0
        exit_status: int | None = None
        waiters: list[asyncio.Future[None]] = []
        # A delete is finished by the lifecycle loop once the process is gone.
        deferred: list[tuple[Command, asyncio.Future[None]]] = []

        def begin_stop(why: Intent) -> None:
            nonlocal intent, stop_started
            if stop_started is None:
                intent = why
                stop_started = clock()

        def kill_now(why: Intent) -> None:
            nonlocal intent, stop_started, stop_steps
            intent = why
            stop_started = stop_started or clock()
            stop_steps = len(plan)
            self.runtime.kill(placement)

        while True:
            if exit_status is None and pid in self._exits:
                exit_status = self._exits.pop(pid)
                self.sink.forget_process(self, pid)
                if pid in self._lost:
                    self._lost.discard(pid)
                    # A stop, restart or kill of ours under way keeps its outcome.
                    if intent is Intent.NONE:
                        intent = Intent.HOLDER_LOST
            if exit_status is not None:
                break
            taken = self._take_command()
            if taken is not None:
                command, future = taken
                if command is Command.DELETE:
                    deferred.append(taken)
                else:
                    waiters.append(future)
                if command in (Command.STOP, Command.DELETE):
                    self.record.desired = "stopped"
                    begin_stop(Intent.STOP)
                    # A stop asked for during a restart, a cycle or a kill wins: the dyno
                    # ends down, not started again.
                    intent = Intent.STOP
                elif command is Command.RESTART and stop_started is None:
                    self._say(logs.restarting())
                    if self.state is DynoState.UP:
                        self._transition(DynoState.STARTING, Reason.RESTART)
                    begin_stop(Intent.RESTART)
                elif command is Command.RESTART and intent is Intent.STOP and not deferred:
                    # Asked to run again while stopping: finish the stop, then start.
                    self.record.desired = "running"
                    intent = Intent.RESTART
                continue
            if not r15 and (self._oom_kills or 0) > oom_base:
                # The kernel OOM-killed a process at the kill point. On v2 memory.oom.group
                # took the whole dyno already; on a v1 hierarchy only the victim died and the
                # rest would run on, so the whole dyno is killed here, as Heroku's R15 does.
                self._say(*self._oom_kill_decision(placement, self._oom_kills, oom_base).lines)
                r15 = True
                if stop_started is None:
                    kill_now(Intent.OOM)
                else:
                    # A stop, restart or cycle under way keeps its outcome; only its grace
                    # period ends.
                    stop_steps = len(plan)
                    self.runtime.kill(placement)
                continue
            now = clock()
            if boot_pending and stop_started is None:
                if await self.runtime.accepting(placement.ip, DEFAULT_PORT):
                    boot_pending = False
                    self._mark_up()
                elif now >= boot_deadline:
                    boot_pending = False
                    self._say(*policy.boot_timeout_lines(self.boot_timeout_s))
                    kill_now(Intent.BOOT_TIMEOUT)
                next_probe = clock() + BOOT_PROBE_INTERVAL_S
            if now >= next_sample:
                next_sample = now + self.timing.sample_interval_s
                if self._sample(placement, now) and stop_started is None and not r15:
                    r15 = True
                    kill_now(Intent.OOM)
                elif not r15 and (self._oom_kills or 0) > oom_base:
                    continue  # a kill the watch did not report: R15 at the top of the loop
            if now >= cycle_at and stop_started is None and self.state is DynoState.UP:
                self._say(logs.cycling())
                self._transition(DynoState.STARTING, Reason.CYCLING)
                begin_stop(Intent.CYCLE)
            if stop_started is not None:
                step = policy.stop_next(plan, started_at=stop_started, now=now,
                                        done_steps=stop_steps, cgroup_empty=False)
                if isinstance(step, policy.StopStep):
                    self._say(*step.lines)
                    stop_steps += 1
                    if step.target is policy.StopTarget.ALL_PROCESSES:
                        self.runtime.signal_all(placement, step.signal)
                    else:
                        self.runtime.kill(placement)
                    continue
            deadlines = [next_sample]
            if boot_pending and stop_started is None:
                deadlines.append(next_probe)
            if stop_started is None:
                deadlines.append(cycle_at)
            elif stop_steps < len(plan):
                deadlines.append(stop_started + plan[stop_steps].after_s)
            self._wakeup.clear()
            if pid in self._exits or self._commands:
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, min(deadlines) - clock())):
                    await self._wakeup.wait()

        self._commands[:0] = deferred
        # PID 1 of the dyno's pid namespace is gone, so the kernel kills the rest; wait for
        # the cgroup to empty (a dyno is `down` only then), SIGKILL stragglers if need be.
        if not await self.runtime.wait_empty(placement, EMPTY_AFTER_EXIT_TIMEOUT_S):
            self.runtime.kill(placement)
            await self.runtime.wait_empty(placement, EMPTY_AFTER_EXIT_TIMEOUT_S)
        # Read off the loop: a mass delete reads a thousand cgroups' counters at once.
        stats = await asyncio.to_thread(self.runtime.stats, placement)
        final_kills = stats.oom_kill_events if stats is not None else None
        if not r15 and (final_kills or 0) > oom_base:
            # PID 1 itself was the victim (or the whole group, on v2) and its exit came in
            # before the OOM event: the same lines, still before the exit status.
            self._say(*self._oom_kill_decision(placement, final_kills, oom_base).lines)
            r15 = True
        oom_killed = r15
        exit_status = policy.reported_exit_status(exit_status, r15=r15)
        up_for = None if self._up_mono is None else clock() - self._up_mono
        self._up_mono = None
        self.record.pid = None
        self.record.start_time = None
        self.record.up_since = self.record.launched_at = self.record.cycle_at = None
        self.record.oom_base = None
        for future in waiters:
            if not future.done():
                future.set_result(None)
        return ExitInfo(exit_status, intent, oom_killed, up_for)

    def _oom_kill_decision(self, placement: Placement, oom_kills: int | None,
                           oom_base: int) -> policy.MemoryDecision:
        stats = self.runtime.stats(placement)
        return policy.oom_kill_check(
            oom_kills=oom_kills, oom_base=oom_base,
            quota_bytes=self.spec.size.memory_quota_bytes, kill_at=self.spec.size.kill_at,
            peak_bytes=stats.memory_peak_bytes if stats is not None else None)

    def _mark_up(self) -> None:
        self._up_mono = time.monotonic()
        self.record.up_since = time.time()
        self._transition(DynoState.UP, Reason.BOOTED)

    def _sample(self, placement: Placement, now: float) -> bool:
        """Memory check and runtime-metrics line; True when the dyno must be killed (R15)."""
        stats = self.runtime.stats(placement)
        self.last_stats = stats
        if stats is None:
            return False
        # The sample also reads the kernel's OOM-kill count: a safety net should the watch
        # have missed a kill (or been unavailable).
        if stats.oom_kill_events is not None and stats.oom_kill_events > (self._oom_kills or 0):
            self._oom_kills = stats.oom_kill_events
        rss = stats.memory_rss_bytes if stats.memory_rss_bytes is not None else (
            stats.memory_current_bytes or 0)
        swap = stats.memory_swap_bytes or 0
        quota = self.spec.size.memory_quota_bytes
        self._say(metrics.memory_metrics_line(self.spec.name, self.id, metrics.MemorySample(
            rss_bytes=rss, cache_bytes=stats.memory_cache_bytes or 0, swap_bytes=swap,
            pgpgin_pages=0, pgpgout_pages=0, quota_bytes=quota)))
        decision = policy.memory_check(quota_bytes=quota, kill_at=self.spec.size.kill_at,
                                       usage_bytes=policy.memory_usage_bytes(rss, swap),
                                       last_r14_at=self._last_r14, now=now,
                                       sample_period_s=self.timing.sample_interval_s)
        self._say(*decision.lines)
        if decision.verdict is policy.MemoryVerdict.R14:
            self._last_r14 = now
        return decision.verdict is policy.MemoryVerdict.R15

    async def _finish(self, info: ExitInfo) -> float | None:
        """Apply the exit; a dyno that has completed frees its cgroup, address and user at
        once (its record stays, for `ps` and its exit status, until it is deleted)."""
        next_start = self._after_exit(info)
        placement = self.record.placement
        if self.state is DynoState.COMPLETE and placement is not None:
            await self.runtime.unplace(placement)
            self.record.placement = None
            self.sink.save(self)
        return next_start

    def _after_exit(self, info: ExitInfo) -> float | None:
        """Apply Heroku's exit rules; when to start again (monotonic), or None."""
        if info.intent is Intent.HOLDER_LOST and info.launched:
            self._say(logs.holder_lost())
        if info.launched:
            self._say(logs.process_exited(info.status))
        mode = RestartMode(self.spec.restart)
        decision = policy.decide_exit(
            mode=mode, exit_status=info.status, intent=info.intent,
            oom_killed=info.oom_killed, crashes_since_reset=self.record.crashes,
            up_for_s=info.up_for_s, policy=self.timing.restart)
        self.record.crashes = decision.crashes
        self.record.exit_status = decision.exit_status
        if decision.state is not None and decision.state is not self.state:
            self._transition(decision.state, decision.reason, decision.exit_status)
        self.sink.save(self)
        if decision.restart_in_s is None or self.record.desired != "running":
            return None
        if info.launched:
            self.record.restarts += 1
        self.record.restart_at = time.time() + decision.restart_in_s
        self.sink.save(self)
        return time.monotonic() + decision.restart_in_s

    async def _destroy(self) -> None:
        if self.state in (DynoState.CRASHED, DynoState.STARTING, DynoState.UP):
            self._transition(DynoState.DOWN, Reason.STOPPED)
        placement = self.record.placement
        if placement is not None:
            await self.runtime.unplace(placement)
            self.record.placement = None
        self.sink.forget(self)
        self.deleted.set()

    # -- status ------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        placement = self.record.placement
        return {
            "id": self.id,
            "app": self.spec.app,
            "name": self.spec.name,
            "type": self.spec.type,
            "state": str(self.state),
            "since": logs.format_timestamp(self.machine.since),
            "pid": self.record.pid,
            "ip": placement.ip if placement else None,
            "restarts": self.record.restarts,
            "size": self.spec.size.name,
            "exit_status": self.record.exit_status,
            "reason": str(self.machine.reason),
            "command": self.spec.command,
        }


async def _first_set(events: tuple[asyncio.Event, ...], timeout_s: float) -> None:
    """Wait until one of `events` is set, or `timeout_s` has passed."""
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=max(0.0, timeout_s),
                           return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
