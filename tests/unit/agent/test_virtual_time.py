"""The virtual-time loop of tests/support/virtualtime.py: timers fire in order of their virtual
deadlines, long sleeps and timeouts cost no real time, a real fd is still seen, executor work
is waited for, and `until` sees a condition at the instant it becomes true."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time

import pytest

from tests.support.virtualtime import (
    EPOCH_S,
    VirtualClock,
    VirtualTimeLoop,
    run_virtual,
    until,
)
from tests.unit.agent.conftest import VIRTUAL_TIME


def test_timers_fire_in_the_order_of_their_virtual_deadlines() -> None:
    async def main() -> list[tuple[str, float]]:
        loop = asyncio.get_running_loop()
        fired: list[tuple[str, float]] = []

        async def sleeper(name: str, delay_s: float) -> None:
            await asyncio.sleep(delay_s)
            fired.append((name, loop.time()))

        loop.call_later(90.0, lambda: fired.append(("call_later", loop.time())))
        await asyncio.gather(sleeper("c", 300.0), sleeper("a", 0.5), sleeper("b", 60.0))
        return fired

    assert run_virtual(main) == [("a", 0.5), ("b", 60.0), ("call_later", 90.0), ("c", 300.0)]


def test_an_hour_of_sleep_and_a_timeout_take_no_real_time() -> None:
    async def main() -> tuple[float, bool]:
        await asyncio.sleep(3600)
        timed_out = False
        try:
            async with asyncio.timeout(20 * 60):
                await asyncio.Event().wait()
        except TimeoutError:
            timed_out = True
        return asyncio.get_running_loop().time(), timed_out

    started = time.monotonic()
    assert run_virtual(main) == (3600.0 + 20 * 60, True)
    assert time.monotonic() - started < 1.0


def test_an_fd_that_becomes_readable_later_in_real_time_is_seen() -> None:
    async def main() -> tuple[bytes, float]:
        loop = asyncio.get_running_loop()
        read_fd, write_fd = os.pipe()
        writer = threading.Timer(0.05, os.write, (write_fd, b"ping"))
        try:
            got: asyncio.Future[bytes] = loop.create_future()
            loop.add_reader(read_fd, lambda: got.set_result(os.read(read_fd, 10)))
            writer.start()
            # No timer is pending: the loop blocks in select() for real until the fd is ready.
            data = await got
            return data, loop.time()
        finally:
            writer.join()
            loop.remove_reader(read_fd)
            os.close(read_fd)
            os.close(write_fd)

    assert run_virtual(main) == (b"ping", 0.0)


def test_a_ready_fd_wins_over_a_due_timer() -> None:
    async def main() -> list[str]:
        loop = asyncio.get_running_loop()
        read_fd, write_fd = os.pipe()
        order: list[str] = []
        done = asyncio.Event()
        try:
            def readable() -> None:
                order.append(f"fd at {loop.time()}")
                loop.remove_reader(read_fd)

            def due() -> None:
                order.append(f"timer at {loop.time()}")
                done.set()

            os.write(write_fd, b"x")
            loop.add_reader(read_fd, readable)
            loop.call_later(5.0, due)
            await done.wait()
            return order
        finally:
            os.close(read_fd)
            os.close(write_fd)

    assert run_virtual(main) == ["fd at 0.0", "timer at 5.0"]


def test_work_in_the_loop_s_executor_is_waited_for_in_real_time() -> None:
    async def main() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        loop.call_later(5.0, lambda: None)  # a timer the clock could jump to meanwhile
        started = time.monotonic()
        await asyncio.to_thread(time.sleep, 0.05)
        return loop.time(), time.monotonic() - started

    at, took_s = run_virtual(main)
    assert at == 0.0 and took_s >= 0.05


def test_until_sees_the_instant_a_condition_becomes_true() -> None:
    async def main() -> tuple[float, float, list[float]]:
        loop = asyncio.get_running_loop()
        flags: list[float] = []

        def chain(left: int) -> None:  # callbacks that run on at the same instant
            if left:
                loop.call_soon(chain, left - 1)
            else:
                flags.append(loop.time())

        loop.call_later(1200.0, chain, 50)
        await until(lambda: flags, 1300.0, "the chain's end")
        seen = loop.time()
        with pytest.raises(TimeoutError, match="never not met within 60"):
            await until(lambda: False, 60.0, "never")
        return seen, loop.time(), flags

    assert run_virtual(main) == (1200.0, 1260.0, [1200.0])


def test_a_deadline_within_the_clock_resolution_is_reached_while_until_waits() -> None:
    # asyncio fires a timer due within its clock resolution at once; code that then compares
    # the clock with its own deadline (as supervision does) waits again. Time must move on
    # even while an `until` waits for that code, or both take turns forever.
    async def main() -> float:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(0.3)
        deadline = 0.1 + 0.2  # 0.30000000000000004: a float hair past the clock
        reached: list[float] = []

        async def wait_for_deadline() -> None:
            while loop.time() < deadline:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(deadline - loop.time()):
                        await asyncio.Event().wait()
            reached.append(loop.time())

        waiter = asyncio.create_task(wait_for_deadline())
        await until(lambda: reached, 1.0, "the deadline reached")
        await waiter
        return reached[0]

    assert run_virtual(main) >= 0.1 + 0.2


def test_the_virtual_clock_follows_the_loop() -> None:
    clock = VirtualClock()

    async def main() -> tuple[float, float, float, float]:
        before = clock.monotonic(), clock.wall()
        await asyncio.sleep(1200)
        return (*before, clock.monotonic(), clock.wall())

    assert run_virtual(main) == (0.0, EPOCH_S, 1200.0, EPOCH_S + 1200)


@pytest.mark.asyncio(loop_factories=[VIRTUAL_TIME])
async def test_a_marked_test_runs_on_the_virtual_time_loop() -> None:
    assert isinstance(asyncio.get_running_loop(), VirtualTimeLoop)
    started = time.monotonic()
    await asyncio.sleep(24 * 3600 * 7)
    assert time.monotonic() - started < 1.0


async def test_an_unmarked_test_runs_on_asyncio_s_own_loop() -> None:
    assert not isinstance(asyncio.get_running_loop(), VirtualTimeLoop)
