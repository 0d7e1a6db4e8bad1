"""Review 2 (attach): when the caller of `dynoctl exec` goes away, the agent SIGKILLs only the
process it entered; whatever that process started stays in the dyno for good. Fixed; the
test keeps it so."""

from __future__ import annotations

import select
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.test_standalone import Up, leftovers
from tests.support.agentproc import BIN
from tests.support.names import unique
from tests.support.testhost import TestHost, new_test_host
from tests.support.wait import wait_for


@pytest.fixture(scope="module")
def host() -> Iterator[TestHost]:
    with new_test_host("dt") as test_host:
        yield test_host


@pytest.fixture(scope="module")
def up(host: TestHost) -> Iterator[Up]:
    base = Path(tempfile.mkdtemp(prefix="dt", dir="/tmp"))
    running = Up(host, unique("rtwo", 6), base).start()
    try:
        wait_for(lambda: running.proc is not None and (
            running.proc.poll() is not None or running.socket.exists()), 30, what="up socket")
        assert running.proc is not None and running.proc.poll() is None, running.output()
        yield running
    finally:
        running.stop()
        try:
            left = leftovers(running)
            assert not any(left.values()), left
        finally:
            shutil.rmtree(base, ignore_errors=True)


def _processes(up: Up) -> list[str]:
    result = up.ctl("exec", "web.1", "--", "ps", "-eo", "args")
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()[1:]


# Review finding, fixed: attach._exec kills only the entered pid (pidfd) when the caller leaves;
# its children (background jobs, pipelines) are left running in the dyno
def test_a_caller_that_leaves_exec_takes_its_children_with_it(up: Up) -> None:
    wait_for(lambda: up.states().get("web.1") == "up", 60, what="web.1 up")
    caller = subprocess.Popen(
        [str(BIN / "dynoctl"), "--socket", str(up.socket), "exec", "web.1", "--", "sh", "-c",
         "sleep 271 & echo started; wait"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert caller.stdout is not None
        ready, _, _ = select.select([caller.stdout], [], [], 30)
        assert ready and caller.stdout.readline().strip() == b"started"
        assert any(p.startswith("sleep 271") for p in _processes(up))
        caller.kill()  # the caller goes away without a word
        assert caller.wait(timeout=10) == -signal.SIGKILL
    finally:
        caller.kill()
        caller.wait(timeout=10)
        if caller.stdout is not None:
            caller.stdout.close()
    # The agent ends what the caller started (sh is SIGKILLed at once); its child too?
    wait_for(lambda: not any(p.startswith("sleep 271") for p in _processes(up)), 10,
             what="the exec'd command's child gone")


def test_ctrl_c_reaches_the_command_of_an_attached_run(up: Up) -> None:
    wait_for(lambda: up.states().get("web.1") == "up", 60, what="web.1 up")
    caller = subprocess.Popen(
        [str(BIN / "dynoctl"), "--socket", str(up.socket), "run", "--", "sh", "-c",
         "trap 'echo caught; exit 5' INT; echo ready; while :; do sleep 0.1; done"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert caller.stdout is not None
        ready, _, _ = select.select([caller.stdout], [], [], 30)
        assert ready and caller.stdout.readline().strip() == b"ready"
        caller.send_signal(signal.SIGINT)  # what the terminal sends on Ctrl-C
        assert caller.wait(timeout=15) == 5
        assert caller.stdout.read().strip() == b"caught"
    finally:
        caller.kill()
        caller.wait(timeout=10)
        if caller.stdout is not None:
            caller.stdout.close()


def test_ctrl_c_in_exec_interrupts_the_command_and_the_session_ends(up: Up) -> None:
    wait_for(lambda: up.states().get("web.1") == "up", 60, what="web.1 up")
    caller = subprocess.Popen(
        [str(BIN / "dynoctl"), "--socket", str(up.socket), "exec", "web.1", "--", "sh", "-c",
         "sleep 272 & echo started; wait"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert caller.stdout is not None
        ready, _, _ = select.select([caller.stdout], [], [], 30)
        assert ready and caller.stdout.readline().strip() == b"started"
        caller.send_signal(signal.SIGINT)
        assert caller.wait(timeout=10) == 130  # sh ended by the forwarded SIGINT
    finally:
        caller.kill()
        caller.wait(timeout=10)
        if caller.stdout is not None:
            caller.stdout.close()
    # Its background job (which ignores SIGINT, as in any non-interactive shell) ends with
    # the session.
    wait_for(lambda: not any(p.startswith("sleep 272") for p in _processes(up)), 10,
             what="the session's background job gone")
