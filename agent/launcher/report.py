"""The child-to-parent report channel: a CLOEXEC pipe carrying phase marks or one error.

EOF without an error means exec succeeded (the kernel closed the write end at exec).
Messages are single JSON lines, each well under PIPE_BUF so a write is atomic.
"""

from __future__ import annotations

import json
import os
import select
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from agent.launcher.errors import LaunchError

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


def read_until_eof(fd: int, timeout_s: float) -> Report | None:
    """Read the whole report; None if the deadline passed first (the child is stuck)."""
    deadline = time.monotonic() + timeout_s
    chunks: list[bytes] = []
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while True:
        left_ms = int((deadline - time.monotonic()) * 1000)
        if left_ms <= 0:
            return None
        if not poller.poll(left_ms):
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    report = decode(b"".join(chunks))
    report.eof_ns = time.monotonic_ns()
    return report


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
