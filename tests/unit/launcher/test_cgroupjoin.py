"""Which way the launcher joins each hierarchy: cgroup v1 groups by their `tasks` file, the
cgroup v2 group by cloning the child into it."""

from __future__ import annotations

from pathlib import Path

from agent.launcher import cgroupjoin


def _group(root: Path, name: str, *, v1: bool) -> str:
    path = root / name / "dyno"
    path.mkdir(parents=True)
    (path / "cgroup.procs").touch()
    if v1:
        (path / "tasks").touch()
    return str(path / "cgroup.procs")


def test_v1_groups_are_joined_through_tasks_in_order_and_v2_by_clone(tmp_path: Path) -> None:
    memory = _group(tmp_path, "memory", v1=True)
    unified = _group(tmp_path, "unified", v1=False)
    pids = _group(tmp_path, "pids", v1=True)
    plan = cgroupjoin.plan((memory, unified, pids))
    assert plan.writes == (str(tmp_path / "memory/dyno/tasks"), str(tmp_path / "pids/dyno/tasks"))
    assert plan.clone_into == (str(tmp_path / "unified/dyno"), unified)


def test_pure_v2_is_one_clone_and_no_write(tmp_path: Path) -> None:
    unified = _group(tmp_path, "unified", v1=False)
    plan = cgroupjoin.plan((unified,))
    assert plan.writes == ()
    assert plan.clone_into == (str(tmp_path / "unified/dyno"), unified)


def test_a_second_v2_group_and_other_files_are_written_as_given(tmp_path: Path) -> None:
    first = _group(tmp_path, "a", v1=False)
    second = _group(tmp_path, "b", v1=False)
    other = str(tmp_path / "fifo")
    plan = cgroupjoin.plan((first, second, other))
    assert plan.clone_into == (str(tmp_path / "a/dyno"), first)
    assert plan.writes == (second, other)


def test_no_groups_no_plan() -> None:
    plan = cgroupjoin.plan(())
    assert plan.clone_into is None and plan.writes == ()
