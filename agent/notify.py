"""systemd service notifications (READY, STATUS, STOPPING, WATCHDOG) through python-systemd.

Without NOTIFY_SOCKET every call is a no-op, so the daemon runs the same in and out of systemd.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Iterator

from systemd import daemon as sd_daemon  # type: ignore[attr-defined]

log = logging.getLogger(__name__)


def send(*assignments: str) -> None:
    if not os.environ.get("NOTIFY_SOCKET"):
        return
    # python-systemd returns False (rather than raising) when the datagram was not sent.
    if not sd_daemon.notify("\n".join(assignments)):
        log.warning("sd_notify failed", extra={"NOTIFY": assignments[0]})


def ready(status: str) -> None:
    send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")


def status(text: str) -> None:
    send(f"STATUS={text}")


def stopping(status: str) -> None:
    send("STOPPING=1", f"STATUS={status}")


def reloading() -> None:
    send("RELOADING=1", "STATUS=reloading configuration")


def watchdog_interval_s() -> float | None:
    """Half of WATCHDOG_USEC, when systemd asks this very process for keep-alives."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(int(usec) / 1e6 / 2, 0.05)
    except ValueError:
        return None


async def watchdog_loop(interval_s: float) -> None:
    """Pings from inside the event loop: a stuck loop stops the pings and systemd restarts us."""
    while True:
        send("WATCHDOG=1")
        await asyncio.sleep(interval_s)


@contextlib.contextmanager
def reloading_done() -> Iterator[None]:
    reloading()
    try:
        yield
    finally:
        send("READY=1", "STATUS=running")
