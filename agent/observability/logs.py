"""Log lines of DESIGN §6: their format, Heroku's platform messages, line splitting, the per-app
tail buffer and the hub that fans lines out to followers without ever blocking the publisher.
"""

from __future__ import annotations

import asyncio
import heapq
import json
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from enum import StrEnum
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, NamedTuple, Protocol

if TYPE_CHECKING:
    from agent.observability.logtail import Origin, TailStore

MAX_LINE_BYTES: Final = 10_000  # Heroku splits longer lines into 10,000-byte chunks
TAIL_LINES: Final = 1_500  # Heroku's per-app log history
# A follower holds at most this many lines, and this many bytes of them (their text plus
# LINE_OVERHEAD_BYTES each, what a queued line costs beyond its text): many short lines absorb
# a burst, while long lines stay within the byte bound.
DEFAULT_FOLLOWER_QUEUE: Final = 50_000
DEFAULT_FOLLOWER_QUEUE_BYTES: Final = 16 << 20
LINE_OVERHEAD_BYTES: Final = 64


class LogError(Exception):
    """Base of this module's errors; carries the offending value."""

    def __init__(self, message: str, value: object) -> None:
        super().__init__(message)
        self.value = value


class LogSource(StrEnum):
    APP = "app"  # what a dyno's processes printed
    AGENT = "agent"  # platform messages (Heroku writes `heroku[...]`)


def format_timestamp(at: datetime) -> str:
    """RFC 3339 in UTC with microseconds, as Heroku prints it:
    `2026-11-26T10:00:00.123456+00:00`."""
    cached = _stamp_cache
    if at is cached[0]:  # the lines of one pipe read share their time (one object)
        return str(cached[1])
    if at.tzinfo is None or at.utcoffset() is None:
        raise LogError(f"timestamp {at.isoformat()} has no timezone", at)
    stamp = at.astimezone(UTC).isoformat(timespec="microseconds")
    cached[:] = (at, stamp)
    return stamp


_stamp_cache: list[Any] = [None, ""]


def _seconds(value: float) -> str:
    # "30 seconds", not "30.0 seconds"; shortened test timeouts keep their fraction.
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


# Platform messages. The wording is Heroku's (reference/heroku.md), because people and tools
# grep for it; do not "improve" it.

def starting_process(command: str) -> str:
    return f"Starting process with command `{command}`"


def state_changed(previous: str, new: str) -> str:
    return f"State changed from {previous} to {new}"


def stopping_all_sigterm() -> str:
    return "Stopping all processes with SIGTERM"


def r12_exit_timeout(stop_timeout_s: float) -> str:
    return ("Error R12 (Exit timeout) -> At least one process failed to exit within "
            f"{_seconds(stop_timeout_s)} seconds of SIGTERM")


def stopping_remaining_sigkill() -> str:
    return "Stopping remaining processes with SIGKILL"


def stopping_process_sigkill() -> str:
    """After R10 and R15 Heroku kills without a grace period and says so in these words."""
    return "Stopping process with SIGKILL"


def process_exited(status: int) -> str:
    return f"Process exited with status {status}"


def r10_boot_timeout(boot_timeout_s: float) -> str:
    return ("Error R10 (Boot timeout) -> Web process failed to bind to $PORT within "
            f"{_seconds(boot_timeout_s)} seconds of launch")


def process_running_mem(usage_bytes: int, quota_bytes: int) -> str:
    """`Process running mem=1028M(103.3%)`: usage in MiB (Heroku's "MB" is 2**20 bytes)."""
    if quota_bytes <= 0:
        raise LogError(f"memory quota must be positive, got {quota_bytes}", quota_bytes)
    mib = round(usage_bytes / 2**20)
    return f"Process running mem={mib}M({usage_bytes * 100 / quota_bytes:.1f}%)"


def r14_memory_quota_exceeded() -> str:
    return "Error R14 (Memory quota exceeded)"


def r15_memory_quota_vastly_exceeded() -> str:
    return "Error R15 (Memory quota vastly exceeded)"


