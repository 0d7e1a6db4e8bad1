"""A dyno's seccomp mode in its detail (`GET /v1/dynos/{id}`) and in `dynoctl inspect`, and the
/proc reading behind it."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent.cli import dynoctl as ctl
from agent.launcher import seccomp
from agent.launcher import syscalls as sc
from tests.unit.agent.fakes import Harness, make_harness


@pytest.fixture
async def h(tmp_path: Path) -> AsyncIterator[Harness]:
    harness = await make_harness(tmp_path)
    yield harness
    await harness.supervisor.detach_all()


async def test_a_running_dyno_reports_its_seccomp_mode_and_a_stopped_one_null(
        h: Harness) -> None:
    dyno_id = await h.create("worker.1")
    await h.state(dyno_id, "up")
    assert h.supervisor.get_dyno(dyno_id)["seccomp"] == 2
    await h.supervisor.stop_dyno(dyno_id)
    await h.state(dyno_id, "down")
    assert h.supervisor.get_dyno(dyno_id)["seccomp"] is None


@pytest.mark.parametrize(("mode", "shown"), [(2, "2 (filter)"), (0, "0 (none)"),
                                             (None, "-"), ("2", "-"), (True, "-")])
def test_inspect_shows_the_mode(mode: object, shown: str) -> None:
    lines = ctl.format_inspect({"id": "x", "name": "web.1", "state": "up", "seccomp": mode})
    assert [line.split(None, 1) for line in lines if line.startswith("Seccomp:")] == [
        ["Seccomp:", shown]]


def test_the_mode_is_read_from_proc_and_is_2_under_the_dyno_filter() -> None:
    """No root needed: no_new_privs lets any process confine itself."""
    assert seccomp.process_mode(os.getpid()) == 0
    program = seccomp.dyno_filter()
    ready_r, ready_w = os.pipe()
    hold_r, hold_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            # Only the parent may hold the write end: its close (or death) releases us.
            os.close(hold_w)
            sc.prctl(sc.PR_SET_NO_NEW_PRIVS, 1)
            seccomp.install(program)
            os.write(ready_w, b"x")
            os.read(hold_r, 1)
        finally:
            os._exit(0)
    try:
        os.close(ready_w)
        os.close(hold_r)
        assert os.read(ready_r, 1) == b"x"
        assert seccomp.process_mode(pid) == 2
    finally:
        os.close(hold_w)
        os.waitpid(pid, 0)
        os.close(ready_r)
