"""A dyno writing as fast as it can through the real holder (plain backend): a prompt client gets
every line in seq order; a slow one costs counted drops of the oldest lines, in bounded memory."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable

import psutil

from agent.holder.client import OUTPUT_QUEUE_PAUSE_BYTES, HolderClient
from agent.holder.client import READ_CHUNK as CLIENT_READ_CHUNK
from tests.unit.holder.harness import ENV, HolderProc, follow

BURST_LINES = 300_000


async def test_a_prompt_client_gets_every_line_of_a_burst_in_seq_order(
        client: HolderClient) -> None:
    launched = await client.launch({"dyno_id": "d-burst", "env": ENV,
                                    "argv": ["seq", "1", str(BURST_LINES)]})
    try:
        stream = await follow(client, "d-burst")
    finally:
        os.close(launched.pidfd)
    assert stream.dropped == 0
    assert stream.gaps_unexplained == 0
    assert stream.lines == [b"%d" % i for i in range(1, BURST_LINES + 1)]
    assert stream.exit is not None and stream.exit.status == 0
    [info] = [p for p in await client.list_processes() if p.dyno_id == "d-burst"]
    assert info.dropped == 0
    assert (info.buffered_lines, info.buffered_bytes) == (0, 0), "all acked once handled"


async def test_a_slow_client_costs_counted_drops_of_the_oldest_lines_in_bounded_memory(
        holder_factory: Callable[..., HolderProc]) -> None:
    total = 3_000_000  # ~21 MB: more than every buffer and queue on the way together
    buffer_bytes = 256 << 10
    h = holder_factory("--buffer-bytes", str(buffer_bytes))
    assert h.proc is not None
    holder_proc = psutil.Process(h.proc.pid)
    rss_before = holder_proc.memory_info().rss
    client = await HolderClient.connect(h.socket)
    probe = await HolderClient.connect(h.socket)
    samples: list[int] = []
    peak_rss = [rss_before]

    async def sample() -> None:
        while True:
            samples.extend(p.buffered_bytes for p in await probe.list_processes())
            peak_rss.append(holder_proc.memory_info().rss)
            await asyncio.sleep(0.02)

    try:
        await client.subscribe()
        launched = await client.launch({"dyno_id": "d-slow", "env": ENV,
                                        "argv": ["seq", "1", str(total)]})
        sampler = asyncio.create_task(sample())
        try:
            stream = await follow(client, "d-slow", handle_s=0.01, timeout_s=100)
        finally:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
        os.close(launched.pidfd)
        [info] = [p for p in await probe.list_processes() if p.dyno_id == "d-slow"]
    finally:
        client.close()
        probe.close()
    assert stream.exit is not None and stream.exit.status == 0, "the dyno never blocked or died"
    assert stream.dropped > 0 and info.dropped == stream.dropped
    assert len(stream.lines) + stream.dropped == total, "every line delivered or counted"
    assert stream.gaps_unexplained == 0, "each seq jump is the drop count it came with"
    numbers = [int(x) for x in stream.lines]
    assert numbers == sorted(set(numbers)), "in order, no repeats"
    assert numbers[-1] == total, "the newest lines are kept"
    assert samples and max(samples) <= buffer_bytes
    assert stream.max_queued_output_bytes <= OUTPUT_QUEUE_PAUSE_BYTES + 2 * CLIENT_READ_CHUNK
    # 21 MB went through; the holder grew by its bounded buffer and queues, not by the output.
    assert max(peak_rss) - rss_before < 24 << 20
