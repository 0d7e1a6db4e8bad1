"""Shared test plumbing: tier markers by directory, and skips that name the missing capability."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

_TIER_MARKERS = {"privileged": "privileged", "e2e": "e2e", "vm": "vm", "bench": "bench",
                 "fuzz": "fuzz"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).parts
        for directory, marker in _TIER_MARKERS.items():
            if directory in parts:
                item.add_marker(getattr(pytest.mark, marker))
        if item.get_closest_marker("privileged") and os.geteuid() != 0:
            item.add_marker(pytest.mark.skip(reason="needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN)"))
