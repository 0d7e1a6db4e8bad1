"""Fixtures shared by the e2e modules: a test host per module, and fresh apps for modules that
define an `agent` fixture."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.test_supervision import delete_app, make_slug
from tests.support.agentproc import AgentProcess
from tests.support.names import unique
from tests.support.testhost import TestHost, new_test_host


@pytest.fixture(scope="module")
def host() -> Iterator[TestHost]:
    """A test host (network namespace) for the module's agent."""
    with new_test_host("dt") as test_host:
        yield test_host


@pytest.fixture(scope="module")
def slug() -> Iterator[Path]:
    """A slug with test_supervision's server.py (modules that need more files define their own)."""
    path = make_slug()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def app(agent: AgentProcess) -> Iterator[str]:
    """A fresh app (and so a fresh space) per test; its dynos are deleted even on failure."""
    name = unique("t", 8)
    try:
        yield name
    finally:
        delete_app(agent, name)


@pytest.fixture
def apps(agent: AgentProcess) -> Iterator[tuple[str, str]]:
    """Two fresh apps (so two spaces), e.g. an attacker and its victim."""
    names = (unique("ta", 8), unique("tv", 8))
    try:
        yield names
    finally:
        for name in names:
            delete_app(agent, name)
