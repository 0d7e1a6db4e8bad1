"""HostRuntime.sample_async: periodic samples are read on the loop, with no thread hop,
through each dyno's control files opened at its first sample and kept open until the dyno is
unplaced (cgroups.SampleFiles)."""

from __future__ import annotations

import asyncio
import errno
import resource
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

import cgroups
from agent.supervision import runtime as runtime_module
from agent.supervision.records import Placement
from agent.supervision.runtime import HostRuntime


class Files:
    """A fake SampleFiles: reads answer memory_current_bytes = reads so far (per Files)."""

    fds = 7

    def __init__(self, groups: Groups, rel: str) -> None:
        self.groups = groups
        self.rel = rel
        self.reads = 0
        self.closed = False

    def read(self) -> cgroups.Stats:
        assert not self.closed
        self.groups.threads.append(threading.get_ident())
        if self.rel in self.groups.removed:
            raise cgroups.NotFound("read failed: No such device", path=self.rel)
        self.reads += 1
        return cgroups.Stats(memory_current_bytes=self.reads)

    def close(self) -> None:
        self.closed = True


class Groups:
    """A fake tree: group(rel).sample_files() opens a Files per call (NotFound for a group
    that is gone); group(rel).sample() is the open-read-close fallback."""

    def __init__(self) -> None:
        self.threads: list[int] = []
        self.gone: set[str] = set()  # no group: opening fails
        self.removed: set[str] = set()  # reads through files opened before fail
        self.opened: list[Files] = []
        self.no_fds = False
        self.plain_samples = 0

    def group(self, rel: str) -> Any:
        def sample_files() -> Files:
            if rel in self.gone:
                raise cgroups.NotFound("group does not exist", path=rel)
            if self.no_fds:
                raise cgroups.CgroupError("open failed: Too many open files", path=rel,
                                          errno=errno.EMFILE)
            files = Files(self, rel)
            self.opened.append(files)
            return files

        def sample() -> cgroups.Stats:
            self.plain_samples += 1
            return cgroups.Stats(memory_current_bytes=-1)
        return SimpleNamespace(sample_files=sample_files, sample=sample)


def make_runtime(groups: Groups, tmp_path: Path) -> HostRuntime:
    return HostRuntime(tree=cast(Any, groups), network=cast(Any, None), uids=cast(Any, None),
                       slugs=cast(Any, None), holder=cast(Any, None), state_dir=tmp_path,
                       run_dir=tmp_path, hide_paths=(),
                       slug_roots=cast(Any, SimpleNamespace(resolve=lambda path: path)))


def placement(n: int) -> Placement:
    return Placement(cgroup=f"app-a.slice/dyno-{n}.scope", netns=f"dyno-{n}",
                     netns_path=f"/run/netns/dyno-{n}", space="s", ip="10.0.0.2", uid=1,
                     gid=1, slug_dir="/slug", dyno_dir=f"/dynos/{n}")


@pytest.fixture
def hops(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every asyncio.to_thread call made meanwhile."""
    calls: list[Any] = []
    real = asyncio.to_thread

    async def counting(fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        calls.append(fn)
        return await real(fn, *args, **kwargs)

    monkeypatch.setattr(asyncio, "to_thread", counting)
    return calls


async def test_samples_are_read_on_the_loop_without_a_thread_hop(tmp_path: Path,
                                                                 hops: list[Any]) -> None:
    groups = Groups()
    runtime = make_runtime(groups, tmp_path)
    results = await asyncio.gather(*(runtime.sample_async(placement(n)) for n in range(1, 41)))
    assert all(s is not None for s in results)
    assert hops == []
    assert set(groups.threads) == {threading.get_ident()}


async def test_a_dyno_s_files_are_opened_once_and_read_at_every_sample(tmp_path: Path) -> None:
    groups = Groups()
    runtime = make_runtime(groups, tmp_path)
    samples = [await runtime.sample_async(placement(1)) for _ in range(3)]
    assert [s.memory_current_bytes if s else None for s in samples] == [1, 2, 3]
    assert len(groups.opened) == 1 and groups.opened[0].reads == 3


async def test_unplacing_closes_the_dyno_s_files(tmp_path: Path) -> None:
    groups = Groups()
    runtime = make_runtime(groups, tmp_path)
    runtime._unplace_blocking = lambda placement: None  # type: ignore[method-assign]
    runtime._destroy_netns_later = lambda space, name: None  # type: ignore[method-assign]
    await runtime.sample_async(placement(1))
    await runtime.sample_async(placement(2))
    one, two = groups.opened
    await runtime.unplace(placement(1))
    assert one.closed and not two.closed
    # Placed again under the same cgroup: its next sample opens the new group's files.
    assert (await runtime.sample_async(placement(1))) is not None
    assert len(groups.opened) == 3 and not groups.opened[2].closed


async def test_a_vanished_group_samples_none_and_spoils_no_other(tmp_path: Path) -> None:
    groups = Groups()
    runtime = make_runtime(groups, tmp_path)
    groups.gone.add(placement(2).cgroup)
    one, two, three = [await runtime.sample_async(placement(n)) for n in (1, 2, 3)]
    assert two is None and one is not None and three is not None


async def test_a_group_removed_since_its_files_opened_is_followed_if_made_again(
        tmp_path: Path) -> None:
    groups = Groups()
    runtime = make_runtime(groups, tmp_path)
    cgroup = placement(1).cgroup
    assert (await runtime.sample_async(placement(1))) is not None
    first = groups.opened[0]
    groups.removed.add(cgroup)
    groups.gone.add(cgroup)
    assert (await runtime.sample_async(placement(1))) is None
    assert first.closed
    groups.removed.discard(cgroup)
    groups.gone.discard(cgroup)  # made again under the same path
    again = await runtime.sample_async(placement(1))
    assert again is not None and again.memory_current_bytes == 1
    assert len(groups.opened) == 2 and not groups.opened[1].closed


async def test_with_no_fd_to_spare_a_sample_opens_reads_and_closes(tmp_path: Path) -> None:
    groups = Groups()
    groups.no_fds = True
    runtime = make_runtime(groups, tmp_path)
    stats = await runtime.sample_async(placement(1))
    assert stats is not None and stats.memory_current_bytes == -1
    assert groups.plain_samples == 1 and groups.opened == []
    groups.no_fds = False  # fds to spare again: the next sample keeps its files open
    stats = await runtime.sample_async(placement(1))
    assert stats is not None and stats.memory_current_bytes == 1
    assert groups.plain_samples == 1 and len(groups.opened) == 1


async def test_files_are_kept_open_within_a_share_of_the_open_file_limit(
        tmp_path: Path) -> None:
    groups = Groups()
    runtime = make_runtime(groups, tmp_path)
    assert runtime._sample_fd_budget == int(
        resource.getrlimit(resource.RLIMIT_NOFILE)[0] * runtime_module.SAMPLE_FDS_SHARE)
    runtime._sample_fd_budget = 2 * runtime_module.SAMPLE_FILES_MAX
    runtime._unplace_blocking = lambda placement: None  # type: ignore[method-assign]
    runtime._destroy_netns_later = lambda space, name: None  # type: ignore[method-assign]
    for n in (1, 2, 3):
        assert (await runtime.sample_async(placement(n))) is not None
    assert len(groups.opened) == 2 and groups.plain_samples == 1  # the third: open-read-close
    await runtime.unplace(placement(1))
    assert (await runtime.sample_async(placement(3))) is not None
    assert len(groups.opened) == 3 and groups.plain_samples == 1
