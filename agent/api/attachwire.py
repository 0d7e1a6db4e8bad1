"""The frames of the attach socket after its JSON request line, shared by the agent and dynoctl
(standard library only: dynoctl imports it and must start fast).

A frame is a 1-byte kind, a 4-byte big-endian payload length and the payload (at most
MAX_PAYLOAD bytes). Stdin travels only within credit the agent has granted, so neither side
ever buffers more than a window of it; everything else is small or bounded by the sender.
"""

from __future__ import annotations

import struct

from agent import cjson
from agent.decoding import json_loads

TYPE_CHECKING = False  # not typing's: dynoctl would import typing for it
if TYPE_CHECKING:
    from typing import Any

HEADER = struct.Struct(">cI")
MAX_PAYLOAD = 64 * 1024
# The attach protocol version a request names in its "v" key.
VERSION = 2

# Caller → agent.
STDIN = b"0"        # bytes for the command's stdin (counts against the credit)
STDIN_EOF = b"e"    # the caller's stdin ended (pipe mode: the command's stdin is closed)
WINDOW = b"w"       # the terminal's new size: rows, columns (u16 each)
SIGNAL = b"s"       # a signal name to deliver to the command ("INT")
# Agent → caller.
STDOUT = b"1"
STDERR = b"2"
CREDIT = b"c"       # the caller may send this many more stdin bytes (u32)
CONTROL = b"j"      # a JSON object: {"event": "started"|"exit", ...} or {"error": {...}}

CALLER_KINDS = frozenset({STDIN, STDIN_EOF, WINDOW, SIGNAL})
AGENT_KINDS = frozenset({STDOUT, STDERR, CREDIT, CONTROL})

_WINDOW = struct.Struct(">HH")
_CREDIT = struct.Struct(">I")


class FrameError(ValueError):
    """The peer sent something that is not a frame of this protocol; the connection ends."""


def encode(kind: bytes, payload: bytes = b"") -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise FrameError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    return HEADER.pack(kind, len(payload)) + payload


def window(rows: int, cols: int) -> bytes:
    return encode(WINDOW, _WINDOW.pack(min(max(rows, 0), 0xFFFF), min(max(cols, 0), 0xFFFF)))


def parse_window(payload: bytes) -> tuple[int, int]:
    if len(payload) != _WINDOW.size:
        raise FrameError(f"window frame of {len(payload)} bytes, not {_WINDOW.size}")
    rows, cols = _WINDOW.unpack(payload)
    return rows, cols


def credit(count: int) -> bytes:
    return encode(CREDIT, _CREDIT.pack(count))


def parse_credit(payload: bytes) -> int:
    if len(payload) != _CREDIT.size:
        raise FrameError(f"credit frame of {len(payload)} bytes, not {_CREDIT.size}")
    count: int = _CREDIT.unpack(payload)[0]
    return count


def control(message: dict[str, Any]) -> bytes:
    return encode(CONTROL, cjson.dumps(message).encode())


def parse_control(payload: bytes) -> dict[str, Any]:
    try:
        message = json_loads(payload)
    except ValueError as exc:
        raise FrameError(f"control frame is not JSON: {exc}") from None
    if not isinstance(message, dict):
        raise FrameError("control frame is not a JSON object")
    return message


class FrameDecoder:
    """Incremental: feed bytes, take complete (kind, payload) frames. Holds at most one
    incomplete frame plus what one feed added, so its memory is bounded by the reader."""

    def __init__(self, kinds: frozenset[bytes]) -> None:
        self._kinds = kinds
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        self._buf += data
        frames: list[tuple[bytes, bytes]] = []
        while len(self._buf) >= HEADER.size:
            kind, length = HEADER.unpack_from(self._buf)
            if kind not in self._kinds:
                raise FrameError(f"unknown frame kind {kind!r}")
            if length > MAX_PAYLOAD:
                raise FrameError(f"frame of {length} bytes exceeds {MAX_PAYLOAD}")
            end = HEADER.size + length
            if len(self._buf) < end:
                break
            frames.append((kind, bytes(self._buf[HEADER.size:end])))
            del self._buf[:end]
        return frames

    @property
    def pending_bytes(self) -> int:
        return len(self._buf)
