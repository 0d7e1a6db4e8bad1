"""The child-to-parent report channel: a CLOEXEC pipe carrying phase marks or one error.

EOF without an error means exec succeeded (the kernel closed the write end at exec).
Messages are single JSON lines, each well under PIPE_BUF so a write is atomic.
"""

from __future__ import annotations

import json
import math
import os
import select
import time
from collections.abc import Generator, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple, TypeVar

from agent.launcher.errors import LaunchError

T = TypeVar("T")

_MAX_MESSAGE = 4000  # < PIPE_BUF (4096): one write(2) is never interleaved or split


def encode_marks(marks: Mapping[str, int]) -> bytes:
    return (json.dumps({"marks": dict(marks)}) + "\n").encode()


def encode_error(phase: str, errno: int, message: str, path: object) -> bytes:
    # OSError.filename may be bytes or an fd number; the wire carries text only.
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    text_path = None if path is None else str(path)
    body = {"error": {"phase": phase, "errno": errno, "message": message[:2000],
                      "path": text_path}}
    return (json.dumps(body) + "\n").encode()[:_MAX_MESSAGE]


@dataclass
class Report:
    """What the parent learnt: phase boundary times (monotonic ns) and maybe an error."""

    marks: dict[str, int] = field(default_factory=dict)
    error: LaunchError | None = None
    eof_ns: int = 0
    messages: int = 0  # lines the child wrote; every child writes one before it execs


def decode(data: bytes) -> Report:
    report = Report()
    for line in data.splitlines():
        report.messages += 1
        try:
            msg = json.loads(line)
        except ValueError:
            report.error = LaunchError("report", 0, f"garbled child report {line[:200]!r}")
            continue
        if "marks" in msg:
            report.marks.update({str(k): int(v) for k, v in msg["marks"].items()})
        elif "error" in msg and report.error is None:
            err = msg["error"]
            report.error = LaunchError(str(err.get("phase", "?")), int(err.get("errno") or 0),
                                       str(err.get("message", "")), err.get("path"))
    return report


class Wait(NamedTuple):
    """What a launch waits for between its steps: `fd` readable, or the monotonic `deadline`
    passing; `pid` is the child it is waiting on (its holder may reap it meanwhile)."""

    fd: int
    deadline: float
    pid: int


Steps = Generator[Wait, None, T]
"""A launch as steps: each `Wait` it yields is resumed (send(None)) once its fd is readable
or its deadline has passed; its return value is the result. Closing it kills and reaps a
child it started. The holder interleaves many launches this way; `run_to_end` runs one."""


def run_to_end(steps: Steps[T]) -> T:
    """Run `steps`, blocking in poll(2) at each wait."""
    poller = select.poll()
    try:
        wait = next(steps)
        while True:
            poller.register(wait.fd, select.POLLIN)
            try:
                poller.poll(max(0, math.ceil((wait.deadline - time.monotonic()) * 1000)))
            finally:
                poller.unregister(wait.fd)
            wait = steps.send(None)
    except StopIteration as stop:
        result: T = stop.value
        return result
    finally:
        steps.close()


def read_steps(fd: int, timeout_s: float, pid: int) -> Steps[Report | None]:
    """Read the whole report of child `pid` from `fd`, waiting in steps; None if the
    deadline passed first (the child is stuck)."""
    deadline = time.monotonic() + timeout_s
    chunks: list[bytes] = []
    os.set_blocking(fd, False)
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return None
            yield Wait(fd, deadline, pid)
            continue
        if not chunk:
            break
        chunks.append(chunk)
    report = decode(b"".join(chunks))
    report.eof_ns = time.monotonic_ns()
    return report


def read_until_eof(fd: int, timeout_s: float) -> Report | None:
    """Read the whole report; None if the deadline passed first (the child is stuck)."""
    return run_to_end(read_steps(fd, timeout_s, 0))


def durations_ms(start_ns: int, marks: Mapping[str, int], end_ns: int,
                 order: tuple[str, ...]) -> dict[str, float]:
    """Phase → ms from boundary marks; the last phase ("exec") ends at `end_ns` (EOF)."""
    out: dict[str, float] = {}
    prev = start_ns
    for name in order:
        if name in marks:
            out[name] = (marks[name] - prev) / 1e6
            prev = marks[name]
    out["exec"] = (end_ns - prev) / 1e6
    out["total"] = (end_ns - start_ns) / 1e6
    return out
