"""What the agent asks of a dyno is on disk before it acts, and an agent killed meanwhile is
succeeded by one that finishes it: a stop or restart under way is resumed (its exit is never
the app's crash), a delete or stop answered is not undone, and processes no holder follows
are ended before another one is launched into the same cgroup."""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from agent.holder import HeldProcess
from agent.supervision.records import Record, RecordStore, RecordWriter
from agent.supervision.states import DynoState
from tests.unit.agent.conftest import VIRTUAL_TIME
from tests.unit.agent.fakes import Harness, Proc, make_harness, virtual_harness


def _held(dyno_id: str, pid: int) -> HeldProcess:
    return HeldProcess(dyno_id, "launch", pid, 1, True, None, None, 0, 0, 0, None)


def _on_disk(h: Harness, dyno_id: str) -> dict[str, object]:
    data: dict[str, object] = json.loads((h.records.dir / f"{dyno_id}.json").read_text())
    return data


async def _up_under_a_first_agent(tmp_path: Path) -> tuple[Harness, str, int]:
    """A worker dyno up under an agent that a test then lets die; with its id and pid."""
    first = await virtual_harness(tmp_path)
    dyno_id = await first.create("worker.1")
    await first.state(dyno_id, "up")
    return first, dyno_id, first.runtime.procs[dyno_id].pid


async def _killed_while(h: Harness, dyno_id: str, ask: str) -> None:
    """Ask for a stop or restart of an up dyno whose processes ignore SIGTERM; the agent
    "dies" once the SIGTERM went (its supervision detached, its record as on disk)."""
    h.runtime.procs[dyno_id].ignores_term = True
    operation = getattr(h.supervisor, f"{ask}_dyno")
    task = asyncio.create_task(operation(dyno_id))
    await h.until(lambda: bool(h.runtime.signals), what="SIGTERM sent")
    await h.supervisor.detach_all()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


@pytest.mark.asyncio(loop_factories=[VIRTUAL_TIME])
@pytest.mark.parametrize(("ask", "intent", "desired"), [("stop", "stop", "stopped"),
                                                        ("restart", "restart", "running")])
async def test_the_intent_is_on_disk_before_the_sigterm(tmp_path: Path, ask: str, intent: str,
                                                        desired: str) -> None:
    h = await virtual_harness(tmp_path)
    dyno_id = await h.create("worker.1")
    await h.state(dyno_id, "up")
    await _killed_while(h, dyno_id, ask)
    record = _on_disk(h, dyno_id)
    assert (record["intent"], record["desired"]) == (intent, desired)
    assert isinstance(record["stop_at"], float)


@pytest.mark.asyncio(loop_factories=[VIRTUAL_TIME])
async def test_a_stop_under_way_when_the_agent_died_is_finished_not_a_crash(
        tmp_path: Path) -> None:
    first, dyno_id, pid = await _up_under_a_first_agent(tmp_path)
    await _killed_while(first, dyno_id, "stop")

    second = await virtual_harness(tmp_path)
    second.runtime.procs[dyno_id] = Proc(pid)  # SIGTERM ends it this time
    try:
        second.supervisor.restore([_held(dyno_id, pid)])
        status = await second.state(dyno_id, "down")
        assert (status["exit_status"], status["reason"]) == (143, "stopped")
        assert second.supervisor.dynos[dyno_id].record.crashes == 0
        assert second.runtime.signals == [(pid, signal.SIGTERM)]
        assert second.runtime.launches == []
        assert _on_disk(second, dyno_id)["intent"] == "none"
    finally:
        await second.supervisor.detach_all()


@pytest.mark.asyncio(loop_factories=[VIRTUAL_TIME])
async def test_a_restart_under_way_when_the_agent_died_starts_again_at_once(
        tmp_path: Path) -> None:
    first, dyno_id, pid = await _up_under_a_first_agent(tmp_path)
    await _killed_while(first, dyno_id, "restart")

    second = await virtual_harness(tmp_path)
    second.runtime.procs[dyno_id] = Proc(pid, ignores_term=True)
    try:
        started = second.clock.monotonic()
        second.supervisor.restore([_held(dyno_id, pid)])
        await second.until(lambda: len(second.runtime.launches) == 1, what="started again",
                           timeout_s=60.0)
        status = await second.state(dyno_id, "up")
        # The R12 deadline is the first agent's: 30 s from its SIGTERM, not from adoption.
        assert second.clock.monotonic() - started <= 30.0
        assert second.runtime.kills == 1
        assert status["state"] == "up" and status["reason"] != "crash"
        assert second.supervisor.dynos[dyno_id].record.crashes == 0
    finally:
        await second.supervisor.detach_all()


