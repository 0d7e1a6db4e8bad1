"""Fixtures of the fuzz tier: the run's seed (printed in pytest's header) and budget, and a
random generator per test (tests/fuzz/settings.py reads the knobs)."""

from __future__ import annotations

import random
import zlib

import pytest

from tests.fuzz.settings import BUDGET_S, SEED


def pytest_report_header() -> str:
    return f"fuzz: FUZZ_SEED={SEED} FUZZ_BUDGET_S={BUDGET_S:g}"


@pytest.fixture
def seed() -> int:
    return SEED


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> random.Random:
    """The run's seed mixed with the test's name: each test has its own stream of inputs,
    and one FUZZ_SEED replays them all."""
    print(f"FUZZ_SEED={SEED} ({request.node.name})")
    return random.Random(SEED ^ zlib.crc32(request.node.name.encode()))


@pytest.fixture
def budget_s() -> float:
    return BUDGET_S
