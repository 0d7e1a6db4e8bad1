"""Fixtures for the cgroups unit tests: fake hosts in both modes over a temp directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.cgroups.fakekernel import FakeHost


@pytest.fixture(params=["v2", "hybrid"])
def host(request: pytest.FixtureRequest, tmp_path: Path) -> FakeHost:
    return FakeHost(tmp_path, str(request.param))


@pytest.fixture
def v2_host(tmp_path: Path) -> FakeHost:
    return FakeHost(tmp_path, "v2")


@pytest.fixture
def hybrid_host(tmp_path: Path) -> FakeHost:
    return FakeHost(tmp_path, "hybrid")
