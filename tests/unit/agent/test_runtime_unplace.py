"""A deleted dyno's kernel objects are freed in the background (HostRuntime.unplace_later):
a new placement of the same id waits for them, a second unplacing of an id follows the first,
a failure is logged (the sweep at the next start removes what is left), and the daemon can
wait for all of them before it exits."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from pathlib import Path
from typing import Any, cast

import pytest

from agent.daemon.service import _remove_dirs, _stale_dyno_dirs
from agent.spec import parse_spec
from agent.supervision.records import Placement
from agent.supervision.runtime import UID_RELEASE_INTERVAL_S, BatchedCalls, HostRuntime


def _placement(dyno_id: str) -> Placement:
    return Placement(cgroup=f"app-a.slice/dyno-{dyno_id}.scope", netns=f"dyno-{dyno_id}",
                     netns_path=f"/run/netns/dyno-{dyno_id}", space="a", ip="10.1.2.3",
                     uid=500, gid=500, slug_dir="/slug", dyno_dir=f"/run/dynos/{dyno_id}")


class _Unplacing:
    """HostRuntime.unplace, held open until released, one event per call."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.release: dict[str, asyncio.Event] = {}
        self.finished: list[str] = []
        self.fail: set[str] = set()

    async def __call__(self, placement: Placement) -> None:
        key = f"{placement.netns}#{len(self.started)}"
        self.started.append(key)
        event = self.release[key] = asyncio.Event()
        await event.wait()
        if key in self.fail:
            raise OSError(16, "Device or resource busy")
        self.finished.append(key)


def _runtime(tmp_path: Path, unplace: _Unplacing) -> HostRuntime:
    runtime = HostRuntime(tree=cast(Any, None), network=cast(Any, None), uids=cast(Any, None),
                          slugs=cast(Any, None), holder=cast(Any, None),
                          state_dir=tmp_path / "state", run_dir=tmp_path / "run",
                          hide_paths=(), slug_roots=cast(Any, None))
    runtime.unplace = unplace  # type: ignore[method-assign]
    return runtime


async def _turns(n: int = 5) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def test_a_placement_of_the_same_id_waits_for_its_unplacing(tmp_path: Path) -> None:
    unplace = _Unplacing()
    runtime = _runtime(tmp_path, unplace)
    reached: list[str] = []

    def slug_source(spec: Any) -> Any:
        reached.append(spec.id)
        raise RuntimeError("stop here: the placement got past its wait")
    runtime._slug_source = slug_source  # type: ignore[method-assign]
    spec = parse_spec({"id": "w1", "app": "a", "name": "worker.1", "command": "x",
                       "release": {"version": 1, "slug": {"path": "/slug"}}})

    runtime.unplace_later(_placement("w1"))
    placing = asyncio.ensure_future(runtime.place(spec))
    await _turns()
    assert unplace.started == ["dyno-w1#0"] and reached == [] and not placing.done()
    unplace.release["dyno-w1#0"].set()
    with pytest.raises(Exception, match="could not be placed"):
        await asyncio.wait_for(placing, 5)
    assert reached == ["w1"]


async def test_unplacings_of_one_id_run_in_order_and_the_daemon_can_wait_for_all(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, "agent.supervision.runtime")
    unplace = _Unplacing()
    runtime = _runtime(tmp_path, unplace)
    runtime.unplace_later(_placement("w1"))
    runtime.unplace_later(_placement("w1"))
    runtime.unplace_later(_placement("w2"))
    await _turns()
    # The second of w1 waits for the first; w2 is on its own.
    assert sorted(unplace.started) == ["dyno-w1#0", "dyno-w2#1"]
    waiting = asyncio.ensure_future(runtime.unplaced())
    unplace.fail.add("dyno-w1#0")
    unplace.release["dyno-w1#0"].set()
    await _turns()
    assert "dyno-w1#2" in unplace.started and not waiting.done()
    unplace.release["dyno-w1#2"].set()
    unplace.release["dyno-w2#1"].set()
    await asyncio.wait_for(waiting, 5)
    assert sorted(unplace.finished) == ["dyno-w1#2", "dyno-w2#1"]
    assert "freeing what dyno w1 used failed" in caplog.text
    assert runtime._unplacing == {}


async def test_uid_releases_asked_for_within_the_interval_go_in_one_pass() -> None:
    # Before its fix: every release that came while no pass ran got a pass of its own, each a
    # read and rewrite of the whole host registry (15-35 ms at 3,000 entries, the GIL held),
    # so a mass delete's releases went one pass per dyno and starved the loop.
    batches: list[list[str]] = []
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        calls = BatchedCalls(batches.append, pool, min_interval_s=0.3)
        first = asyncio.ensure_future(calls.call("a"))
        await asyncio.wait_for(first, 5)
        later = []
        for item in "bcd":
            later.append(asyncio.ensure_future(calls.call(item)))
            await asyncio.sleep(0.03)
        await asyncio.wait_for(asyncio.gather(*later), 5)
    assert batches == [["a"], ["b", "c", "d"]]


class _Uids:
    def __init__(self) -> None:
        self.released: list[list[str]] = []

    def release_many(self, dyno_ids: list[str]) -> None:
        self.released.append(list(dyno_ids))


async def test_unplacing_does_not_wait_for_the_next_batch_of_uid_releases(
        tmp_path: Path) -> None:
    # Before its fix: unplace() returned once the dyno's uid was written free, in the next
    # batch of releases, up to UID_RELEASE_INTERVAL_S later; a completed one-off waits for
    # its unplace with an exit slot held, so in a run of `dynoctl run`s every other one's
    # exit waited for that batch (~0.4 s).
    uids = _Uids()
    runtime = HostRuntime(tree=cast(Any, None), network=cast(Any, None), uids=cast(Any, uids),
                          slugs=cast(Any, None), holder=cast(Any, None),
                          state_dir=tmp_path / "state", run_dir=tmp_path / "run",
                          hide_paths=(), slug_roots=cast(Any, None))
    runtime._unplace_blocking = lambda placement: None  # type: ignore[method-assign]
    runtime._destroy_netns_later = lambda space, name: None  # type: ignore[method-assign]
    loop = asyncio.get_running_loop()
    await runtime.unplace(_placement("w0"))
    await runtime.unplaced("w0")
    assert uids.released == [["w0"]]
    began = loop.time()
    await runtime.unplace(_placement("w1"))
    assert loop.time() - began < UID_RELEASE_INTERVAL_S / 2
    assert uids.released == [["w0"]]
    # A place of the same id waits for it (the daemon too, before it exits).
    await asyncio.wait_for(runtime.unplaced("w1"), 5)
    assert uids.released == [["w0"], ["w1"]]
    assert loop.time() - began >= UID_RELEASE_INTERVAL_S * 0.9


def test_the_start_sweeps_runtime_dirs_no_record_places(tmp_path: Path) -> None:
    # A delete is answered before its runtime dir goes: an agent killed in between leaves
    # it, and the next start removes it (the cgroup and namespace sweeps do the same).
    root = tmp_path / "dynos"
    for name in ("kept", "deleted"):
        (root / name / "tmp").mkdir(parents=True)
    stale = _stale_dyno_dirs(root, {"kept"})
    assert stale == [root / "deleted"]
    _remove_dirs(stale)
    assert sorted(p.name for p in root.iterdir()) == ["kept"]
    assert _stale_dyno_dirs(tmp_path / "absent", set()) == []