def cycling() -> str:
    return "Cycling"


def restarting() -> str:
    return "Restarting"


def holder_lost() -> str:
    """The host's process holder died: the platform's failure, not the app's (no crash is
    counted). Not a Heroku message: Heroku's hosts have no holder to lose."""
    return "Error: the host's process holder died with the process; restarting it (not a crash)"


def l10_buffer_overflow(dropped: int) -> str:
    return f"Error L10 (output buffer overflow): {dropped} messages dropped"


class LogLine(NamedTuple):
    """One line of a dyno's output or one platform message about it. (A named tuple: made
    per line at some 100k lines/s, it costs a third of a frozen dataclass.)"""

    at: datetime
    source: LogSource
    dyno: str  # the dyno's name, e.g. "web.1"
    app: str
    text: str
    dyno_id: str = ""

    @classmethod
    def agent(cls, at: datetime, app: str, dyno: str, text: str, dyno_id: str = "") -> LogLine:
        return cls(at, LogSource.AGENT, dyno, app, text, dyno_id)

    @classmethod
    def output(cls, at: datetime, app: str, dyno: str, text: str, dyno_id: str = "") -> LogLine:
        return cls(at, LogSource.APP, dyno, app, text, dyno_id)

    def format(self) -> str:
        """`2026-11-26T10:00:00.123456+00:00 app[web.1]: text`"""
        return f"{format_timestamp(self.at)} {self.source}[{self.dyno}]: {self.text}"

    def as_dict(self) -> dict[str, str]:
        return {"at": format_timestamp(self.at), "source": str(self.source), "app": self.app,
                "dyno": self.dyno, "id": self.dyno_id, "text": self.text, "line": self.format()}

    def matches(self, app: str | None, dyno: str | None) -> bool:
        """Filter of `logs -a APP -d DYNO`; a dyno is named by its name or its id."""
        if app is not None and self.app != app:
            return False
        return dyno is None or dyno in (self.dyno, self.dyno_id)


_json_str = json.encoder.encode_basestring_ascii


class LineBlock:
    """Consecutive lines of one dyno (one pipe read): one time, one source, one object for
    all of them, so that a burst costs a few Python objects per read and not per line. The
    hub keeps, offers and formats blocks as a whole (`format_text`, `format_json`); a reader
    that wants LogLine objects gets them one by one (`line`, `lines`)."""

    __slots__ = ("_cost", "app", "at", "dyno", "dyno_id", "source", "texts")

    def __init__(self, at: datetime, source: LogSource, dyno: str, app: str, texts: list[str],
                 dyno_id: str = "") -> None:
        self.at = at
        self.source = source
        self.dyno = dyno
        self.app = app
        self.texts = texts
        self.dyno_id = dyno_id
        self._cost = -1

    @property
    def cost(self) -> int:
        """What its lines cost in a follower's queue: text plus LINE_OVERHEAD_BYTES each."""
        if self._cost < 0:
            self._cost = sum(map(len, self.texts)) + LINE_OVERHEAD_BYTES * len(self.texts)
        return self._cost

    @classmethod
    def of(cls, line: LogLine) -> LineBlock:
        return cls(line.at, line.source, line.dyno, line.app, [line.text], line.dyno_id)

    def __len__(self) -> int:
        return len(self.texts)

    def line(self, index: int) -> LogLine:
        return LogLine(self.at, self.source, self.dyno, self.app, self.texts[index],
                       self.dyno_id)

    def lines(self, start: int = 0) -> list[LogLine]:
        at, source, dyno, app, dyno_id = self.at, self.source, self.dyno, self.app, self.dyno_id
        new = tuple.__new__  # LogLine's own __new__, without its argument handling
        return [new(LogLine, (at, source, dyno, app, text, dyno_id))
                for text in self.texts[start:]]

    def head(self, n: int) -> LineBlock:
        return LineBlock(self.at, self.source, self.dyno, self.app, self.texts[:n],
                         self.dyno_id)

    def matches(self, app: str | None, dyno: str | None) -> bool:
        if app is not None and self.app != app:
            return False
        return dyno is None or dyno in (self.dyno, self.dyno_id)

    def format_text(self) -> str:
        """Every line as `LogLine.format()` gives it, each ending in a newline."""
        prefix = f"{format_timestamp(self.at)} {self.source}[{self.dyno}]: "
        return prefix + ("\n" + prefix).join(self.texts) + "\n"

    def format_json(self) -> str:
        """Every line as the compact JSON of `LogLine.as_dict()`, each ending in a newline."""
        prefix = f"{format_timestamp(self.at)} {self.source}[{self.dyno}]: "
        head = (f'{{"at":{_json_str(format_timestamp(self.at))},"source":'
                f'{_json_str(str(self.source))},"app":{_json_str(self.app)},"dyno":'
                f'{_json_str(self.dyno)},"id":{_json_str(self.dyno_id)},"text":')
        return "".join([f'{head}{_json_str(text)},"line":{_json_str(prefix + text)}}}\n'
                        for text in self.texts])


