"""An agent's start squares the host-wide uid registry with its dyno records: recorded uids are
kept (after a reboot too), one another agent holds is replaced in the record, entries of
dynos without a placed record are freed, and the per-agent uids.json of old is removed."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, cast

from agent.launcher import UidAllocator
from agent.supervision.records import Placement, RecordStore
from agent.supervision.runtime import HostRuntime


def placement(dyno_id: str, uid: int) -> Placement:
    return Placement(cgroup=f"app-a.slice/dyno-{dyno_id}.scope", netns=f"dyno-{dyno_id}",
                     netns_path=f"/run/netns/dyno-{dyno_id}", space="a", ip="10.1.2.3",
                     uid=uid, gid=uid, slug_dir="/slug", dyno_dir=f"/run/dynos/{dyno_id}")


def record(dyno_id: str, where: Placement | None) -> bytes:
    return json.dumps({"spec": {"id": dyno_id, "app": "a", "name": "worker.1"}, "state": "up",
                       "since": "2026-01-01T00:00:00+00:00", "reason": "booted",
                       "placement": asdict(where) if where else None}).encode()


def test_keep_uids_squares_the_registry_with_the_records(tmp_path: Path) -> None:
    registry = str(tmp_path / "reg" / "registry.json")

    def allocator(name: str, boot_id: str) -> UidAllocator:
        return UidAllocator(str(tmp_path / name), path=registry, first=500, last=599,
                            boot_id=boot_id, remnants=lambda first, last: frozenset())

    before = allocator("agent", "boot-1")
    before.allocate("stale")  # allocated, but the agent died before the record was written
    # A reboot: the registry (on tmpfs) is gone; another agent is quicker to place a dyno.
    other = allocator("other", "boot-2")
    assert other.allocate("theirs") == (500, 500)
    uids = allocator("agent", "boot-2")
    legacy = tmp_path / "agent" / "uids"
    legacy.mkdir()
    (legacy / "uids.json").write_text('{"kept": 501}')
    records = RecordStore(tmp_path / "agent")
    for dyno_id, where in (("kept", placement("kept", 501)),
                           ("clash", placement("clash", 500)), ("unplaced", None)):
        records.write(dyno_id, record(dyno_id, where))
    runtime = HostRuntime(tree=cast(Any, None), network=cast(Any, None), uids=uids,
                          slugs=cast(Any, None), holder=cast(Any, None),
                          state_dir=tmp_path / "agent", run_dir=tmp_path / "run", hide_paths=(),
                          slug_roots=cast(Any, None))

    # The new uid goes back to the caller (the supervisor, the records' one writer, puts it in
    # the record when it restores the dyno); the runtime itself writes no record.
    assert runtime.keep_uids(records.load_all()) == {"clash": 502}
    assert uids.allocations() == {"kept": 501, "clash": 502}
    assert other.allocations() == {"theirs": 500}
    assert not legacy.exists()
