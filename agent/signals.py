"""Signals as the interfaces take them (operator API, coordinator, supervisor): a name with
or without `SIG` in any case, or a number, in ASCII only; and exit statuses as Heroku reports
them, 128 + the signal for a process a signal ended."""

from __future__ import annotations

import os
import re
import signal as signal_mod
from typing import Any, Final

from agent import errors
from agent.errors import excerpt

# ASCII only: str.isdigit() and int() also take other scripts' digits (U+0661 U+0660 is
# 10), and str.upper() maps some non-ASCII letters onto ASCII ones (U+017F is "S").
_NUMBER = re.compile(r"[0-9]{1,3}")
_NAME = re.compile(r"(?:SIG)?[A-Z][A-Z0-9]{0,15}", re.IGNORECASE)

EXIT_SIGTERM: Final = 128 + signal_mod.SIGTERM  # 143, as Heroku prints it
EXIT_SIGKILL: Final = 128 + signal_mod.SIGKILL  # 137


def parse_signal(value: Any) -> signal_mod.Signals:
    """The signal named by "TERM", "SIGTERM", "sigterm", "15" or 15; anything else, or a
    number no signal has, is a BadRequest."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise errors.BadRequest(f"signal must be a name or a number, got {excerpt(value)}")
    text = str(value) if isinstance(value, int) else value.strip(" ")
    try:
        if _NUMBER.fullmatch(text):
            return signal_mod.Signals(int(text))
        if text.isascii() and _NAME.fullmatch(text):
            name = text.upper()
            return signal_mod.Signals[name if name.startswith("SIG") else f"SIG{name}"]
    except (KeyError, ValueError):
        pass
    raise errors.BadRequest(f"unknown signal {excerpt(value)}")


def exit_status_from_wait(wait_status: int) -> int:
    """A `waitpid` status as Heroku reports it: the exit code, or 128 + the signal number
    (143 after SIGTERM, 137 after SIGKILL), like a shell does. ValueError for a stopped or
    continued status (only `WUNTRACED`/`WCONTINUED` waits return those)."""
    if os.WIFSIGNALED(wait_status):
        return 128 + os.WTERMSIG(wait_status)
    if os.WIFEXITED(wait_status):
        return os.WEXITSTATUS(wait_status)
    raise ValueError(f"wait status {wait_status:#x} is neither an exit nor a signal death")
