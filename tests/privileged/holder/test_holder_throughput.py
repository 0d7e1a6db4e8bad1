"""A burst through the holder with the real launcher: an isolated dyno (tini, namespaces, its own
uid and cgroups) prints 300,000 lines as fast as it can; a prompt client gets all, in seq order."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest

from agent.holder.client import HolderClient
from tests.privileged.holder.conftest import TINI
from tests.unit.holder.harness import HolderProc, follow

pytestmark = pytest.mark.skipif(not os.path.exists(TINI), reason=f"needs tini at {TINI}")

BURST_LINES = 300_000


async def test_an_isolated_burst_reaches_a_prompt_client_whole(
        isolated_holder: HolderProc, request_factory: Callable[..., dict[str, Any]]) -> None:
    req = request_factory(f"seq 1 {BURST_LINES}; echo done >&2")
    async with await HolderClient.connect(isolated_holder.socket) as client:
        await client.subscribe()
        launched = await client.launch(req)
        os.close(launched.pidfd)
        stream = await follow(client, req["dyno_id"], timeout_s=60)
        [info] = [p for p in await client.list_processes() if p.dyno_id == req["dyno_id"]]
    assert (stream.dropped, info.dropped, stream.gaps_unexplained) == (0, 0, 0)
    assert stream.first_seqs[0] == 0
    assert stream.lines == [b"%d" % i for i in range(1, BURST_LINES + 1)] + [b"done"]
    assert stream.exit is not None and stream.exit.status == 0
