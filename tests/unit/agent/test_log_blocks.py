"""The log path's blocks (issue 17): lines of one pipe read travel as one LineBlock through the
hub, its tail, the followers, the disk tail and /v1/logs, and every one of them must give what
the same lines published one by one give: formats, drops and L10 lines, files on disk, long
lines split. Also the drop counter of /metrics."""

from __future__ import annotations

import json
import re
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.holder import OutputEvent
from agent.observability.logs import (
    LINE_OVERHEAD_BYTES,
    LineBlock,
    LogHub,
    LogLine,
    LogSource,
)
from agent.observability.logtail import TailStore
from tests.unit.agent.conftest import VIRTUAL_TIME
from tests.unit.agent.fakes import virtual_harness

AT = datetime(2026, 11, 26, 10, 0, 0, 123456, tzinfo=UTC)


def _clock() -> datetime:
    return AT


def _block(texts: list[str], app: str = "shop", dyno: str = "web.1") -> LineBlock:
    return LineBlock(AT, LogSource.APP, dyno, app, texts, "d-1")


@pytest.mark.parametrize("texts", [["a"], ["", "b c", 'quote " and \\ back', "tab\tnewline",
                                           "é ünïcode ☃", "\x00ctl"]])
def test_a_block_formats_as_its_lines_do(texts: list[str]) -> None:
    block = _block(texts)
    lines = block.lines()
    assert [line.text for line in lines] == texts
    assert block.format_text() == "".join(line.format() + "\n" for line in lines)
    assert block.format_json() == "".join(
        json.dumps(line.as_dict(), separators=(",", ":")) + "\n" for line in lines)


def _read(follower_items: list[LogLine | LineBlock]) -> list[str]:
    out: list[str] = []
    for item in follower_items:
        out += item.texts if isinstance(item, LineBlock) else [item.text]
    return out


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 12), st.integers(1, 400),
       st.lists(st.one_of(
           st.lists(st.text("xy", max_size=30), min_size=1, max_size=8),  # a block offered
           st.integers(0, 10)),  # the reader takes this many lines
           max_size=30))
def test_offering_a_block_keeps_and_drops_what_offering_its_lines_would(
        max_queue: int, max_bytes: int, steps: list[list[str] | int]) -> None:
    whole_hub, lines_hub = LogHub(clock=_clock), LogHub(clock=_clock)
    whole = whole_hub.subscribe(max_queue=max_queue, max_bytes=max_bytes)
    by_line = lines_hub.subscribe(max_queue=max_queue, max_bytes=max_bytes)
    read_whole: list[str] = []
    read_lines: list[str] = []
    for step in steps:
        if isinstance(step, int):
            for _ in range(step):
                line = by_line.get_nowait()
                if line is not None:
                    read_lines.append(line.text)
            # The block reader takes the same number of lines, some as whole blocks.
            taken = 0
            while taken < step:
                items = whole.take_nowait(1)
                if not items:
                    break
                for item in items:
                    texts = item.texts if isinstance(item, LineBlock) else [item.text]
                    read_whole += texts
                    taken += len(texts)
            # Whole blocks may have taken more than `step`: the line reader catches up.
            while len(read_lines) < len(read_whole) and (line := by_line.get_nowait()):
                read_lines.append(line.text)
        else:
            kept = whole.offer_block(_block(step))
            assert kept == sum(by_line.offer(line) for line in _block(step).lines())
        assert (whole.queued, whole.dropped) == (by_line.queued, by_line.dropped)
        assert whole._bytes == by_line._bytes
    read_whole += _read(whole.take_nowait(10**9))
    while (line := by_line.get_nowait()) is not None:
        read_lines.append(line.text)
    assert read_whole == read_lines
    assert whole.queued == by_line.queued == 0
    assert whole._bytes == by_line._bytes == 0


def test_a_follower_bounds_bytes_too() -> None:
    hub = LogHub(clock=_clock)
    follower = hub.subscribe(max_queue=1_000, max_bytes=10 * (100 + LINE_OVERHEAD_BYTES))
    hub.publish_block(_block(["x" * 100] * 25))
    assert (follower.queued, follower.dropped, hub.follower_dropped) == (10, 15, 15)
    texts = _read(follower.take_nowait(100))
    assert texts[-1] == "Error L10 (output buffer overflow): 15 messages dropped"
    assert len(texts) == 11


def test_a_block_reaches_a_sink_without_offer_block_line_by_line() -> None:
    class Sink:
        app: str | None = None
        dyno: str | None = None

        def __init__(self) -> None:
            self.lines: list[LogLine] = []

        def offer(self, line: LogLine) -> bool:
            self.lines.append(line)
            return len(self.lines) <= 2

        def close(self) -> None:
            pass

    hub = LogHub(clock=_clock)
    sink = Sink()
    hub.attach(sink)
    hub.publish_block(_block(["a", "b", "c"]))
    assert sink.lines == _block(["a", "b", "c"]).lines()
    assert (hub.dropped, hub.follower_dropped) == (1, 0)


