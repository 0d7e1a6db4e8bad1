"""Log lines: format, Heroku's wording, 10,000-byte splitting, the 1,500-line tail, and
followers that lose lines (counted, reported as L10) instead of blocking the publisher."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.observability import logs
from agent.observability.logs import (
    LineAssembler,
    LogBuffer,
    LogError,
    LogHub,
    LogLine,
    LogSource,
    split_line,
)
from tests.support.wait import async_wait_for
from tests.unit.agent.fakes import FakeClock

T0 = datetime(2026, 11, 26, 10, 0, 0, 123456, tzinfo=UTC)


def out(text: str, app: str = "shop", dyno: str = "web.1", i: int = 0) -> LogLine:
    return LogLine.output(T0 + timedelta(microseconds=i), app, dyno, text, f"id-{dyno}")


# --- format and wording ---------------------------------------------------------------------

def test_line_format() -> None:
    assert out("hello").format() == "2026-11-26T10:00:00.123456+00:00 app[web.1]: hello"
    line = LogLine.agent(T0, "shop", "web.1", "State changed from starting to up")
    assert line.source is LogSource.AGENT
    assert line.format() == ("2026-11-26T10:00:00.123456+00:00 agent[web.1]: "
                             "State changed from starting to up")
    # Whole seconds still print microseconds; other zones are shown in UTC.
    cet = timezone(timedelta(hours=1))
    whole = LogLine.output(datetime(2026, 1, 1, 11, tzinfo=cet), "a", "run.1", "x")
    assert whole.format() == "2026-01-01T10:00:00.000000+00:00 app[run.1]: x"
    with pytest.raises(LogError):
        LogLine.output(datetime(2026, 1, 1), "a", "run.1", "x").format()


def test_as_dict() -> None:
    assert out("hi").as_dict() == {
        "at": "2026-11-26T10:00:00.123456+00:00", "source": "app", "app": "shop",
        "dyno": "web.1", "id": "id-web.1", "text": "hi",
        "line": "2026-11-26T10:00:00.123456+00:00 app[web.1]: hi"}


@pytest.mark.parametrize(("text", "expected"), [
    (logs.starting_process("bundle exec puma -p $PORT"),
     "Starting process with command `bundle exec puma -p $PORT`"),
    (logs.state_changed("starting", "crashed"), "State changed from starting to crashed"),
    (logs.stopping_all_sigterm(), "Stopping all processes with SIGTERM"),
    (logs.r12_exit_timeout(30), "Error R12 (Exit timeout) -> At least one process failed to "
     "exit within 30 seconds of SIGTERM"),
    (logs.r12_exit_timeout(1.5), "Error R12 (Exit timeout) -> At least one process failed to "
     "exit within 1.5 seconds of SIGTERM"),
    (logs.stopping_remaining_sigkill(), "Stopping remaining processes with SIGKILL"),
    (logs.stopping_process_sigkill(), "Stopping process with SIGKILL"),
    (logs.process_exited(143), "Process exited with status 143"),
    (logs.r10_boot_timeout(60.0), "Error R10 (Boot timeout) -> Web process failed to bind to "
     "$PORT within 60 seconds of launch"),
    (logs.process_running_mem(1028 * 2**20, 512 * 2**20), "Process running mem=1028M(200.8%)"),
    (logs.process_running_mem(0, 512 * 2**20), "Process running mem=0M(0.0%)"),
    (logs.r14_memory_quota_exceeded(), "Error R14 (Memory quota exceeded)"),
    (logs.r15_memory_quota_vastly_exceeded(), "Error R15 (Memory quota vastly exceeded)"),
    (logs.cycling(), "Cycling"),
    (logs.restarting(), "Restarting"),
    (logs.l10_buffer_overflow(500), "Error L10 (output buffer overflow): 500 messages dropped"),
])
def test_platform_wording(text: str, expected: str) -> None:
    assert text == expected


def test_mem_line_refuses_zero_quota() -> None:
    with pytest.raises(LogError):
        logs.process_running_mem(1, 0)


# --- splitting ------------------------------------------------------------------------------

@pytest.mark.parametrize(("size", "chunks"), [
    (0, [0]), (1, [1]), (9_999, [9_999]), (10_000, [10_000]), (10_001, [10_000, 1]),
    (25_000, [10_000, 10_000, 5_000]), (30_000, [10_000, 10_000, 10_000]),
])
def test_split_at_10000_bytes(size: int, chunks: list[int]) -> None:
    parts = split_line(b"x" * size)
    assert [len(p) for p in parts] == chunks
    assert "".join(parts) == "x" * size


def test_split_strips_one_newline_and_keeps_utf8_whole() -> None:
    assert split_line("hello\r\n") == ["hello"]
    assert split_line(b"a\n\n") == ["a\n"]
    text = "é" * 6_000  # 12,000 bytes, 2 bytes a character
    parts = split_line(text)
    assert [len(p.encode()) for p in parts] == [10_000, 2_000]
    assert "".join(parts) == text
    odd = "a" + "€" * 4_000  # 1 + 12,000 bytes: cut may not fall on 10,000 exactly
    parts = split_line(odd)
    assert all(len(p.encode()) <= 10_000 for p in parts)
    assert "".join(parts) == odd
    assert "\ufffd" not in "".join(parts)


def test_split_invalid_utf8_keeps_the_byte_bound() -> None:
    parts = split_line(b"\x80" * 10_001)
    assert len(parts) == 2
    assert parts[1] == "\ufffd"


def test_assembler_lines_partial_and_overlong() -> None:
    a = LineAssembler(limit_bytes=10)
    assert a.feed(b"one\ntw") == ["one"]
    assert a.pending_bytes == 2
    assert a.feed(b"o\nthree") == ["two"]
    # A process printing without newlines: delivered in limit-sized pieces, memory bounded.
    assert a.feed(b"x" * 25) == ["threexxxxx", "xxxxxxxxxx"]
    assert a.pending_bytes == 10
    assert a.feed(b"\n") == ["xxxxxxxxxx"]
    assert a.feed(b"crlf\r\n\r\n") == ["crlf", ""]
    assert a.feed(b"tail") == []
    assert a.flush() == ["tail"]
    assert a.flush() == []
    with pytest.raises(LogError):
        LineAssembler(limit_bytes=0)


@given(data=st.binary(max_size=400) | st.text(max_size=200).map(str.encode),
       cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=10),
       limit=st.integers(min_value=4, max_value=40))
def test_assembler_does_not_depend_on_how_the_pipe_is_read(data: bytes, cuts: list[int],
                                                           limit: int) -> None:
    whole = LineAssembler(limit)
    expected = whole.feed(data) + whole.flush()
    pieces = LineAssembler(limit)
    got: list[str] = []
    start = 0
    for cut in sorted(cuts):
        got += pieces.feed(data[start:cut])
        start = max(start, cut)
    got += pieces.feed(data[start:]) + pieces.flush()
    assert got == expected
    assert all(len(line.encode("utf-8", "surrogateescape")) <= limit * 3 for line in got)
    if data.isascii() and b"\r" not in data:
        # Nothing is lost but the newlines.
        assert "".join(got) == data.replace(b"\n", b"").decode()
        assert all(len(line) <= limit for line in got)


# --- tail buffer ----------------------------------------------------------------------------

def test_buffer_keeps_last_1500_lines() -> None:
    buffer = LogBuffer()
    for i in range(4_000):
        buffer.append(out(str(i), dyno=f"web.{i % 2}"))
    assert len(buffer) == 1_500
    tail = buffer.tail()
    assert [line.text for line in tail] == [str(i) for i in range(2_500, 4_000)]
    assert [line.text for line in buffer.tail(3)] == ["3997", "3998", "3999"]
    assert [line.text for line in buffer.tail(2, dyno="web.0")] == ["3996", "3998"]
    assert buffer.tail(0) == []


def test_hub_tail_per_app_and_merged_in_order() -> None:
    hub = LogHub()
    for i in range(2_000):
        hub.publish(out(f"a{i}", app="a", i=i))
        hub.publish(out(f"b{i}", app="b", i=i))
    a = hub.tail("a")
    assert len(a) == 1_500 and a[0].text == "a500" and a[-1].text == "a1999"
    merged = hub.tail(None, n=4)
    assert [line.text for line in merged] == ["a1998", "b1998", "a1999", "b1999"]
    assert len(hub.tail()) == 3_000
    assert hub.tail("nope") == []
    assert [line.text for line in hub.tail("a", dyno="id-web.1", n=1)] == ["a1999"]
    hub.forget_app("a")
    assert hub.tail("a") == []


def test_hub_splits_overlong_lines() -> None:
    hub = LogHub()
    hub.publish(out("y" * 25_000))
    hub.publish(out("z" * 2_600))  # past the cheap pre-check, still under the limit
    assert [len(line.text) for line in hub.tail()] == [10_000, 10_000, 5_000, 2_600]
    assert hub.published == 4


# --- followers ------------------------------------------------------------------------------

async def take(follower: logs.Follower, n: int) -> list[LogLine]:
    got: list[LogLine] = []
    async with asyncio.timeout(5):
        async for line in follower:
            got.append(line)
            if len(got) == n:
                break
    return got


async def test_follower_gets_tail_then_new_lines_filtered() -> None:
    hub = LogHub()
    hub.publish(out("old-1"))
    hub.publish(out("other", app="blog"))
    hub.publish(out("old-2", dyno="worker.1"))
    with hub.subscribe(app="shop", dyno="web.1", tail=10) as follower:
        hub.publish(out("new", dyno="web.1"))
        hub.publish(out("skip", dyno="worker.1"))
        hub.publish(out("skip", app="blog"))
        got = await take(follower, 2)
        assert [line.text for line in got] == ["old-1", "new"]
        assert follower.queued == 0
    assert hub.followers == 0


async def test_follower_waits_for_lines_published_later() -> None:
    hub = LogHub()
    follower = hub.subscribe()
    reader = asyncio.create_task(take(follower, 2))
    await asyncio.sleep(0)
    assert not reader.done()
    hub.publish(out("one"))
    hub.publish(out("two"))
    assert [line.text for line in await reader] == ["one", "two"]
    follower.close()


async def test_close_ends_iteration_of_a_waiting_follower() -> None:
    hub = LogHub()
    follower = hub.subscribe()

    async def drain() -> int:
        return len([line async for line in follower])

    reader = asyncio.create_task(drain())
    await asyncio.sleep(0)
    hub.close()
    async with asyncio.timeout(5):
        assert await reader == 0
    hub.publish(out("after close"))  # no follower left, nothing raises
    assert follower.dropped == 0


async def test_slow_follower_loses_lines_counted_and_gets_l10_in_place() -> None:
    clock = FakeClock()
    hub = LogHub(clock=clock)
    slow = hub.subscribe(max_queue=100)
    fast = hub.subscribe(max_queue=100_000)
    # 1,000 lines while nobody reads: the publisher never blocks or raises.
    for i in range(1_000):
        hub.publish(out(str(i), i=i))
    assert slow.queued == 100 and slow.dropped == 900
    assert hub.dropped == 900 and fast.dropped == 0
    clock.advance(1.5)
    got = await take(slow, 101)
    assert [line.text for line in got[:100]] == [str(i) for i in range(100)]
    l10 = got[100]
    assert l10.text == "Error L10 (output buffer overflow): 900 messages dropped"
    assert l10.source is LogSource.AGENT and l10.at == clock.now
    # Caught up: the next lines arrive again, and the gap is not reported twice.
    hub.publish(out("fresh"))
    assert [line.text for line in await take(slow, 1)] == ["fresh"]
    assert slow.get_nowait() is None and slow.dropped == 900
    # The fast follower saw everything.
    assert [line.text for line in await take(fast, 1_000)] == [str(i) for i in range(1_000)]


async def test_l10_sits_where_the_gap_is_when_reading_resumes_mid_stream() -> None:
    hub = LogHub()
    follower = hub.subscribe(max_queue=3)
    for i in range(5):  # 0,1,2 kept; 3,4 dropped
        hub.publish(out(str(i)))
    assert [line.text for line in await take(follower, 1)] == ["0"]
    hub.publish(out("5"))  # room again: the L10 goes before "5"
    got = [line.text for line in await take(follower, 4)]
    assert got == ["1", "2", "Error L10 (output buffer overflow): 2 messages dropped", "5"]
    assert follower.dropped == 2


async def test_heavy_publish_with_a_slow_reader_never_blocks() -> None:
    """100,000 lines from a producer with a reader that only gets a turn now and then: the
    tail holds the last 1,500 exactly, and everything the reader missed is accounted for."""
    hub = LogHub()
    follower = hub.subscribe(max_queue=1_000)
    received: list[str] = []
    reported_dropped = 0

    async def reader() -> None:
        nonlocal reported_dropped
        async for line in follower:
            if line.source is LogSource.AGENT:
                reported_dropped += int(line.text.split(": ")[1].split()[0])
            elif line.text == "end":
                return
            else:
                received.append(line.text)

    task = asyncio.create_task(reader())
    for i in range(100_000):
        hub.publish(out(str(i)))
        if i % 5_000 == 0:
            await asyncio.sleep(0)  # the reader's rare turn

    async def drained() -> bool:
        return follower.queued == 0

    await async_wait_for(drained, timeout_s=5, what="slow follower drained its queue")
    hub.publish(out("end"))  # there is room now: any last gap is reported before it
    async with asyncio.timeout(5):
        await task
    follower.close()
    assert len(received) + reported_dropped == 100_000
    assert follower.dropped == reported_dropped == hub.dropped > 0
    assert [int(t) for t in received] == sorted(int(t) for t in received)  # order kept
    assert [line.text for line in hub.tail("shop")][:-1] == \
        [str(i) for i in range(98_501, 100_000)]


def test_bad_parameters_are_refused() -> None:
    hub = LogHub()
    with pytest.raises(LogError):
        hub.subscribe(max_queue=0)
    with pytest.raises(LogError):
        LogHub(tail_lines=0)
    with pytest.raises(LogError):
        LogBuffer(capacity=0)
    with pytest.raises(LogError):
        split_line("x", limit_bytes=2)
