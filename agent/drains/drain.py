"""One drain: the bounded queue of frames between the log hub and a receiver, its counters,
its spool on disk and the task that delivers it with retries and backoff.

`offer` (called by the hub as dynos print) never blocks: a frame that does not fit is dropped
and counted; once there is room again, the drain itself carries Heroku's `Error L10 (output
buffer overflow): N messages dropped since T` before the next line (newest lines are the ones
dropped: the queue is an append-only spool on disk). Counters: `emitted` (offered, including
frames restored from the spool at start) == `delivered` + `dropped` + `queued`.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Final, Protocol

from agent.drains.rfc5424 import Formatter, l10_text
from agent.drains.spool import Spool
from agent.drainurl import DrainUrl
from agent.observability.logs import LogLine, LogSource

log = logging.getLogger(__name__)

# Lines a drain holds for its receiver (Heroku's Logplex: 1024; a dyno's pipe read here
# publishes thousands at once, so more, still bounded: ~100 bytes a frame).
DEFAULT_CAPACITY: Final = 50_000
BACKOFF_FIRST_S: Final = 0.5
BACKOFF_MAX_S: Final = 30.0


class Block(Protocol):
    """Consecutive lines of one dyno read at once (the hub's LineBlock, where it has one)."""

    at: datetime
    source: LogSource
    dyno: str
    app: str
    texts: list[str]


class DeliveryError(Exception):
    """A receiver did not take a batch (refused, gone, 5xx, stalled); the drain retries."""


class Notice(bytes):
    """A frame of the drain's own (L10): not one of the lines counted."""

    __slots__ = ()


class Sender(Protocol):
    async def deliver(self, drain: Drain) -> None:
        """Send what `drain` has until it is empty; raise on a failure."""

    def failed(self, drain: Drain) -> None:
        """After a failure: what was taken and not confirmed is to be sent again."""

    async def aclose(self) -> None: ...


def backoff_s(attempt: int, first_s: float = BACKOFF_FIRST_S, max_s: float = BACKOFF_MAX_S,
              rand: Callable[[], float] = random.random) -> float:
    """Exponential, with jitter of up to half: 0.5, 1, 2, … up to max_s."""
    base = min(max_s, first_s * 2.0 ** min(attempt, 30))
    return float(base * (0.5 + rand() / 2))


def _utc_now() -> datetime:
    return datetime.now(UTC)


class Drain:
    def __init__(self, url: DrainUrl, app: str | None, sender: Sender, *,
                 spool: Spool | None = None, capacity: int = DEFAULT_CAPACITY,
                 clock: Callable[[], datetime] = _utc_now,
                 backoff_first_s: float = BACKOFF_FIRST_S,
                 backoff_max_s: float = BACKOFF_MAX_S) -> None:
        self.url = url
        self.app = app  # None: every app's lines (a host-wide drain from the config)
        self.dyno: str | None = None  # the hub's filter: every dyno
        self.token = url.token(app)
        self.sender = sender
        self.spool = spool
        self.capacity = capacity
        self.clock = clock
        self.backoff_first_s = backoff_first_s
        self.backoff_max_s = backoff_max_s
        self.formatter = Formatter()
        self.emitted = 0
        self.delivered = 0
        self.dropped = 0
        self.retries = 0
        self.retiring = False  # no longer wanted: ends once empty
        self._queue: deque[bytes] = deque()  # not yet taken by the sender
        self._inflight: deque[bytes] = deque()  # taken, not yet confirmed
        self._unspooled: list[bytes] = []
        self._flush_soon = False
        self._gap = 0  # dropped since the last L10
        self._gap_since: datetime | None = None
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def queued(self) -> int:
        return len(self._queue) + len(self._inflight)

    @property
    def label(self) -> dict[str, str]:
        return {"drain": self.token, "app": self.app or "*", "url": self.url.redacted}

    # -- the hub's side ---------------------------------------------------------------------
    def offer(self, line: LogLine) -> bool:
        self.emitted += 1
        if self._closed or len(self._queue) + len(self._inflight) >= self.capacity:
            self._drop(1)
            return False
        if self._gap:
            self._put(Notice(self._l10()))
        self._put(self.formatter.frame(line))
        return True

    def offer_block(self, block: Block) -> int:
        """`offer` for each line of `block` at once; returns how many were kept (a head of
        the block: once one line does not fit, the following ones do not either)."""
        texts = block.texts
        n = len(texts)
        self.emitted += n
        room = 0 if self._closed else self.capacity - len(self._queue) - len(self._inflight)
        kept = max(0, min(n, room))
        if kept:
            if self._gap:
                self._put(Notice(self._l10()))
            frames = self.formatter.frames(block.at, block.source, block.dyno,
                                           texts if kept == n else texts[:kept])
            self._queue.extend(frames)
            if self.spool is not None:
                self._unspooled.extend(frames)
                if not self._flush_soon:
                    self._flush_soon = True
                    asyncio.get_running_loop().call_soon(self.flush)
            self._ready.set()
        if kept < n:
            self._drop(n - kept)
        return kept

    def restore(self, frames: list[bytes]) -> None:
        """Frames from the spool (an agent before this one): queued again, counted emitted."""
        lines = 0
        for frame in frames:
            if b" heroku logplex - Error L10 " in frame[:120]:
                self._queue.append(Notice(frame))
            else:
                self._queue.append(frame)
                lines += 1
        self.emitted += lines
        if frames:
            self._ready.set()

    def _drop(self, count: int) -> None:
        if not self._gap:
            self._gap_since = self.clock()
        self._gap += count
        self.dropped += count

    def _l10(self) -> bytes:
        since = self._gap_since or self.clock()
        gap, self._gap, self._gap_since = self._gap, 0, None
        return self.formatter.notice(self.clock(), l10_text(gap, since))

    def _put(self, frame: bytes) -> None:
        self._queue.append(frame)
        if self.spool is not None:
            self._unspooled.append(frame)
            if not self._flush_soon:
                self._flush_soon = True
                asyncio.get_running_loop().call_soon(self.flush)
        self._ready.set()

    def flush(self) -> None:
        """Write the frames queued this loop turn to the spool (one write)."""
        self._flush_soon = False
        if self._unspooled and self.spool is not None:
            frames, self._unspooled = self._unspooled, []
            self.spool.append(frames)

    # -- the sender's side ------------------------------------------------------------------
    def take(self, max_frames: int, max_bytes: int) -> list[bytes]:
        """Frames from the head, to be sent (they stay counted as queued until confirmed)."""
        queue = self._queue
        if not queue and self._gap and not self._closed:
            self._put(Notice(self._l10()))  # caught up: report a gap with no line after it
        taken: list[bytes] = []
        size = 0
        while queue and len(taken) < max_frames:
            frame = queue[0]
            if taken and size + len(frame) > max_bytes:
                break
            taken.append(queue.popleft())
            size += len(frame)
        self._inflight.extend(taken)
        return taken

    def confirm(self, count: int) -> None:
        """The first `count` frames taken were delivered."""
        self._settle(count, delivered=True)

    def confirm_bytes(self, nbytes: int) -> int:
        """Frames taken whose bytes all lie within the next `nbytes` were delivered; returns
        the bytes of those frames."""
        used = 0
        count = 0
        for frame in self._inflight:
            if used + len(frame) > nbytes:
                break
            used += len(frame)
            count += 1
        self._settle(count, delivered=True)
        return used

    def discard(self, count: int) -> None:
        """The first `count` frames taken were refused for good (counted dropped, in-band)."""
        lines = self._settle(count, delivered=False)
        if lines:
            self._drop(lines)

    def _settle(self, count: int, delivered: bool) -> int:
        if not count:
            return 0
        inflight = self._inflight
        nbytes = 0
        lines = 0
        for _ in range(count):
            frame = inflight.popleft()
            nbytes += len(frame)
            if type(frame) is not Notice:
                lines += 1
        if delivered:
            self.delivered += lines
        if self.spool is not None:
            if self._unspooled:
                self.flush()
            self.spool.confirm(nbytes)
        return lines

    def unsend(self) -> None:
        """What was taken goes back to the head of the queue, to be sent again."""
        self._queue.extendleft(reversed(self._inflight))
        self._inflight.clear()

    async def wait_ready(self, timeout_s: float | None = None) -> None:
        if self._queue or self._gap or self.retiring:
            return
        self._ready.clear()
        if timeout_s is None:
            await self._ready.wait()
        else:
            try:
                async with asyncio.timeout(timeout_s):
                    await self._ready.wait()
            except TimeoutError:
                pass

    # -- life -------------------------------------------------------------------------------
    def start(self) -> None:
        """Start delivering (again, if a retired drain's task ended and it is wanted again)."""
        if not self._closed and (self._task is None or self._task.done()):
            self._task = asyncio.create_task(self._run(), name=f"drain-{self.token}")

    @property
    def idle(self) -> bool:
        return not self._queue and not self._inflight and not self._gap

    async def _run(self) -> None:
        attempt = 0
        while True:
            if self.retiring and self.idle:
                return
            await self.wait_ready()
            if self.retiring and self.idle:
                return
            try:
                await self.sender.deliver(self)
                attempt = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the task's root: any failure is a retry
                self.retries += 1
                self.sender.failed(self)
                delay = backoff_s(attempt, self.backoff_first_s, self.backoff_max_s)
                attempt += 1
                log.warning("log drain %s (%s): %s; retrying in %.1fs (%d queued)",
                            self.url.redacted, self.token, exc or type(exc).__name__, delay,
                            self.queued)
                await asyncio.sleep(delay)

    def remove_spool(self) -> None:
        """The drain is retired and has sent everything: its directory goes."""
        if self.spool is not None:
            self.spool.remove()
            self.spool = None

    async def aclose(self) -> None:
        """Stop sending; what is queued stays in the spool for the next agent."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.sender.aclose()
        self.flush()
        if self.spool is not None:
            self.spool.close()
            self.spool = None

    @property
    def done(self) -> bool:
        return self._task is not None and self._task.done()
