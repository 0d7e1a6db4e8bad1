"""A placement makes the dyno's uid, directory, cgroup and network namespace at once (none of
them needs another), times each, and undoes what was made when one of them fails."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path
from typing import Any, cast

import pytest

import netns
from agent.kernelnames import cgroup_rel
from agent.spec import parse_spec
from agent.supervision.runtime import DynoStartError, HostRuntime

WAIT_S = 5.0


class _Steps:
    """Fakes of the uid allocator, the cgroup tree and the host network. The uid is only
    given once the network namespace has been asked for: a placement that made them one
    after the other would wait for it in vain."""

    def __init__(self, netns_fails: bool = False) -> None:
        self.netns_fails = netns_fails
        self.netns_asked = threading.Event()
        self.released: list[str] = []
        self.removed: list[str] = []
        self.destroyed: list[str] = []

    # uids
    def allocate(self, dyno_id: str) -> tuple[int, int]:
        if not self.netns_asked.wait(WAIT_S):
            raise TimeoutError("the network namespace was not asked for meanwhile")
        return 500, 500

    def release(self, dyno_id: str) -> None:
        self.released.append(dyno_id)

    def release_many(self, dyno_ids: list[str]) -> None:
        self.released += dyno_ids

    # cgroup tree
    def create_group(self, rel: str, limits: Any) -> Any:
        steps = self

        class Group:
            name = rel

            def populated(self) -> bool:
                return False

            def remove(self, timeout_s: float) -> None:
                steps.removed.append(rel)
        return Group()

    # host network
    def create_attached(self, space: str, name: str) -> netns.Attachment:
        self.netns_asked.set()
        if self.netns_fails:
            raise netns.NetnsError("the space's /24 is full", operation="attach")
        return netns.Attachment(space, name, Path(f"/run/netns/{name}"),
                                IPv4Interface("10.1.2.3/24"), IPv4Address("10.1.2.1"),
                                "veth-host")

    def destroy_later(self, space: str, name: str) -> concurrent.futures.Future[None]:
        self.destroyed.append(name)
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        done.set_result(None)
        return done


def _runtime(tmp_path: Path, steps: _Steps) -> HostRuntime:
    class Slugs:
        async def resolve(self, source: Any, info: Any) -> Path:
            return tmp_path / "slug"

    runtime = HostRuntime(tree=cast(Any, steps), network=cast(Any, steps),
                          uids=cast(Any, steps), slugs=cast(Any, Slugs()),
                          holder=cast(Any, None), state_dir=tmp_path / "state",
                          run_dir=tmp_path / "run", hide_paths=(), slug_roots=cast(Any, None))
    runtime._slug_and_stack = lambda spec: (spec.release.slug, None)  # type: ignore[method-assign]
    runtime.limits = lambda spec: cast(Any, None)  # type: ignore[method-assign]
    return runtime


SPEC = parse_spec({"id": "w1", "app": "a", "name": "worker.1", "command": "x",
                   "release": {"version": 1, "slug": {"path": "/slug"}}})


async def test_the_steps_are_made_at_once_and_each_timed(tmp_path: Path) -> None:
    steps = _Steps()
    timings: dict[str, float] = {}
    placement = await _runtime(tmp_path, steps).place(SPEC, timings)
    assert (placement.uid, placement.ip, placement.netns) == (500, "10.1.2.3", "dyno-w1")
    assert placement.dyno_dir == str(tmp_path / "run" / "dynos" / "w1")
    assert await asyncio.to_thread(os.path.isdir, placement.dyno_dir)
    assert list(timings) == ["slug", "uid", "dir", "cgroup", "netns"]
    assert all(ms >= 0 for ms in timings.values())
    assert steps.released == steps.removed == steps.destroyed == []


async def test_a_failed_step_undoes_the_others(tmp_path: Path) -> None:
    steps = _Steps(netns_fails=True)
    with pytest.raises(DynoStartError, match=r"cannot set up the dyno's network: .*/24 is full"):
        await _runtime(tmp_path, steps).place(SPEC)
    assert steps.released == ["w1"]
    assert steps.removed == [cgroup_rel("a", "w1")]
    assert not await asyncio.to_thread(os.path.exists, tmp_path / "run" / "dynos" / "w1")
    assert steps.destroyed == []  # the namespace itself was never made


async def test_no_placement_begins_while_placements_are_held(tmp_path: Path) -> None:
    """The daemon holds placements while its start-up sweep runs: a restored dyno's start
    waits, and goes on once they are released."""
    steps = _Steps()
    runtime = _runtime(tmp_path, steps)
    reached: list[str] = []

    def slug_and_stack(spec: Any) -> tuple[Any, None]:
        reached.append(spec.id)
        return spec.release.slug, None
    runtime._slug_and_stack = slug_and_stack  # type: ignore[method-assign]
    runtime.hold_placements()
    placing = asyncio.ensure_future(runtime.place(SPEC))
    await asyncio.sleep(0.05)
    assert reached == [] and not placing.done()
    runtime.release_placements()
    placement = await asyncio.wait_for(placing, WAIT_S)
    assert reached == ["w1"] and placement.uid == 500