def _cut(data: bytes, limit: int) -> int:
    """Largest cut point <= limit that does not split a UTF-8 sequence (unless none exists)."""
    cut = limit
    # Continuation bytes are 0b10xxxxxx; back up at most 3 to the lead byte of the character.
    while cut > limit - 3 and cut > 0 and (data[cut] & 0xC0) == 0x80:
        cut -= 1
    return cut if cut > 0 and (data[cut] & 0xC0) != 0x80 else limit


def split_line(line: str | bytes, limit_bytes: int = MAX_LINE_BYTES) -> list[str]:
    """Split one line (its trailing newline removed) into chunks of at most `limit_bytes` bytes.

    Chunks end on a UTF-8 character boundary when the text is UTF-8; bytes that are not valid
    UTF-8 are replaced (U+FFFD) only after cutting, so the byte bound holds on the input.
    """
    if limit_bytes < 4:
        raise LogError(f"line limit must be at least 4 bytes, got {limit_bytes}", limit_bytes)
    data = line.encode("utf-8", "surrogateescape") if isinstance(line, str) else line
    if data.endswith(b"\n"):
        data = data[:-1]
        if data.endswith(b"\r"):
            data = data[:-1]
    chunks: list[str] = []
    while len(data) > limit_bytes:
        cut = _cut(data, limit_bytes)
        chunks.append(data[:cut].decode("utf-8", "replace"))
        data = data[cut:]
    chunks.append(data.decode("utf-8", "replace"))
    return chunks


class LineAssembler:
    """Turns a byte stream (a dyno's pipe) into lines, holding at most `limit_bytes` of a
    partial line: a process that prints without newlines still has its output delivered."""

    def __init__(self, limit_bytes: int = MAX_LINE_BYTES) -> None:
        if limit_bytes < 4:
            raise LogError(f"line limit must be at least 4 bytes, got {limit_bytes}",
                           limit_bytes)
        self._limit = limit_bytes
        self._partial = bytearray()

    @property
    def pending_bytes(self) -> int:
        return len(self._partial)

    def feed(self, chunk: bytes) -> list[str]:
        """Add bytes read from the pipe; return the lines completed (or cut) so far."""
        self._partial += chunk
        lines: list[str] = []
        start = 0
        buf = self._partial
        while True:
            newline = buf.find(b"\n", start)
            if newline < 0:
                break
            # Keep the newline: split_line drops it with a CR before it.
            lines.extend(split_line(bytes(buf[start:newline + 1]), self._limit))
            start = newline + 1
        rest = bytes(buf[start:])
        while len(rest) > self._limit:
            cut = _cut(rest, self._limit)
            lines.append(rest[:cut].decode("utf-8", "replace"))
            rest = rest[cut:]
        self._partial = bytearray(rest)
        return lines

    def flush(self) -> list[str]:
        """End of stream: the unterminated tail, if any, becomes a line."""
        if not self._partial:
            return []
        rest, self._partial = bytes(self._partial), bytearray()
        return split_line(rest, self._limit)


