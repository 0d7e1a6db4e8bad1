"""The end of an attached session: a caller that leaves `dynoctl exec` takes everything the
entered command started with it, and Ctrl-C reaches the command of an attached run or exec."""

from __future__ import annotations

import contextlib
import select
import signal
import subprocess
from collections.abc import Iterator

import pytest

from tests.e2e.test_standalone import Up, running_up
from tests.support.agentproc import BIN
from tests.support.names import unique
from tests.support.testhost import TestHost
from tests.support.wait import wait_for


@pytest.fixture(scope="module")
def up(host: TestHost) -> Iterator[Up]:
    with running_up(host, unique("rtwo", 6)) as running:
        yield running


def _processes(up: Up) -> list[str]:
    result = up.ctl("exec", "web.1", "--", "ps", "-eo", "args")
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()[1:]


@contextlib.contextmanager
def attached(up: Up, *args: str, first_line: bytes) -> Iterator[subprocess.Popen[bytes]]:
    """`dynoctl ARGS` with its output on a pipe, once it has printed `first_line`; killed and
    reaped on the way out whatever the test did."""
    wait_for(lambda: up.states().get("web.1") == "up", 60, what="web.1 up")
    caller = subprocess.Popen([str(BIN / "dynoctl"), "--socket", str(up.socket), *args],
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL)
    try:
        assert caller.stdout is not None
        ready, _, _ = select.select([caller.stdout], [], [], 30)
        assert ready and caller.stdout.readline().strip() == first_line
        yield caller
    finally:
        caller.kill()
        caller.wait(timeout=10)
        if caller.stdout is not None:
            caller.stdout.close()


# Before its fix: attach._exec kills only the entered pid (pidfd) when the caller leaves;
# its children (background jobs, pipelines) are left running in the dyno
def test_a_caller_that_leaves_exec_takes_its_children_with_it(up: Up) -> None:
    with attached(up, "exec", "web.1", "--", "sh", "-c", "sleep 271 & echo started; wait",
                  first_line=b"started") as caller:
        assert any(p.startswith("sleep 271") for p in _processes(up))
        caller.kill()  # the caller goes away without a word
        assert caller.wait(timeout=10) == -signal.SIGKILL
    # The agent ends what the caller started (sh is SIGKILLed at once); its child too.
    wait_for(lambda: not any(p.startswith("sleep 271") for p in _processes(up)), 10,
             what="the exec'd command's child gone")


def test_ctrl_c_reaches_the_command_of_an_attached_run(up: Up) -> None:
    with attached(up, "run", "--", "sh", "-c",
                  "trap 'echo caught; exit 5' INT; echo ready; while :; do sleep 0.1; done",
                  first_line=b"ready") as caller:
        caller.send_signal(signal.SIGINT)  # what the terminal sends on Ctrl-C
        assert caller.wait(timeout=15) == 5
        assert caller.stdout is not None and caller.stdout.read().strip() == b"caught"


def test_ctrl_c_in_exec_interrupts_the_command_and_the_session_ends(up: Up) -> None:
    with attached(up, "exec", "web.1", "--", "sh", "-c", "sleep 272 & echo started; wait",
                  first_line=b"started") as caller:
        caller.send_signal(signal.SIGINT)
        assert caller.wait(timeout=10) == 130  # sh ended by the forwarded SIGINT
    # Its background job (which ignores SIGINT, as in any non-interactive shell) ends with
    # the session.
    wait_for(lambda: not any(p.startswith("sleep 272") for p in _processes(up)), 10,
             what="the session's background job gone")
