"""Supervisor operations at their edges (a cancelled delete, a failed record save, a restart
after a stop, a reload, an unchanged desired set, a record that did not parse); the comment
above each test says what went wrong before its fix.

They run the real Supervisor, Dyno, Engine and Daemon halves on test_dyno's fake Runtime.
"""

from __future__ import annotations

import asyncio
import errno
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from agent.daemon.service import Daemon
from agent.spec import DynoSpec
from agent.supervision.policy import STOP_TIMEOUT_S
from agent.supervision.reconcile import Engine, SupervisorFleet
from agent.supervision.records import Placement, Record, RecordStore
from tests.support.virtualtime import until
from tests.unit.agent.conftest import VIRTUAL_TIME
from tests.unit.agent.fakes import FakeRuntime, Harness, make_config, virtual_harness

# On virtual time, with Heroku's timings (a 30-second stop timeout costs nothing).
pytestmark = pytest.mark.asyncio(loop_factories=[VIRTUAL_TIME])


@pytest.fixture
async def h(tmp_path: Path) -> AsyncIterator[Harness]:
    harness = await virtual_harness(tmp_path)
    yield harness
    await harness.supervisor.detach_all()


def _body(name: str = "worker.1", dyno_id: str = "w1") -> dict[str, Any]:
    return {"id": dyno_id, "app": "demo", "name": name, "command": "run-it",
            "release": {"version": 1, "slug": {"path": "/slug"}}}


async def _until(predicate: Callable[[], bool], what: str, timeout_s: float = 5.0) -> None:
    await until(predicate, timeout_s, what)


# Before its fix: a delete whose caller is cancelled (coordinator link dropped mid-sync,
# API drain at shutdown) is carried out by the dyno task, which then dies on InvalidStateError
# (dyno.py:198 set_result on the cancelled future); Supervisor.delete_dyno never pops the dyno
# nor deletes its record: a dead entry stays listed, every later command on it hangs
async def test_cancelled_delete_still_forgets_the_dyno(tmp_path: Path) -> None:
    h = await virtual_harness(tmp_path, FakeRuntime(ignores_term=True))
    try:
        dyno_id = await h.create("worker.1")
        await h.state(dyno_id, "up")
        dyno = h.supervisor.dynos[dyno_id]
        deleting = asyncio.create_task(h.supervisor.delete_dyno(dyno_id))
        await _until(lambda: bool(h.runtime.signals), "SIGTERM of the stop")
        deleting.cancel()
        await asyncio.gather(deleting, return_exceptions=True)
        # The dyno task goes on (stop timeout 30 s, then SIGKILL) and destroys the dyno.
        await asyncio.wait_for(dyno.deleted.wait(), 2 * STOP_TIMEOUT_S)
        await _until(lambda: dyno_id not in h.supervisor.dynos, "dyno forgotten", 2.0)
        assert not (h.records.dir / f"{dyno_id}.json").exists()
    finally:
        await h.supervisor.detach_all()


