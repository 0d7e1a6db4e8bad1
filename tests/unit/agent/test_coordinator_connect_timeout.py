"""The coordinator link's WebSocket handshake has a deadline of its own (CONNECT_TIMEOUT_S):
a coordinator that accepts TCP and never answers costs one failed attempt and a backoff, not
aiohttp's 5-minute default."""

from __future__ import annotations

import asyncio
import contextlib
import random

from agent.coordinator.link import CONNECT_TIMEOUT_S, CoordinatorLink


# Before its fix: ws_connect has no handshake timeout (CONNECT_TIMEOUT_S unused): a
# coordinator that accepts but never answers stalls the link for aiohttp's 300 s default instead
# of failing and backing off
async def test_a_silent_coordinator_fails_the_attempt_within_the_connect_timeout() -> None:
    held: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # read the upgrade request, never answer it
        with contextlib.suppress(ConnectionError):
            while await reader.read(65536):
                pass

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    link = CoordinatorLink(f"ws://127.0.0.1:{port}/v1/agents/connect",
                           handler=lambda _m, _p: asyncio.sleep(0),
                           hello=lambda: {}, metrics=list, backoff_min_s=0.05,
                           backoff_max_s=0.1, rng=random.Random(1))
    try:
        link.start()
        deadline = asyncio.get_running_loop().time() + CONNECT_TIMEOUT_S + 10
        while link.counters.connect_failures == 0:
            assert asyncio.get_running_loop().time() < deadline, (
                f"no failed attempt within {CONNECT_TIMEOUT_S + 10:g}s; "
                f"state {link.state}, connections accepted {len(held)}")
            await asyncio.sleep(0.05)
        assert link.last_error, "a failed attempt says why"
    finally:
        await link.close()
        server.close()
        await server.wait_closed()
        for writer in held:
            writer.close()
            # The socket is closed on a later turn of the loop: wait for it, or the loop may
            # end first and leave it to the garbage collector (a ResourceWarning, which fails
            # whichever test happens to run then).
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
