"""Log lines for the coordinator (docs/protocol.md §4 `logs.tail`, `logs.follow`; §5 `log.line`,
`log.lost`): the tail as the protocol carries it, and each connection's subscriptions with the
one bounded queue their lines share and the task that sends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from agent import errors
from agent.coordinator.frames import Busy, Event, Frame
from agent.observability.logs import LogHub, LogLine, format_timestamp

log = logging.getLogger(__name__)

MAX_SUBSCRIPTIONS: Final = 64  # per connection (docs/protocol.md §8)
# Lines waiting to be sent, all subscriptions of a connection together. A coordinator that
# reads slower than dynos print loses lines (counted in `log.lost`), the agent no memory.
QUEUE_LINES: Final = 10_000

Send = Callable[[Frame], Awaitable[None]]


def wire_line(line: LogLine) -> dict[str, str]:
    """A line as the protocol carries it: the operator API's `format=json` object."""
    return line.as_dict()


def _utc_now() -> datetime:
    return datetime.now(UTC)


class _Subscription:
    """One `logs.follow`: the hub's sink for the new lines of one app (and dyno)."""

    def __init__(self, number: int, app: str, dyno: str | None, stream: _Stream) -> None:
        self.number = number
        self.app = app
        self.dyno = dyno
        self.lost = 0  # lines dropped since the last `log.lost` of this subscription
        self._stream = stream

    def offer(self, line: LogLine) -> bool:
        return self._stream.offer(self, line)

    def close(self) -> None:
        self._stream.unfollow(self.number)


@dataclass(frozen=True, slots=True)
class _Lost:
    """Where a subscription's lines went missing, queued before its next line."""

    subscription: int
    count: int


class _Stream:
    """One connection's subscriptions and their queue. `offer` (called by the hub as dynos
    print) never blocks: a line that does not fit is dropped and counted, and the count is
    sent as one `log.lost` where the lines went missing."""

    def __init__(self, hub: LogHub, send: Send, max_subscriptions: int, max_queue: int,
                 clock: Callable[[], datetime]) -> None:
        self.hub = hub
        self.send = send
        self.max_subscriptions = max_subscriptions
        self.max_queue = max_queue
        self.clock = clock
        self.subscriptions: dict[int, _Subscription] = {}
        self.dropped = 0
        self._numbers = itertools.count(1)
        self._queue: deque[tuple[int, LogLine] | _Lost] = deque()
        self._ready = asyncio.Event()

    @property
    def queued(self) -> int:
        return len(self._queue)

    def follow(self, app: str, dyno: str | None, tail: int) -> int:
        if len(self.subscriptions) >= self.max_subscriptions:
            raise Busy(f"this connection follows {self.max_subscriptions} log streams "
                       f"already; unfollow one first")
        subscription = _Subscription(next(self._numbers), app, dyno, self)
        self.subscriptions[subscription.number] = subscription
        # The tail and then every new line, with nothing published in between lost.
        for line in self.hub.tail(app, dyno, tail) if tail > 0 else ():
            self.offer(subscription, line)
        self.hub.attach(subscription)
        return subscription.number

    def unfollow(self, number: int) -> bool:
        """End a subscription; its lines still queued are not sent."""
        subscription = self.subscriptions.pop(number, None)
        if subscription is None:
            return False
        self.hub.detach(subscription)
        return True

    def offer(self, subscription: _Subscription, line: LogLine) -> bool:
        if len(self._queue) >= self.max_queue:
            subscription.lost += 1
            self.dropped += 1
            return False
        if subscription.lost:
            # May take the queue one over its bound, once per gap.
            self._queue.append(_Lost(subscription.number, subscription.lost))
            subscription.lost = 0
        self._queue.append((subscription.number, line))
        self._ready.set()
        return True

    def close(self) -> None:
        for number in list(self.subscriptions):
            self.unfollow(number)
        self._queue.clear()

    def _lost_event(self, number: int, count: int) -> Event:
        return Event("log.lost", {"subscription": number, "count": count,
                                  "at": format_timestamp(self.clock())})

    def _next_event(self) -> Event | None:
        while self._queue:
            item = self._queue.popleft()
            if isinstance(item, _Lost):
                if item.subscription in self.subscriptions:
                    return self._lost_event(item.subscription, item.count)
            elif item[0] in self.subscriptions:
                return Event("log.line", {"subscription": item[0], **wire_line(item[1])})
        # Caught up: losses with no line after them yet are reported now.
        for subscription in self.subscriptions.values():
            if subscription.lost:
                count, subscription.lost = subscription.lost, 0
                return self._lost_event(subscription.number, count)
        return None

    async def run(self) -> None:
        """Send what is queued, in order, until the connection ends (the task's root)."""
        try:
            while True:
                event = self._next_event()
                if event is None:
                    self._ready.clear()
                    await self._ready.wait()
                    continue
                try:
                    await self.send(event)
                except TimeoutError:
                    # The frame is in the socket's buffer: the link's own sends time out too
                    # and end the connection if the coordinator does not read again.
                    continue
        except ConnectionError as exc:
            log.debug("log feed ended: %s", exc)
        except Exception:
            log.exception("log feed failed")


class LogFeed:
    """The agent's log lines as the coordinator asks for them: `tail` at any time, `follow`
    and `unfollow` on the current connection, whose scope (`connection`, entered by the link
    for each connection) they live and die with."""

    def __init__(self, hub: LogHub, *, max_subscriptions: int = MAX_SUBSCRIPTIONS,
                 max_queue: int = QUEUE_LINES, clock: Callable[[], datetime] = _utc_now
                 ) -> None:
        self.hub = hub
        self.max_subscriptions = max_subscriptions
        self.max_queue = max_queue
        self.clock = clock
        self._stream: _Stream | None = None

    def tail(self, app: str, dyno: str | None, n: int) -> list[dict[str, str]]:
        """The last `n` lines kept, sorted by time so that a coordinator can merge hosts:
        the hub keeps them as they came, and a dyno's output, stamped when the holder read
        it, may come after the agent's own message of a moment later."""
        lines = self.hub.tail(app, dyno, n)
        lines.sort(key=lambda line: line.at)  # stable: lines of one time keep their order
        return [wire_line(line) for line in lines]

    def follow(self, app: str, dyno: str | None, tail: int = 0) -> int:
        return self._current().follow(app, dyno, tail)

    def unfollow(self, subscription: int) -> bool:
        return self._current().unfollow(subscription)

    @property
    def queued(self) -> int:
        """Lines (and loss reports) waiting to be sent on the current connection."""
        return 0 if self._stream is None else self._stream.queued

    def _current(self) -> _Stream:
        if self._stream is None:
            raise errors.NotReady("no coordinator connection")
        return self._stream

    @contextlib.asynccontextmanager
    async def connection(self, send: Send) -> AsyncIterator[None]:
        """One connection's scope: its subscriptions end, and what they queued is dropped,
        when it ends."""
        stream = _Stream(self.hub, send, self.max_subscriptions, self.max_queue, self.clock)
        self._stream = stream
        task = asyncio.create_task(stream.run(), name="coordinator-log-feed")
        try:
            yield
        finally:
            if self._stream is stream:
                self._stream = None
            stream.close()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