# Before its fix: an exception inside a dyno's task (here ENOSPC from the record save in
# _transition; equally UidAllocationError from place(), CgroupError from
# kill()/signal_all()/unplace()) ends its supervision for good: no restart, and every later
# command times out as a 500
async def test_a_failed_record_save_does_not_end_supervision(
        h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    dyno_id = await h.create("worker.1")
    await h.state(dyno_id, "up")
    real_save = RecordStore.save
    failures = [OSError(errno.ENOSPC, "No space left on device")]

    def save(self: RecordStore, record: Record) -> None:
        if failures:
            raise failures.pop()
        real_save(self, record)

    monkeypatch.setattr(RecordStore, "save", save)
    h.runtime.exit(dyno_id, 1)
    await _until(lambda: len(h.runtime.launches) == 2, "restart after the crash", 3.0)


# Before its fix: a restart requested while a stop is under way is acknowledged (its
# future resolves when the process exits) but dropped: intent stays STOP, desired 'stopped', the
# dyno ends down
async def test_restart_after_stop_is_not_lost(tmp_path: Path) -> None:
    h = await virtual_harness(tmp_path, FakeRuntime(ignores_term=True))
    try:
        dyno_id = await h.create("worker.1")
        await h.state(dyno_id, "up")
        stopping = asyncio.create_task(h.supervisor.stop_dyno(dyno_id))
        await _until(lambda: bool(h.runtime.signals), "SIGTERM of the stop")
        restarting = asyncio.create_task(h.supervisor.restart_dyno(dyno_id))
        await asyncio.wait_for(asyncio.gather(stopping, restarting), 3 * STOP_TIMEOUT_S)
        await _until(lambda: len(h.runtime.launches) == 2, "launch of the restart", 3.0)
        await h.state(dyno_id, "up")
    finally:
        await h.supervisor.detach_all()


# Before its fix: SIGHUP replaces Daemon.config only; the Supervisor (and each Dyno's
# Timing, and the coordinator link's token file) keep the start-up Config, so the RELOADABLE
# keys restart_schedule_s, boot/stop_timeout_s, cycle_after_s, sizes, sample_interval_s change
# nothing although the log says 'configuration reloaded'
async def test_sighup_reload_reaches_the_supervisor(h: Harness, tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(f'state_dir = "{tmp_path / "state"}"\nrun_dir = "{tmp_path / "run"}"\n'
                    "stop_timeout_s = 7\n")
    daemon = Daemon(make_config(tmp_path), path)
    daemon.supervisor = h.supervisor
    daemon.reload()
    assert daemon.config.stop_timeout_s == 7.0  # the daemon itself did reload
    status = await h.supervisor.create_dyno(_body())
    assert h.supervisor.get_dyno(str(status["id"]))["spec"]["stop_timeout_s"] == 7


# Before its fix: the agent's boot/stop timeout defaults and its size table are baked
# into DynoSpec, which is the engine's identity for 'changed': once a reload takes effect, the
# next dynos.sync with unchanged bodies replaces (stops and restarts) every dyno on the host
async def test_same_desired_set_after_a_config_change_replaces_nothing(h: Harness) -> None:
    engine = Engine(SupervisorFleet(h.supervisor))
    first = await engine.apply(1, [_body()])
    assert first.started == ["w1"]
    await h.state("w1", "up")
    # What a working SIGHUP (previous test) would do to the supervisor's configuration.
    h.supervisor.config = replace(h.supervisor.config, stop_timeout_s=5.0)
    second = await engine.apply(2, [_body()])
    assert second.replaced == []
    assert len(h.runtime.launches) == 1


@dataclass
class _FakeGroup:
    rel: str
    destroyed: list[str]

    async def destroy(self, timeout_s: float = 10.0) -> None:
        self.destroyed.append(self.rel)


@dataclass
class _FakeTree:
    groups: list[str]
    destroyed: list[str] = field(default_factory=list)

    def list_groups(self, suffix: str = "") -> list[str]:
        return [g for g in self.groups if g.endswith(suffix)]

    def group(self, rel: str) -> _FakeGroup:
        return _FakeGroup(rel, self.destroyed)

    def sweep_empty(self, keep: Callable[[str], bool]) -> None:
        return None


@dataclass
class _FakeNetwork:
    kept_ns: list[set[str]] = field(default_factory=list)

    def sweep(self, spaces: Any, namespaces: Any) -> str:
        self.kept_ns.append(set(namespaces))
        return "swept"


# Before its fix: restore() 'leaves alone' a record whose spec no longer parses (a
# [sizes.X] removed from the config, a stricter validator after an upgrade), but _sweep then
# treats its cgroup and netns as ownerless and destroys them: the running dyno is killed by an
# agent restart
async def test_sweep_spares_a_dyno_whose_record_did_not_parse(h: Harness) -> None:
    rel = "app-demo.slice/dyno-c1.scope"
    spec = {**_body("worker.2", "c1"), "size": "custom-size"}  # unknown to this config
    placement = Placement(cgroup=rel, netns="dyno-c1", netns_path="/run/netns/dyno-c1",
                          space="demo", ip="10.1.2.9", uid=100001, gid=100001,
                          slug_dir="/slug", dyno_dir="/run/dynos/c1")
    h.records.write("c1", json.dumps({
        "spec": spec, "state": "up", "since": "2026-01-01T00:00:00+00:00", "reason": "booted",
        "placement": asdict(placement), "pid": 4242, "start_time": 7}).encode())
    restored = h.supervisor.restore([])
    assert restored == []  # skipped: "leaving it alone"
    daemon = Daemon(h.supervisor.config, None)
    tree, network = _FakeTree([rel]), _FakeNetwork()
    daemon.supervisor = h.supervisor
    daemon.tree = tree  # type: ignore[assignment]
    daemon.network = network  # type: ignore[assignment]
    await daemon._sweep(restored)
    assert tree.destroyed == []
    assert "dyno-c1" in network.kept_ns[0]


async def test_restore_puts_a_moved_uid_in_the_record_and_saves_it(h: Harness) -> None:
    """The runtime's uid reconciliation names the new uid; the supervisor, the records' one
    writer, puts it in the restored dyno's record and on disk."""
    placement = Placement(cgroup="app-demo.slice/dyno-m1.scope", netns="dyno-m1",
                          netns_path="/run/netns/dyno-m1", space="demo", ip="10.1.2.8",
                          uid=100001, gid=100001, slug_dir="/slug", dyno_dir="/run/dynos/m1")
    h.records.write("m1", json.dumps({
        "spec": _body("worker.3", "m1"), "state": "down", "since": "2026-01-01T00:00:00+00:00",
        "reason": "stopped", "placement": asdict(placement), "desired": "stopped"}).encode())
    assert h.supervisor.restore([], moved_uids={"m1": 100007}) == ["m1"]
    record = h.supervisor.dynos["m1"].record
    assert record.placement is not None and record.placement.uid == 100007
    h.supervisor.writer.flush()
    (stored,) = h.records.load_all()
    assert stored.placement is not None and stored.placement.gid == 100007


class _SlowTeardownRuntime(FakeRuntime):
    """Freeing a dyno's cgroup, directory, uid and namespace never ends (a mass delete's
    teardown queued behind a thousand others)."""

    async def unplace(self, placement: Placement) -> None:
        await asyncio.Event().wait()


# Before its fix: a delete was answered only once the dyno's kernel objects were freed, so a
# mass delete answered each dyno as late as the teardown queue made it (a sync from 1,000 to 0
# reported most removals as `timeout`, though every dyno was gone): a deleted dyno is gone
# once its processes and record are, and its kernel objects follow in the background
async def test_a_delete_is_answered_without_waiting_for_the_teardown(tmp_path: Path) -> None:
    h = await virtual_harness(tmp_path, _SlowTeardownRuntime())
    try:
        dyno_id = await h.create("worker.1")
        await h.state(dyno_id, "up")
        await asyncio.wait_for(h.supervisor.delete_dyno(dyno_id), STOP_TIMEOUT_S)
        assert dyno_id not in h.supervisor.dynos
        assert not (h.records.dir / f"{dyno_id}.json").exists()
        assert h.runtime.unplaced == [dyno_id]
    finally:
        await h.supervisor.detach_all()


# Before its fix: a stop's deadline (stop_timeout_s + 15 s) covered the agent's work after
# the exit too, which in a mass delete waits behind other dynos' (MAX_CONCURRENT_EXITS): a
# thousand-dyno sync reported most removals `timeout` though every process had ended on time
async def test_a_stop_whose_process_ended_in_time_is_no_timeout_however_late_its_turn(
        h: Harness) -> None:
    from agent.supervision.dyno import MAX_CONCURRENT_EXITS
    from agent.supervision.supervisor import COMMAND_GRACE_S
    dyno_id = await h.create("worker.1")
    await h.state(dyno_id, "up")
    dyno = h.supervisor.dynos[dyno_id]
    for _ in range(MAX_CONCURRENT_EXITS):  # every exit-handling turn taken by other dynos
        await h.supervisor.exit_slots.acquire()
    deleting = asyncio.ensure_future(h.supervisor.delete_dyno(dyno_id))
    await _until(lambda: dyno.process_ended.is_set(), "the process ended")
    await asyncio.sleep(dyno.stop_timeout_s + COMMAND_GRACE_S + 60)
    assert not deleting.done()  # still waiting its turn, not failed
    for _ in range(MAX_CONCURRENT_EXITS):
        h.supervisor.exit_slots.release()
    await asyncio.wait_for(deleting, 5)
    assert dyno_id not in h.supervisor.dynos


@dataclass
class _UnkillableRuntime(FakeRuntime):
    """A process that ignores SIGTERM and that SIGKILL does not end (a kernel that cannot
    kill it: stuck in an uninterruptible sleep)."""

    ignores_term: bool = True

    def kill(self, placement: Placement) -> None:
        self.kills += 1


# The deadline still holds for a process that does not end: SIGKILL is not enough when the
# agent cannot kill (here the runtime's kill does nothing), and the caller hears `timeout`
async def test_a_stop_whose_process_never_ends_times_out(tmp_path: Path) -> None:
    from agent import errors
    h = await virtual_harness(tmp_path, _UnkillableRuntime())
    try:
        dyno_id = await h.create("worker.1")
        await h.state(dyno_id, "up")
        with pytest.raises(errors.Timeout, match="had not ended within"):
            await h.supervisor.stop_dyno(dyno_id)
    finally:
        await h.supervisor.detach_all()


# Before its fix: a command asked for while its dyno was being deleted (a second delete, a
# stop racing the delete: the fuzzing client's parallel sequences) stayed queued in a dyno
# whose task had ended, and its caller waited forever (with a deadline: `timeout`)
async def test_commands_racing_a_delete_are_answered(h: Harness) -> None:
    from agent import errors
    dyno_id = await h.create("worker.1")
    await h.state(dyno_id, "up")
    first = asyncio.ensure_future(h.supervisor.delete_dyno(dyno_id))
    second = asyncio.ensure_future(h.supervisor.delete_dyno(dyno_id))
    stop = asyncio.ensure_future(h.supervisor.stop_dyno(dyno_id))
    await asyncio.sleep(0)
    _done, pending = await asyncio.wait((first, second, stop), timeout=5)
    assert not pending
    assert first.result() is None and second.result() is None
    assert stop.exception() is None or isinstance(stop.exception(), errors.NotFound)
    assert dyno_id not in h.supervisor.dynos


# A start through the convergence engine (the operator API's, the coordinator's dyno.start)
# checked the spec, and the slug path on the host, twice: once to decide, once to create.
async def test_a_start_through_the_engine_parses_its_spec_once(h: Harness) -> None:
    engine = Engine(SupervisorFleet(h.supervisor))
    parsed: list[str] = []
    parse = h.supervisor.parse

    def counting(body: Any) -> DynoSpec:
        spec = parse(body)
        parsed.append(spec.id)
        return spec

    h.supervisor.parse = counting  # type: ignore[method-assign]
    spec = await engine.start(_body())
    assert parsed == [spec.id]
    await h.state(spec.id, "up")
    # The same start again (idempotent by id): parsed, and nothing else started.
    await engine.start(_body())
    assert parsed == [spec.id, spec.id]
    assert len(h.runtime.launches) == 1