def test_the_tail_keeps_the_last_lines_of_blocks_across_apps_in_order() -> None:
    hub = LogHub(tail_lines=5, clock=_clock)
    hub.publish_block(_block(["a1", "a2", "a3"], app="a"))
    hub.publish(LogLine.output(AT, "b", "web.1", "b1"))
    hub.publish_block(_block(["a4", "a5", "a6", "a7"], app="a"))
    assert [line.text for line in hub.tail("a")] == ["a3", "a4", "a5", "a6", "a7"]
    assert [line.text for line in hub.tail("a", n=2)] == ["a6", "a7"]
    assert [line.text for line in hub.tail()] == ["a3", "b1", "a4", "a5", "a6", "a7"]
    hub.publish_block(_block([f"x{i}" for i in range(12)], app="a"))
    assert [line.text for line in hub.tail("a")] == [f"x{i}" for i in range(7, 12)]


def test_long_lines_of_a_block_are_split_as_publish_splits_them() -> None:
    texts = ["short", "é" * 6_000, "x" * 25_000, "end"]
    by_block, by_line = LogHub(clock=_clock), LogHub(clock=_clock)
    by_block.publish_block(_block(texts))
    for line in _block(texts).lines():
        by_line.publish(line)
    assert by_block.tail() == by_line.tail()
    assert len(by_block.tail()) == 7


@pytest.mark.parametrize("before", [0, 1, 700, 1_499])
@pytest.mark.parametrize("size", [1, 2, 1_499, 1_500, 1_501, 2_999, 3_000, 3_001, 7_777])
def test_a_block_on_disk_leaves_the_files_its_lines_would(tmp_path: Path, before: int,
                                                          size: int) -> None:
    files = {}
    for how in ("lines", "block"):
        store = TailStore(tmp_path / how, tail_lines=1_500)
        for i in range(before):
            store.append(LogLine.agent(AT, "shop", "web.1", f"before {i}"))
        store.flush()
        texts = [f"line {i}" if i % 7 else f'"quoted" é {i}' for i in range(size)]
        if how == "lines":
            for number, line in enumerate(_block(texts).lines(), 42):
                store.append(line, ("d-1", 9, number))
        else:
            store.append_block(_block(texts), ("d-1", 9, 42))
        store.append(LogLine.agent(AT, "shop", "web.1", "after"))
        store.close()
        files[how] = {p.name: p.read_bytes() for p in (tmp_path / how).iterdir()}
        loaded = TailStore(tmp_path / how, tail_lines=1_500).load()["shop"]
        assert loaded[-1].line.text == "after"
        if size > 1:
            assert loaded[-2].origin == ("d-1", 9, 42 + size - 1)
            assert loaded[-2].line.text == texts[-1]
    assert files["block"] == files["lines"]


@pytest.mark.asyncio(loop_factories=[VIRTUAL_TIME])
async def test_blocks_from_the_holder_are_published_once_with_their_numbers(
        tmp_path: Path) -> None:
    h = await virtual_harness(tmp_path)
    h.hub.keep_on_disk(TailStore(tmp_path / "logs"))
    try:
        dyno_id = await h.create("worker.1")
        await h.state(dyno_id, "up")
        now = time.time()
        first = OutputEvent(dyno_id, 1000, 10, 0, blocks=((now, 2, b"a\nb"), (now, 1, b"c")))
        # Sent again after a resubscribe, with more: only d, e and f are new.
        again = OutputEvent(dyno_id, 1000, 10, 0,
                            blocks=((now, 2, b"a\nb"), (now + 1, 3, b"c\nd\ne"),
                                    (now + 2, 1, b"\xff f")))
        for event in (first, again):
            h.supervisor.on_holder_event(event)
        lines = [line for line in h.hub.tail(dyno="worker.1") if line.source == "app"]
        assert [line.text for line in lines] == ["a", "b", "c", "d", "e", "\ufffd f"]
        assert lines[3].at == datetime.fromtimestamp(now + 1, UTC)
        h.hub.flush()
        # A next agent's hub knows how far these were kept, line by line.
        kept = TailStore(tmp_path / "logs").load()[lines[0].app]
        assert [k.origin for k in kept if k.origin is not None] == [
            (dyno_id, 1000, n) for n in range(10, 16)]
        assert [k.line.text for k in kept if k.origin is not None] == [
            line.text for line in lines]
    finally:
        await h.supervisor.detach_all()


@pytest.mark.asyncio(loop_factories=[VIRTUAL_TIME])
async def test_log_path_drops_are_counted_in_metrics(tmp_path: Path) -> None:
    h = await virtual_harness(tmp_path)
    try:
        dyno_id = await h.create("worker.1")
        await h.state(dyno_id, "up")
        follower = h.hub.subscribe(max_queue=3)
        now = time.time()
        h.supervisor.on_holder_event(OutputEvent(dyno_id, 1000, 0, 7,
                                                 blocks=((now, 5, b"1\n2\n3\n4\n5"),)))
        text = h.supervisor.metrics_text()
        counts = dict(re.findall(
            r'^dynoagent_log_lines_dropped_total\{reason="(\w+)"\} (\d+)$', text, re.M))
        # The holder's 7, reported as one L10 line; the follower kept that and 2 lines.
        assert counts == {"holder_buffer": "7", "follower_queue": "3"}
        assert "# TYPE dynoagent_log_lines_dropped_total counter" in text
        assert follower.dropped == 3
    finally:
        await h.supervisor.detach_all()
