"""The pure parts of the runtime: how a dyno's command is handed to the shell."""

from __future__ import annotations

import pytest

from agent.runtime import shell_command


@pytest.mark.parametrize(("command", "expected"), [
    ("python3 -u web.py", "exec python3 -u web.py"),
    ("  bundle exec puma -p $PORT  ", "exec bundle exec puma -p $PORT"),
    ("gunicorn -b 0.0.0.0:$PORT 'app:create()'",
     "exec gunicorn -b 0.0.0.0:$PORT 'app:create()'"),
    ("sh -c 'trap \"exit 5\" INT; sleep 9'", "exec sh -c 'trap \"exit 5\" INT; sleep 9'"),
    ("web > log 2>&1", "exec web > log 2>&1"),
])
def test_simple_commands_are_execd(command: str, expected: str) -> None:
    assert shell_command(command) == expected


@pytest.mark.parametrize("command", [
    "a && b", "a || b", "a; b", "a | b", "a &", "(a)", "{ a; }", "a\nb",
    "FOO=1 cmd", "exec cmd", "trap '' TERM", "cd /app", "while :; do x; done",
    "if x; then y; fi", "! x", ". ./env", "", "echo $(date)", "a|b", "x 'unbalanced",
])
def test_everything_else_keeps_the_shell(command: str) -> None:
    assert shell_command(command) == command