class LogBuffer:
    """The last `capacity` lines of one app (Heroku's `heroku logs` history), kept as the
    blocks they were published in: LogLine objects are made only when someone reads them."""

    def __init__(self, capacity: int = TAIL_LINES) -> None:
        if capacity < 1:
            raise LogError(f"buffer capacity must be positive, got {capacity}", capacity)
        self._capacity = capacity
        # [seq of the block's first line, block, index of its first line still kept]
        self._runs: deque[list[Any]] = deque()
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def append(self, line: LogLine, seq: int = 0) -> None:
        """`seq` orders lines across apps when several buffers are merged (see LogHub)."""
        self.append_block(LineBlock.of(line), seq)

    def append_block(self, block: LineBlock, seq: int = 0) -> None:
        """The block's lines, numbered from `seq` on."""
        n = len(block)
        start = max(0, n - self._capacity)
        self._runs.append([seq, block, start])
        self._len += n - start
        over = self._len - self._capacity
        while over > 0:
            run = self._runs[0]
            kept = len(run[1]) - run[2]
            if kept <= over:
                self._runs.popleft()
                self._len -= kept
                over -= kept
            else:
                run[2] += over
                self._len -= over
                over = 0

    def entries(self) -> Iterator[tuple[int, LogLine]]:
        for seq, block, start in list(self._runs):
            for index in range(start, len(block)):
                yield seq + index, block.line(index)

    def tail(self, n: int | None = None, dyno: str | None = None) -> list[LogLine]:
        """The last `n` lines (all when None), oldest first, optionally of one dyno."""
        lines = [line for seq, block, start in self._runs if block.matches(None, dyno)
                 for line in block.lines(start)]
        if n is None:
            return lines
        return lines[-n:] if n > 0 else []


class LineSink(Protocol):
    """What a LogHub offers the lines of `app` (and `dyno`) to: a Follower, or another reader
    with a bound of its own (the coordinator's log feed). `offer` never blocks and says
    whether the line was kept; `close` ends it (the hub's own close calls it)."""

    @property
    def app(self) -> str | None: ...

    @property
    def dyno(self) -> str | None: ...

    def offer(self, line: LogLine) -> bool: ...

    def close(self) -> None: ...


