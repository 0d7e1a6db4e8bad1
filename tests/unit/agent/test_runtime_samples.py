"""HostRuntime.sample_async: periodic samples due in the same tick are read in one thread hop."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

import cgroups
from agent.supervision import runtime as runtime_module
from agent.supervision.records import Placement
from agent.supervision.runtime import HostRuntime


class Groups:
    """A fake tree: group(rel).sample() answers per cgroup and records the reading thread."""

    def __init__(self) -> None:
        self.threads: list[int] = []
        self.gone: set[str] = set()

    def group(self, rel: str) -> Any:
        def sample() -> cgroups.Stats:
            self.threads.append(threading.get_ident())
            if rel in self.gone:
                raise cgroups.NotFound("group does not exist", path=rel)
            return cgroups.Stats(memory_current_bytes=len(rel))
        return SimpleNamespace(sample=sample)


def make_runtime(groups: Groups, tmp_path: Path) -> HostRuntime:
    return HostRuntime(tree=cast(Any, groups), network=cast(Any, None), uids=cast(Any, None),
                       slugs=cast(Any, None), holder=cast(Any, None), state_dir=tmp_path,
                       run_dir=tmp_path, hide_paths=(),
                       slug_roots=cast(Any, SimpleNamespace(resolve=lambda path: path)))


def placement(n: int) -> Placement:
    return Placement(cgroup="app-a.slice/dyno-" + "x" * n + ".scope", netns=f"dyno-{n}",
                     netns_path=f"/run/netns/dyno-{n}", space="s", ip="10.0.0.2", uid=1,
                     gid=1, slug_dir="/slug", dyno_dir=f"/dynos/{n}")


@pytest.fixture
def hops(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many items each asyncio.to_thread call of the runtime carried."""
    calls: list[int] = []
    real = asyncio.to_thread

    async def counting(fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        calls.append(len(args[0]) if args and isinstance(args[0], list) else 1)
        return await real(fn, *args, **kwargs)

    monkeypatch.setattr(asyncio, "to_thread", counting)
    return calls


async def test_samples_due_together_take_one_thread_hop(tmp_path: Path, hops: list[int]) -> None:
    groups = Groups()
    runtime = make_runtime(groups, tmp_path)
    results = await asyncio.gather(*(runtime.sample_async(placement(n)) for n in range(1, 41)))
    assert hops == [40]
    assert len(set(groups.threads)) == 1
    assert [s.memory_current_bytes if s else None for s in results] == [
        len(placement(n).cgroup) for n in range(1, 41)]


async def test_a_sample_asked_after_a_batch_left_goes_in_the_next(tmp_path: Path,
                                                                 hops: list[int]) -> None:
    runtime = make_runtime(Groups(), tmp_path)
    first = asyncio.ensure_future(runtime.sample_async(placement(1)))
    await asyncio.sleep(runtime_module.SAMPLE_BATCH_WINDOW_S * 3)  # the batch left
    second = await asyncio.gather(runtime.sample_async(placement(2)),
                                  runtime.sample_async(placement(3)))
    assert (await first) is not None and all(second)
    assert hops == [1, 2]


async def test_a_vanished_group_samples_none_and_spoils_no_other(tmp_path: Path,
                                                                hops: list[int]) -> None:
    groups = Groups()
    groups.gone.add(placement(2).cgroup)
    runtime = make_runtime(groups, tmp_path)
    one, two, three = await asyncio.gather(*(runtime.sample_async(placement(n))
                                             for n in (1, 2, 3)))
    assert two is None and one is not None and three is not None
    assert hops == [3]


async def test_a_cancelled_sample_leaves_the_rest_of_its_batch(tmp_path: Path,
                                                              hops: list[int]) -> None:
    runtime = make_runtime(Groups(), tmp_path)
    gone = asyncio.ensure_future(runtime.sample_async(placement(1)))
    kept = asyncio.ensure_future(runtime.sample_async(placement(2)))
    await asyncio.sleep(0)
    gone.cancel()
    assert (await kept) is not None
    assert gone.cancelled()
