"""Heroku's start-up end to end in `dynoagent up`: `.profile.d/*.sh` (in order, in one shell)
and `.profile` are sourced after the config vars are set, for the release, a formation dyno, a
one-off (`run`, with `-e` overrides) and an entered command (`exec`); and `dynoctl restart`
picks up an edited `.env`."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.test_standalone import Up, app_dir, leftovers
from tests.support.names import unique
from tests.support.testhost import TestHost
from tests.support.wait import wait_for

# A simple command (exec'd after the start-up: its parent is the dyno's PID 1, tini).
WORKER = ("python3 -u -c \"import os, time; print('formation', os.environ['STARTUP_P'], "
          "'ppid', os.getppid()); time.sleep(300)\"")
PROCFILE = f'release: echo "release $STARTUP_P"\nworker: {WORKER}\n'
EXPECTED = "a-hi-b-profile"


@pytest.fixture(scope="module")
def up(host: TestHost, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    directory = app_dir(tmp_path_factory.mktemp("startup"), PROCFILE)
    (directory / ".env").write_text("GREETING=hi\n")
    profile_d = directory / ".profile.d"
    profile_d.mkdir()
    # 10 uses a config var and exports; 20 uses what 10 exported (same shell, glob order).
    (profile_d / "10-a.sh").write_text('export STARTUP_A="a-$GREETING"\n')
    (profile_d / "20-b.sh").write_text('export STARTUP_B="$STARTUP_A-b"\n')
    (directory / ".profile").write_text('export STARTUP_P="$STARTUP_B-profile"\n')
    base = Path(tempfile.mkdtemp(prefix="dt", dir="/tmp"))
    running = Up(host, unique("prof", 6), base, directory=directory).start()
    try:
        wait_for(lambda: running.proc is not None and (
            running.proc.poll() is not None or running.socket.exists()), 30, what="up socket")
        assert running.proc is not None and running.proc.poll() is None, running.output()
        wait_for(lambda: running.states().get("worker.1") == "up", 60, what="worker.1 up")
        yield running
    finally:
        running.stop()
        try:
            left = leftovers(running)
            assert not any(left.values()), left
        finally:
            shutil.rmtree(base, ignore_errors=True)


def test_the_release_and_a_formation_dyno_run_after_the_start_up(up: Up) -> None:
    output = up.output()
    assert f"release.1 | release {EXPECTED}" in output, output
    # ... and the app is still exec'd by that shell: the reaper's own child.
    wait_for(lambda: f"worker.1  | formation {EXPECTED} ppid 1" in up.output(), 30,
             what="the worker's line")


def test_a_one_off_runs_after_the_start_up(up: Up) -> None:
    result = up.ctl("run", "--", 'echo "$STARTUP_P"')
    assert (result.returncode, result.stdout) == (0, f"{EXPECTED}\n"), result.stderr


def test_run_e_overrides_config_vars_for_that_one_off_only(up: Up) -> None:
    result = up.ctl("run", "-e", "GREETING=over=ride", "--env", "EXTRA=x y", "--",
                    'echo "$STARTUP_P|$GREETING|$EXTRA"')
    assert result.returncode == 0, result.stderr
    # The start-up already sees the override.
    assert result.stdout == "a-over=ride-b-profile|over=ride|x y\n"
    assert up.ctl("run", "--", 'echo "$GREETING|${EXTRA-unset}"').stdout == "hi|unset\n"
    bad = up.ctl("run", "-e", "NOT-A-NAME=1", "--", "true")
    assert bad.returncode == 2 and "NOT-A-NAME" in bad.stderr


def test_an_entered_command_and_shell_run_after_the_start_up(up: Up) -> None:
    result = up.ctl("exec", "worker.1", "--", "sh", "-c", 'echo "$STARTUP_P"')
    assert (result.returncode, result.stdout) == (0, f"{EXPECTED}\n"), result.stderr
    # The default command, a shell, reading its commands from our stdin.
    result = up.ctl("exec", "worker.1", input='echo "shell $STARTUP_A"\n')
    assert (result.returncode, result.stdout) == (0, "shell a-hi\n"), result.stderr


def test_restart_reads_the_env_file_again(up: Up) -> None:
    directory = Path(up.argv[up.argv.index("up") + 1])
    (directory / ".env").write_text("GREETING=edited\n")
    try:
        result = up.ctl("restart", "worker")
        assert result.returncode == 0, result.stderr
        wait_for(lambda: "worker.1  | formation a-edited-b-profile ppid 1" in up.output(), 60,
                 what="the restarted worker's line")
        assert up.states().get("worker.1") == "up"
    finally:
        (directory / ".env").write_text("GREETING=hi\n")
