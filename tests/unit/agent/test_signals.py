"""Exit statuses as Heroku reports them, from the wait statuses the holder reaps."""

from __future__ import annotations

import os
import signal

import pytest

from agent.signals import EXIT_SIGKILL, EXIT_SIGTERM, exit_status_from_wait


@pytest.mark.parametrize(("status", "expected"), [
    (0, 0), (1 << 8, 1), (3 << 8, 3), (signal.SIGTERM, EXIT_SIGTERM),
    (signal.SIGKILL, EXIT_SIGKILL), (signal.SIGKILL | 0x80, 137),  # core-dump bit set
])
def test_exit_status_from_wait(status: int, expected: int) -> None:
    assert exit_status_from_wait(status) == expected
    assert (EXIT_SIGTERM, EXIT_SIGKILL) == (143, 137)


def test_exit_status_from_wait_refuses_stopped_status() -> None:
    stopped = (signal.SIGSTOP << 8) | 0x7F
    assert os.WIFSTOPPED(stopped)
    with pytest.raises(ValueError, match="neither an exit nor a signal death"):
        exit_status_from_wait(stopped)
