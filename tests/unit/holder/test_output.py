"""Line splitting (newlines, the 10,000-byte cap) and the bounded, acked output buffer of blocks."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.holder.output import (
    BLOCK_OVERHEAD_BYTES,
    MAX_LINE_BYTES,
    Block,
    BufferLimits,
    ByteTally,
    LineSplitter,
    OutputBuffer,
)


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
    """n one-line pushes (one block each), line i padded to `size` bytes."""
    for i in range(start, start + n):
        buf.push(float(i), str(i).encode().rjust(size, b"."))


def _take(buf: OutputBuffer, max_lines: int, max_bytes: int) -> tuple[int, list[Block]]:
    batch = buf.take(max_lines, max_bytes)
    return batch.seq, batch.blocks


def _lines(blocks: list[Block]) -> list[bytes]:
    return [line for block in blocks for line in block.lines()]


def _cost(lines: int, data_bytes: int) -> int:
    """What one block of `lines` lines with `data_bytes` bytes of line data costs."""
    return data_bytes + lines + BLOCK_OVERHEAD_BYTES


def test_feed_chunk_joins_complete_lines_and_counts_them() -> None:
    s = LineSplitter()
    assert s.feed_chunk(b"par") is None
    assert s.feed_chunk(b"t\n\nx\ny") == (b"part\n\nx", 3)
    assert s.feed_chunk(b"\n") == (b"y", 1)
    assert s.feed_chunk(b"\n") == (b"", 1), "an empty line is still a line"


def test_feed_chunk_splits_long_lines_and_emits_long_partials() -> None:
    s = LineSplitter(max_line_bytes=4)
    assert s.feed_chunk(b"ab\nabcdefghij\nxy") == (b"ab\nabcd\nefgh\nij", 4)
    assert s.feed_chunk(b"zzzzz") == (b"xyzz", 1)
    assert s.partial_bytes == 3


def test_buffer_keeps_newest_lines_and_counts_drops() -> None:
    buf = OutputBuffer(BufferLimits(max_lines=10, max_bytes=1 << 20))
    _fill(buf, 25)
    assert buf.lines == 10
    assert buf.dropped_unreported == 15 and buf.dropped_total == 15
    batch = buf.take(100, 1 << 20)
    assert (batch.seq, batch.dropped, buf.dropped_unreported) == (15, 15, 0)
    assert _lines(batch.blocks) == [str(i).encode() for i in range(15, 25)]


def test_buffer_bound_by_bytes_of_memory() -> None:
    per_line = _cost(1, 10)
    buf = OutputBuffer(BufferLimits(max_lines=1000, max_bytes=10 * per_line))
    _fill(buf, 30, size=10)
    assert buf.lines == 10 and buf.bytes == 10 * per_line
    assert buf.dropped_total == 20


def test_a_burst_in_one_block_is_cheap_and_trimmed_from_its_oldest_lines() -> None:
    lines = [b"%06d" % i for i in range(1000)]
    limit = _cost(1000, 6000)
    buf = OutputBuffer(BufferLimits(max_bytes=limit))
    buf.push(1.0, b"\n".join(lines), 1000)
    assert (buf.lines, buf.bytes, buf.dropped_total) == (1000, limit, 0)
    buf.push(2.0, b"\n".join(lines[:100]), 100)
    # 100 lines more than fit: at least that many of the oldest go, and one block overhead.
    assert buf.bytes <= limit and buf.dropped_total >= 100
    seq, blocks = _take(buf, 10_000, 1 << 20)
    assert seq == buf.dropped_total
    assert _lines(blocks) == (lines + lines[:100])[seq:]
    assert [b.ts for b in blocks] == [1.0, 2.0]


def test_a_line_bigger_than_the_byte_bound_is_still_kept_alone() -> None:
    buf = OutputBuffer(BufferLimits(max_lines=10, max_bytes=5))
    buf.push(0.0, b"0123456789")
    buf.push(1.0, b"a\nbigger-than-five", 2)
    assert buf.lines == 1 and buf.dropped_total == 2
    _, [block] = _take(buf, 10, 100)
    assert block.lines() == [b"bigger-than-five"] and block.ts == 1.0


def test_take_respects_batch_limits_splitting_blocks() -> None:
    buf = OutputBuffer(BufferLimits())
    buf.push(1.0, b"\n".join(b"%04d" % i for i in range(10)), 10)
    seq1, first = _take(buf, 3, 1 << 20)
    seq2, second = _take(buf, 100, 10)  # two 4-byte lines with their newlines
    assert (seq1, _lines(first)) == (0, [b"0000", b"0001", b"0002"])
    assert (seq2, _lines(second)) == (3, [b"0003", b"0004"])
    seq3, rest = _take(buf, 100, 1 << 20)
    assert (seq3, len(_lines(rest))) == (5, 5)
    assert not buf.unsent
    assert _take(buf, 100, 100) == (10, [])
    assert buf.lines == 10, "sent is not acked"
    assert buf.bytes == _cost(10, 40) + 2 * BLOCK_OVERHEAD_BYTES, "two splits, two blocks more"


def test_take_gives_at_least_one_line_bigger_than_the_batch() -> None:
    buf = OutputBuffer(BufferLimits())
    buf.push(1.0, b"x" * 50 + b"\nyy", 2)
    seq, [block] = _take(buf, 10, 8)
    assert (seq, block.seq, block.ts, block.lines()) == (0, 0, 1.0, [b"x" * 50])
    assert _take(buf, 10, 8)[0] == 1


def test_ack_forgets_and_rewind_resends_only_unacked() -> None:
    buf = OutputBuffer(BufferLimits())
    _fill(buf, 6)
    _take(buf, 100, 1 << 20)
    buf.ack(4)
    assert buf.lines == 2
    buf.rewind()
    seq, blocks = _take(buf, 100, 1 << 20)
    assert seq == 4 and _lines(blocks) == [b"4", b"5"]


def test_ack_inside_a_block_trims_it() -> None:
    buf = OutputBuffer(BufferLimits())
    buf.push(1.0, b"a\nbb\nccc", 3)
    _take(buf, 100, 1 << 20)
    buf.ack(2)
    assert (buf.lines, buf.bytes) == (1, _cost(1, 3))
    buf.rewind()
    assert _take(buf, 100, 1 << 20)[0] == 2


def test_evicting_sent_but_unacked_lines_is_not_a_drop() -> None:
    buf = OutputBuffer(BufferLimits(max_lines=5, max_bytes=1 << 20))
    _fill(buf, 5)
    _take(buf, 100, 1 << 20)
    _fill(buf, 3, start=5)
    assert buf.dropped_total == 0
    seq, blocks = _take(buf, 100, 1 << 20)
    assert seq == 5 and len(_lines(blocks)) == 3


def test_ack_beyond_what_exists_is_harmless() -> None:
    buf = OutputBuffer(BufferLimits())
    _fill(buf, 2)
    buf.ack(99)
    assert buf.lines == 0 and buf.bytes == 0 and not buf.unsent
    _fill(buf, 1, start=2)
    assert _take(buf, 10, 100)[0] == 2


def test_evict_counts_only_unsent_lines() -> None:
    buf = OutputBuffer(BufferLimits())
    _fill(buf, 4, size=3)
    _take(buf, 2, 1 << 20)
    assert buf.evict(1) == _cost(1, 3) and buf.dropped_total == 0  # it had been sent
    buf.evict(1)
    assert buf.evict(1) == _cost(1, 3) and buf.dropped_total == 1
    assert _take(buf, 10, 100)[0] == 3
    buf.evict(1)
    assert buf.evict(1) == 0 and buf.lines == 0


def test_tally_follows_every_buffer_and_forget_gives_bytes_back() -> None:
    tally = ByteTally()
    a = OutputBuffer(BufferLimits(), tally)
    b = OutputBuffer(BufferLimits(), tally)
    _fill(a, 5, size=7)
    b.push(0.0, b"x\ny", 2)
    assert tally.bytes == a.bytes + b.bytes == 5 * _cost(1, 7) + _cost(2, 2)
    _take(a, 2, 1 << 20)
    a.ack(2)
    a.evict(1)
    assert tally.bytes == a.bytes + b.bytes
    b.forget()
    assert (tally.bytes, b.lines) == (a.bytes, 0)


_line = st.binary(max_size=12).map(lambda b: b.replace(b"\n", b""))
_op = st.one_of(
    st.tuples(st.just("push"), st.lists(_line, min_size=1, max_size=8)),
    st.tuples(st.just("take"), st.integers(1, 6), st.integers(1, 60)),
    st.tuples(st.just("ack"), st.integers(0, 6)),
    st.tuples(st.just("rewind")),
    st.tuples(st.just("evict"), st.integers(1, 400)),
)


@settings(max_examples=400)
@given(st.lists(_op, max_size=60), st.integers(1, 40), st.integers(1, 3000))
def test_every_line_is_delivered_or_counted_dropped(ops: list[tuple[object, ...]],
                                                   max_lines: int, max_bytes: int) -> None:
    """Against a plain list of every pushed line: what is taken is exactly what was pushed, in
    seq order; what never was taken is exactly what was counted dropped; held lines are always
    the newest ones; the accounting matches the blocks."""
    buf = OutputBuffer(BufferLimits(max_lines=max_lines, max_bytes=max_bytes))
    pushed: list[tuple[float, bytes]] = []
    delivered: set[int] = set()
    taken_to = 0  # next seq after the last take (what an honest client can ack)
    sent_to: int | None = 0  # the same, unknown after a rewind (sent lines may be gone)
    dropped_reported = 0
    gap = 0  # drops reported since the last batch with lines
    acked = 0
    for op in ops:
        if op[0] == "push":
            lines = op[1]
            assert isinstance(lines, list)
            ts = float(len(pushed))
            buf.push(ts, b"\n".join(lines), len(lines))
            pushed += [(ts, line) for line in lines]
            assert buf.lines <= max_lines
            assert buf.bytes <= max_bytes or buf.lines == 1
        elif op[0] == "take":
            max_l, max_b = op[1], op[2]
            assert isinstance(max_l, int) and isinstance(max_b, int)
            batch = buf.take(max_l, max_b)
            seq, blocks = batch.seq, batch.blocks
            dropped_reported += batch.dropped
            gap += batch.dropped
            if blocks:
                if sent_to is not None:
                    assert seq == sent_to + gap, "the seq gap is the drops reported"
                gap = 0
            got = [(b.ts, line) for b in blocks for line in b.lines()]
            assert len(got) <= max_l
            assert len(got) <= 1 or sum(len(b.data) + 1 for b in blocks) <= max_b
            assert [b.seq for b in blocks] == [seq + sum(b.count for b in blocks[:i])
                                               for i in range(len(blocks))]
            assert got == pushed[seq:seq + len(got)]
            assert buf.lines <= max_lines
            assert buf.bytes <= max_bytes or buf.lines == 1
            delivered.update(range(seq, seq + len(got)))
            if got:
                taken_to = sent_to = seq + len(got)
        elif op[0] == "ack":
            step = op[1]
            assert isinstance(step, int)
            acked = max(acked, min(taken_to, acked + step))
            buf.ack(acked)
        elif op[0] == "rewind":
            # A new sink: what the old one was sent but did not ack is its to get (or lose).
            buf.rewind()
            delivered -= {s for b in buf._unsent for s in range(b.seq, b.end_seq)}
            taken_to = acked
            sent_to = None
        else:
            free = op[1]
            assert isinstance(free, int)
            buf.evict(free)
        held = buf._sent + buf._unsent  # white-box: the accounting is the point here
        assert buf.lines == sum(b.count for b in held)
        assert buf.bytes == sum(b.cost for b in held)
        assert all(b.data.count(b"\n") == b.count - 1 for b in held)
        seqs = [s for b in held for s in range(b.seq, b.end_seq)]
        assert seqs == list(range(len(pushed) - buf.lines, len(pushed))), "newest kept"
    # Whatever is still held goes out now; then every line was delivered or counted dropped.
    while buf.unsent:
        batch = buf.take(1000, 1 << 20)
        dropped_reported += batch.dropped
        delivered.update(range(batch.seq, batch.seq + batch.count))
    dropped_reported += buf.take(1, 1).dropped
    assert len(pushed) - len(delivered) == buf.dropped_total == dropped_reported
