"""The dyno manager: every dyno on this host, their records, the holder's event stream,
adoption after an agent restart, and the operations the operator API and coordinator call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from agent import errors
from agent.config import Config
from agent.holder import ExitEvent, HeldProcess, OutputEvent
from agent.observability import metrics
from agent.observability.logs import (
    LineBlock,
    LogHub,
    LogLine,
    LogSource,
    l10_buffer_overflow,
)
from agent.signals import parse_signal
from agent.slugs.roots import SlugPathRefused, SlugRoots
from agent.spec import HOST_STACK, DynoSpec, SpecError, parse_spec
from agent.supervision.clock import Clock, LoopClock
from agent.supervision.dyno import MAX_CONCURRENT_EXITS, Dyno, HolderGate, Timing
from agent.supervision.events import Dropped, EventBus, EventFollower
from agent.supervision.policy import CYCLE_JITTER_S, RestartPolicy
from agent.supervision.records import Placement, Record, RecordStore, RecordWriter, Stored
from agent.supervision.runtime import Runtime
from agent.supervision.states import DynoState, Reason, StateChange
from agent.supervision.watch import Command
from agent.tasks import OwnedTasks

log = logging.getLogger(__name__)

MAX_CONCURRENT_STARTS = 16
COMMAND_GRACE_S = 15.0
# States in which a one-shot dyno has ended.
ENDED_STATES = frozenset({str(DynoState.COMPLETE), str(DynoState.DOWN), str(DynoState.CRASHED)})


def _now() -> datetime:
    return datetime.now(UTC)


class Supervisor:
    def __init__(self, config: Config, runtime: Runtime, records: RecordStore, hub: LogHub,
                 bus: EventBus, release: Callable[[str, int], Awaitable[None]] | None = None,
                 sample_interval_s: float | None = None,
                 record_writer: RecordWriter | None = None, clock: Clock | None = None) -> None:
        self.config = config
        # What its dynos read the time from (tests: a virtual one).
        self.clock: Clock = clock or LoopClock()
        self.runtime = runtime
        self.records = records
        # Where the dynos' changes are saved: by default at once; the daemon's writes on a
        # thread of its own, off the loop.
        self.writer = record_writer or RecordWriter(records, background=False)
        self.hub = hub
        self.bus = bus
        # Lines the holder dropped (its buffer full) before this agent read them, all dynos.
        self.output_dropped = 0
        # How long each phase of the dynos' starts and exits took (the dynos' timings_ms).
        self.start_phases = metrics.PhaseHistogram(
            "dynoagent_start_phase_seconds",
            "Wall time of each phase of a dyno's start (record write, queue, slug, uid, dir, "
            "cgroup, netns, prepare, launch, up), of its process (run) and of its exit (the "
            "holder's reap until heard: exit_event, then until its outcome is visible: exit).")
        self.dynos: dict[str, Dyno] = {}
        self.draining = False
        self.accepting = True
        self.start_slots = asyncio.Semaphore(MAX_CONCURRENT_STARTS)
        self.exit_slots = asyncio.Semaphore(MAX_CONCURRENT_EXITS)
        # Dynos whose launch found the holder gone wait here for it to be back.
        self.holder_gate = HolderGate()
        self.sample_interval_s = (config.sample_interval_s if sample_interval_s is None
                                  else sample_interval_s)
        self.state_listeners: list[Callable[[StateChange], None]] = []
        self._release = release
        # Log once per app that runs on the `host` stack that it is for development only
        # (standalone mode says so on the terminal instead).
        self.warn_host_stack = True
        self._host_stack_apps: set[str] = set()
        # Records whose spec no longer validates: left alone, and their kernel objects are
        # spared by the sweep (an agent restart never kills a dyno).
        self.unparsed: list[Stored] = []
        # Per held process: the number of the next output line not yet published.
        self._next_seq: dict[tuple[str, int], int] = {}
        self._tasks = OwnedTasks()
        # Held processes no record owns (an agent killed between the holder's launch and the
        # record's save, or a record deleted meanwhile): released once they have exited, so
        # an idle holder really is empty and can be stopped.
        self._strays: set[tuple[str, int]] = set()

    @property
    def timing(self) -> Timing:
        return Timing(restart=RestartPolicy(self.config.restart_schedule_s),
                      cycle_after_s=self.config.cycle_after_s, cycle_jitter_s=CYCLE_JITTER_S,
                      sample_interval_s=self.sample_interval_s,
                      boot_timeout_s=self.config.boot_timeout_s,
                      stop_timeout_s=self.config.stop_timeout_s)

    def reconfigure(self, config: Config) -> None:
        """SIGHUP: new timings for every dyno from now on (specs are not touched)."""
        self.config = config
        self.sample_interval_s = config.sample_interval_s
        timing = self.timing
        for dyno in self.dynos.values():
            dyno.timing = timing

    # -- the Sink of every dyno ----------------------------------------------------------------
    def line(self, dyno: Dyno, text: str) -> None:
        self.hub.publish(LogLine.agent(_now(), dyno.spec.app, dyno.spec.name, text, dyno.id))

    def changed(self, dyno: Dyno, change: StateChange) -> None:
        self.bus.publish(change)
        for listener in self.state_listeners:
            listener(change)

    def timed(self, dyno: Dyno, phases: dict[str, float]) -> None:
        for phase, ms in phases.items():
            self.start_phases.observe(phase, ms / 1e3)

    def save(self, dyno: Dyno) -> None:
        if dyno.id not in self.dynos:
            return
        self.writer.save(dyno.record)

    async def persisted(self, dyno: Dyno) -> None:
        await self.writer.persisted(dyno.id)

    def forget(self, dyno: Dyno) -> None:
        if self.dynos.get(dyno.id) is dyno:
            del self.dynos[dyno.id]
        self.writer.delete(dyno.id)

    def forget_process(self, dyno: Dyno, pid: int) -> None:
        self._next_seq.pop((dyno.id, pid), None)
        self.hub.forget_output(dyno.id, pid)
        if self._release is not None:
            self._tasks.spawn(self._release(dyno.id, pid), f"release-{dyno.id}")

    # -- holder events -------------------------------------------------------------------------
    def on_holder_event(self, event: OutputEvent | ExitEvent | object) -> None:
        if isinstance(event, OutputEvent):
            self._on_output(event)
        elif isinstance(event, ExitEvent) and event.kind == "launch":
            if (event.dyno_id, event.pid) in self._strays:
                self._release_stray(event.dyno_id, event.pid)
                return
            dyno = self.dynos.get(event.dyno_id)
            if dyno is not None:
                dyno.on_exit(event.pid, event.status, event.exited_at)

    def _on_output(self, event: OutputEvent) -> None:
        dyno = self.dynos.get(event.dyno_id)
        if dyno is None:
            return
        # Delivery from the holder is at least once: after a re-subscribe it sends again what
        # was not yet acknowledged. Lines are numbered per process; skip those already seen.
        key = (event.dyno_id, event.pid)
        seen_up_to = self._next_seq.get(key)
        if seen_up_to is None:
            # What an earlier agent published already (its tail is kept on disk).
            seen_up_to = self.hub.output_seen(*key)
        end = event.seq + event.count
        if end <= seen_up_to and event.count:
            return
        self._next_seq[key] = max(end, seen_up_to)
        skip = max(0, seen_up_to - event.seq)
        app, name = dyno.spec.app, dyno.spec.name
        if event.dropped and event.seq >= seen_up_to:
            dyno.output_dropped += event.dropped
            self.output_dropped += event.dropped
            self.hub.publish(LogLine.agent(_now(), app, name, l10_buffer_overflow(event.dropped),
                                           dyno.id))
        # A block per pipe read: its lines share their time, and travel as one object.
        number = event.seq
        for stamp, count, data in event.blocks:
            if skip >= count:
                skip -= count
                number += count
                continue
            # Decoding the lines joined replaces what decoding each would: b"\n" never
            # continues a UTF-8 sequence.
            text = data.decode("utf-8", errors="replace")
            texts = [text.rstrip("\n")] if count == 1 else text.split("\n")
            if skip:
                texts, number, skip = texts[skip:], number + skip, 0
            self.hub.publish_block(
                LineBlock(datetime.fromtimestamp(stamp, UTC), LogSource.APP, name, app, texts,
                          dyno.id), origin=(dyno.id, event.pid, number))
            number += len(texts)
        # On disk before the holder hears that these lines were handled (its ack).
        self.hub.flush()

    # -- start-up: adoption ----------------------------------------------------------------------
    def _release_stray(self, dyno_id: str, pid: int) -> None:
        self._strays.discard((dyno_id, pid))
        if self._release is not None:
            self._tasks.spawn(self._release(dyno_id, pid), f"release-{dyno_id}")

    def restore(self, held: Iterable[HeldProcess],
                moved_uids: Mapping[str, int] | None = None) -> list[str]:
        """Rebuild every recorded dyno and resume supervising it. Processes the holder still
        runs are adopted as they are; exits it saw while we were away are handled by policy.
        `moved_uids`: dynos whose uid went to another dyno meanwhile get these from their
        next start (`Runtime.keep_uids`)."""
        by_key = {(p.dyno_id, p.pid): p for p in held if p.kind == "launch"}
        unclaimed = dict(by_key)
        restored = []
        stored = list(self.records.load_all())
        for entry in stored:
            if entry.pid is not None:
                unclaimed.pop((entry.id, entry.pid), None)
        for entry in stored:
            if entry.state == DynoState.COMPLETE and entry.pid is None and \
                    entry.name.startswith("run."):
                # A `dynoctl run` session that ended while no agent was there to remove it.
                log.info("forgetting completed one-off dyno %s", entry.id)
                if entry.placement is not None:
                    self._tasks.spawn(self.runtime.unplace(entry.placement), f"unplace-{entry.id}")
                self.writer.delete(entry.id)
                continue
            try:
                record = entry.parse(self.config.sizes)
            except (SpecError, ValueError, TypeError, KeyError) as exc:
                log.error("record %s is unreadable (%s); leaving it alone", entry.id,
                          errors.excerpt(str(exc)))
                self.unparsed.append(entry)
                continue
            uid = (moved_uids or {}).get(record.id)
            changed = uid is not None and record.placement is not None
            if uid is not None and record.placement is not None:
                record = replace(record, placement=replace(record.placement, uid=uid, gid=uid))
            if record.pid is None and record.placement is not None:
                # The agent died after the holder launched the process but before the record
                # said so: that process is the dyno, adopt it rather than launch a second one.
                # Not when the placement was not recorded either (the record is written in
                # the background, and a launch can come first): nothing of the process's
                # cgroup and namespace is known then, the start-up sweep removes them (and
                # the process with them), and the dyno is placed and launched anew.
                orphans = [p for p in unclaimed.values()
                           if p.dyno_id == record.id and p.running]
                if len(orphans) == 1:
                    log.warning("adopting dyno %s pid %d launched just before the agent "
                                "stopped", record.id, orphans[0].pid)
                    record = replace(record, pid=orphans[0].pid,
                                     start_time=orphans[0].start_time)
                    changed = True
                    unclaimed.pop((record.id, orphans[0].pid))
            spec = record.spec
            problem = self.slug_problem(spec)
            if problem is not None:
                # Adopted all the same (a restarted agent never kills a dyno), but the start
                # refuses to launch it again: slug_roots changed, or the record predates them.
                log.warning("dyno %s: %s; it will not be launched again", record.id, problem)
            dyno = self._make(record)
            self.dynos[spec.id] = dyno
            if changed:
                self.save(dyno)
            adopt = record.pid is not None
            self._match_process(dyno, by_key)
            dyno.start(adopt=adopt)
            restored.append(spec.id)
        for key, process in unclaimed.items():
            # Still running: its cgroup is swept (no record owns it) or, for a dyno that has
            # a record, killed with the cgroup below; either way its exit releases it.
            self._strays.add(key)
            if not process.running:
                self._release_stray(*key)
            else:
                owner = self.dynos.get(process.dyno_id)
                if owner is not None and owner.placement is not None \
                        and owner.record.pid is None:
                    log.warning("killing stray processes of dyno %s", process.dyno_id)
                    self.runtime.kill(owner.placement)
        log.info("restored %d dynos", len(restored))
        return restored

    def _match_process(self, dyno: Dyno, by_key: dict[tuple[str, int], HeldProcess]) -> None:
        """Square a dyno's recorded process with what the holder holds: an exit it saw is
        delivered; a process it does not know (the holder was replaced) can no longer be
        followed — no exit status, no output — so it is ended and counts as exited."""
        record = dyno.record
        if record.pid is None:
            return
        process = by_key.get((record.id, record.pid))
        if process is not None:
            if not process.running:
                dyno.on_exit(process.pid, process.status if process.status is not None
                             else 128 + (process.signal or 9))
            return
        if record.start_time is not None and self.runtime.pid_alive(record.pid,
                                                                     record.start_time):
            log.warning("dyno %s runs outside the holder; ending it so policy restarts it",
                        record.id)
            if record.placement is not None:
                self.runtime.kill(record.placement)
        # The holder's death, not the app's: restarted at once, no crash counted.
        dyno.on_holder_lost(record.pid)

    def resync(self, held: Iterable[HeldProcess]) -> None:
        """After reconnecting to the holder (perhaps a new one, the old having died)."""
        by_key = {(p.dyno_id, p.pid): p for p in held if p.kind == "launch"}
        for dyno in list(self.dynos.values()):
            self._match_process(dyno, by_key)

    def _make(self, record: Record) -> Dyno:
        spec = record.spec
        if (spec.release.stack == HOST_STACK and self.warn_host_stack
                and spec.app not in self._host_stack_apps):
            self._host_stack_apps.add(spec.app)
            log.warning("app %s runs on the host stack: its dynos see the host's own "
                        "world-readable files (development only; use a named stack)", spec.app,
                        extra={"APP": spec.app})
        return Dyno(record, self.runtime, self, self.timing, self.start_slots,
                    holder_gate=self.holder_gate, exit_slots=self.exit_slots, clock=self.clock)

    async def detach_all(self) -> None:
        """Stop supervising; the dynos themselves keep running (static stability)."""
        self.accepting = False
        await asyncio.gather(*(dyno.detach() for dyno in self.dynos.values()))
        await self._tasks.cancel_all()
        # Every change is on disk before the agent goes: the next one adopts from it.
        await asyncio.to_thread(self.writer.close)

    async def stop_all(self) -> None:
        """Stop and forget every dyno (standalone mode's Ctrl-C, tests)."""
        await asyncio.gather(*(self.delete_dyno(dyno_id) for dyno_id in list(self.dynos)),
                             return_exceptions=True)

    # -- lookups ---------------------------------------------------------------------------------
    def find(self, ref: str, app: str | None = None) -> Dyno:
        dyno = self.dynos.get(ref)
        if dyno is not None and (app is None or dyno.spec.app == app):
            return dyno
        named = [d for d in self.dynos.values()
                 if d.spec.name == ref and (app is None or d.spec.app == app)]
        if not named:
            raise errors.NotFound(f"no dyno {ref}" + (f" in app {app}" if app else ""))
        if len(named) > 1:
            apps = ", ".join(sorted(d.spec.app for d in named))
            raise errors.Conflict(f"{ref} exists in several apps ({apps}); name the app")
        return named[0]

    def specs(self, app: str | None = None) -> list[DynoSpec]:
        """The specs of every dyno here, or of one app's."""
        return [d.spec for d in self.dynos.values() if app is None or d.spec.app == app]

    def running(self, ref: str, app: str | None = None) -> tuple[DynoSpec, Placement]:
        """The spec and placement of a dyno (id, or name) that has a running process, as
        `dynoctl run` and `exec` need them; NotFound, or Conflict when it has no process."""
        dyno = self.find(ref, app)
        if dyno.placement is None or dyno.record.pid is None:
            raise errors.Conflict(f"{dyno.spec.name} has no running process to enter")
        return dyno.spec, dyno.placement

    def counts(self) -> dict[str, Any]:
        # Asked for by every `GET /v1/info`: one pass, in C, over a thousand dynos.
        by_state = Counter(dyno.machine.state for dyno in self.dynos.values())
        return {"total": len(self.dynos),
                "by_state": {str(state): n for state, n in by_state.items()}}

    # -- the Backend of the operator API ---------------------------------------------------------
    def _listed(self, app: str | None) -> list[Dyno]:
        """The dynos here, or one app's, in the order `GET /v1/dynos` lists them."""
        dynos = [d for d in self.dynos.values() if app is None or d.spec.app == app]
        dynos.sort(key=_list_key)
        return dynos

    def list_dynos(self, app: str | None = None) -> list[dict[str, Any]]:
        return [d.status() for d in self._listed(app)]

    def list_dynos_json(self, app: str | None = None) -> str:
        """`list_dynos()` as compact JSON, from each dyno's cached encoding: a thousand idle
        dynos are listed without building or encoding a status on the event loop."""
        return "[" + ",".join([d.status_json() for d in self._listed(app)]) + "]"

    def get_dyno(self, ref: str, app: str | None = None) -> dict[str, Any]:
        dyno = self.find(ref, app)
        status = dyno.status()
        placement = dyno.placement
        stats = self.runtime.stats(placement) if placement is not None else None
        size = dyno.spec.size
        status.update({
            # With the timeouts in force, whether the spec gave them or the agent's defaults.
            "spec": {**dyno.spec.to_dict(), "boot_timeout_s": dyno.boot_timeout_s,
                     "stop_timeout_s": dyno.stop_timeout_s},
            "cgroup": placement.cgroup if placement else None,
            "netns": placement.netns_path if placement else None,
            "uid": placement.uid if placement else None,
            # 2 (a seccomp filter) for a dyno's PID 1 as launched; null when not running.
            "seccomp": self._seccomp_mode(dyno),
            "limits": {"memory_quota_bytes": size.memory_quota_bytes,
                       "memory_kill_bytes": size.kill_at_bytes, "pids_max": size.pids_max,
                       "cpu_weight": size.cpu_weight, "cpu_max_cpus": size.cpu_max_cpus},
            "stats": None if stats is None else {
                "memory_bytes": stats.memory_current_bytes,
                "memory_rss_bytes": stats.memory_rss_bytes,
                "memory_quota_bytes": size.memory_quota_bytes,
                "cpu_seconds": (stats.cpu_usage_usec or 0) / 1e6,
                "pids": stats.pids_current,
                "oom_kills": stats.oom_kill_events,
            },
            "timings_ms": dyno.timings_ms,
            "crashes": dyno.record.crashes,
            "output_dropped": dyno.output_dropped,
        })
        return status

    def _seccomp_mode(self, dyno: Dyno) -> int | None:
        pid, start_time = dyno.record.pid, dyno.record.start_time
        if pid is None or start_time is None:
            return None
        return self.runtime.seccomp_mode(pid, start_time)

    def parse(self, body: Any) -> DynoSpec:
        """A spec for a new dyno, validated at the edge (operator API, coordinator RPC, the
        local controller): DESIGN §5, and a local slug path against the slug roots. Raises
        SpecError and changes nothing."""
        spec = parse_spec(body, self.config.sizes)
        problem = self.slug_problem(spec)
        if problem is not None:
            raise SpecError("release.slug.path", problem, spec.release.slug.path)
        return spec

    def slug_problem(self, spec: DynoSpec) -> str | None:
        """Why the spec's local slug path may not be used, or None (a url, or allowed)."""
        path = spec.release.slug.path
        if path is None:
            return None
        try:
            SlugRoots.from_config(self.config).resolve(path)
        except SlugPathRefused as exc:
            return str(exc)
        return None

    async def create_dyno(self, body: Any) -> dict[str, Any]:
        self._check_accepting()
        try:
            spec = self.parse(body)
        except SpecError as exc:
            raise errors.InvalidSpec(str(exc), exc.field) from None
        return self.create_parsed(spec)

    def _check_accepting(self) -> None:
        if not self.accepting:
            raise errors.NotReady("the agent is shutting down")
        if self.draining:
            raise errors.Draining("the agent is draining and starts no new dynos")

    def create_parsed(self, spec: DynoSpec) -> dict[str, Any]:
        """`create_dyno` of a spec that `parse` returned (the convergence engine parses
        before it decides, and a second parse would check the slug path again)."""
        self._check_accepting()
        existing = self.dynos.get(spec.id)
        if existing is not None:
            if existing.spec != spec:
                raise errors.Conflict(f"dyno {spec.id} exists with a different spec")
            return existing.status()
        for other in self.dynos.values():
            if other.spec.app == spec.app and other.spec.name == spec.name:
                raise errors.Conflict(f"{spec.app} already has a dyno named {spec.name} "
                                      f"({other.id})")
        now = _now()
        dyno = self._make(Record(spec=spec, state=DynoState.STARTING, since=now,
                                 reason=Reason.START))
        self.dynos[spec.id] = dyno
        # On disk before the caller hears of it: a dyno it was told exists survives a crash.
        began = time.perf_counter()
        self.writer.save_now(dyno.record)
        dyno.saved_at_create(began)
        self.changed(dyno, dyno.machine.current())
        dyno.start(adopt=False)
        return dyno.status()

    async def _command(self, dyno: Dyno, command: Command, timeout_s: float) -> None:
        # The deadline is the stop's: the dyno's process must have ended within it. What
        # follows the exit (the cgroup emptied, the final counters, the record) is the
        # agent's own work, bounded step by step; in a mass delete it waits its turn behind
        # other dynos' (MAX_CONCURRENT_EXITS), which is no failure of this dyno's stop.
        # Never cancelled: a caller that gives up (timeout, disconnect) does not cancel the
        # command; the dyno carries it out all the same.
        future = dyno.request(command)
        ended = asyncio.ensure_future(dyno.process_ended.wait())
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.wait((future, ended), return_when=asyncio.FIRST_COMPLETED)
        except TimeoutError:
            raise errors.Timeout(f"{command.value} of {dyno.spec.name}: its process had not "
                                 f"ended within {timeout_s:g}s; the stop goes on in the "
                                 f"background") from None
        finally:
            ended.cancel()
        await asyncio.shield(future)
        # Answered only once it is on disk: a stopped or deleted dyno an agent killed right
        # after the answer comes back stopped or gone, not running.
        await asyncio.shield(self.writer.persisted(dyno.id))

    async def restart_dyno(self, ref: str, app: str | None = None) -> dict[str, Any]:
        dyno = self.find(ref, app)
        if dyno.state is DynoState.COMPLETE:
            raise errors.Conflict(f"{dyno.spec.name} has completed; one-off dynos do not restart")
        await self._command(dyno, Command.RESTART, dyno.stop_timeout_s + COMMAND_GRACE_S)
        return dyno.status()

    async def stop_dyno(self, ref: str, app: str | None = None) -> dict[str, Any]:
        dyno = self.find(ref, app)
        await self._command(dyno, Command.STOP, dyno.stop_timeout_s + COMMAND_GRACE_S)
        return dyno.status()

    async def signal_dyno(self, ref: str, signal: str,
                          app: str | None = None) -> dict[str, Any]:
        dyno = self.find(ref, app)
        sig = parse_signal(signal)
        if dyno.placement is None or dyno.record.pid is None:
            raise errors.Conflict(f"{dyno.spec.name} has no running process")
        count = await self.runtime.signal_all_async(dyno.placement, sig)
        status = dyno.status()
        status["signalled"] = count
        return status

    async def delete_dyno(self, ref: str, app: str | None = None) -> None:
        dyno = self.find(ref, app)
        await self._command(dyno, Command.DELETE, dyno.stop_timeout_s + COMMAND_GRACE_S)

    async def wait_ended(self, dyno_id: str, follower: EventFollower) -> int:
        """The exit status of a one-shot dyno once it has ended (completed, stopped or
        crashed), from `follower` (subscribed before the dyno could end). An event lost to a
        follower that fell behind is made up for by looking at the dyno itself."""
        def ended() -> int | None:
            dyno = self.dynos.get(dyno_id)
            if dyno is None:
                return 1
            if str(dyno.state) in ENDED_STATES and dyno.record.pid is None:
                return int(dyno.record.exit_status if dyno.record.exit_status is not None
                           else 1)
            return None

        if dyno_id in self.dynos and self.dynos[dyno_id].state is DynoState.COMPLETE:
            return ended() or 0
        async for event in follower:
            if isinstance(event, Dropped):
                status = ended()
                if status is not None:
                    return status
            elif event.id == dyno_id and event.state in ENDED_STATES:
                return event.exit_status if event.exit_status is not None else 1
        raise errors.NotReady("the agent is shutting down")

    @property
    def log_hub(self) -> LogHub:
        return self.hub

    def subscribe_events(self) -> EventFollower:
        return self.bus.subscribe()

    def metrics_text(self, extra: Iterable[metrics.MetricFamily] = ()) -> str:
        rows = []
        for dyno in self.dynos.values():
            stats = dyno.last_stats
            rows.append(metrics.DynoMetrics(
                id=dyno.id, app=dyno.spec.app, name=dyno.spec.name, type=dyno.spec.type,
                size=dyno.spec.size.name, state=dyno.state,
                state_since_s=dyno.machine.since.timestamp(), restarts=dyno.record.restarts,
                memory_rss_bytes=(stats.memory_rss_bytes or 0) if stats else 0,
                memory_cache_bytes=(stats.memory_cache_bytes or 0) if stats else 0,
                memory_swap_bytes=(stats.memory_swap_bytes or 0) if stats else 0,
                memory_quota_bytes=dyno.spec.size.memory_quota_bytes,
                cpu_seconds=((stats.cpu_usage_usec or 0) / 1e6) if stats else 0.0,
                pids=(stats.pids_current or 0) if stats else 0))
        return metrics.render_dynos(rows, [str(state) for state in DynoState],
                                    [self.log_drops_family(), self.start_phases.family(),
                                     *extra])

    def log_drops_family(self) -> metrics.MetricFamily:
        """Lines lost on the log path, by where: the holder's buffer (a dyno printed faster
        than the agent read; each gap an L10 line in the log) and the queues of log followers
        (`/v1/logs?follow=1` readers that read slower than lines came; an L10 line in their
        stream). Drains count theirs in dynoagent_drain_lines_dropped_total."""
        return metrics.MetricFamily(
            "dynoagent_log_lines_dropped_total",
            "Log lines dropped (reported in the log as Error L10), by where: the holder's "
            "buffer before the agent read them, or a log follower's queue.",
            metrics.MetricType.COUNTER,
            (metrics.Sample({"reason": "holder_buffer"}, float(self.output_dropped)),
             metrics.Sample({"reason": "follower_queue"}, float(self.hub.follower_dropped))))


def _ordinal(name: str) -> int:
    with contextlib.suppress(ValueError):
        return int(name.rpartition(".")[2])
    return 0


def _list_key(dyno: Dyno) -> tuple[str, str, int]:
    """By app, type, then number (web.2 before web.10); kept on the dyno for its spec."""
    spec = dyno.record.spec
    cached = dyno.list_key
    if cached is None or cached[0] is not spec:
        cached = dyno.list_key = (spec, (spec.app, spec.type, _ordinal(spec.name)))
    return cached[1]


