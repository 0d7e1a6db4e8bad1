"""A launched child is in its cgroup v2 group from its first instruction (cloned into it,
not moved there), and still joins it on a kernel without clone3; the v1 groups it joins by
`tasks` hold the whole (single-threaded) process."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import NoReturn

import pytest

from agent.launcher import cgroupjoin, process
from tests.privileged.launcher.harness import Cgroups


def _cgroups_seen_by_child(plan: cgroupjoin.JoinPlan) -> str:
    """Fork as the launcher does; the child reports /proc/self/cgroup after the v1 writes and
    before anything else, then exits."""
    read_fd, write_fd = os.pipe()

    def child(report_fd: int) -> NoReturn:
        os.close(read_fd)
        cgroupjoin.join(plan.writes)
        os.write(write_fd, Path("/proc/self/cgroup").read_bytes())
        os._exit(0)

    pid, _report = process.fork_into(lambda: None, child, 10, plan.clone_into)
    os.close(write_fd)
    try:
        with os.fdopen(read_fd, "rb") as f:
            seen = f.read().decode()
    finally:
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return seen


@pytest.mark.parametrize("clone3", [True, False], ids=["clone3", "without-clone3"])
def test_child_is_in_every_group(cgroups: Cgroups, monkeypatch: pytest.MonkeyPatch,
                                 clone3: bool) -> None:
    if not clone3:
        monkeypatch.setattr(process, "_clone3_missing", True)
    procs = cgroups.make()
    name = Path(procs[0]).parent.name
    plan = cgroupjoin.plan(procs)
    assert plan.clone_into is not None and len(plan.writes) == len(procs) - 1
    seen = _cgroups_seen_by_child(plan)
    assert f"0::/{name}\n" in seen, seen
    for hierarchy in ("memory", "pids", "cpu"):
        assert any(hierarchy in line.split(":")[1].split(",") and line.endswith("/" + name)
                   for line in seen.splitlines()), seen


def test_a_missing_v2_group_fails_the_fork_as_a_cgroup_error(cgroups: Cgroups) -> None:
    plan = cgroupjoin.plan(("/sys/fs/cgroup/unified/dt-no-such-group/cgroup.procs",))
    with pytest.raises(process.LaunchError) as caught:
        _cgroups_seen_by_child(plan)
    assert caught.value.phase == "cgroup" and caught.value.errno == 2


def test_a_group_once_killed_is_still_joined(cgroups: Cgroups,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # A restart after cgroup.kill: the kernel kills any child cloned into such a group
    # before it runs, so the launcher must notice and join it by migration instead.
    monkeypatch.setattr(process, "_killed_groups", {})
    procs = cgroups.make()
    name = Path(procs[0]).parent.name
    plan = cgroupjoin.plan(procs)
    assert plan.clone_into is not None
    victim = os.fork()
    if victim == 0:
        try:
            cgroupjoin.join(procs)
            os.kill(os.getpid(), signal.SIGSTOP)
        finally:
            os._exit(0)
    os.waitpid(victim, os.WSTOPPED)
    Path(plan.clone_into[0], "cgroup.kill").write_text("1")
    os.waitpid(victim, 0)
    for _ in range(2):  # the first finds out, the second knows
        assert f"0::/{name}\n" in _cgroups_seen_by_child(plan)
    assert plan.clone_into[0] in process._killed_groups
