"""A dyno's output as the holder keeps it: newline splitting with a line cap, and a bounded buffer.

The buffer numbers lines (seq) so a subscriber can ack them; unacked lines stay (up to the
bounds) and are sent again after a reconnect. When full, the oldest line goes; if no sink
had been sent it yet, it counts as dropped (the daemon reports that as Error L10).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

# Heroku's logging splits lines longer than 10,000 bytes (DESIGN §6, issue 6).
MAX_LINE_BYTES = 10_000


class LineSplitter:
    """Turns a byte stream into lines without their newline, none longer than `max_line_bytes`."""

    def __init__(self, max_line_bytes: int = MAX_LINE_BYTES) -> None:
        if max_line_bytes < 1:
            raise ValueError(f"max_line_bytes must be positive, got {max_line_bytes}")
        self._max = max_line_bytes
        self._partial = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        lines: list[bytes] = []
        start = 0
        while True:
            end = data.find(b"\n", start)
            if end < 0:
                break
            if self._partial:
                self._partial += data[start:end]
                self._emit(bytes(self._partial), lines)
                self._partial.clear()
            else:
                self._emit(data[start:end], lines)
            start = end + 1
        self._partial += data[start:]
        # A long unterminated line is emitted in full-size pieces as soon as they exist, so
        # the partial buffer never grows past one line's worth.
        while len(self._partial) >= self._max:
            lines.append(bytes(self._partial[:self._max]))
            del self._partial[:self._max]
        return lines

    def flush(self) -> list[bytes]:
        """The unterminated tail, at end of stream."""
        if not self._partial:
            return []
        tail = bytes(self._partial)
        self._partial.clear()
        return [tail]

    @property
    def partial_bytes(self) -> int:
        return len(self._partial)

    def _emit(self, line: bytes, out: list[bytes]) -> None:
        if len(line) <= self._max:
            out.append(line)
            return
        for i in range(0, len(line), self._max):
            out.append(line[i:i + self._max])


@dataclass(frozen=True)
class BufferLimits:
    """Per held process, and `total_bytes` over all of them (200 dynos at 4 MiB is too much)."""

    max_lines: int = 10_000
    max_bytes: int = 4 << 20
    total_bytes: int = 256 << 20

    def __post_init__(self) -> None:
        if self.max_lines < 1 or self.max_bytes < 1 or self.total_bytes < 1:
            raise ValueError(f"buffer limits must be positive: {self}")


@dataclass(frozen=True)
class Line:
    seq: int
    ts: float
    data: bytes


class OutputBuffer:
    """Lines not yet acked, oldest first, within `limits`; a cursor marks what was sent."""

    def __init__(self, limits: BufferLimits) -> None:
        self._limits = limits
        self._lines: deque[Line] = deque()
        self._bytes = 0
        self._next_seq = 0
        self._send_from = 0
        self.dropped_unreported = 0
        self.dropped_total = 0

    def push(self, ts: float, data: bytes) -> None:
        self._lines.append(Line(self._next_seq, ts, data))
        self._next_seq += 1
        self._bytes += len(data)
        while len(self._lines) > self._limits.max_lines or (
                self._bytes > self._limits.max_bytes and len(self._lines) > 1):
            self.evict_oldest()

    def evict_oldest(self) -> int:
        """Drop the oldest line (to honour a bound across all buffers); returns bytes freed."""
        if not self._lines:
            return 0
        old = self._lines.popleft()
        self._bytes -= len(old.data)
        if old.seq >= self._send_from:
            # Never sent to anyone: a real loss, reported with the next batch.
            self._send_from = old.seq + 1
            self.dropped_unreported += 1
            self.dropped_total += 1
        return len(old.data)

    def take(self, max_lines: int, max_bytes: int) -> tuple[int, list[Line]]:
        """The next unsent lines (at least one if any), advancing the send cursor."""
        if self._send_from >= self._next_seq:
            return self._send_from, []
        start = self._send_from - self._lines[0].seq
        out: list[Line] = []
        size = 0
        for i in range(start, len(self._lines)):
            line = self._lines[i]
            if out and (len(out) >= max_lines or size + len(line.data) > max_bytes):
                break
            out.append(line)
            size += len(line.data)
        self._send_from = out[-1].seq + 1
        return out[0].seq, out

    def ack(self, next_seq: int) -> None:
        """A sink holds every line before `next_seq`: forget them."""
        while self._lines and self._lines[0].seq < next_seq:
            old = self._lines.popleft()
            self._bytes -= len(old.data)
        self._send_from = max(self._send_from, min(next_seq, self._next_seq))

    def rewind(self) -> None:
        """A new sink: everything unacked is sent again."""
        self._send_from = self._lines[0].seq if self._lines else self._next_seq

    @property
    def unsent(self) -> bool:
        return self._send_from < self._next_seq

    @property
    def lines(self) -> int:
        return len(self._lines)

    @property
    def bytes(self) -> int:
        return self._bytes

    @property
    def next_seq(self) -> int:
        return self._next_seq