class Follower:
    """A bounded subscription to a LogHub, consumed with `async for line in follower`.

    When it falls behind, lines that do not fit are dropped and counted; once it has read what
    it had, it receives one `Error L10 (output buffer overflow): N messages dropped` line.
    """

    def __init__(self, hub: LogHub, app: str | None, dyno: str | None, max_queue: int,
                 clock: Callable[[], datetime],
                 max_bytes: int = DEFAULT_FOLLOWER_QUEUE_BYTES) -> None:
        if max_queue < 1 or max_bytes < 1:
            raise LogError(f"follower queue must hold at least one line, got {max_queue}",
                           max_queue)
        self.app = app
        self.dyno = dyno
        self.max_queue = max_queue
        self.max_bytes = max_bytes
        self._bytes = 0  # what the queued lines cost (see LINE_OVERHEAD_BYTES)
        self.dropped = 0  # lines lost by this follower since it subscribed
        self._hub = hub
        self._clock = clock
        self._queue: deque[LogLine | LineBlock] = deque()
        self._lines = 0  # lines in the queue (a block counts its lines)
        self._gap = 0  # dropped since the last L10 this follower was given
        self._wakeup = asyncio.Event()
        self._closed = False

    @property
    def queued(self) -> int:
        return self._lines

    @property
    def closed(self) -> bool:
        return self._closed

    def offer(self, line: LogLine) -> bool:
        """Called by the hub; never blocks. Returns whether the line was kept."""
        if self._closed:
            return False
        if self._lines >= self.max_queue or self._bytes >= self.max_bytes:
            self._gap += 1
            self.dropped += 1
            self._hub.follower_dropped += 1
            return False
        if self._gap:
            self._push_l10()
        self._queue.append(line)
        self._lines += 1
        self._bytes += len(line.text) + LINE_OVERHEAD_BYTES
        self._wakeup.set()
        return True

    def offer_block(self, block: LineBlock) -> int:
        """`offer` for each line of the block in turn, at once; returns how many were kept
        (a head of the block: once one line does not fit, the following ones do not either)."""
        if self._closed:
            return 0
        n = len(block)
        gap = 1 if self._gap else 0
        if (self._lines + gap + n <= self.max_queue
                and self._bytes + gap * 256 + block.cost <= self.max_bytes):
            kept = n  # all of it fits, an L10 line in front included
            if gap:
                self._push_l10()
            self._bytes += block.cost
        else:
            # Near a bound: line by line, exactly as `offer` would.
            kept = 0
            for text in block.texts:
                if self._lines >= self.max_queue or self._bytes >= self.max_bytes:
                    break
                if self._gap:
                    self._push_l10()
                kept += 1
                self._lines += 1
                self._bytes += len(text) + LINE_OVERHEAD_BYTES
            self._lines -= kept  # added below with the block
            if kept < n:
                self._gap += n - kept
                self.dropped += n - kept
                self._hub.follower_dropped += n - kept
        if kept:
            self._queue.append(block if kept == n else block.head(kept))
            self._lines += kept
            self._wakeup.set()
        return kept

    def _push_l10(self) -> None:
        # The gap lies before the line about to be queued: report it here, so the L10 line
        # sits where the lines went missing. It may take the queue one over its bounds, once
        # per gap.
        line = self._l10()
        self._queue.append(line)
        self._lines += 1
        self._bytes += len(line.text) + LINE_OVERHEAD_BYTES

    def _preload(self, lines: Iterable[LogLine]) -> None:
        for line in lines:
            self._queue.append(line)
            self._lines += 1
            self._bytes += len(line.text) + LINE_OVERHEAD_BYTES
        self._wakeup.set()

    def _l10(self) -> LogLine:
        gap, self._gap = self._gap, 0
        return LogLine.agent(self._clock(), self.app or "", "logs", l10_buffer_overflow(gap))

    def close(self) -> None:
        """Stop following: iteration ends at once and the hub forgets this follower."""
        if not self._closed:
            self._closed = True
            self._queue.clear()
            self._lines = self._bytes = 0
            self._wakeup.set()
            self._hub._forget(self)

    def get_nowait(self) -> LogLine | None:
        """The next line if one is ready (including a due L10 line), else None."""
        if self._queue:
            item = self._queue.popleft()
            if isinstance(item, LineBlock):
                lines = item.lines()
                self._queue.extendleft(reversed(lines[1:]))
                item = lines[0]
            self._lines -= 1
            self._bytes -= len(item.text) + LINE_OVERHEAD_BYTES
            return item
        if self._gap and not self._closed:
            return self._l10()
        return None

    def take_nowait(self, max_lines: int) -> list[LogLine | LineBlock]:
        """What is ready, in order, lines and whole blocks (a due L10 line included): at
        least one item when any is ready, then items while they add up to `max_lines`."""
        out: list[LogLine | LineBlock] = []
        taken = cost = 0
        queue = self._queue
        while queue:
            item = queue[0]
            if isinstance(item, LineBlock):
                size, item_cost = len(item), item.cost
            else:
                size, item_cost = 1, len(item.text) + LINE_OVERHEAD_BYTES
            if out and taken + size > max_lines:
                break
            queue.popleft()
            out.append(item)
            taken += size
            cost += item_cost
        self._lines -= taken
        self._bytes -= cost
        if not queue and self._gap and not self._closed:
            out.append(self._l10())
        return out

    async def batch(self, max_lines: int) -> list[LogLine | LineBlock]:
        """`take_nowait`, waiting for something to be ready; empty once closed."""
        while not self._closed:
            items = self.take_nowait(max_lines)
            if items:
                return items
            self._wakeup.clear()
            await self._wakeup.wait()
        return []

    def __aiter__(self) -> Follower:
        return self

    async def __anext__(self) -> LogLine:
        while True:
            if self._closed:
                raise StopAsyncIteration
            line = self.get_nowait()
            if line is not None:
                return line
            self._wakeup.clear()
            await self._wakeup.wait()

    def __enter__(self) -> Follower:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _utc_now() -> datetime:
    return datetime.now(UTC)


