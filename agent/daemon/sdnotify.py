"""systemd service notifications (READY, STATUS, STOPPING, WATCHDOG): sd_notify's datagram
protocol on a non-blocking socket (see `send` for why not libsystemd's).

Without NOTIFY_SOCKET every call is a no-op, so the daemon runs the same in and out of systemd.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Iterator

log = logging.getLogger(__name__)


_sock: socket.socket | None = None
_dropped = 0


def _address(raw: str) -> str | bytes:
    # "@name" is an abstract socket: a leading NUL byte on the wire.
    return b"\0" + raw[1:].encode() if raw.startswith("@") else raw


def send(*assignments: str) -> None:
    """One sd_notify datagram, never blocking.

    Not libsystemd's sd_notify (python-systemd's `daemon.notify`): it sends on a blocking
    socket, and a receiver whose queue is full (net.unix.max_dgram_qlen is 10 on this kind
    of host) would freeze the whole event loop. A datagram that does not fit is dropped and
    counted; the next keep-alive or status follows soon after.
    """
    global _sock, _dropped
    target = os.environ.get("NOTIFY_SOCKET")
    if not target:
        return
    if _sock is None:
        _sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK
                              | socket.SOCK_CLOEXEC)
    try:
        _sock.sendto("\n".join(assignments).encode(), _address(target))
    except BlockingIOError:
        _dropped += 1
        if _dropped == 1 or _dropped % 100 == 0:
            log.warning("sd_notify receiver is not reading; %d notifications dropped", _dropped)
    except OSError as exc:
        log.warning("sd_notify to %s failed: %s", target, exc.strerror)


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
