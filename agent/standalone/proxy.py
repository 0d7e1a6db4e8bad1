"""The TCP proxy of standalone mode: one listening socket on 127.0.0.1:PORT whose connections
are spread round-robin over the backends (web dynos that are `up`) known at accept time."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from collections import Counter
from collections.abc import Callable, Sequence

from agent.tasks import OwnedTasks

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 2.0
COPY_CHUNK_BYTES = 64 * 1024

Backend = tuple[str, int]


class ProxyError(Exception):
    """The proxy cannot listen; carries the address and the errno."""

    def __init__(self, message: str, host: str, port: int, errno_: int | None) -> None:
        super().__init__(message)
        self.host = host
        self.port = port
        self.errno = errno_


def bind_listener(host: str, port: int) -> socket.socket:
    """Bind and listen now, before anything is started, so a taken port fails the command
    up front (SO_REUSEADDR only lets us reuse ports in TIME_WAIT, never a live listener)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ProxyError(f"{host}:{port} is already in use; pick another port with --port",
                             host, port, exc.errno) from None
        raise ProxyError(f"cannot listen on {host}:{port}: {exc.strerror}", host, port,
                         exc.errno) from None
    sock.setblocking(False)
    return sock


class TcpProxy:
    """Accepts on `listener` and pipes each connection to the next backend that answers."""

    def __init__(self, listener: socket.socket, backends: Callable[[], Sequence[Backend]],
                 connect_timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        self._listener = listener
        self._backends = backends
        self._connect_timeout_s = connect_timeout_s
        self._turn = 0
        self._server: asyncio.Server | None = None
        self._connections = OwnedTasks()
        self.served: Counter[Backend] = Counter()  # connections per backend, for tests/bench
        self.refused = 0  # connections closed because no backend was up

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._listener.getsockname()[:2]
        return str(host), int(port)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, sock=self._listener)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._connections.cancel_all()
        if self._server is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                async with asyncio.timeout(2.0):
                    await self._server.wait_closed()
            self._server = None

    def _order(self) -> list[Backend]:
        """Backends to try for the next connection: round-robin, failing over to the rest."""
        backends = list(self._backends())
        if not backends:
            return []
        start = self._turn % len(backends)
        self._turn += 1
        return backends[start:] + backends[:start]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.adopt(task)
        try:
            await self._serve(reader, writer)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for backend in self._order():
            try:
                async with asyncio.timeout(self._connect_timeout_s):
                    up_reader, up_writer = await asyncio.open_connection(*backend)
            except (OSError, TimeoutError) as exc:
                log.info("backend %s:%d refused a connection: %s", *backend, exc)
                continue
            self.served[backend] += 1
            try:
                await asyncio.gather(_copy(reader, up_writer), _copy(up_reader, writer))
            finally:
                up_writer.close()
                with contextlib.suppress(OSError):
                    await up_writer.wait_closed()
            return
        self.refused += 1


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(COPY_CHUNK_BYTES):
            writer.write(data)
            await writer.drain()
        # Pass the half-close on: HTTP/1.0 clients and `nc -q` end their request this way.
        if writer.can_write_eof():
            writer.write_eof()
    except OSError:
        # One side reset the connection: the other copy ends on its own EOF or error.
        with contextlib.suppress(OSError):
            writer.close()
