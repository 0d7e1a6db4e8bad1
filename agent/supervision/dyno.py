"""One dyno's supervision: a task that launches its process, watches it (boot, memory,
cycling, stop requests) and decides what happens when it exits, by Heroku's rules.

All decisions come from `agent.supervision.policy`; every state change goes through `_transition()`.
The kernel is reached only through the `Runtime` protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
import weakref
from dataclasses import dataclass, replace
from typing import Any, Protocol

from agent import errors
from agent.journal import extra
from agent.observability import logs
from agent.spec import DEFAULT_PORT, DynoSpec, dyno_env
from agent.supervision import policy, watch
from agent.supervision.clock import Clock, LoopClock
from agent.supervision.policy import Intent, RestartMode, RestartPolicy
from agent.supervision.records import Desired, Placement, Record
from agent.supervision.runtime import DynoStartError, HolderUnavailable, Launch, Runtime
from agent.supervision.states import DynoState, Reason, StateChange, StateMachine
from agent.supervision.watch import Command

log = logging.getLogger(__name__)

EMPTY_AFTER_EXIT_TIMEOUT_S = 5.0
# Dynos whose exit is being handled at once (the cgroup emptied, final counters, the decision,
# the record). Each exit's work is mostly thread hops and loop turns, so more at once only
# crowds the loop and the GIL: a sync from 1,000 dynos to none answered in 12.2 s with an API
# p99 of 191 ms at 8, 15.5 s and 132 ms at 4, 11.2 s and 90 ms at 2.
MAX_CONCURRENT_EXITS = 2
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

    def timed(self, dyno: Dyno, phases: dict[str, float]) -> None:
        """Phases of a start (or exit) of the dyno have been timed (ms)."""
        ...

    async def persisted(self, dyno: Dyno) -> None:
        """Return once everything saved of the dyno's record is on disk."""
        ...

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
    def __init__(self, record: Record, runtime: Runtime, sink: Sink,
                 timing: Timing, start_slots: asyncio.Semaphore,
                 rng: random.Random | None = None,
                 holder_gate: HolderGate | None = None, clock: Clock | None = None,
                 exit_slots: asyncio.Semaphore | None = None) -> None:
        self.record = record
        spec = record.spec
        self.runtime = runtime
        self.sink = sink
        self.timing = timing
        self.start_slots = start_slots
        # Shared by the host's dynos: what follows an exit (empty cgroup, final counters, the
        # decision, unplacing) runs for a bounded number of dynos at once, so a mass delete
        # never fills one turn of the loop with a thousand dynos' work.
        self.exit_slots = exit_slots or asyncio.Semaphore(MAX_CONCURRENT_EXITS)
        self.rng = rng or random.Random()
        self.holder_gate = holder_gate or HolderGate()
        self.clock: Clock = clock or LoopClock()
        # Set while the dyno waits for a holder newer than this generation, until the
        # monotonic deadline (then it launches again).
        self._holder_wait: tuple[int, float] | None = None
        # Processes the holder took with it (or that no holder can follow any more).
        self._lost: set[int] = set()
        self.machine = StateMachine(
            spec.id, spec.app, spec.name, at=record.since, state=record.state,
            reason=record.reason,
            exit_status=record.exit_status)
        # The wall time (ms) of each phase of the last start, in order (record, queue, slug,
        # uid, dir, cgroup, netns, prepare, launch), then those of its launch in the holder
        # ("launch.fork", …); "up" once it happened; at its exit "run" (launched → reaped by
        # the holder), "exit_event" (reaped → heard here) and "exit" (heard → its outcome,
        # complete, crashed or down, visible).
        self.timings_ms: dict[str, float] = {}
        # The phases of the start under way, and the end of the last one timed (perf_counter;
        # None: nothing is being timed). A created dyno's start begins with its record write.
        self._phases: dict[str, float] = {}
        self._mark: float | None = None
        self._created: tuple[dict[str, float], float] | None = None
        self._exit_at: float | None = None
        # Wall clock (the holder's exit events carry its time of the reap): when the process
        # was launched, and (heard, reaped) of its exit.
        self._launched_wall: float | None = None
        self._exit_wall: tuple[float, float] | None = None
        self.last_stats: Any = None
        # Output lines the holder had to drop before this agent read them (reported as L10).
        self.output_dropped = 0
        self._exits: dict[int, int] = {}
        self._wakeup = asyncio.Event()
        self._commands: list[tuple[Command, asyncio.Future[None]]] = []
        self._task: asyncio.Task[None] | None = None
        self._up_mono: float | None = None
        # While a process runs: the futures of commands carried out once it has exited, the
        # deletes the lifecycle finishes after it, and an OOM kill from before it was watched.
        self._waiters: list[asyncio.Future[None]] = []
        self._deferred: list[tuple[Command, asyncio.Future[None]]] = []
        self._oom_pending = False
        self.deleted = asyncio.Event()
        # Clear while a process of the dyno runs and is watched: a stop's deadline is over
        # once it is set (what follows the exit is the agent's own work).
        self.process_ended = asyncio.Event()
        self.process_ended.set()
        # `status()` as last built, and its JSON once asked for: [record, state, since, reason,
        # status, json]. Kept until the record (a new one on every change) or the state moves:
        # `GET /v1/dynos` over a thousand idle dynos then builds and encodes nothing.
        self._status_cache: list[Any] | None = None
        # Where the dyno comes in `GET /v1/dynos` (the supervisor's key), for its spec.
        self.list_key: tuple[DynoSpec, tuple[str, str, int]] | None = None

    # -- what the owner calls ----------------------------------------------------------------
    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def spec(self) -> DynoSpec:
        return self.record.spec

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

    def saved_at_create(self, began: float) -> None:
        """Its first record was written from `began` (perf_counter) until now: the first
        phase of its first start."""
        now = time.perf_counter()
        self._created = ({"record": (now - began) * 1e3}, now)

    def _lap(self, phase: str) -> float | None:
        """Time `phase` as what happened since the last phase ended; its ms."""
        now = time.perf_counter()
        if self._mark is None:
            return None
        ms = self._phases[phase] = (now - self._mark) * 1e3
        self._mark = now
        return ms

    def on_exit(self, pid: int, status: int, exited_at: float | None = None) -> None:
        """The process has exited (`exited_at`: when the holder reaped it, wall clock)."""
        self._exit_at = time.perf_counter()
        self._exit_wall = None if exited_at is None else (time.time(), exited_at)
        self._exits[pid] = status
        self._wakeup.set()

    def on_holder_lost(self, pid: int) -> None:
        """The process is gone with its holder, or a new holder does not know it (it has been
        ended): an exit that is the platform's doing, not the app's."""
        self._lost.add(pid)
        self.on_exit(pid, policy.EXIT_SIGKILL)

    def request(self, command: Command) -> asyncio.Future[None]:
        """Queue a lifecycle command; the future completes once it has been carried out (a
        delete of a dyno deleted meanwhile is done; any other command fails NotFound)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._commands.append((command, future))
        if self.deleted.is_set():
            self._settle_commands()
        self._wakeup.set()
        return future

    def _settle_commands(self) -> None:
        """Answer the commands a deleted dyno will never take (asked for while it was being
        deleted: a second delete, a stop racing the delete)."""
        pending, self._commands = self._commands + self._deferred, []
        self._deferred = []
        for command, future in pending:
            if future.done():
                continue
            if command is Command.DELETE:
                future.set_result(None)
            else:
                future.set_exception(errors.NotFound(f"dyno {self.id} was deleted"))

    # -- state -------------------------------------------------------------------------------
    def update(self, **changes: Any) -> Record:
        """The one way the dyno's record changes: a new record, saved at once (the writer
        keeps only the newest pending version of each record, so saving every change costs
        one encoding)."""
        self.record = replace(self.record, **changes)
        self.sink.save(self)
        return self.record

    def _transition(self, new: DynoState, reason: Reason, exit_status: int | None = None) -> None:
        change = self.machine.transition(new, reason, exit_status)
        self.update(state=new, since=change.at, reason=reason,
                    exit_status=self.machine.exit_status)
        self.sink.line(self, change.message)
        self.sink.changed(self, change)
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
        now = self.clock.monotonic
        next_start: float | None
        if adopt and self.record.pid is not None:
            next_start = await self._finish(await self._supervise(adopted=True))
        elif self.record.desired is Desired.RUNNING and self.state is not DynoState.COMPLETE:
            # A cool-off survives an agent restart: it is kept in wall-clock time.
            wait_s = (self.record.restart_at or 0.0) - self.clock.wall()
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
                self.update(desired=Desired.STOPPED)
                next_start = None
                self._holder_wait = None
                # Crashed in a cool-off, or starting but with no process (waiting for the
                # holder): down at once.
                if self.state in (DynoState.CRASHED, DynoState.STARTING):
                    self._transition(DynoState.DOWN, Reason.STOPPED)
            elif command in (Command.START, Command.RESTART):
                if self.state is DynoState.COMPLETE:
                    continue
                self.update(desired=Desired.RUNNING)
                if command is Command.RESTART:
                    self.update(crashes=0)
                    self._say(logs.restarting())
                next_start = now()

    async def _start_and_supervise(self) -> ExitInfo:
        self._phases, self._mark = self._created or ({}, time.perf_counter())
        self._created = None
        self.update(restart_at=None)
        if self.state is not DynoState.STARTING:
            reason = Reason.RESTART if self.state is DynoState.CRASHED else Reason.START
            self._transition(DynoState.STARTING, reason)
        try:
            async with self.start_slots:
                self._lap("queue")
                placement = self.record.placement
                if placement is not None and not await self.runtime.placement_intact_async(
                        placement):
                    # The host rebooted (or someone removed them): the record names a
                    # namespace, runtime dir or cgroup that is gone. What is left of it goes,
                    # and the dyno is placed anew.
                    log.warning("%s: its network namespace, runtime dir or cgroup is gone; "
                                "placing it again", self.spec.name,
                                extra=extra(dyno_id=self.id, app=self.spec.app))
                    with contextlib.suppress(Exception):
                        await self.runtime.unplace(placement)
                    self.update(placement=None)
                    placement = None
                if placement is None:
                    placed: dict[str, float] = {}
                    placement = await self.runtime.place(self.spec, placed)
                    self._phases.update(placed)
                    self._mark = time.perf_counter()
                    self.update(placement=placement)
                elif await self.runtime.populated_async(placement):
                    # Processes no holder follows (launched by one that died before this
                    # dyno's record had their pid) still run in its cgroup: they go before
                    # another process is launched beside them.
                    log.warning("%s: ending processes left in its cgroup before it starts",
                                self.spec.name, extra=extra(dyno_id=self.id, app=self.spec.app))
                    self.runtime.kill(placement)
                    await self.runtime.wait_empty(placement, EMPTY_AFTER_EXIT_TIMEOUT_S)
                env = dyno_env(self.spec, placement.ip, DEFAULT_PORT)
                self._say(logs.starting_process(self.spec.command))
                self._lap("prepare")
                launched: Launch = await self.runtime.launch(self.spec, placement, env)
                self._lap("launch")
                self._launched_wall = time.time()
        except HolderUnavailable as exc:
            self.timings_ms, self._mark = self._phases, None
            self._say(exc.line)
            self._holder_wait = (self.holder_gate.generation,
                                 self.clock.monotonic() + HOLDER_WAIT_S)
            # No process, so no exit status: the last one stays; a one-off that never ran
            # has failed (1), not succeeded.
            last = self.record.exit_status
            return ExitInfo(1 if last is None else last, Intent.HOLDER_LOST, False, None,
                            launched=False)
        except DynoStartError as exc:
            self.timings_ms, self._mark = self._phases, None
            self._say(exc.line)
            return ExitInfo(1, Intent.NONE, False, None)
        self.update(pid=launched.pid, start_time=launched.start_time)
        self.sink.timed(self, self._phases)
        self._phases.update({f"launch.{phase}": ms for phase, ms in launched.timings_ms.items()})
        self.timings_ms = self._phases
        return await self._supervise(adopted=False)

    async def _supervise(self, adopted: bool) -> ExitInfo:
        """Watch the running process until it has exited and its cgroup is empty: a thin
        shell around `watch.step`, which makes every decision. The shell gathers events (an
        exit, a command, the kernel's OOM kills as they happen, probe and sample results, time
        passing), carries out the actions and waits for the next event or deadline."""
        placement = self.record.placement
        pid = self.record.pid
        assert placement is not None and pid is not None
        oom_heard: list[int] = []

        def on_oom_kill(count: int) -> None:
            oom_heard.append(count)
            self._wakeup.set()

        stop_watch = self.runtime.watch_oom_kills(placement, on_oom_kill)
        # A web dyno is up once its $PORT accepts: the kernel says when a process of the
        # dyno listens on it (the probes remain, for what the kernel cannot tell). Watched
        # from before the first probe, so that a listen is either probed or heard.
        listens: list[int] = []
        stop_listens = None
        if policy.needs_port_check(self.spec.type) and self.state is not DynoState.UP:

            def on_listen(port: int) -> None:
                if port == DEFAULT_PORT:
                    listens.append(port)
                    self._wakeup.set()

            stop_listens = self.runtime.watch_listens(placement, on_listen)
        self.process_ended.clear()
        try:
            w = await self._begin_watch(placement, adopted)
            while True:
                if stop_listens is not None and not w.boot_pending:
                    stop_listens.close()  # up (or stopping): nothing more to hear
                    stop_listens = None
                event = await self._next_event(pid, oom_heard, placement)
                if event is None and listens:
                    listens.clear()
                    event = watch.Listening()
                if event is None:
                    now = self.clock.monotonic()
                    if now < w.deadline():
                        self._wakeup.clear()
                        if pid in self._exits or self._commands or oom_heard or listens:
                            continue
                        await _alarms().wait(self._wakeup, w.deadline())
                        continue
                    event = watch.Tick()
                await self._act(w, watch.step(w, event, self.clock.monotonic()), placement)
                if w.exited:
                    break
        finally:
            self.process_ended.set()
            if stop_watch is not None:
                stop_watch.close()
            if stop_listens is not None:
                stop_listens.close()
        async with self.exit_slots:
            return await self._after_process(w, placement)

    async def _begin_watch(self, placement: Placement, adopted: bool) -> watch.Watch:
        record = self.record
        clock = self.clock
        # The counters alone, on the loop: a start needs no full statistics (memory.stat's
        # flush, pressure, cpu.stat of every hierarchy) and no thread hop.
        stats = self.runtime.counters(placement)
        oom_now = (stats.oom_kill_events or 0) if stats is not None else 0
        wall = clock.wall()
        if not adopted or record.launched_at is None:
            record = self.update(
                launched_at=wall, oom_base=oom_now,
                cycle_at=policy.cycle_deadline(wall, self.rng, self.timing.cycle_after_s,
                                               self.timing.cycle_jitter_s))
        # An adopted process keeps the clocks it started with: its boot deadline, its cycle
        # time and the OOM-kill count from before it ran (an OOM kill while no agent watched
        # is still an OOM kill), and its time up for the crash-count reset.
        now = clock.monotonic()
        if adopted and self.state is DynoState.UP:
            up_s = 0.0 if record.up_since is None else max(0.0, wall - record.up_since)
            self._up_mono = now - up_s
        size = self.spec.size
        limits = watch.Limits(
            name=self.spec.name, dyno_id=self.id, process_type=self.spec.type,
            quota_bytes=size.memory_quota_bytes, kill_at=size.kill_at,
            boot_timeout_s=self.boot_timeout_s, sample_period_s=self.timing.sample_interval_s,
            stop_timeout_s=self.stop_timeout_s)
        w, actions = watch.begin(
            limits, now=now, started_at=now - max(0.0, wall - (record.launched_at or wall)),
            cycle_at=now + ((record.cycle_at or wall) - wall),
            oom_base=record.oom_base if record.oom_base is not None else oom_now,
            oom_kills=oom_now, state=self.state, intent=record.intent,
            stop_started=None if record.stop_at is None else now - max(0.0,
                                                                        wall - record.stop_at))
        if w.intent is not Intent.NONE:
            log.info("%s: resuming the %s its last agent began", self.spec.name, w.intent,
                     extra=extra(dyno_id=self.id, app=self.spec.app))
        await self._act(w, actions, placement)
        if w.oom_kills > w.oom_base:
            # Killed while no agent watched: R15 at the first step.
            self._oom_pending = True
        return w

    async def _next_event(self, pid: int, oom_heard: list[int],
                    placement: Placement) -> watch.Event | None:
        """The next thing that happened, most final first: the exit, a command, an OOM
        kill. None: nothing; time may have passed."""
        if pid in self._exits:
            status = self._exits.pop(pid)
            self.sink.forget_process(self, pid)
            lost = pid in self._lost
            self._lost.discard(pid)
            return watch.Exited(status, lost)
        taken = self._take_command()
        if taken is not None:
            command, future = taken
            if command is Command.DELETE:
                # A delete is finished by the lifecycle loop once the process is gone.
                self._deferred.append(taken)
            else:
                self._waiters.append(future)
            return watch.Asked(command)
        if oom_heard or self._oom_pending:
            count = max(oom_heard, default=0)
            oom_heard.clear()
            self._oom_pending = False
            stats = await self.runtime.stats_async(placement)
            if stats is not None and stats.oom_kill_events is not None:
                count = max(count, stats.oom_kill_events)
            return watch.OomKilled(count, stats.memory_peak_bytes if stats else None)
        return None

    async def _act(self, w: watch.Watch, actions: list[watch.Action],
                   placement: Placement) -> None:
        """Carry out the actions of a step; the answers of probes and samples are stepped
        at once (a probe's answer as of when it was asked)."""
        for action in actions:
            match action:
                case watch.Say(lines=lines):
                    self._say(*lines)
                case watch.Transition(state=state, reason=reason):
                    self._transition(state, reason)
                case watch.MarkUp():
                    self._mark_up()
                case watch.SignalAll(signal=sig):
                    await self._write_ahead(w)
                    await self.runtime.signal_all_async(placement, sig)
                case watch.KillAll():
                    await self._write_ahead(w)
                    self.runtime.kill(placement)
                case watch.Desire(running=running):
                    # With the intent that goes with it: a stop asked for during a restart
                    # is a stop, on disk too.
                    self.update(desired=Desired.RUNNING if running else Desired.STOPPED,
                                **self._intent_changes(w))
                case watch.Probe():
                    asked_at = self.clock.monotonic()
                    accepting = await self.runtime.accepting(placement.ip, DEFAULT_PORT)
                    await self._act(w, watch.step(w, watch.Probed(accepting), asked_at),
                                    placement)
                case watch.Sample():
                    stats = await self.runtime.sample_async(placement)
                    self.last_stats = stats
                    await self._act(w, watch.step(w, watch.Sampled(stats),
                                                  self.clock.monotonic()), placement)

    async def _write_ahead(self, w: watch.Watch) -> None:
        """A signal whose outcome the record must explain goes only once the record on disk
        says why (the intent) and what is wanted after it (`desired`)."""
        changes = self._intent_changes(w)
        if changes:
            self.update(**changes)
        await self.sink.persisted(self)

    def _intent_changes(self, w: watch.Watch) -> dict[str, Any]:
        """The record's fields that must change for it to say what the watch is doing."""
        if w.stop_started is None or self.record.intent is w.intent:
            return {}
        stop_at = self.clock.wall() - (self.clock.monotonic() - w.stop_started)
        return {"intent": w.intent, "stop_at": stop_at}

    async def _after_process(self, w: watch.Watch, placement: Placement) -> ExitInfo:
        """PID 1 of the dyno's pid namespace is gone, so the kernel kills the rest; wait for
        the cgroup to empty (a dyno is `down` only then), SIGKILL stragglers if need be."""
        self._commands[:0] = self._deferred
        self._deferred = []
        # cgroup.events, then the OOM-kill count and memory peak, read on the loop: each is a
        # counter read without a lock or a statistics flush, and a thread hop costs about a
        # millisecond before the exit is visible. PID 1 of a pid namespace is reaped only once
        # the rest is gone, so the cgroup is empty already but for processes that left it (or
        # a kill of the agent's is still under way).
        if not self.runtime.emptied(placement) and not await self.runtime.wait_empty(
                placement, EMPTY_AFTER_EXIT_TIMEOUT_S):
            self.runtime.kill(placement)
            await self.runtime.wait_empty(placement, EMPTY_AFTER_EXIT_TIMEOUT_S)
        stats = self.runtime.counters(placement)
        outcome = watch.conclude(w, stats.oom_kill_events if stats is not None else None,
                                 stats.memory_peak_bytes if stats is not None else None)
        self._say(*outcome.lines)
        up_for = None if self._up_mono is None else self.clock.monotonic() - self._up_mono
        self._up_mono = None
        self.update(pid=None, start_time=None, up_since=None, launched_at=None, cycle_at=None,
                    oom_base=None, intent=Intent.NONE, stop_at=None)
        waiters, self._waiters = self._waiters, []
        for future in waiters:
            if not future.done():
                future.set_result(None)
        return ExitInfo(outcome.exit_status, outcome.intent, outcome.oom_killed, up_for)

    def _mark_up(self) -> None:
        self._up_mono = self.clock.monotonic()
        self.update(up_since=self.clock.wall())
        self._transition(DynoState.UP, Reason.BOOTED)
        up_ms = self._lap("up")
        if up_ms is not None:
            self._mark = None
            self.sink.timed(self, {"up": up_ms})

    def _time_exit(self, heard: float) -> None:
        """The exit heard until its outcome (complete, crashed, down) is visible; and before
        it, from the holder's time of the reap, the process's run and the exit's way here."""
        phases: dict[str, float] = {}
        if self._exit_wall is not None:
            heard_wall, reaped_wall = self._exit_wall
            if self._launched_wall is not None:
                phases["run"] = max(0.0, reaped_wall - self._launched_wall) * 1e3
            phases["exit_event"] = max(0.0, heard_wall - reaped_wall) * 1e3
        phases["exit"] = (time.perf_counter() - heard) * 1e3
        self._exit_at = self._exit_wall = self._launched_wall = None
        self.timings_ms.update(phases)
        self.sink.timed(self, phases)

    async def _finish(self, info: ExitInfo) -> float | None:
        """Apply the exit; a dyno that has completed frees its cgroup, address and user at
        once (its record stays, for `ps` and its exit status, until it is deleted)."""
        async with self.exit_slots:
            next_start = self._after_exit(info)
            if self._exit_at is not None:
                self._time_exit(self._exit_at)
            placement = self.record.placement
            if self.state is DynoState.COMPLETE and placement is not None:
                # A turn of the loop first: the tasks the event woke (the API's event streams,
                # the coordinator link) send it before the teardown's threads contend with
                # them for the GIL.
                await asyncio.sleep(0)
                await self.runtime.unplace(placement)
                self.update(placement=None)
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
        self.update(crashes=decision.crashes, exit_status=decision.exit_status)
        if decision.state is not None and decision.state is not self.state:
            self._transition(decision.state, decision.reason, decision.exit_status)
        if decision.restart_in_s is None or self.record.desired is not Desired.RUNNING:
            return None
        self.update(restarts=self.record.restarts + (1 if info.launched else 0),
                    restart_at=self.clock.wall() + decision.restart_in_s)
        return self.clock.monotonic() + decision.restart_in_s

    async def _destroy(self) -> None:
        """The dyno is gone once its processes are (they are) and its record is: the delete
        is answered then, and its kernel objects are freed after, in the background (a mass
        delete is answered in the time its processes take to exit)."""
        if self.state in (DynoState.CRASHED, DynoState.STARTING, DynoState.UP):
            self._transition(DynoState.DOWN, Reason.STOPPED)
        placement = self.record.placement
        if placement is not None:
            self.runtime.unplace_later(placement)
            self.update(placement=None)
        self.sink.forget(self)
        self.deleted.set()
        self._settle_commands()

    # -- status ------------------------------------------------------------------------------
    def _status_entry(self) -> list[Any]:
        """The cache entry of the status as the record and the state are now."""
        record, machine = self.record, self.machine
        cached = self._status_cache
        if (cached is None or cached[0] is not record or cached[1] is not machine.state
                or cached[2] is not machine.since or cached[3] is not machine.reason):
            cached = self._status_cache = [record, machine.state, machine.since,
                                           machine.reason, self._build_status(), None]
        return cached

    def status(self) -> dict[str, Any]:
        """The dyno's status (DESIGN §7), a new dict the caller may change."""
        return dict(self._status_entry()[4])

    def status_json(self) -> str:
        """`status()` as compact JSON (`json.dumps(status(), separators=(",", ":"))`)."""
        cached = self._status_entry()
        if cached[5] is None:
            cached[5] = json.dumps(cached[4], separators=(",", ":"))
        return str(cached[5])

    def _build_status(self) -> dict[str, Any]:
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


class Alarms:
    """Events set at deadlines of the loop's clock, one timer per distinct deadline: the
    running dynos' samples fall due on the same SAMPLE_TICK_S multiples, so the dozen a tick
    wakes share a timer. A dyno's wait then costs no timer of its own, nor, once its deadline
    comes, the cancellation an expiring `asyncio.timeout` throws through its task."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._due: dict[float, tuple[asyncio.TimerHandle, set[asyncio.Event]]] = {}

    async def wait(self, event: asyncio.Event, deadline: float) -> None:
        """Until `event` is set, at the latest at `deadline` (then set by the alarm; the
        caller clears it before it waits again)."""
        entry = self._due.get(deadline)
        if entry is None:
            entry = self._due[deadline] = (self._loop.call_at(deadline, self._ring, deadline),
                                           set())
        entry[1].add(event)
        try:
            await event.wait()
        finally:
            waiting = entry[1]
            waiting.discard(event)
            if not waiting and self._due.get(deadline) is entry:
                entry[0].cancel()
                del self._due[deadline]

    def _ring(self, deadline: float) -> None:
        entry = self._due.pop(deadline, None)
        if entry is not None:
            for event in entry[1]:
                event.set()


_LOOP_ALARMS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Alarms] = (
    weakref.WeakKeyDictionary())


def _alarms() -> Alarms:
    """The running loop's Alarms."""
    loop = asyncio.get_running_loop()
    alarms = _LOOP_ALARMS.get(loop)
    if alarms is None:
        alarms = _LOOP_ALARMS[loop] = Alarms(loop)
    return alarms


async def _first_set(events: tuple[asyncio.Event, ...], timeout_s: float) -> None:
    """Wait until one of `events` is set, or `timeout_s` has passed."""
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=max(0.0, timeout_s),
                           return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
