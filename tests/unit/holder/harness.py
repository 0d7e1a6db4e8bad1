"""Harness running a real holder (plain backend: no isolation, no root) on a temp socket."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

import pytest

from agent.holder.client import ExitEvent, HolderClient, HolderEvent, OutputEvent


@dataclass
class HolderProc:
    socket: str
    state_dir: str
    proc: subprocess.Popen[bytes] | None = None
    extra: list[str] = field(default_factory=list)

    def argv(self, *extra: str) -> list[str]:
        return [sys.executable, "-m", "agent.holder", "--socket", self.socket, "--state-dir",
                self.state_dir, "--backend", "plain", "--log-file",
                os.path.join(self.state_dir, "holder.log"), "--log-level", "debug",
                *self.extra, *extra]

    def log(self) -> str:
        with contextlib.suppress(OSError), open(os.path.join(self.state_dir, "holder.log")) as f:
            return f.read()
        return ""


@pytest.fixture
def short_dir() -> Iterator[str]:
    # AF_UNIX paths are limited to 108 bytes; pytest's tmp_path can be longer.
    path = tempfile.mkdtemp(prefix="dth", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _connectable(path: str) -> bool:
    import socket
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path)
    except OSError:
        return False
    finally:
        s.close()
    return True


def start_holder(h: HolderProc, timeout_s: float = 10.0) -> HolderProc:
    h.proc = subprocess.Popen(h.argv(), start_new_session=True, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout_s
    while not _connectable(h.socket):
        if h.proc.poll() is not None:
            raise RuntimeError(f"holder exited with {h.proc.returncode}: {h.log()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"holder did not bind in {timeout_s}s: {h.log()}")
        time.sleep(0.01)
    return h


async def kill_held(socket_path: str) -> None:
    """SIGKILL every running process the holder holds (all started by this test) by pidfd."""
    client = await HolderClient.connect(socket_path, 5.0)
    try:
        for held in await client.list_processes(pidfds=True):
            if held.pidfd is not None:
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(held.pidfd, signal.SIGKILL)
                os.close(held.pidfd)
        deadline = time.monotonic() + 10
        while any(p.running for p in await client.list_processes()):
            if time.monotonic() > deadline:
                raise TimeoutError("held processes did not exit after SIGKILL")
            await asyncio.sleep(0.01)
    finally:
        client.close()


def stop_holder(h: HolderProc) -> None:
    if h.proc is None or h.proc.poll() is not None:
        return
    with contextlib.suppress(Exception):
        asyncio.run(kill_held(h.socket))
    h.proc.send_signal(signal.SIGTERM)
    try:
        h.proc.wait(10)
    except subprocess.TimeoutExpired:
        h.proc.kill()
        h.proc.wait(5)


@pytest.fixture
def holder_factory(short_dir: str) -> Iterator[Callable[..., HolderProc]]:
    made: list[HolderProc] = []

    def make(*extra: str, name: str = "h") -> HolderProc:
        h = HolderProc(os.path.join(short_dir, f"{name}.sock"),
                       os.path.join(short_dir, f"{name}-state"), extra=list(extra))
        made.append(h)
        return start_holder(h)

    yield make
    for h in made:
        stop_holder(h)


@pytest.fixture
def holder(holder_factory: Callable[..., HolderProc]) -> HolderProc:
    return holder_factory()


@pytest.fixture
async def client(holder: HolderProc) -> AsyncIterator[HolderClient]:
    c = await HolderClient.connect(holder.socket, 5.0)
    await c.subscribe()
    yield c
    c.close()


async def collect(client: HolderClient, until: Callable[[list[HolderEvent]], bool],
                  timeout_s: float = 10.0) -> list[HolderEvent]:
    """Events from `client` until `until(events)` holds; fails after `timeout_s`."""
    got: list[HolderEvent] = []
    stream = client.events()
    try:
        async with asyncio.timeout(timeout_s):
            while not until(got):
                got.append(await anext(stream))
    except TimeoutError:
        raise TimeoutError(f"events condition not met in {timeout_s}s; got {got!r}") from None
    finally:
        # Closing the generator would not ack the last event; that is what tests of
        # redelivery rely on, so keep it explicit.
        await stream.aclose()
    return got


def lines_of(events: list[HolderEvent], dyno_id: str | None = None) -> list[bytes]:
    return [data for e in events if isinstance(e, OutputEvent)
            and (dyno_id is None or e.dyno_id == dyno_id) for _, data in e.lines]


def exits_of(events: list[HolderEvent]) -> list[ExitEvent]:
    return [e for e in events if isinstance(e, ExitEvent)]


ENV = [("PATH", "/usr/bin:/bin")]


@dataclass
class Stream:
    """One held process's output as a client saw it, checked against the protocol as it came."""

    lines: list[bytes] = field(default_factory=list)
    first_seqs: list[int] = field(default_factory=list)
    dropped: int = 0
    events: int = 0
    exit: ExitEvent | None = None
    gaps_unexplained: int = 0  # seq jumps that `dropped` does not account for
    max_queued_output_bytes: int = 0


async def follow(client: HolderClient, dyno_id: str, handle_s: float = 0.0,
                 timeout_s: float = 60.0) -> Stream:
    """Take `dyno_id`'s events until its exit, spending `handle_s` on each output event."""
    stream = Stream()
    next_seq = 0
    events = client.events()
    try:
        async with asyncio.timeout(timeout_s):
            async for event in events:
                stream.max_queued_output_bytes = max(stream.max_queued_output_bytes,
                                                     client.queued_output_bytes)
                if isinstance(event, OutputEvent) and event.dyno_id == dyno_id:
                    stream.events += 1
                    stream.first_seqs.append(event.seq)
                    stream.gaps_unexplained += event.seq != next_seq + event.dropped
                    stream.dropped += event.dropped
                    next_seq = event.seq + len(event.lines)
                    stream.lines.extend(data for _, data in event.lines)
                    if handle_s:
                        await asyncio.sleep(handle_s)
                elif isinstance(event, ExitEvent) and event.dyno_id == dyno_id:
                    stream.exit = event
                    break
    finally:
        await events.aclose()
    return stream