@pytest.mark.asyncio(loop_factories=[VIRTUAL_TIME])
async def test_processes_no_holder_follows_are_ended_before_a_launch_beside_them(
        tmp_path: Path) -> None:
    first, dyno_id, orphan = await _up_under_a_first_agent(tmp_path)
    await first.supervisor.detach_all()
    # The agent died before the record had the pid, and the holder died with it: the new
    # holder knows nothing, but the process still runs in the dyno's cgroup.
    stored = next(r for r in first.records.load_all() if r.id == dyno_id)
    first.records.save(replace(stored.parse(first.supervisor.config.sizes), pid=None,
                               start_time=None, state=DynoState.STARTING))

    second = await virtual_harness(tmp_path)
    second.runtime.procs[dyno_id] = Proc(orphan)
    second.runtime._pids = itertools.count(orphan + 1000)  # no pid of the orphan's again
    try:
        second.supervisor.restore([])
        status = await second.state(dyno_id, "up")
        assert second.runtime.kills == 1, "the orphan is killed"
        assert second.runtime.launches == [dyno_id]
        assert status["pid"] != orphan
    finally:
        await second.supervisor.detach_all()


@pytest.mark.asyncio(loop_factories=[VIRTUAL_TIME])
async def test_a_process_launched_before_its_placement_was_recorded_is_not_adopted(
        tmp_path: Path) -> None:
    """The agent died after the holder launched the process but before even the placement
    was on disk (records are written in the background): there is nothing to supervise it
    with, so it is left to the start-up sweep, and the dyno starts anew (it was adopted
    without a placement, and its supervision failed on that for ever)."""
    first, dyno_id, orphan = await _up_under_a_first_agent(tmp_path)
    await first.supervisor.detach_all()
    stored = next(r for r in first.records.load_all() if r.id == dyno_id)
    first.records.save(replace(stored.parse(first.supervisor.config.sizes), pid=None,
                               start_time=None, placement=None, state=DynoState.STARTING))

    second = await virtual_harness(tmp_path)
    second.runtime._pids = itertools.count(orphan + 1000)
    try:
        second.supervisor.restore([_held(dyno_id, orphan)])
        status = await second.state(dyno_id, "up")
        assert second.runtime.launches == [dyno_id]
        assert status["pid"] != orphan
        assert second.supervisor.dynos[dyno_id].placement is not None
    finally:
        await second.supervisor.detach_all()


class _SlowStore(RecordStore):
    """Writes that take a while, on the writer's thread."""

    def write(self, dyno_id: str, data: bytes) -> None:
        time.sleep(0.05)
        super().write(dyno_id, data)

    def delete(self, dyno_id: str) -> None:
        time.sleep(0.05)
        super().delete(dyno_id)


async def test_persisted_returns_once_the_newest_version_is_on_disk(tmp_path: Path) -> None:
    store = _SlowStore(tmp_path)
    writer = RecordWriter(store)
    h = await make_harness(tmp_path / "h")
    try:
        dyno_id = await h.create("worker.1")
        record: Record = h.supervisor.dynos[dyno_id].record
        for restarts in range(1, 4):
            writer.save(replace(record, restarts=restarts))
        waiting = asyncio.create_task(writer.persisted(dyno_id))
        await asyncio.sleep(0)
        assert not waiting.done()
        await asyncio.wait_for(waiting, 5)
        (stored,) = store.load_all()
        assert stored.data["restarts"] == 3
        writer.delete(dyno_id)
        await asyncio.wait_for(writer.persisted(dyno_id), 5)
        assert list(store.load_all()) == []
        # Nothing pending: at once.
        await asyncio.wait_for(writer.persisted("other"), 0.01)
    finally:
        await asyncio.to_thread(writer.close)
        await h.supervisor.detach_all()


class _NotedExecutor:
    """The writer's thread, whose start is noted in `order`."""

    def __init__(self, order: list[tuple[str, int]]) -> None:
        self.order = order
        self.threads: list[threading.Thread] = []

    def submit(self, fn: Callable[[], None]) -> None:
        self.order.append(("start", 0))
        thread = threading.Thread(target=fn)
        self.threads.append(thread)
        thread.start()

    def shutdown(self, wait: bool = True) -> None:
        for thread in self.threads:
            thread.join()


