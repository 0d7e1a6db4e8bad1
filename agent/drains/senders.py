"""How frames reach a receiver: syslog over TCP or TLS (the frames as they are, one stream),
or HTTP(S) POSTs of `application/logplex-1` batches (aiohttp). TLS is verified against the
system's CAs, or the configured bundle (`log_drains_ca_file`)."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import ssl
import struct
import termios
import uuid
from pathlib import Path
from typing import Final

import aiohttp

from agent import __version__
from agent.drains.drain import DeliveryError, Drain, Sender
from agent.drainurl import DrainUrl, Transport

CONNECT_TIMEOUT_S: Final = 10.0
# A receiver that takes nothing at all for this long is given up on (and dialled again);
# one that reads slowly is not.
STALL_S: Final = 30.0
SYSLOG_CHUNK_BYTES: Final = 256 * 1024
SYSLOG_CHUNK_FRAMES: Final = 8192
# Logplex posts batches of a few hundred lines; Heroku's Shield logging at most 500.
HTTP_BATCH_FRAMES: Final = 500
HTTP_BATCH_BYTES: Final = 1024 * 1024
HTTP_TIMEOUT_S: Final = 30.0
USER_AGENT: Final = f"dynoagent/{__version__} (Logplex compatible)"


def tls_context(ca_file: Path | None) -> ssl.SSLContext:
    """Verifies the receiver's certificate and name against `ca_file`, or the system CAs."""
    return ssl.create_default_context(cafile=str(ca_file) if ca_file is not None else None)


