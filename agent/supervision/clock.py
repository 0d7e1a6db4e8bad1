"""The clocks supervision reads, injected so that tests run it on virtual time."""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds of a clock that never goes back: deadlines and durations."""
        ...

    def wall(self) -> float:
        """Seconds since the epoch: what is persisted (it survives an agent restart)."""
        ...


class LoopClock:
    """The running loop's clock, the one asyncio's timeouts use (so a deadline computed here
    and a `asyncio.timeout` agree, on a real loop and on a virtual-time one), and the
    system's wall clock."""

    def monotonic(self) -> float:
        return asyncio.get_running_loop().time()

    def wall(self) -> float:
        return time.time()
