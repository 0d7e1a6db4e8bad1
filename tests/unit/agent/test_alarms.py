"""agent.supervision.dyno.Alarms: the dynos waiting for the same deadline (samples fall on
the SAMPLE_TICK_S grid) share one timer of the loop, each is woken at its deadline or as soon
as its event is set, and a timer no dyno waits for any more is cancelled."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from agent.supervision.dyno import Alarms, _alarms


class CountingLoop:
    """The running loop, for Alarms, with every timer it asks for kept in `timers`."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.timers: list[asyncio.TimerHandle] = []

    def call_at(self, when: float, callback: Any, *args: Any) -> asyncio.TimerHandle:
        handle = self.loop.call_at(when, callback, *args)
        self.timers.append(handle)
        return handle


def _alarms_on(counting: CountingLoop) -> Alarms:
    return Alarms(cast(asyncio.AbstractEventLoop, counting))


async def test_waits_for_the_same_deadline_share_one_timer() -> None:
    loop = asyncio.get_running_loop()
    counting = CountingLoop()
    timers = counting.timers
    alarms = _alarms_on(counting)
    deadline = loop.time() + 0.05
    events = [asyncio.Event() for _ in range(12)]
    woken: list[float] = []

    async def wait(event: asyncio.Event) -> None:
        await alarms.wait(event, deadline)
        woken.append(loop.time())
    await asyncio.gather(*(wait(event) for event in events))
    assert len(timers) == 1
    assert len(woken) == 12 and min(woken) >= deadline - 0.001
    assert all(event.is_set() for event in events)


async def test_a_wait_ends_when_its_event_is_set_and_the_rest_still_ring() -> None:
    loop = asyncio.get_running_loop()
    counting = CountingLoop()
    timers = counting.timers
    alarms = _alarms_on(counting)
    deadline = loop.time() + 0.2
    early, late = asyncio.Event(), asyncio.Event()
    early_wait = asyncio.ensure_future(alarms.wait(early, deadline))
    late_wait = asyncio.ensure_future(alarms.wait(late, deadline))
    await asyncio.sleep(0.01)
    early.set()
    await asyncio.wait_for(early_wait, 0.05)
    assert loop.time() < deadline and not late_wait.done()
    await late_wait
    assert loop.time() >= deadline - 0.001
    assert len(timers) == 1


async def test_a_timer_no_one_waits_for_is_cancelled() -> None:
    loop = asyncio.get_running_loop()
    counting = CountingLoop()
    timers = counting.timers
    alarms = _alarms_on(counting)
    deadline = loop.time() + 60
    events = [asyncio.Event(), asyncio.Event()]
    waits = [asyncio.ensure_future(alarms.wait(event, deadline)) for event in events]
    await asyncio.sleep(0)
    events[0].set()
    waits[1].cancel()  # a dyno whose supervision is detached
    await asyncio.gather(*waits, return_exceptions=True)
    assert len(timers) == 1 and timers[0].cancelled()
    # A later wait for the same deadline gets a timer of its own again.
    again = asyncio.ensure_future(alarms.wait(asyncio.Event(), deadline))
    await asyncio.sleep(0)
    assert len(timers) == 2 and not timers[1].cancelled()
    again.cancel()
    await asyncio.gather(again, return_exceptions=True)
    assert timers[1].cancelled()


def test_each_loop_has_its_own() -> None:
    async def mine() -> tuple[Alarms, Alarms]:
        return _alarms(), _alarms()

    firsts = []
    for _ in range(2):
        loop = asyncio.new_event_loop()
        try:
            one, two = loop.run_until_complete(mine())
        finally:
            loop.close()
        assert one is two
        firsts.append(one)
    assert firsts[0] is not firsts[1]
