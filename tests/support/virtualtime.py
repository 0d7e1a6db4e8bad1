"""An asyncio event loop on virtual time, for unit tests: whenever the loop would sleep in
select() with nothing ready, it moves its clock to the next timer at once instead.

`asyncio.sleep(600)`, `asyncio.timeout(...)` and `call_later` therefore return immediately in
real time, in the order their virtual deadlines give. A file descriptor that is ready is still
seen: the loop polls its fds (without blocking) before it moves the clock. Work handed to the
loop's executor (`run_in_executor`, `asyncio.to_thread`) is waited for in real time: while any
is under way, the clock stands still.

The limit: work done in other threads (started with `threading`, or in an executor the loop
does not know of) is not waited for. While it runs and a timer is pending, the loop jumps to
the timer, so a deadline may pass in virtual time before the thread is done. Only with no timer
pending does the loop block for real, until the thread wakes it (an fd, or
`call_soon_threadsafe`). Code under test that works so should be driven on a real loop.
Likewise the clock stands still while any callback is ready: a task that yields with
`asyncio.sleep(0)` forever stops time (give it a virtual pause instead).
"""

from __future__ import annotations

import asyncio
import selectors
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from typing import Any, TypeVar, TypeVarTuple

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

# The wall-clock time of virtual time 0: 2026-11-26T10:00:00Z.
EPOCH_S = 1_795_687_200.0
# The loop runs timers due within its clock's resolution (asyncio's `_clock_resolution`).
_RESOLUTION_S = time.get_clock_info("monotonic").resolution


class _SkippingSelector(selectors.DefaultSelector):
    """The platform's selector, except that a wait with a timeout in which nothing is ready
    advances `now` by the timeout instead of sleeping, and first wakes the `settled` waiters
    if the loop ran anything since it last woke them."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.settled: list[asyncio.Future[None]] = []
        self._ran = True  # callbacks ran since the settled waiters were last woken
        self.in_executor = 0  # calls the loop handed to an executor, not yet back

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is not None and timeout <= 0:
            self._ran = True  # asyncio polls without waiting only when callbacks are ready
            return super().select(0)
        ready = super().select(0)
        if ready:
            self._ran = True
            return ready
        if timeout is not None and timeout < _RESOLUTION_S:
            # asyncio runs a timer this close as if it were due: time must reach it, or code
            # that checks the clock against its own deadline waits again at once, forever.
            self.now += timeout
            self._ran = True
            return []
        if self.in_executor:
            # A thread is working for the loop: wait for real until it reports back (through
            # the loop's self-pipe) or an fd is ready; the clock stands still meanwhile.
            self._ran = True
            return super().select(None)
        if self.settled and self._ran:
            # Nothing is left to run at this instant: the waiters' turn, before time moves.
            self._ran = False
            waiters, self.settled = self.settled, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
            return []
        if timeout is None:
            # No timer pending: only an fd or another thread can wake the loop; block for real.
            return super().select(None)
        self.now += timeout
        self._ran = True  # the timers now due are about to run
        return []


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """A selector event loop whose `time()` is virtual, starting at 0.0."""

    def __init__(self) -> None:
        self._skipping = _SkippingSelector()
        super().__init__(self._skipping)

    def time(self) -> float:
        return self._skipping.now

    def run_in_executor(self, executor: Executor | None, func: Callable[[*Ts], T],
                        *args: *Ts) -> asyncio.Future[T]:
        future = super().run_in_executor(executor, func, *args)
        self._skipping.in_executor += 1
        future.add_done_callback(self._back_from_executor)
        return future

    def _back_from_executor(self, _future: asyncio.Future[Any]) -> None:
        self._skipping.in_executor -= 1

    async def settled(self) -> None:
        """Return once the loop has run everything it can at the current instant; if it had
        already done so when last asked, at the next instant it moves to, once it has run
        everything there."""
        waiter = self.create_future()
        self._skipping.settled.append(waiter)
        await waiter


async def until(predicate: Callable[[], object], timeout_s: float, what: str = "condition",
                poll_s: float = 0.005) -> None:
    """Wait until `predicate()` is true; TimeoutError after `timeout_s` of the loop's time.

    On the virtual-time loop the predicate is checked each time the loop has settled at an
    instant, so no instant the loop stops at is missed and none is added (a 20-minute wait
    costs as many checks as there are instants in it). On another loop it is polled every
    `poll_s`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    if not isinstance(loop, VirtualTimeLoop):
        while not predicate():
            if loop.time() > deadline:
                raise TimeoutError(f"{what} not met within {timeout_s}s")
            await asyncio.sleep(poll_s)
        return
    # A timer at the deadline, so that the clock gets there even if nothing else is pending.
    alarm = loop.call_at(deadline, lambda: None)
    try:
        while not predicate():
            if loop.time() >= deadline:
                raise TimeoutError(f"{what} not met within {timeout_s}s")
            await loop.settled()
    finally:
        alarm.cancel()


class VirtualClock:
    """The clocks code under test reads (`monotonic()`, `wall()`), both following the running
    virtual-time loop: monotonic is the loop's time, wall is `EPOCH_S` plus it."""

    def monotonic(self) -> float:
        return asyncio.get_running_loop().time()

    def wall(self) -> float:
        return EPOCH_S + asyncio.get_running_loop().time()


def run_virtual(main: Callable[[], Awaitable[T]]) -> T:
    """Run `main()` to completion on a new virtual-time loop; tasks it leaves are cancelled
    and the loop closed, as `asyncio.run` does."""

    async def wrapped() -> T:
        return await main()

    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        return runner.run(wrapped())
