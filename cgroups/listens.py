"""Hearing a process of a cgroup start to listen on a TCP port, as it happens.

A small BPF program of type sock_ops, attached to a group of the unified (v2) hierarchy, runs
in the kernel whenever a socket of that group goes to LISTEN, and writes (its key, the local
port) to a BPF ring buffer that the caller reads from its event loop. It is how a web dyno is
known to be up as soon as its $PORT accepts, rather than at the next connect probe.

Each watched group gets its own program, with its key written into it, so an event names
its group whatever the process did since (a program attached once above every dyno could
not tell them apart). A program only reports; it never changes what the socket does, and
one that could not be attached (no cgroup v2, no BPF) leaves the caller with its probes.
A program outlives a caller killed while it watched (it stays attached until its group is
removed); watching the group again detaches it.

Everything is plain syscalls through ctypes: bpf(2) to make the ring buffer, load and attach
the program, and mmap(2) to read the ring buffer (one consumer, the caller's loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import itertools
import logging
import mmap
import os
import platform
import struct
from collections.abc import Callable

log = logging.getLogger(__name__)

_SYS_BPF = {"x86_64": 321, "aarch64": 280}.get(platform.machine())

_BPF_MAP_CREATE = 0
_BPF_PROG_LOAD = 5
_BPF_PROG_ATTACH = 8
_BPF_PROG_DETACH = 9
_BPF_PROG_GET_FD_BY_ID = 13
_BPF_OBJ_GET_INFO_BY_FD = 15
_BPF_PROG_QUERY = 16
_BPF_MAP_TYPE_RINGBUF = 27
_BPF_PROG_TYPE_SOCK_OPS = 13
_BPF_CGROUP_SOCK_OPS = 3
_BPF_F_ALLOW_MULTI = 2
_BPF_SOCK_OPS_TCP_LISTEN_CB = 11
_BPF_FUNC_RINGBUF_OUTPUT = 130
_ATTR_BYTES = 128
_NAME = b"dyno_listen"  # every listen program's name (at most 15 bytes)
# struct bpf_prog_info: name (16 bytes) at 64; the kernel fills what fits.
_INFO_NAME_OFFSET = 64
_INFO_BYTES = 80

# struct bpf_sock_ops: op at 0, local_port (host order) at 68.
_OP_OFFSET = 0
_LOCAL_PORT_OFFSET = 68

# Ring buffer records: an 8-byte header (length, with these two flag bits), then the data,
# padded to 8 bytes.
_RINGBUF_BYTES = 64 << 10
_BUSY = 1 << 31
_DISCARD = 1 << 30
_EVENT = struct.Struct("<QQ")  # key, port


class ListenWatchUnavailable(OSError):
    """This kernel, or this process, cannot run or attach the program."""


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    imm &= 0xFFFFFFFF  # the 32 bits as they are, whatever their sign
    return struct.pack("<BBhI", code, (src << 4) | dst, off, imm)


def _program(ringbuf_fd: int, key: int) -> bytes:
    """On BPF_SOCK_OPS_TCP_LISTEN_CB: ringbuf_output(map, {key, local_port}, 16, 0).
    Always returns 1 (the socket operation goes on as it would)."""
    ldx_w, stx_dw, mov_x, mov_k, add_k, jne_k = 0x61, 0x7B, 0xBF, 0xB7, 0x07, 0x55
    ld_dw, call, exit_ = 0x18, 0x85, 0x95
    body = [
        _insn(mov_x, 6, 1),                                   # r6 = ctx
        _insn(ldx_w, 2, 6, _OP_OFFSET),                       # r2 = ctx->op
        None,                                                 # if r2 != LISTEN goto out
        _insn(ldx_w, 2, 6, _LOCAL_PORT_OFFSET),               # r2 = ctx->local_port
        _insn(stx_dw, 10, 2, -8),                             # fp[-8] = port
        _insn(ld_dw, 3, 0, 0, key), _insn(0, 0, 0, 0, key >> 32),  # r3 = key
        _insn(stx_dw, 10, 3, -16),                            # fp[-16] = key
        _insn(ld_dw, 1, 1, 0, ringbuf_fd), _insn(0),          # r1 = the ring buffer
        _insn(mov_x, 2, 10),                                  # r2 = fp - 16
        _insn(add_k, 2, 0, 0, -16),
        _insn(mov_k, 3, 0, 0, _EVENT.size),                   # r3 = 16
        _insn(mov_k, 4, 0, 0, 0),                             # r4 = flags
        _insn(call, 0, 0, 0, _BPF_FUNC_RINGBUF_OUTPUT),
        _insn(mov_k, 0, 0, 0, 1),                             # out: r0 = 1
        _insn(exit_),
    ]
    out = len(body) - 2
    body[2] = _insn(jne_k, 2, 0, out - 3, _BPF_SOCK_OPS_TCP_LISTEN_CB)
    return b"".join(i for i in body if i is not None)


_libc: ctypes.CDLL | None = None


def _bpf(cmd: int, attr: bytes) -> int:
    return _bpf_out(cmd, attr)[0]


def _bpf_out(cmd: int, attr: bytes) -> tuple[int, bytes]:
    """bpf(2)'s result and the attributes as the kernel left them (some commands answer in
    them)."""
    global _libc
    if _SYS_BPF is None:
        raise ListenWatchUnavailable(errno.ENOSYS, f"bpf(2) on {platform.machine()}")
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(attr.ljust(_ATTR_BYTES, b"\0"), _ATTR_BYTES)
    result = int(_libc.syscall(_SYS_BPF, cmd, buf, _ATTR_BYTES))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result, buf.raw


def attached_listen_programs(group_fd: int) -> list[int]:
    """fds on the listen programs (of any process: by name) attached to the cgroup v2 group
    open as `group_fd`; the caller closes them."""
    capacity = 64
    while True:
        ids = (ctypes.c_uint32 * capacity)()
        attr = struct.pack("IIIIQI", group_fd, _BPF_CGROUP_SOCK_OPS, 0, 0,
                           ctypes.addressof(ids), capacity)
        try:
            _result, out = _bpf_out(_BPF_PROG_QUERY, attr)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            capacity *= 4  # more attached than asked for: ask for all of them
            continue
        count = struct.unpack_from("I", out, 24)[0]
        break
    fds: list[int] = []
    try:
        for prog_id in ids[:count]:
            try:
                fd = _bpf(_BPF_PROG_GET_FD_BY_ID, struct.pack("III", prog_id, 0, 0))
            except FileNotFoundError:
                continue  # detached and freed since the query
            info = ctypes.create_string_buffer(_INFO_BYTES)
            try:
                _bpf(_BPF_OBJ_GET_INFO_BY_FD, struct.pack("IIQ", fd, _INFO_BYTES,
                                                          ctypes.addressof(info)))
            except BaseException:
                os.close(fd)
                raise
            name = info.raw[_INFO_NAME_OFFSET:_INFO_NAME_OFFSET + 16].rstrip(b"\0")
            if name == _NAME:
                fds.append(fd)
            else:
                os.close(fd)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds


def _detach_left_behind(group_fd: int, unified_dir: str) -> None:
    """Detach the listen programs an agent killed while its dyno booted left on the group:
    the group is watched anew, and theirs would report to a ring buffer no one reads for as
    long as the group lives. Best effort: the new watch works with or without it."""
    try:
        fds = attached_listen_programs(group_fd)
    except OSError as exc:
        log.debug("cannot list the listen programs on %s: %s", unified_dir, exc)
        return
    for fd in fds:
        try:
            _bpf(_BPF_PROG_DETACH, struct.pack("IIII", group_fd, fd, _BPF_CGROUP_SOCK_OPS, 0))
            log.info("detached a listen program left on %s", unified_dir)
        except OSError as exc:
            log.debug("cannot detach a listen program from %s: %s", unified_dir, exc)
        finally:
            os.close(fd)


class ListenWatch:
    """The caller's ring buffer, read on its event loop, and the programs of the groups it
    watches. Made on first use; the ring buffer goes once the last group's watch closes."""

    def __init__(self) -> None:
        self._ring_fd = -1
        self._consumer: mmap.mmap | None = None
        self._producer: mmap.mmap | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._keys = itertools.count(1)
        self._callbacks: dict[int, Callable[[int], None]] = {}
        self.events = 0  # read so far (tests, metrics)

    def watch(self, unified_dir: str, on_listen: Callable[[int], None]) -> GroupListens:
        """Call `on_listen(port)` on the running loop whenever a process of the group at
        `unified_dir` (a cgroup v2 directory) starts to listen on a TCP port, until the
        returned watch is closed. Raises ListenWatchUnavailable, or OSError for the group."""
        self._open()
        key = next(self._keys)
        try:
            prog_fd = self._load(key)
        except OSError as exc:
            self._close_if_idle()
            raise ListenWatchUnavailable(exc.errno, f"loading the listen program: "
                                                    f"{exc.strerror}") from exc
        try:
            group_fd = os.open(unified_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                _detach_left_behind(group_fd, unified_dir)
                _bpf(_BPF_PROG_ATTACH, struct.pack("IIII", group_fd, prog_fd,
                                                   _BPF_CGROUP_SOCK_OPS, _BPF_F_ALLOW_MULTI))
            except OSError:
                os.close(group_fd)
                raise
        except OSError:
            os.close(prog_fd)
            self._close_if_idle()
            raise
        self._callbacks[key] = on_listen
        return GroupListens(self, key, group_fd, prog_fd)

    def _open(self) -> None:
        if self._ring_fd >= 0:
            return
        try:
            fd = _bpf(_BPF_MAP_CREATE, struct.pack("IIIII", _BPF_MAP_TYPE_RINGBUF, 0, 0,
                                                   _RINGBUF_BYTES, 0))
        except OSError as exc:
            raise ListenWatchUnavailable(exc.errno, f"a BPF ring buffer: {exc.strerror}") \
                from exc
        try:
            page = mmap.PAGESIZE
            consumer = mmap.mmap(fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                                 offset=0)
            # The data area is mapped twice in a row, so a record is never split in two.
            producer = mmap.mmap(fd, page + 2 * _RINGBUF_BYTES, mmap.MAP_SHARED,
                                 mmap.PROT_READ, offset=page)
            loop = asyncio.get_running_loop()
            loop.add_reader(fd, self._drain)
        except BaseException:
            os.close(fd)
            raise
        self._ring_fd, self._consumer, self._producer, self._loop = fd, consumer, producer, loop

    def _load(self, key: int) -> int:
        code = _program(self._ring_fd, key)
        insns = ctypes.create_string_buffer(code, len(code))
        license_ = ctypes.create_string_buffer(b"GPL")
        name = _NAME.ljust(16, b"\0")
        attr = struct.pack("IIQQIIQII16s", _BPF_PROG_TYPE_SOCK_OPS, len(code) // 8,
                           ctypes.addressof(insns), ctypes.addressof(license_), 0, 0, 0, 0, 0,
                           name)
        return _bpf(_BPF_PROG_LOAD, attr)

    def _drain(self) -> None:
        """Read every committed record, then tell the kernel how far."""
        consumer, producer = self._consumer, self._producer
        if consumer is None or producer is None:
            return
        page = mmap.PAGESIZE
        position = struct.unpack_from("<Q", consumer, 0)[0]
        end = struct.unpack_from("<Q", producer, 0)[0]
        heard: list[tuple[int, int]] = []
        while position < end:
            offset = page + (position & (_RINGBUF_BYTES - 1))
            length = struct.unpack_from("<I", producer, offset)[0]
            if length & _BUSY:
                break  # being written: the next wakeup comes once it is committed
            size = length & ~(_BUSY | _DISCARD)
            if not length & _DISCARD and size == _EVENT.size:
                heard.append(_EVENT.unpack_from(producer, offset + 8))
            position += (8 + size + 7) & ~7
        struct.pack_into("<Q", consumer, 0, position)
        self.events += len(heard)
        for key, port in heard:
            callback = self._callbacks.get(key)
            if callback is not None:
                callback(port)

    def _forget(self, key: int) -> None:
        self._callbacks.pop(key, None)
        self._close_if_idle()

    def _close_if_idle(self) -> None:
        if self._callbacks or self._ring_fd < 0:
            return
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._ring_fd)
        for area in (self._consumer, self._producer):
            if area is not None:
                area.close()
        os.close(self._ring_fd)
        self._ring_fd, self._consumer, self._producer, self._loop = -1, None, None, None


class GroupListens:
    """One group's program, attached until `close()` (or until the group is removed)."""

    def __init__(self, owner: ListenWatch, key: int, group_fd: int, prog_fd: int) -> None:
        self._owner = owner
        self._key = key
        self._group_fd = group_fd
        self._prog_fd = prog_fd

    def close(self) -> None:
        if self._prog_fd < 0:
            return
        # Gone with its group already, if that was removed first.
        with contextlib.suppress(OSError):
            _bpf(_BPF_PROG_DETACH, struct.pack("IIII", self._group_fd, self._prog_fd,
                                               _BPF_CGROUP_SOCK_OPS, 0))
        os.close(self._prog_fd)
        os.close(self._group_fd)
        self._prog_fd = self._group_fd = -1
        self._owner._forget(self._key)
