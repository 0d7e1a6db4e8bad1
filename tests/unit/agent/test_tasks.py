"""Owned background tasks: kept until they end, failures logged, all cancelled on close."""

from __future__ import annotations

import asyncio
import logging

import pytest

from agent.tasks import OwnedTasks


async def test_a_finished_task_is_let_go_and_a_failed_one_logged(
        caplog: pytest.LogCaptureFixture) -> None:
    tasks = OwnedTasks()

    async def fail() -> None:
        raise RuntimeError("boom")

    done = tasks.spawn(asyncio.sleep(0), "quick")
    failed = tasks.spawn(fail(), "failing-d1")
    assert len(tasks) == 2 and done.get_name() == "quick"
    await asyncio.gather(done, failed, return_exceptions=True)
    await asyncio.sleep(0)
    assert len(tasks) == 0
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR] == [
        "background task failing-d1 failed"]


async def test_cancel_all_cancels_and_awaits_every_task_even_late_ones() -> None:
    tasks = OwnedTasks()
    ended: list[str] = []

    async def forever(name: str) -> None:
        try:
            await asyncio.Event().wait()
        finally:
            ended.append(name)
            if name == "first":
                tasks.spawn(forever("late"), "late")  # started while closing

    tasks.spawn(forever("first"), "first")
    server_made = asyncio.ensure_future(forever("adopted"))
    tasks.adopt(server_made)
    await asyncio.sleep(0)
    await tasks.cancel_all()
    assert sorted(ended) == ["adopted", "first", "late"]
    assert len(tasks) == 0 and server_made.cancelled()