async def test_a_turns_saves_are_one_write_after_what_the_turn_woke(tmp_path: Path) -> None:
    """The saves of one turn of the loop are written together, once the tasks that turn woke
    (the event streams a state change wakes) have run: the write never contends with them."""
    order: list[tuple[str, int]] = []

    class Store(RecordStore):
        def write(self, dyno_id: str, data: bytes) -> None:
            order.append(("write", json.loads(data)["restarts"]))
            super().write(dyno_id, data)

    writer = RecordWriter(Store(tmp_path))
    writer._executor = _NotedExecutor(order)  # type: ignore[assignment]
    h = await make_harness(tmp_path / "h")
    try:
        dyno_id = await h.create("worker.1")
        record: Record = h.supervisor.dynos[dyno_id].record
        woken = asyncio.Event()

        async def follower() -> None:
            await woken.wait()
            order.append(("event", 0))

        task = asyncio.create_task(follower())
        await asyncio.sleep(0)
        for restarts in range(1, 4):
            writer.save(replace(record, restarts=restarts))
        woken.set()
        await asyncio.wait_for(writer.persisted(dyno_id), 5)
        await task
        assert order == [("event", 0), ("start", 0), ("write", 3)]
    finally:
        await asyncio.to_thread(writer.close)
        await h.supervisor.detach_all()


async def test_a_delete_is_answered_only_once_the_record_is_gone_from_disk(
        tmp_path: Path) -> None:
    h = await make_harness(tmp_path)
    h.supervisor.writer = RecordWriter(_SlowStore(h.records.dir.parent))
    try:
        dyno_id = await h.create("worker.1")
        await h.state(dyno_id, "up")
        await h.supervisor.stop_dyno(dyno_id)
        assert _on_disk(h, dyno_id)["desired"] == "stopped"
        await h.supervisor.delete_dyno(dyno_id)
        assert not (h.records.dir / f"{dyno_id}.json").exists()
    finally:
        await asyncio.to_thread(h.supervisor.writer.close)
        await h.supervisor.detach_all()


@pytest.mark.asyncio(loop_factories=[VIRTUAL_TIME])
async def test_a_stop_asked_during_a_restart_is_a_stop_on_disk_too(tmp_path: Path) -> None:
    h = await virtual_harness(tmp_path)
    try:
        dyno_id = await h.create("worker.1")
        await h.state(dyno_id, "up")
        h.runtime.procs[dyno_id].ignores_term = True
        restart = asyncio.create_task(h.supervisor.restart_dyno(dyno_id))
        await h.until(lambda: bool(h.runtime.signals), what="SIGTERM sent")
        assert _on_disk(h, dyno_id)["intent"] == "restart"
        stop = asyncio.create_task(h.supervisor.stop_dyno(dyno_id))
        await h.until(lambda: _on_disk(h, dyno_id)["desired"] == "stopped", what="stop saved")
        # An agent killed now is succeeded by one that finishes a stop, not a restart.
        assert _on_disk(h, dyno_id)["intent"] == "stop"
        await asyncio.gather(restart, stop)
        assert h.supervisor.dynos[dyno_id].state is DynoState.DOWN
    finally:
        await h.supervisor.detach_all()


def test_a_record_is_rewritten_over_its_spare_and_deleted_with_it(tmp_path: Path) -> None:
    """A record is written over its spare copy and exchanged with it: from the second write
    on the same two inodes, the spare holding the version before, which a restarted agent
    never loads; a delete removes both."""
    store = RecordStore(tmp_path)
    path, spare = store.dir / "w1.json", store.dir / ".w1.json.tmp"
    record = {"spec": {"id": "w1", "app": "a", "name": "worker.1"}, "state": "starting"}
    store.write("w1", json.dumps(record).encode())
    store.write("w1", json.dumps({**record, "state": "up"}).encode())
    inodes = {path.stat().st_ino, spare.stat().st_ino}
    for state in ("down", "starting", "up"):
        before = path.read_bytes()
        store.write("w1", json.dumps({**record, "state": state}).encode())
        assert {path.stat().st_ino, spare.stat().st_ino} == inodes
        assert spare.read_bytes() == before
        assert json.loads(path.read_bytes())["state"] == state
    assert spare.stat().st_mode & 0o777 == 0o600
    assert [(s.id, s.state) for s in store.load_all()] == [("w1", "up")]
    store.delete("w1")
    assert sorted(p.name for p in store.dir.iterdir()) == []
