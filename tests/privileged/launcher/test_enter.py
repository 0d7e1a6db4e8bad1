"""enter() on the real kernel: a command joins a running dyno's namespaces, cgroup and user."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tests.privileged.launcher.harness import Holder
from tests.support.wait import wait_for


def _start_sleeper(holder: Holder, make_dyno: Any) -> tuple[Any, int]:
    dyno = make_dyno("echo s3cret > /tmp/mine; echo ready; exec sleep 60")
    started = holder.launch(dyno.req, dyno.out)
    assert "pid" in started, started
    wait_for(lambda: "ready" in dyno.output(), 10, what="dyno ready")
    return dyno, int(started["pid"])


def test_enter_sees_only_the_dyno(holder: Holder, make_dyno: Any, tmp_path: Path) -> None:
    dyno, pid1 = _start_sleeper(holder, make_dyno)
    out = tmp_path / "enter.txt"
    cmd = ("ps -eo pid=,comm=; id -u; hostname; pwd; cat /tmp/mine; "
           "for ns in mnt pid net uts ipc cgroup; do stat -L -c %i /proc/self/ns/$ns; done; "
           "grep CapEff /proc/self/status; cat /proc/self/cgroup")
    answer = holder.call(op="enter", pid=pid1, argv=["sh", "-c", cmd],
                         env={"PATH": "/usr/bin:/bin"}, uid=dyno.req["uid"],
                         gid=dyno.req["gid"], cwd="/app", stdout=str(out),
                         cgroup_procs=dyno.req["cgroup_procs"])
    assert "pid" in answer, answer
    assert holder.wait(answer["pid"]) == 0, out.read_text()
    lines = out.read_text().splitlines()
    ps_rows = [row for row in (line.split() for line in lines)
               if len(row) == 2 and row[0].isdigit()]
    assert sorted(row[1] for row in ps_rows) == ["ps", "sh", "sleep", "tini"], lines
    assert ["1", "tini"] in ps_rows
    rest = lines[len(ps_rows):]
    assert rest[0] == str(dyno.req["uid"])
    assert rest[1] == dyno.req["hostname"]
    assert rest[2] == "/app"
    assert rest[3] == "s3cret"  # the dyno's own /tmp, which exists only in its mount ns
    for ns, inode in zip(("mnt", "pid", "net", "uts", "ipc", "cgroup"), rest[4:10], strict=True):
        assert int(inode) == os.stat(f"/proc/{pid1}/ns/{ns}").st_ino, ns
    assert rest[10].split() == ["CapEff:", "0000000000000000"]
    assert all(line.endswith(":/") for line in rest[11:]), rest[11:]


def test_enter_reports_a_missing_command(holder: Holder, make_dyno: Any, tmp_path: Path) -> None:
    dyno, pid1 = _start_sleeper(holder, make_dyno)
    answer = holder.call(op="enter", pid=pid1, argv=["dt-no-such-command"],
                         env={"PATH": "/usr/bin:/bin"}, uid=dyno.req["uid"],
                         gid=dyno.req["gid"], cwd="/app", stdout=str(tmp_path / "o"),
                         cgroup_procs=dyno.req["cgroup_procs"])
    assert answer.get("error", {}).get("phase") == "exec", answer
    assert answer["error"]["errno"] == 2


def test_enter_refuses_a_dead_dyno(holder: Holder, make_dyno: Any, tmp_path: Path) -> None:
    dyno, pid1 = _start_sleeper(holder, make_dyno)
    holder.call(op="kill", pid=pid1)
    holder.wait(pid1)
    answer = holder.call(op="enter", pid=pid1, argv=["true"], env={}, uid=dyno.req["uid"],
                         gid=dyno.req["gid"], cwd="/", stdout=str(tmp_path / "o"),
                         cgroup_procs=[])
    assert "error" in answer, answer
