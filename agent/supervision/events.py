"""The agent's state-change event stream: a bounded, never-blocking broadcast of JSON-able dicts.

Subscribers that fall behind lose the oldest events and are told how many with a
`{"dropped": N}` entry; the publisher never waits for anyone.
"""

from __future__ import annotations

import asyncio
from collections import deque
from types import TracebackType
from typing import Any

DEFAULT_QUEUE = 10_000


class EventFollower:
    def __init__(self, bus: EventBus, max_queue: int) -> None:
        self._bus = bus
        self._queue: deque[dict[str, Any]] = deque(maxlen=max_queue)
        self._dropped = 0
        self._wakeup = asyncio.Event()
        self._closed = False

    def offer(self, event: dict[str, Any]) -> None:
        if self._closed:
            return
        if len(self._queue) == self._queue.maxlen:
            self._dropped += 1
        self._queue.append(event)
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

    async def __anext__(self) -> dict[str, Any]:
        while True:
            if self._closed:
                raise StopAsyncIteration
            if self._dropped:
                dropped, self._dropped = self._dropped, 0
                return {"dropped": dropped}
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

    def publish(self, event: dict[str, Any]) -> None:
        for follower in list(self._followers):
            follower.offer(event)

    def subscribe(self, max_queue: int = DEFAULT_QUEUE) -> EventFollower:
        follower = EventFollower(self, max_queue)
        self._followers.add(follower)
        return follower

    def close(self) -> None:
        for follower in list(self._followers):
            follower.close()
