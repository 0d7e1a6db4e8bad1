"""The holder's wire protocol: length-prefixed msgpack maps on a Unix socket, fds by SCM_RIGHTS.

Framing. Every frame is a 4-byte big-endian unsigned length N, then N bytes holding one
msgpack map (bin type for bytes, str for text). Frames longer than the receiver's limit,
or nested deeper than 32 maps and arrays (agent/decoding.py), close the connection. A frame
that carries file descriptors says so in its `nfd` key; the sender attaches exactly those
fds (SCM_RIGHTS) to the sendmsg call that carries the frame's first byte. Because fds
travel in order with the bytes, the receiver keeps every fd it gets in one FIFO and a
decoded frame with `nfd: k` takes the next k fds from it. Fds are received with
MSG_CMSG_CLOEXEC so they never leak into processes the holder starts.

Messages (the `t` key):
    {"t": "req", "id": 7, "m": METHOD, "p": {...}, "nfd": k}     client → holder
    {"t": "res", "id": 7, "p": {...}, "nfd": k}                   holder → client, success
    {"t": "res", "id": 7, "e": {"code": C, "message": M, "errno": E|nil}}   failure
    {"t": "evt", "m": EVENT, "p": {...}}                          holder → subscribed client
    {"t": "ack", "p": {"a": [[dyno_id, pid, next_seq], ...]}}     client → holder, no response

Methods:
    ping       {} → {version, holder_version, pid, started_at, held}
    subscribe  {} → {superseded: bool}: this connection becomes the event sink (the newest
               subscriber wins; the previous one gets an `superseded` event and no more events).
               The holder then replays, per held process, the output no sink has acked and the
               exit of every exited process not yet released.
    launch     LaunchRequest fields (dyno_id, hostname, argv, env [[k, v]...], uid, gid,
               stack_dir, slug_dir, dyno_dir, writable_limit_bytes, cgroup_procs, netns_path,
               hide_paths, reaper); nfd 0 (the holder owns output: one pipe for stdout and
               stderr, stdin /dev/null), 1 (stdin given) or 3 (stdin, stdout, stderr given; the
               holder captures nothing) → {pid, start_time, timings_ms}, nfd 1: a pidfd of PID 1.
               With `tty: [rows, columns]` and nfd 0, PID 1 gets a new pty of the dyno's own
               devpts as controlling terminal and stdio; the answer's nfd is 2: the pidfd,
               then the pty's master (the holder captures nothing).
    enter      {dyno_id, argv, env, uid, gid, cwd, cgroup_procs}, nfd 3 (its stdio) → {pid,
               start_time}, nfd 1: a pidfd of the new process. With `tty` and nfd 0 as for
               launch: nfd 2, the pidfd and the master of the command's new pty.
    list       {pidfds: bool} → {procs: [{dyno_id, kind: "launch"|"enter", pid, start_time,
               state: "running"|"exited", status, signal, buffered_lines, buffered_bytes,
               dropped, pidfd_index}]}; with pidfds, nfd = the number of running processes,
               in list order (`pidfd_index` says which).
    release    {dyno_id, pid?} → {released: n}; forgets exited processes (conflict if running).

Events:
    output     {dyno_id, pid, seq, dropped, blocks: [[unix_ts_float, count, bytes], ...]}:
               each block is `count` consecutive lines read at one time, joined by b"\n" (so
               it holds count - 1 newlines; lines never contain one); `seq` numbers the first
               line (per held process, from 0); `dropped` counts lines discarded, unsent,
               since the previous output event because the buffer was full, so seq moves on
               by that many (an event may carry drops and no blocks when no line is left to
               follow them). The client acks with the next seq it expects, several events in
               one ack when it likes; unacked lines are sent again to the next subscriber, so
               a daemon killed mid-batch loses nothing it had not acked. (Protocol 1 sent
               `lines: [[ts, bytes], ...]` instead of blocks; clients read both.)
    exit       {dyno_id, kind, pid, status, signal, exited_at}: `status` is the exit code, or
               128 + signal; `signal` is the raw signal number or nil. Sent after every output
               line read before the exit, and again on each subscribe until `release`.
    superseded {}: another connection subscribed; this one gets no further events.
"""

from __future__ import annotations

import array
import contextlib
import os
import socket
import struct
from collections import deque
from typing import Any

import msgpack

from agent.decoding import MAX_DEPTH, TooDeep, check_depth
from agent.errors import excerpt
from agent.holder.errors import ProtocolError

