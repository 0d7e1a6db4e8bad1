"""A dyno's output as the holder keeps it: newline splitting with a line cap, and a bounded buffer.

Lines are kept in blocks, one per pipe read: the lines joined by b"\\n", one timestamp, a count
and the seq of the first line. A burst of short lines then costs a few Python objects per read
instead of several per line, which is where the holder's time went (issue 6: `seq 1 300000`).
The buffer numbers lines (seq) so a subscriber can ack them; unacked lines stay (up to the
bounds, charged in bytes of memory) and are sent again after a reconnect. When full, the oldest
lines go; those no sink had been sent yet count as dropped (the daemon reports Error L10).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

# Heroku's logging splits lines longer than 10,000 bytes (DESIGN §6, issue 6).
MAX_LINE_BYTES = 10_000
# What a block costs beyond its data (measured on CPython 3.11: the slotted Block 72 bytes,
# the bytes header 33, a deque slot 8), charged so that the byte bound bounds memory even when
# a dyno writes one line per read.
BLOCK_OVERHEAD_BYTES = 120

Chunk = tuple[bytes, int]
"""Complete lines joined by b"\\n" (no trailing newline) and how many lines that is (≥ 1)."""


class LineSplitter:
    """Turns a byte stream into lines without their newline, none longer than `max_line_bytes`."""

    def __init__(self, max_line_bytes: int = MAX_LINE_BYTES) -> None:
        if max_line_bytes < 1:
            raise ValueError(f"max_line_bytes must be positive, got {max_line_bytes}")
        self._max = max_line_bytes
        self._partial = bytearray()

    def feed_chunk(self, data: bytes) -> Chunk | None:
        """The complete lines `data` finishes, as one joined chunk (None if it finishes none)."""
        pieces: list[bytes] = []
        end = data.rfind(b"\n")
        if end >= 0:
            if self._partial:
                self._partial += data[:end]
                head = bytes(self._partial)
                self._partial.clear()
            else:
                head = data[:end]
            self._partial += data[end + 1:]
            lines = head.split(b"\n")
            # Only a chunk longer than the cap can hold a long line; checking its longest line
            # is a C-speed scan, the Python-level re-split below runs only when one is found.
            if len(head) > self._max and max(map(len, lines)) > self._max:
                lines = [piece for line in lines for piece in self._pieces(line)]
                head = b"\n".join(lines)
            pieces.append(head)
            count = len(lines)
        else:
            self._partial += data
            count = 0
        # A long unterminated line is emitted in full-size pieces as soon as they exist, so
        # the partial buffer never grows past one line's worth.
        while len(self._partial) >= self._max:
            pieces.append(bytes(self._partial[:self._max]))
            del self._partial[:self._max]
            count += 1
        if not pieces:
            return None
        return (pieces[0] if len(pieces) == 1 else b"\n".join(pieces)), count

    def feed(self, data: bytes) -> list[bytes]:
        """The complete lines `data` finishes, one bytes object each."""
        chunk = self.feed_chunk(data)
        return chunk[0].split(b"\n") if chunk is not None else []

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

    def _pieces(self, line: bytes) -> list[bytes]:
        if len(line) <= self._max:
            return [line]
        return [line[i:i + self._max] for i in range(0, len(line), self._max)]


@dataclass(frozen=True)
class BufferLimits:
    """Per held process, and `total_bytes` over all of them (200 dynos at 4 MiB is too much).

    Bytes are memory: line data, a newline each, and BLOCK_OVERHEAD_BYTES per pipe read. The
    line bound is a second, coarser guard; bytes are what bind in practice (a 7-byte line costs
    8 bytes, so the 4 MiB default holds a `seq 1 300000` burst whole).
    """

    max_lines: int = 1_000_000
    max_bytes: int = 4 << 20
    total_bytes: int = 256 << 20

    def __post_init__(self) -> None:
        if self.max_lines < 1 or self.max_bytes < 1 or self.total_bytes < 1:
            raise ValueError(f"buffer limits must be positive: {self}")


class Block:
    """Consecutive lines read together: `data` is them joined by b"\\n" (count - 1 newlines)."""

    __slots__ = ("count", "data", "seq", "ts")

    def __init__(self, seq: int, ts: float, count: int, data: bytes) -> None:
        self.seq = seq
        self.ts = ts
        self.count = count
        self.data = data

    @property
    def cost(self) -> int:
        return len(self.data) + 1 + BLOCK_OVERHEAD_BYTES

    @property
    def end_seq(self) -> int:
        return self.seq + self.count

    def lines(self) -> list[bytes]:
        return self.data.split(b"\n")

    def cut_after_bytes(self, n: int) -> tuple[int, int]:
        """(lines, data bytes incl. newlines) of the shortest head whose removal frees ≥ n bytes."""
        pos = self.data.find(b"\n", max(n - 1, 0))
        if pos < 0:
            return self.count, len(self.data) + 1
        return self.data.count(b"\n", 0, pos + 1), pos + 1

    def cut_at_line(self, k: int) -> int:
        """Data bytes (incl. newlines) of the first k lines, 0 < k < count."""
        data = self.data
        # Guess from the mean line length, then step newline by newline (C-speed finds) to the
        # exact spot: a few steps for the even lines of a burst, no copy of the data.
        pos = len(data) * k // self.count
        n = data.count(b"\n", 0, pos)
        while n < k:
            pos = data.find(b"\n", pos) + 1
            n += 1
        while n > k:
            pos = data.rfind(b"\n", 0, pos)
            n -= 1
        return data.rfind(b"\n", 0, pos) + 1

    def split_head(self, k: int, size: int) -> Block:
        """Detach the first k lines (`size` bytes of data with their newlines) as a new block."""
        head = Block(self.seq, self.ts, k, self.data[:size - 1])
        self.seq += k
        self.count -= k
        self.data = self.data[size:]
        return head


@dataclass(frozen=True)
class Batch:
    """What one output event carries: `blocks` from `seq` on, after `dropped` unsent lines
    were discarded since the previous batch (so seq moved on by that many)."""

    seq: int
    dropped: int
    blocks: list[Block]

    @property
    def count(self) -> int:
        return sum(b.count for b in self.blocks)


class ByteTally:
    """Bytes held by every buffer of one holder, kept current by the buffers themselves."""

    __slots__ = ("bytes",)

    def __init__(self) -> None:
        self.bytes = 0


class OutputBuffer:
    """Lines not yet acked, oldest first, within `limits`: those sent to the sink, then the rest."""

    def __init__(self, limits: BufferLimits, tally: ByteTally | None = None) -> None:
        self._limits = limits
        self._tally = tally if tally is not None else ByteTally()
        self._sent: deque[Block] = deque()
        self._unsent: deque[Block] = deque()
        self._lines = 0
        self._bytes = 0
        self._next_seq = 0
        self.dropped_unreported = 0
        self.dropped_total = 0

    def push(self, ts: float, data: bytes, count: int = 1) -> None:
        """Append `count` lines read at `ts` (joined by b"\\n"); evict the oldest over a bound."""
        if count < 1:
            raise ValueError(f"a chunk holds at least one line, got count={count}")
        block = Block(self._next_seq, ts, count, data)
        self._next_seq += count
        self._unsent.append(block)
        self._account(count, block.cost)
        self._enforce()

    def evict(self, free_bytes: int, drop_lines: int = 0, keep_newest: bool = False) -> int:
        """Drop the oldest lines until `free_bytes` are freed and `drop_lines` gone; bytes freed.

        Lines sent but not acked go first and silently (the sink has them); unsent ones count
        as dropped, reported with the next batch.
        """
        freed = 0
        while freed < free_bytes or drop_lines > 0:
            queue = self._sent or self._unsent
            if not queue:
                break
            block = queue[0]
            keep = 1 if keep_newest and queue is self._unsent and len(queue) == 1 else 0
            if block.count - keep <= 0:
                break
            lines, size = block.cut_after_bytes(free_bytes - freed)
            if lines < drop_lines:
                lines = min(drop_lines, block.count)
                size = len(block.data) + 1 if lines == block.count else block.cut_at_line(lines)
            if lines > block.count - keep:
                lines = block.count - keep
                size = block.cut_at_line(lines)
            if lines == block.count:
                queue.popleft()
                size = block.cost
            else:
                block.split_head(lines, size)
            self._account(-lines, -size)
            freed += size
            drop_lines -= lines
            if queue is self._unsent:
                self.dropped_unreported += lines
                self.dropped_total += lines
        return freed

    def take(self, max_lines: int, max_bytes: int) -> Batch:
        """The next unsent lines (at least one if any), now counted as sent, with the drops
        before them. The blocks are snapshots: trimming the buffer later cannot change them."""
        dropped = self.dropped_unreported
        self.dropped_unreported = 0
        if not self._unsent:
            return Batch(self._next_seq, dropped, [])
        first_seq = self._unsent[0].seq
        out: list[Block] = []
        lines = size = 0
        while self._unsent and lines < max_lines and size < max_bytes:
            block = self._unsent[0]
            room_lines = max_lines - lines
            room_bytes = max_bytes - size
            if block.count <= room_lines and len(block.data) + 1 <= room_bytes:
                self._unsent.popleft()
            else:
                k, cut = self._fit(block, room_lines, room_bytes, first=not out)
                if k == 0:
                    break
                if k == block.count:
                    self._unsent.popleft()
                else:
                    block = block.split_head(k, cut)
                    self._account(0, BLOCK_OVERHEAD_BYTES)
            out.append(Block(block.seq, block.ts, block.count, block.data))
            self._sent.append(block)
            lines += block.count
            size += len(block.data) + 1
        # A split adds a block's overhead; what it pushes over the bound goes from the oldest
        # sent lines (the sink has them). Unsent lines it drops lie after this batch, so they
        # are reported with the next one.
        self._enforce()
        return Batch(first_seq, dropped, out)

    def ack(self, next_seq: int) -> None:
        """A sink holds every line before `next_seq`: forget them (sent or not)."""
        for queue in (self._sent, self._unsent):
            while queue and queue[0].seq < next_seq:
                block = queue[0]
                if block.end_seq <= next_seq:
                    queue.popleft()
                    self._account(-block.count, -block.cost)
                else:
                    k = next_seq - block.seq
                    size = block.cut_at_line(k)
                    block.split_head(k, size)
                    self._account(-k, -size)

    def rewind(self) -> None:
        """A new sink: everything unacked is sent again."""
        self._unsent.extendleft(reversed(self._sent))
        self._sent.clear()

    def forget(self) -> None:
        """Release everything (the process is being forgotten) and give the bytes back."""
        self._sent.clear()
        self._unsent.clear()
        self._account(-self._lines, -self._bytes)

    @property
    def unsent(self) -> bool:
        return bool(self._unsent)

    @property
    def lines(self) -> int:
        return self._lines

    @property
    def bytes(self) -> int:
        return self._bytes

    @property
    def next_seq(self) -> int:
        return self._next_seq

    def _enforce(self) -> None:
        over_lines = self._lines - self._limits.max_lines
        over_bytes = self._bytes - self._limits.max_bytes
        if over_lines > 0 or over_bytes > 0:
            # The newest line stays even when it alone is over the byte bound.
            self.evict(over_bytes, over_lines, keep_newest=True)

    def _account(self, lines: int, size: int) -> None:
        self._lines += lines
        self._bytes += size
        self._tally.bytes += size

    @staticmethod
    def _fit(block: Block, room_lines: int, room_bytes: int, first: bool) -> tuple[int, int]:
        """(lines, bytes with newlines) of the longest head of `block` within the room; the
        first block of a batch yields at least one line so a huge line still goes out."""
        pos = block.data.rfind(b"\n", 0, room_bytes)
        if pos < 0:
            if not first:
                return 0, 0
            pos = block.data.find(b"\n")
            if pos < 0:
                return block.count, len(block.data) + 1
        k = block.data.count(b"\n", 0, pos + 1)
        if k > room_lines:
            k = room_lines
            return k, block.cut_at_line(k)
        return k, pos + 1
