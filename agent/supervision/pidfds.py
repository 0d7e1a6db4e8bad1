"""The pidfds of the dynos' PID 1s, held for each process's life: a signal to a PID 1 goes
through its pidfd, never through a bare pid that may have been reused; each pidfd is closed
once its process has exited (or its dyno is removed)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal


class Pidfds:
    """Dyno id -> the pidfds of its launched processes (one, but a stray found at adoption
    may add a second). Used on the event loop only: a pidfd closed there while a thread
    signalled through it could be a reused fd number by then, another dyno's PID 1."""

    def __init__(self) -> None:
        # dyno id -> pid -> (pidfd, start time)
        self._held: dict[str, dict[int, tuple[int, int]]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def __len__(self) -> int:
        return sum(len(by_pid) for by_pid in self._held.values())

    def hold(self, dyno_id: str, pid: int, start_time: int, pidfd: int) -> None:
        """Own `pidfd` (of `pid`, started at `start_time`) until the process exits: a pidfd
        becomes readable then (Linux 5.3), and the loop closes it. Call on the loop."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        by_pid = self._held.setdefault(dyno_id, {})
        old = by_pid.pop(pid, None)
        if old is not None:
            self._close(old[0])
        by_pid[pid] = (pidfd, start_time)
        # Not pollable (not a pidfd: a test's stand-in): held until forgotten or replaced.
        with contextlib.suppress(OSError):
            loop.add_reader(pidfd, self._exited, dyno_id, pid, pidfd)

    def pids(self, dyno_id: str) -> frozenset[int]:
        """The held (host) pids of the dyno's launched processes."""
        return frozenset(self._held.get(dyno_id, ()))

    def signal(self, dyno_id: str, sig: signal.Signals) -> int:
        """Signal the dyno's held processes; how many were still there to receive it."""
        count = 0
        for pidfd, _start_time in list(self._held.get(dyno_id, {}).values()):
            try:
                signal.pidfd_send_signal(pidfd, sig)
                count += 1
            except ProcessLookupError:
                pass  # exited; the loop closes the pidfd on its next turn
        return count

    def alive(self, pid: int, start_time: int) -> bool | None:
        """Whether the process (`pid`, `start_time`) is running; None when no pidfd of that
        pid is held. A held pid with another start time is a newer process: that one is gone."""
        for by_pid in self._held.values():
            held = by_pid.get(pid)
            if held is not None:
                if held[1] != start_time:
                    return False
                try:
                    signal.pidfd_send_signal(held[0], 0)
                except ProcessLookupError:
                    return False
                return True
        return None

    def forget(self, dyno_id: str) -> None:
        """Close the dyno's pidfds (its processes are done with, or no longer ours)."""
        for pidfd, _start_time in self._held.pop(dyno_id, {}).values():
            self._close(pidfd)

    def close(self) -> None:
        for dyno_id in list(self._held):
            self.forget(dyno_id)

    def _exited(self, dyno_id: str, pid: int, pidfd: int) -> None:
        by_pid = self._held.get(dyno_id)
        if by_pid is None or pid not in by_pid or by_pid[pid][0] != pidfd:
            return
        del by_pid[pid]
        if not by_pid:
            del self._held[dyno_id]
        self._close(pidfd)

    def _close(self, pidfd: int) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(pidfd)
        with contextlib.suppress(OSError):
            os.close(pidfd)