class LogHub:
    """Keeps each app's tail and fans published lines out to followers.

    `publish` never blocks and never raises for a slow or gone follower: it is called from the
    code that reads dynos' pipes, and a dyno must never stall because someone reads slowly.
    Must be used from one event loop thread.
    """

    def __init__(self, *, tail_lines: int = TAIL_LINES,
                 max_line_bytes: int = MAX_LINE_BYTES,
                 clock: Callable[[], datetime] = _utc_now) -> None:
        if tail_lines < 1:
            raise LogError(f"tail must keep at least one line, got {tail_lines}", tail_lines)
        self._tail_lines = tail_lines
        self._max_line_bytes = max_line_bytes
        self._clock = clock
        self._buffers: dict[str, LogBuffer] = {}
        self._followers: set[LineSink] = set()
        self._seq = 0  # numbers every line kept in a tail, across apps
        # Each app's tail on disk too (set by the daemon; tests and one-shot tools run
        # without), and per held process the number of the next output line kept there when
        # the agent started: lines the holder sends a new agent again are published once.
        self._store: TailStore | None = None
        self._output_next: dict[tuple[str, int], int] = {}
        self.published = 0
        self.dropped = 0  # lines lost by all followers and other sinks together
        self.follower_dropped = 0  # of those, lines lost by Followers (`subscribe`)

    @property
    def followers(self) -> int:
        return len(self._followers)

    def keep_on_disk(self, store: TailStore) -> None:
        """Load the tails `store` kept (from before an agent restart) and keep new lines
        there too. Call before anything is published."""
        loaded = store.load()
        # Each app's lines in the order they were published; apps interleaved by time.
        entries = heapq.merge(*([(kept.line.at, app, kept) for kept in lines]
                                for app, lines in loaded.items()), key=lambda entry: entry[0])
        for _at, app, kept in entries:
            buffer = self._buffers.get(app)
            if buffer is None:
                buffer = self._buffers[app] = LogBuffer(self._tail_lines)
            buffer.append(kept.line, self._seq)
            self._seq += 1
            if kept.origin is not None:
                dyno_id, pid, seq = kept.origin
                key = (dyno_id, pid)
                self._output_next[key] = max(self._output_next.get(key, 0), seq + 1)
        self._store = store

    def flush(self) -> None:
        """Write the lines published so far to disk now (before the holder's ack of them)."""
        if self._store is not None:
            self._store.flush()

    def output_seen(self, dyno_id: str, pid: int) -> int:
        """How far the tail kept from before this agent has the held process's output: the
        number of its first line not kept (0 when none is)."""
        return self._output_next.get((dyno_id, pid), 0)

    def forget_output(self, dyno_id: str, pid: int) -> None:
        """The process is gone and released: its numbering is no longer needed."""
        self._output_next.pop((dyno_id, pid), None)

    def publish(self, line: LogLine, origin: Origin | None = None) -> None:
        """Add a line to its app's tail and offer it to every matching follower. `origin`
        (dyno id, pid, the holder's line number) of an app output line is kept with it on
        disk, for `output_seen` after an agent restart (the caller skips what it has seen)."""
        # Cheap pre-check: a str of n characters is at most 4n bytes in UTF-8.
        if len(line.text) * 4 > self._max_line_bytes and \
                len(line.text.encode("utf-8", "surrogateescape")) > self._max_line_bytes:
            for text in split_line(line.text, self._max_line_bytes):
                self._publish_one(LogLine(line.at, line.source, line.dyno, line.app, text,
                                          line.dyno_id), origin)
        else:
            self._publish_one(line, origin)

    def _publish_one(self, line: LogLine, origin: Origin | None = None) -> None:
        if self._store is not None:
            # Before any follower or the holder's ack: a line acknowledged is on disk.
            self._store.append(line, origin)
        buffer = self._buffers.get(line.app)
        if buffer is None:
            buffer = self._buffers[line.app] = LogBuffer(self._tail_lines)
        buffer.append(line, self._seq)
        self._seq += 1
        self.published += 1
        for follower in self._followers:
            if line.matches(follower.app, follower.dyno) and not follower.offer(line):
                self.dropped += 1

    def publish_block(self, block: LineBlock, origin: Origin | None = None) -> None:
        """`publish` each line of `block` in order, at the cost of a few objects for the
        block; `origin` is that of its first line (the next lines number on from it). Sinks
        with an `offer_block` get the block whole, others line by line."""
        texts = block.texts
        if not texts:
            return
        limit = self._max_line_bytes
        if sum(map(len, texts)) * 4 > limit and max(map(len, texts)) * 4 > limit and any(
                len(text.encode("utf-8", "surrogateescape")) > limit for text in texts):
            # A line to split (rare): line by line, each split as `publish` splits it.
            for number, line in enumerate(block.lines()):
                self.publish(line, None if origin is None else
                             (origin[0], origin[1], origin[2] + number))
            return
        if self._store is not None:
            self._store.append_block(block, origin)
        buffer = self._buffers.get(block.app)
        if buffer is None:
            buffer = self._buffers[block.app] = LogBuffer(self._tail_lines)
        n = len(texts)
        buffer.append_block(block, self._seq)
        self._seq += n
        self.published += n
        for follower in self._followers:
            if not block.matches(follower.app, follower.dyno):
                continue
            offer_block = getattr(follower, "offer_block", None)
            if offer_block is not None:
                self.dropped += n - offer_block(block)
            else:
                for line in block.lines():
                    if not follower.offer(line):
                        self.dropped += 1

    def tail(self, app: str | None = None, dyno: str | None = None,
             n: int | None = None) -> list[LogLine]:
        """The last `n` lines kept (all kept when None), oldest first, across apps when
        `app` is None."""
        if app is not None:
            buffer = self._buffers.get(app)
            return [] if buffer is None else buffer.tail(n, dyno)
        merged = heapq.merge(*(b.entries() for b in self._buffers.values()),
                             key=lambda entry: entry[0])
        lines = [line for _, line in merged if line.matches(None, dyno)]
        if n is None:
            return lines
        return lines[-n:] if n > 0 else []

    def subscribe(self, app: str | None = None, dyno: str | None = None, tail: int = 0,
                  max_queue: int = DEFAULT_FOLLOWER_QUEUE,
                  max_bytes: int = DEFAULT_FOLLOWER_QUEUE_BYTES) -> Follower:
        """A follower that first yields the last `tail` matching lines, then new ones."""
        follower = Follower(self, app, dyno, max_queue, self._clock, max_bytes)
        if tail > 0:
            follower._preload(self.tail(app, dyno, tail))
        self._followers.add(follower)
        return follower

    def attach(self, sink: LineSink) -> None:
        """Offer new lines to `sink` too, until `detach` (or the hub's close)."""
        self._followers.add(sink)

    def detach(self, sink: LineSink) -> None:
        self._followers.discard(sink)

    def forget_app(self, app: str) -> None:
        """Drop an app's tail (the app is gone from this host), on disk too."""
        self._buffers.pop(app, None)
        if self._store is not None:
            self._store.remove(app)

    def sweep_tails(self, live_apps: Iterable[str], now: float) -> list[str]:
        """Remove the tails of apps with no dyno here that are old or over the cap (see
        agent.observability.logtail); returns those apps."""
        if self._store is None:
            return []
        gone = self._store.to_remove(set(live_apps), now)
        for app in gone:
            self.forget_app(app)
        return gone

    def close(self) -> None:
        """End every follower (agent shutdown)."""
        for follower in list(self._followers):
            follower.close()
        if self._store is not None:
            self._store.close()

    def _forget(self, follower: Follower) -> None:
        self.detach(follower)
