"""Which event loop the agent's async unit tests run on: asyncio's own, or the virtual-time
loop for a module marked `pytest.mark.asyncio(loop_factories=[VIRTUAL_TIME])`."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

import pytest

from tests.support.virtualtime import VirtualTimeLoop

VIRTUAL_TIME = "virtual-time"


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item
                                  ) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    # pytest-asyncio runs a test once per factory given here that its marker does not rule
    # out, so each test gets exactly one.
    marker = item.get_closest_marker("asyncio")
    if marker is not None and VIRTUAL_TIME in marker.kwargs.get("loop_factories", ()):
        return {VIRTUAL_TIME: VirtualTimeLoop}
    return {"asyncio": asyncio.new_event_loop}
