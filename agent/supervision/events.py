"""The agent's state-change event stream: a bounded, never-blocking broadcast of typed events,
and the one place where an event takes its wire form (`/v1/events`, the coordinator).

Subscribers that fall behind lose the oldest events and are told how many with a `Dropped`
notice (`{"dropped": N}` on the wire); the publisher never waits for anyone.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from types import TracebackType
from typing import assert_never

from agent.observability import logs
from agent.supervision.states import StateChange

DEFAULT_QUEUE = 10_000


@dataclass(frozen=True, slots=True)
class Dropped:
    """This follower fell behind and lost its `count` oldest events."""

    count: int


# What a follower yields: a dyno's state change, or the notice of changes it lost.
BusEvent = StateChange | Dropped
WireEvent = dict[str, str | int | None]


def to_wire(event: BusEvent) -> WireEvent:
    """The JSON object of DESIGN §7 (`at` in RFC 3339, UTC, microseconds), or
    `{"dropped": N}`."""
    if isinstance(event, Dropped):
        return {"dropped": event.count}
    if isinstance(event, StateChange):
        return {
            "id": event.id,
            "app": event.app,
            "name": event.name,
            "state": str(event.state),
            "previous": None if event.previous is None else str(event.previous),
            "reason": str(event.reason),
            "exit_status": event.exit_status,
            "at": logs.format_timestamp(event.at),
        }
    assert_never(event)


def concerns(event: BusEvent, app: str | None) -> bool:
    """Whether a reader of `app`'s events (None: every app's) gets `event`: drop notices
    belong to every reader, a state change only to those of its app."""
    return app is None or isinstance(event, Dropped) or event.app == app


class EventFollower:
    def __init__(self, bus: EventBus, max_queue: int) -> None:
        self._bus = bus
        self._queue: deque[StateChange] = deque(maxlen=max_queue)
        self._dropped = 0
        self._wakeup = asyncio.Event()
        self._closed = False

    def offer(self, change: StateChange) -> None:
        if self._closed:
            return
        if len(self._queue) == self._queue.maxlen:
            self._dropped += 1
        self._queue.append(change)
        self._wakeup.set()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._queue.clear()
            self._wakeup.set()
            self._bus._followers.discard(self)

    @property
    def closed(self) -> bool:
        return self._closed

    def __aiter__(self) -> EventFollower:
        return self

    async def __anext__(self) -> BusEvent:
        while True:
            if self._closed:
                raise StopAsyncIteration
            if self._dropped:
                dropped, self._dropped = self._dropped, 0
                return Dropped(dropped)
            if self._queue:
                return self._queue.popleft()
            self._wakeup.clear()
            await self._wakeup.wait()

    def __enter__(self) -> EventFollower:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class EventBus:
    def __init__(self) -> None:
        self._followers: set[EventFollower] = set()

    def publish(self, change: StateChange) -> None:
        for follower in list(self._followers):
            follower.offer(change)

    def subscribe(self, max_queue: int = DEFAULT_QUEUE) -> EventFollower:
        follower = EventFollower(self, max_queue)
        self._followers.add(follower)
        return follower

    def close(self) -> None:
        for follower in list(self._followers):
            follower.close()
