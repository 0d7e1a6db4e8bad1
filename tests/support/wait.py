"""Polling with a deadline: the only way tests wait for a condition."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from tests.support.pace import time_scale

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout_s: float, interval_s: float = 0.01,
             what: str = "condition") -> T:
    """Call `predicate` until it returns something truthy; fail after `timeout_s` (times
    the slowness of an emulated guest, see tests.support.pace)."""
    timeout_s *= time_scale()
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what} not met within {timeout_s}s")
        time.sleep(interval_s)


async def async_wait_for(predicate: Callable[[], Awaitable[T]], timeout_s: float,
                         interval_s: float = 0.01, what: str = "condition") -> T:
    timeout_s *= time_scale()
    deadline = time.monotonic() + timeout_s
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what} not met within {timeout_s}s")
        await asyncio.sleep(interval_s)
