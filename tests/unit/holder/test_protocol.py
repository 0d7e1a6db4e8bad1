"""Framing of the holder protocol: length prefix, msgpack body, fd FIFO, limits; output events."""

from __future__ import annotations

import os
import socket

import pytest

from agent.holder.client import ReceivedOutput as ClientOutput
from agent.holder.client import decode_event as client_event
from agent.holder.errors import ProtocolError
from agent.holder.protocol import (
    ANCILLARY_BYTES,
    HEADER,
    FrameDecoder,
    chunks_with_fds,
    decode_body,
    encode,
    fds_from_ancillary,
    rights,
)


def test_frame_is_big_endian_length_then_msgpack() -> None:
    frame = encode({"t": "req", "id": 1, "m": "ping", "p": {}})
    (length,) = HEADER.unpack_from(frame)
    assert length == len(frame) - 4
    assert frame[:4] == length.to_bytes(4, "big")
    assert decode_body(frame[4:]) == {"t": "req", "id": 1, "m": "ping", "p": {}}


def test_bytes_stay_bytes_and_text_stays_text() -> None:
    message = {"t": "evt", "m": "output", "p": {"lines": [[1.5, b"\xff\x00raw"]], "id": "é"}}
    decoder = FrameDecoder(1 << 20)
    decoder.feed(encode(message))
    [(decoded, fds)] = decoder.messages()
    assert decoded == message
    assert isinstance(decoded["p"]["lines"][0][1], bytes)
    assert fds == []


def test_decoder_reassembles_frames_fed_one_byte_at_a_time() -> None:
    stream = b"".join(encode({"t": "req", "id": i, "m": "ping"}) for i in range(5))
    decoder = FrameDecoder(1 << 20)
    got: list[int] = []
    for i in range(len(stream)):
        decoder.feed(stream[i:i + 1])
        got.extend(m["id"] for m, _ in decoder.messages())
    assert got == [0, 1, 2, 3, 4]
    assert decoder.pending_bytes == 0


def test_oversized_frame_is_refused_before_its_body_arrives() -> None:
    decoder = FrameDecoder(100)
    decoder.feed(HEADER.pack(101))
    with pytest.raises(ProtocolError) as err:
        decoder.messages()
    assert err.value.value == 101


@pytest.mark.parametrize("body", [b"\xc1", b"\x93\x01\x02\x03", b"\x81\xa1x\x01"])
def test_garbage_and_maps_without_t_are_protocol_errors(body: bytes) -> None:
    decoder = FrameDecoder(1 << 20)
    decoder.feed(HEADER.pack(len(body)) + body)
    with pytest.raises(ProtocolError):
        decoder.messages()


def test_fds_are_handed_out_in_frame_order() -> None:
    decoder = FrameDecoder(1 << 20)
    decoder.feed(encode({"t": "res", "id": 1, "nfd": 2}) + encode({"t": "res", "id": 2}),
                 [10, 11])
    decoder.feed(encode({"t": "res", "id": 3, "nfd": 1}), [12])
    assert [(m["id"], fds) for m, fds in decoder.messages()] == [(1, [10, 11]), (2, []),
                                                                (3, [12])]
    assert decoder.take_stray_fds() == []


def test_frame_claiming_more_fds_than_received_is_an_error() -> None:
    decoder = FrameDecoder(1 << 20)
    decoder.feed(encode({"t": "res", "id": 1, "nfd": 2}), [10])
    with pytest.raises(ProtocolError):
        decoder.messages()
    assert decoder.take_stray_fds() == [10]


def test_truncated_control_message_is_an_error() -> None:
    with pytest.raises(ProtocolError):
        fds_from_ancillary([], socket.MSG_CTRUNC)


def test_fds_cross_a_real_socketpair_with_their_frame() -> None:
    a, b = socket.socketpair()
    r, w = os.pipe()
    try:
        frame = encode({"t": "req", "id": 9, "m": "enter", "nfd": 1})
        a.sendmsg([frame], rights([w]))
        data, anc, flags, _ = b.recvmsg(1 << 16, ANCILLARY_BYTES, socket.MSG_CMSG_CLOEXEC)
        decoder = FrameDecoder(1 << 20)
        decoder.feed(data, fds_from_ancillary(anc, flags))
        [(message, [passed])] = decoder.messages()
        assert message["id"] == 9
        assert passed != w
        assert not os.get_inheritable(passed)
        os.write(passed, b"through")
        os.close(passed)
        os.close(w)
        w = -1
        assert os.read(r, 100) == b"through"
    finally:
        a.close()
        b.close()
        os.close(r)
        if w >= 0:
            os.close(w)


def test_more_fds_than_one_sendmsg_takes_arrive_with_their_frame() -> None:
    a, b = socket.socketpair()
    r, w = os.pipe()
    dups = [os.dup(w) for _ in range(600)]
    received: list[int] = []
    try:
        frame = encode({"t": "res", "id": 1, "nfd": len(dups), "p": {"pad": "x" * 100}})
        pieces = chunks_with_fds(frame, dups)
        assert len(pieces) == 3 and b"".join(bytes(p) for p, _ in pieces) == frame
        for piece, fds in pieces:
            a.sendmsg([piece], rights(fds))
        decoder = FrameDecoder(1 << 20)
        messages: list[tuple[dict[str, object], list[int]]] = []
        while not messages:
            data, anc, flags, _ = b.recvmsg(1 << 16, ANCILLARY_BYTES, socket.MSG_CMSG_CLOEXEC)
            decoder.feed(data, fds_from_ancillary(anc, flags))
            messages = decoder.messages()
        [(message, received)] = messages
        assert message["id"] == 1 and len(received) == 600
        os.write(received[599], b"last")
        assert os.read(r, 10) == b"last"
    finally:
        for fd in [*dups, *received, r, w]:
            os.close(fd)
        a.close()
        b.close()


def test_fds_need_enough_frame_bytes_to_ride_on() -> None:
    with pytest.raises(ProtocolError):
        chunks_with_fds(b"ab", list(range(1000)))
    assert chunks_with_fds(b"ab", [5]) == [(memoryview(b"ab"), [5])]


def _output_message(**p: object) -> dict[str, object]:
    return {"t": "evt", "m": "output",
            "p": {"dyno_id": "d", "pid": 7, "seq": 3, "dropped": 1, **p}}


def test_output_blocks_become_lines_with_their_block_timestamp() -> None:
    raw = client_event(_output_message(blocks=[[1.5, 2, b"a\nb"], [2.5, 1, b""]]))
    assert isinstance(raw, ClientOutput) and raw.size == 3
    event = raw.event()
    assert (event.seq, event.dropped) == (3, 1)
    assert event.lines == ((1.5, b"a"), (1.5, b"b"), (2.5, b""))


def test_protocol_1_output_lines_are_still_read() -> None:
    raw = client_event(_output_message(lines=[[1.0, b"x"], [2.0, b"y"]]))
    assert isinstance(raw, ClientOutput)
    assert raw.event().lines == ((1.0, b"x"), (2.0, b"y"))


@pytest.mark.parametrize("p", [
    {"blocks": [[1.0, 3, b"a\nb"]]},  # count says 3, data holds 2
    {"blocks": [[1.0, 0, b""]]},
    {"blocks": [[1.0, 1, "text"]]},
    {"lines": [[1.0, b"a\nb"]]},  # a protocol-1 line never holds a newline
    {"blocks": [[1.0, 1]]},
])
def test_malformed_output_is_a_protocol_error(p: dict[str, object]) -> None:
    with pytest.raises(ProtocolError):
        client_event(_output_message(**p))