# 2: output events carry joined blocks of lines instead of one [ts, bytes] per line.
# 3: launch and enter take `tty` (a pty made in the dyno, its master in the answer).
PROTOCOL_VERSION = 3
HEADER = struct.Struct(">I")
# Requests are small (env ≤ 32 KiB by spec); output events are batched well under this.
MAX_REQUEST_BYTES = 1 << 20
MAX_RESPONSE_BYTES = 64 << 20
MAX_FDS_PER_FRAME = 3
# The kernel refuses more than SCM_MAX_FD (253) fds in one sendmsg, and a stream recvmsg
# returns at most one such batch, so senders split bigger sets over the frame's first bytes.
FDS_PER_SENDMSG = 250
MAX_FDS_PER_RECV = 256
# CMSG space for the most fds one recvmsg may return; a `list` with pidfds may be long.
ANCILLARY_BYTES = socket.CMSG_SPACE(MAX_FDS_PER_RECV * array.array("i").itemsize)

Message = dict[str, Any]


def chunks_with_fds(frame: bytes, fds: list[int]) -> list[tuple[memoryview, list[int]]]:
    """The frame as sendmsg pieces: one byte per extra batch of fds, the rest with no fds."""
    view = memoryview(frame)
    batches = [fds[i:i + FDS_PER_SENDMSG] for i in range(0, len(fds), FDS_PER_SENDMSG)]
    if len(batches) <= 1:
        return [(view, fds)]
    if len(batches) > len(frame):
        raise ProtocolError(f"{len(fds)} fds cannot ride on a {len(frame)}-byte frame", len(fds))
    pieces = [(view[i:i + 1], batch) for i, batch in enumerate(batches[:-1])]
    pieces.append((view[len(batches) - 1:], batches[-1]))
    return pieces


def encode(message: Message) -> bytes:
    """One frame: header + msgpack body."""
    body: bytes = msgpack.packb(message, use_bin_type=True)
    return HEADER.pack(len(body)) + body


class FrameDecoder:
    """Incremental decoder: feed bytes and received fds, take complete messages with their fds."""

    def __init__(self, max_frame_bytes: int) -> None:
        self._max = max_frame_bytes
        self._buf = bytearray()
        self._fds: deque[int] = deque()

    def feed(self, data: bytes, fds: list[int] | None = None) -> None:
        self._buf += data
        if fds:
            self._fds.extend(fds)

    def messages(self) -> list[tuple[Message, list[int]]]:
        """Every complete message so far; raises ProtocolError (the connection must close)."""
        out: list[tuple[Message, list[int]]] = []
        try:
            self._decode_into(out)
        except ProtocolError:
            # The connection is closing: the fds of frames decoded before the bad one will
            # never be handled, and nobody else can close them.
            for _message, fds in out:
                for fd in fds:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            raise
        return out

    def _decode_into(self, out: list[tuple[Message, list[int]]]) -> None:
        while len(self._buf) >= HEADER.size:
            (length,) = HEADER.unpack_from(self._buf)
            if length > self._max:
                raise ProtocolError(f"frame of {length} bytes exceeds {self._max}", length)
            if len(self._buf) < HEADER.size + length:
                break
            body = bytes(self._buf[HEADER.size:HEADER.size + length])
            del self._buf[:HEADER.size + length]
            message = decode_body(body)
            nfd = message.get("nfd", 0)
            if not isinstance(nfd, int) or nfd < 0 or nfd > len(self._fds):
                raise ProtocolError(f"frame announces {excerpt(nfd)} fds, {len(self._fds)} "
                                    "received", nfd)
            out.append((message, [self._fds.popleft() for _ in range(nfd)]))

    def take_stray_fds(self) -> list[int]:
        """Fds no frame claimed (for closing when the connection ends)."""
        fds = list(self._fds)
        self._fds.clear()
        return fds

    @property
    def pending_bytes(self) -> int:
        return len(self._buf)


def decode_body(body: bytes) -> Message:
    try:
        # The nesting bound holds before anything walks (or reprs) the message.
        message = check_depth(msgpack.unpackb(body, raw=False, strict_map_key=True))
    except (TooDeep, msgpack.StackError):
        raise ProtocolError(f"frame is {TooDeep()}", MAX_DEPTH) from None
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise ProtocolError(f"frame is not msgpack: {exc}", body[:32]) from exc
    if not isinstance(message, dict) or not isinstance(message.get("t"), str):
        raise ProtocolError("frame is not a map with a 't' key", type(message).__name__)
    return message


def fds_from_ancillary(ancdata: list[tuple[int, int, bytes]], flags: int) -> list[int]:
    """Fds of an SCM_RIGHTS control message; a truncated one is a protocol error (fds were lost)."""
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % array.array("i").itemsize
            fds.extend(array.array("i", data[:usable]))
    if flags & socket.MSG_CTRUNC:
        raise ProtocolError("control message truncated: file descriptors were lost", len(fds))
    return fds


def rights(fds: list[int]) -> list[tuple[int, int, bytes]]:
    """The ancillary list for sendmsg carrying `fds`."""
    if not fds:
        return []
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
