"""Heroku's start-up (`.profile.d/*.sh`, then `.profile`) as the script a dyno's shell runs,
run for real by dash (Debian's /bin/sh) and busybox sh with a temp dir standing in for /app."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from agent.startup import SHELL, command_argv, entered_argv, profile_prelude

# The shells a stack's /bin/sh may be; each test runs under every one installed here.
SHELLS = [pytest.param(shell, marks=pytest.mark.skipif(
    shutil.which(shell[0]) is None, reason=f"{shell[0]} is not installed"), id=shell[-1])
    for shell in (("dash",), ("busybox", "sh"))]


def run(shell: tuple[str, ...], argv: tuple[str, ...],
        cwd: Path) -> subprocess.CompletedProcess[str]:
    assert argv[0] == SHELL and argv[1] == "-c"
    return subprocess.run([*shell, *argv[1:]], cwd=cwd, capture_output=True, text=True,
                          timeout=30, env={"PATH": "/usr/bin:/bin", "CONFIG": "from-env"})


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def app(tmp_path: Path) -> Path:
    """An app dir with a space in its name (the prelude quotes it) and Heroku-style scripts."""
    app = tmp_path / "the app"
    # 10 exports, 20 uses what 10 exported (same shell, glob order), .profile uses both.
    write(app / ".profile.d" / "10-a.sh", 'export A="a+$CONFIG"\n')
    write(app / ".profile.d" / "20-b.sh", 'export B="$A+b"\nfalse\n')
    # A syntax error is printed and skipped; so is a script that returns non-zero.
    write(app / ".profile.d" / "15-broken.sh", "echo broken-ran >&2\nif then fi (\n")
    write(app / ".profile.d" / "17-fails.sh", "export F=1\nreturn 3\n")
    # Not *.sh, or not a file: not sourced.
    write(app / ".profile.d" / "30-c.txt", "export C=never\n")
    (app / ".profile.d" / "40-dir.sh").mkdir()
    write(app / ".profile", 'export P="$B+profile"\n')
    return app


@pytest.mark.parametrize("shell", SHELLS)
def test_the_scripts_are_sourced_in_order_in_the_commands_shell(shell: tuple[str, ...],
                                                                app: Path) -> None:
    argv = command_argv('echo "A=$A B=$B F=$F C=${C-unset} P=$P"; '
                        'echo "${__dynoagent_profile-gone}"', str(app))
    result = run(shell, argv, app)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "A=a+from-env B=a+from-env+b F=1 C=unset P=a+from-env+b+profile", "gone"]
    # The broken script ran up to its error, which is on stderr (the dyno's log).
    assert "broken-ran" in result.stderr and "15-broken.sh" in result.stderr


@pytest.mark.parametrize("shell", SHELLS)
def test_no_profile_d_and_no_profile_is_nothing_at_all(shell: tuple[str, ...],
                                                       tmp_path: Path) -> None:
    result = run(shell, command_argv("echo ran", str(tmp_path)), tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (0, "ran\n", "")
    (tmp_path / ".profile.d").mkdir()  # present but empty: the glob matches nothing
    result = run(shell, command_argv("echo ran", str(tmp_path)), tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (0, "ran\n", "")


@pytest.mark.parametrize("shell", SHELLS)
def test_a_simple_command_is_still_execd_after_the_start_up(shell: tuple[str, ...],
                                                             app: Path) -> None:
    # exec'd: the command has the shell's pid (it is the reaper's child, not a shell's).
    process = subprocess.Popen([*shell, *command_argv("sh -c 'echo $$'", str(app))[1:]],
                               cwd=app, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               text=True)
    out, _ = process.communicate(timeout=30)
    assert out.strip() == str(process.pid)
    # A list keeps its shell, which runs after the start-up all the same.
    result = run(shell, command_argv('echo "$P" && echo two', str(app)), app)
    assert result.stdout == "a+from-env+b+profile\ntwo\n"


@pytest.mark.parametrize("shell", SHELLS)
def test_an_entered_command_gets_its_words_unchanged_after_the_start_up(
        shell: tuple[str, ...], app: Path) -> None:
    # A script that resets the positional parameters cannot change the command's words.
    write(app / ".profile.d" / "50-args.sh", "set -- clobbered\n")
    words = ["it's", "$A", "a  b", "*", ""]
    argv = entered_argv(["sh", "-c", 'printf "[%s]" "$A" "$P" "$@"', "sh", *words], str(app))
    result = run(shell, argv, app)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ("[a+from-env][a+from-env+b+profile]"
                             "[it's][$A][a  b][*][]")
    process = subprocess.Popen([*shell, *entered_argv(["sh", "-c", "echo $$"], str(app))[1:]],
                               cwd=app, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               text=True)
    out, _ = process.communicate(timeout=30)
    assert out.strip() == str(process.pid)


@pytest.mark.parametrize("shell", SHELLS)
def test_an_entered_command_that_is_not_found_is_the_shells_127(shell: tuple[str, ...],
                                                               tmp_path: Path) -> None:
    result = run(shell, entered_argv(["no-such-command-here"], str(tmp_path)), tmp_path)
    assert result.returncode == 127 and "no-such-command-here" in result.stderr


def test_the_dyno_runs_the_start_up_of_app_unless_told_not_to() -> None:
    argv = command_argv("python3 web.py")
    assert argv == (SHELL, "-c", profile_prelude("/app") + "exec python3 web.py")
    assert "/app/.profile.d/*.sh" in argv[2] and "command . /app/.profile" in argv[2]
    assert command_argv("a && b", profile=False) == (SHELL, "-c", "a && b")
    assert entered_argv(["/bin/sh"]) == (SHELL, "-c", profile_prelude("/app") + "exec /bin/sh")
