"""`dynoagent up` prints log lines off the event loop: a stdout nobody reads (`dynoagent up |
less`, Ctrl-S on a terminal) stalls only the printing, never the agent."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import threading
import time
from datetime import UTC, datetime

from agent.observability.logs import LogHub, LogLine
from agent.standalone.up import LogPrinter


def _fill(fd: int) -> None:
    """Write into the pipe until the kernel takes no more, leaving `fd` blocking again."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
    with contextlib.suppress(BlockingIOError):
        while True:
            os.write(fd, b"x" * 65536)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags)


# Before its fix: LogPrinter.write does a blocking write+flush on the event loop: a full
# stdout pipe (`dynoagent up | less`, Ctrl-S) stops the agent: no supervision, no proxy, no
# operator API, Ctrl-C unhandled
def test_a_stdout_nobody_reads_does_not_freeze_the_event_loop() -> None:
    read_fd, write_fd = os.pipe()
    _fill(write_fd)
    out = os.fdopen(write_fd, "w")
    responsive = threading.Event()

    async def scenario() -> None:
        hub = LogHub()
        follower = hub.subscribe("demo")
        printer = LogPrinter(out, colour=False)
        task = asyncio.create_task(printer.follow(follower))
        hub.publish(LogLine.output(datetime.now(UTC), "demo", "web.1", "hello"))
        # Other work of the agent (supervision, the proxy, the API) must still get turns.
        for _ in range(10):
            await asyncio.sleep(0.02)
        responsive.set()
        follower.close()
        await asyncio.gather(task, return_exceptions=True)

    thread = threading.Thread(target=asyncio.run, args=(scenario(),), daemon=True)
    thread.start()
    try:
        was_responsive = responsive.wait(3.0)
    finally:
        # Unblock the writer whatever happened, so the thread ends and nothing is left.
        os.set_blocking(read_fd, False)
        deadline = time.monotonic() + 10
        while thread.is_alive() and time.monotonic() < deadline:
            with contextlib.suppress(BlockingIOError):
                os.read(read_fd, 1 << 20)
            thread.join(0.01)
        with contextlib.suppress(OSError):
            out.close()
        os.close(read_fd)
    assert not thread.is_alive()
    assert was_responsive, "the event loop was blocked by a write to stdout"
