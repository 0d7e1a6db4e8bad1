"""Deadlines in an emulated guest scale with its measured slowness, bounded."""

from __future__ import annotations

import time

import pytest

from tests.support import pace
from tests.support.wait import wait_for


def test_scale_is_the_slowdown_bounded_below_by_one_and_above() -> None:
    assert pace.scale_for(0.001, 0.02) == pytest.approx(20.0)
    assert pace.scale_for(0.002, 0.001) == 1.0
    assert pace.scale_for(0.001, 10.0) == pace.MAX_SCALE
    assert pace.scale_for(0.0, 1.0) == 1.0


def test_wait_for_deadlines_follow_the_scale(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(pace.SCALE_ENV, "4")
    began = time.monotonic()
    with pytest.raises(TimeoutError, match=r"within 0\.2s"):
        wait_for(lambda: False, 0.05, interval_s=0.01)
    assert time.monotonic() - began >= 0.2
    monkeypatch.setenv(pace.SCALE_ENV, "not a number")
    assert pace.time_scale() == 1.0
    monkeypatch.delenv(pace.SCALE_ENV)
    assert pace.time_scale() == 1.0


def test_starting_a_process_is_measured() -> None:
    assert 0 < pace.spawn_cost_s(rounds=3) < 5