def _unacked_bytes(writer: asyncio.StreamWriter) -> int:
    """Bytes the kernel holds for the socket that the peer has not acknowledged (SIOCOUTQ)."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return 0
    try:
        raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    except OSError:
        return 0
    return int(struct.unpack("i", raw)[0])


class SyslogSender:
    """One TCP (or TLS) connection; frames count as delivered once the receiver's kernel has
    acknowledged their bytes (what the agent's buffers and the socket's send queue still hold
    is sent again after a reconnect: at least once)."""

    def __init__(self, url: DrainUrl, ssl_context: ssl.SSLContext | None = None,
                 connect_timeout_s: float = CONNECT_TIMEOUT_S, stall_s: float = STALL_S
                 ) -> None:
        self.url = url
        self.ssl_context = ssl_context if url.transport is Transport.SYSLOG_TLS else None
        self.connect_timeout_s = connect_timeout_s
        self.stall_s = stall_s
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._written = 0  # bytes written on this connection
        self._settled = 0  # of them, bytes of frames confirmed

    async def _connect(self) -> asyncio.StreamWriter:
        async with asyncio.timeout(self.connect_timeout_s):
            self._reader, writer = await asyncio.open_connection(
                self.url.host, self.url.port, ssl=self.ssl_context,
                server_hostname=self.url.host if self.ssl_context is not None else None,
                limit=4096)
        writer.transport.set_write_buffer_limits(high=SYSLOG_CHUNK_BYTES)
        self._writer = writer
        self._written = self._settled = 0
        return writer

    def _acked(self, drain: Drain, writer: asyncio.StreamWriter) -> int:
        """Confirm what the receiver has; returns bytes still unconfirmed."""
        pending = writer.transport.get_write_buffer_size() + _unacked_bytes(writer)
        acked = self._written - pending
        if acked > self._settled:
            self._settled += drain.confirm_bytes(acked - self._settled)
        return self._written - self._settled

    def _check_open(self, writer: asyncio.StreamWriter) -> None:
        if writer.transport.is_closing() or (self._reader is not None and
                                              self._reader.at_eof()):
            raise DeliveryError("the receiver closed the connection")

    async def deliver(self, drain: Drain) -> None:
        writer = self._writer or await self._connect()
        loop = asyncio.get_running_loop()
        last_progress = loop.time()
        last_unconfirmed = -1
        while True:
            self._check_open(writer)
            frames = drain.take(SYSLOG_CHUNK_FRAMES, SYSLOG_CHUNK_BYTES)
            if frames:
                data = b"".join(frames)
                writer.write(data)
                self._written += len(data)
                await self._drain(drain, writer)
                self._acked(drain, writer)
                last_unconfirmed = -1
                continue
            unconfirmed = self._acked(drain, writer)
            if not unconfirmed:
                return
            # All written; wait for the acknowledgements (or more lines), as long as the
            # receiver takes something.
            if unconfirmed != last_unconfirmed:
                last_unconfirmed, last_progress = unconfirmed, loop.time()
            elif loop.time() - last_progress > self.stall_s:
                raise DeliveryError(f"the receiver acknowledged nothing for {self.stall_s:g}s")
            await drain.wait_ready(0.05)

    async def _drain(self, drain: Drain, writer: asyncio.StreamWriter) -> None:
        """Wait until the transport takes more, as long as the receiver makes progress."""
        loop = asyncio.get_running_loop()
        last_progress = loop.time()
        last_unconfirmed = -1
        while True:
            try:
                async with asyncio.timeout(1.0):
                    await writer.drain()
                return
            except TimeoutError:
                unconfirmed = self._acked(drain, writer)
                self._check_open(writer)
                if unconfirmed != last_unconfirmed:
                    last_unconfirmed, last_progress = unconfirmed, loop.time()
                elif loop.time() - last_progress > self.stall_s:
                    raise DeliveryError(
                        f"the receiver took nothing for {self.stall_s:g}s") from None
                # A timeout cancels drain()'s wait only; it is called again.

    def failed(self, drain: Drain) -> None:
        drain.unsend()
        self._close()

    def _close(self) -> None:
        if self._writer is not None:
            self._writer.transport.abort()
        self._writer = self._reader = None

    async def aclose(self) -> None:
        self._close()


class HttpSender:
    """POSTs batches of at most HTTP_BATCH_FRAMES frames; a batch not accepted (a connection
    error, 408, 429, 5xx) is posted again as it was, with the same `Logplex-Frame-Id`; one
    refused for good (another 4xx) is counted dropped."""

    def __init__(self, url: DrainUrl, token: str, ssl_context: ssl.SSLContext | None = None,
                 timeout_s: float = HTTP_TIMEOUT_S, batch_frames: int = HTTP_BATCH_FRAMES
                 ) -> None:
        self.url = url
        self.token = token
        self.ssl_context = ssl_context
        self.timeout_s = timeout_s
        self.batch_frames = batch_frames
        self._session: aiohttp.ClientSession | None = None
        self._batch: list[bytes] | None = None
        self._frame_id = ""

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None:
            tls: ssl.SSLContext | bool = False
            if self.url.transport is Transport.HTTPS:
                tls = self.ssl_context or tls_context(None)
            connector = aiohttp.TCPConnector(ssl=tls, limit=1)
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                skip_auto_headers=("Content-Type",))
        return self._session

    async def deliver(self, drain: Drain) -> None:
        session = self._open()
        while True:
            if self._batch is None:
                frames = drain.take(self.batch_frames, HTTP_BATCH_BYTES)
                if not frames:
                    return
                self._batch, self._frame_id = frames, uuid.uuid4().hex
            batch = self._batch
            headers = {"Content-Type": "application/logplex-1",
                       "Logplex-Msg-Count": str(len(batch)),
                       "Logplex-Frame-Id": self._frame_id,
                       "Logplex-Drain-Token": self.token,
                       "User-Agent": USER_AGENT}
            async with session.post(self.url.url, data=b"".join(batch), headers=headers) as res:
                status = res.status
                await res.read()
            if 200 <= status < 300:
                drain.confirm(len(batch))
            elif status in (408, 429) or status >= 500:
                raise DeliveryError(f"the receiver answered {status}")
            else:
                drain.discard(len(batch))
                self._batch = None
                raise DeliveryError(f"the receiver refused a batch of {len(batch)} with "
                                    f"{status}; dropped")
            self._batch = None

    def failed(self, drain: Drain) -> None:
        # The batch stays taken: sent again as it is, under its frame id.
        pass

    async def aclose(self) -> None:
        if self._session is not None:
            with contextlib.suppress(Exception):
                await self._session.close()
            self._session = None


def make_sender(url: DrainUrl, token: str, ca_file: Path | None) -> Sender:
    context = tls_context(ca_file) if url.transport.uses_tls else None
    if url.transport.is_syslog:
        return SyslogSender(url, context)
    return HttpSender(url, token, context)
