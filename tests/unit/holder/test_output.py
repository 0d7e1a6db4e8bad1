"""Line splitting (newlines, the 10,000-byte cap) and the bounded, acked output buffer."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from agent.holder.output import MAX_LINE_BYTES, BufferLimits, LineSplitter, OutputBuffer


def test_lines_split_on_newline_across_feeds() -> None:
    s = LineSplitter()
    assert s.feed(b"a") == []
    assert s.feed(b"b\nc\n\nd") == [b"ab", b"c", b""]
    assert s.feed(b"e\n") == [b"de"]
    assert s.flush() == []


def test_unterminated_tail_comes_out_on_flush() -> None:
    s = LineSplitter()
    assert s.feed(b"x\ntail") == [b"x"]
    assert s.flush() == [b"tail"]
    assert s.flush() == []


def test_long_line_is_split_at_ten_thousand_bytes() -> None:
    s = LineSplitter()
    line = bytes(b for b in range(256) if b != 10) * 100 + b"x" * 100  # 25,600 bytes
    out = s.feed(line + b"\n")
    assert [len(x) for x in out] == [MAX_LINE_BYTES, MAX_LINE_BYTES, 5_600]
    assert b"".join(out) == line


def test_long_unterminated_line_does_not_accumulate() -> None:
    s = LineSplitter(max_line_bytes=10)
    out: list[bytes] = []
    for _ in range(7):
        out += s.feed(b"abc")
    assert out == [b"abcabcabca", b"bcabcabcab"]
    assert s.partial_bytes == 1
    assert s.flush() == [b"c"]


@given(st.lists(st.binary(max_size=40), max_size=30), st.integers(min_value=1, max_value=16))
def test_splitting_loses_and_invents_nothing(chunks: list[bytes], cap: int) -> None:
    s = LineSplitter(max_line_bytes=cap)
    lines: list[bytes] = []
    for chunk in chunks:
        lines += s.feed(chunk)
    lines += s.flush()
    data = b"".join(chunks)
    assert all(len(line) <= cap and b"\n" not in line for line in lines)
    assert b"".join(lines) == data.replace(b"\n", b"")
    assert len(lines) >= data.count(b"\n")


def _fill(buf: OutputBuffer, n: int, size: int = 1, start: int = 0) -> None:
    for i in range(start, start + n):
        buf.push(float(i), str(i).encode().rjust(size, b"."))


def test_buffer_keeps_newest_lines_and_counts_drops() -> None:
    buf = OutputBuffer(BufferLimits(max_lines=10, max_bytes=1 << 20))
    _fill(buf, 25)
    assert buf.lines == 10
    assert buf.dropped_unreported == 15 and buf.dropped_total == 15
    seq, lines = buf.take(100, 1 << 20)
    assert seq == 15
    assert [ln.data for ln in lines] == [str(i).encode() for i in range(15, 25)]


def test_buffer_bound_by_bytes() -> None:
    buf = OutputBuffer(BufferLimits(max_lines=1000, max_bytes=100))
    _fill(buf, 30, size=10)
    assert buf.lines == 10 and buf.bytes == 100
    assert buf.dropped_total == 20


def test_a_line_bigger_than_the_byte_bound_is_still_kept_alone() -> None:
    buf = OutputBuffer(BufferLimits(max_lines=10, max_bytes=5))
    buf.push(0.0, b"0123456789")
    assert buf.lines == 1
    _, [line] = buf.take(10, 100)
    assert line.data == b"0123456789"


def test_take_respects_batch_limits_and_advances() -> None:
    buf = OutputBuffer(BufferLimits())
    _fill(buf, 10, size=4)
    seq1, first = buf.take(3, 1 << 20)
    seq2, second = buf.take(100, 9)
    assert (seq1, len(first)) == (0, 3)
    assert (seq2, len(second)) == (3, 2)
    seq3, rest = buf.take(100, 1 << 20)
    assert (seq3, len(rest)) == (5, 5)
    assert not buf.unsent
    assert buf.take(100, 100) == (10, [])


def test_ack_forgets_and_rewind_resends_only_unacked() -> None:
    buf = OutputBuffer(BufferLimits())
    _fill(buf, 6)
    buf.take(100, 1 << 20)
    buf.ack(4)
    assert buf.lines == 2
    buf.rewind()
    seq, lines = buf.take(100, 1 << 20)
    assert seq == 4 and [ln.data for ln in lines] == [b"4", b"5"]


def test_evicting_sent_but_unacked_lines_is_not_a_drop() -> None:
    buf = OutputBuffer(BufferLimits(max_lines=5, max_bytes=1 << 20))
    _fill(buf, 5)
    buf.take(100, 1 << 20)
    _fill(buf, 3, start=5)
    assert buf.dropped_total == 0
    seq, lines = buf.take(100, 1 << 20)
    assert seq == 5 and len(lines) == 3


def test_ack_beyond_what_exists_is_harmless() -> None:
    buf = OutputBuffer(BufferLimits())
    _fill(buf, 2)
    buf.ack(99)
    assert buf.lines == 0 and not buf.unsent
    _fill(buf, 1, start=2)
    assert buf.take(10, 100)[0] == 2


def test_evict_oldest_counts_only_unsent_lines() -> None:
    buf = OutputBuffer(BufferLimits())
    _fill(buf, 4, size=3)
    buf.take(2, 1 << 20)
    assert buf.evict_oldest() == 3 and buf.dropped_total == 0  # it had been sent
    buf.evict_oldest()
    assert buf.evict_oldest() == 3 and buf.dropped_total == 1
    assert buf.take(10, 100)[0] == 3
    buf.evict_oldest()
    assert buf.evict_oldest() == 0 and buf.lines == 0
