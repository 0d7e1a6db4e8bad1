"""A test coordinator written from docs/protocol.md alone (it does not import the agent):
an aiohttp WebSocket server on a Unix socket or on 127.0.0.1 inside a test host's network
namespace, recording every frame and driving the agent with requests."""

from __future__ import annotations

import asyncio
import ctypes
import itertools
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import msgpack
from aiohttp import WSCloseCode, WSMsgType, web

from tests.support.wait import wait_for

SUBPROTOCOL = "dynoagent.v1"
PATH = "/v1/agents/connect"
CLONE_NEWNET = 0x40000000
T = TypeVar("T")


def pack(frame: Any) -> bytes:
    data: bytes = msgpack.packb(frame, use_bin_type=True)
    return data


@dataclass
class Connection:
    ws: web.WebSocketResponse
    hello: dict[str, Any] | None = None
    peercert: dict[str, Any] | None = None  # the agent's TLS client certificate, if any
    closed: bool = False


@dataclass
class Received:
    """One frame the coordinator received, with the connection it came on (1-based)."""

    connection: int
    frame: dict[str, Any]
    at: float = field(default_factory=time.monotonic)

    @property
    def method(self) -> str | None:
        return self.frame.get("m")

    @property
    def params(self) -> dict[str, Any]:
        params = self.frame.get("p")
        return params if isinstance(params, dict) else {}


class TestCoordinator:
    """The coordinator's side of the protocol, run on the caller's event loop."""

    __test__ = False

    def __init__(self, token: str = "test-token", *, hello_error: dict[str, str] | None = None,
                 max_msg_size: int = 64 * 1024 * 1024) -> None:
        self.token = token
        self.hello_error = hello_error
        self.max_msg_size = max_msg_size
        self.received: list[Received] = []
        self.connections: list[Connection] = []
        self.refused = 0
        self.subprotocols: list[str | None] = []
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._ids = itertools.count(1)
        self._changed = asyncio.Event()
        self._runner: web.AppRunner | None = None

    # -- server ----------------------------------------------------------------------------
    async def start(self, sock: socket.socket, ssl_context: ssl.SSLContext | None = None
                    ) -> None:
        """Serve on a bound, listening socket (Unix, or TCP in a test host's namespace),
        with TLS when `ssl_context` is given (wss://)."""
        app = web.Application()
        app.router.add_get(PATH, self._connect)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None,
                                     shutdown_timeout=1.0)
        await self._runner.setup()
        await web.SockSite(self._runner, sock, ssl_context=ssl_context).start()

    async def stop(self) -> None:
        """Go away: stop listening and drop every connection (1001, going away)."""
        for conn in self.connections:
            if not conn.closed:
                await conn.ws.close(code=WSCloseCode.GOING_AWAY, message=b"coordinator away")
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _connect(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            self.refused += 1
            self._notify()
            raise web.HTTPUnauthorized(text="bad or missing bearer token")
        ws = web.WebSocketResponse(protocols=(SUBPROTOCOL,), max_msg_size=self.max_msg_size,
                                   autoping=True)
        await ws.prepare(request)
        self.subprotocols.append(ws.ws_protocol)
        if ws.ws_protocol != SUBPROTOCOL:
            await ws.close(code=WSCloseCode.PROTOCOL_ERROR, message=b"dynoagent.v1 required")
            return ws
        transport = request.transport
        conn = Connection(ws, peercert=transport.get_extra_info("peercert") if transport
                          else None)
        self.connections.append(conn)
        number = len(self.connections)
        try:
            async for message in ws:
                if message.type is not WSMsgType.BINARY:
                    continue
                frame = msgpack.unpackb(message.data, raw=False)
                self.received.append(Received(number, frame))
                await self._dispatch(conn, frame)
                self._notify()
        finally:
            conn.closed = True
            self._notify()
        return ws

    async def _dispatch(self, conn: Connection, frame: dict[str, Any]) -> None:
        kind = frame.get("t")
        if kind == "res":
            future = self._pending.pop(frame.get("id", -1), None)
            if future is not None and not future.done():
                future.set_result(frame)
        elif kind == "req" and frame.get("m") == "hello":
            if self.hello_error is not None:
                await conn.ws.send_bytes(pack({"t": "res", "id": frame["id"],
                                               "e": self.hello_error}))
                return
            conn.hello = frame["p"]
            await conn.ws.send_bytes(pack({"t": "res", "id": frame["id"],
                                           "p": {"accepted": True}}))
        elif kind == "req":
            await conn.ws.send_bytes(pack({"t": "res", "id": frame["id"], "e": {
                "code": "unknown_method", "message": f"unknown method {frame.get('m')!r}"}}))

    def _notify(self) -> None:
        self._changed.set()

    # -- what tests use ------------------------------------------------------------------------
    @property
    def current(self) -> Connection | None:
        """The live connection whose hello was answered, if any."""
        for conn in reversed(self.connections):
            if not conn.closed and conn.hello is not None:
                return conn
        return None

    @property
    def hellos(self) -> list[dict[str, Any]]:
        return [c.hello for c in self.connections if c.hello is not None]

    def events(self, method: str | None = None) -> list[Received]:
        return [r for r in self.received if r.frame.get("t") == "evt"
                and (method is None or r.method == method)]

    def states(self, dyno_id: str | None = None) -> list[dict[str, Any]]:
        return [r.params for r in self.events("dyno.state")
                if dyno_id is None or r.params.get("id") == dyno_id]

    async def wait_until(self, predicate: Callable[[], T], timeout_s: float,
                         what: str = "condition") -> T:
        deadline = time.monotonic() + timeout_s
        while True:
            self._changed.clear()
            value = predicate()
            if value:
                return value
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{what} not met within {timeout_s}s")
            try:
                async with asyncio.timeout(min(remaining, 0.5)):
                    await self._changed.wait()
            except TimeoutError:
                pass

    async def wait_connected(self, timeout_s: float = 10.0) -> Connection:
        return await self.wait_until(lambda: self.current, timeout_s, "agent connected")

    async def send_raw(self, data: bytes | str) -> None:
        conn = await self.wait_connected()
        if isinstance(data, str):
            await conn.ws.send_str(data)
        else:
            await conn.ws.send_bytes(data)

    async def request(self, method: str, params: Any = None, timeout_s: float = 60.0,
                      request_id: int | None = None, conn: Connection | None = None
                      ) -> dict[str, Any]:
        """Send a request (on `conn`, by default the current connection); return the whole
        response frame (`p` or `e`)."""
        conn = conn or await self.wait_connected()
        rid = next(self._ids) if request_id is None else request_id
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = future
        await conn.ws.send_bytes(pack({"t": "req", "id": rid, "m": method,
                                       "p": {} if params is None else params}))
        async with asyncio.timeout(timeout_s):
            return await future

    async def wait_response(self, request_id: int | None, timeout_s: float = 10.0
                            ) -> dict[str, Any]:
        """A response frame with this id (None for errors about unreadable frames)."""
        def find() -> dict[str, Any] | None:
            for r in self.received:
                if r.frame.get("t") == "res" and r.frame.get("id", -1) == request_id:
                    return r.frame
            return None
        return await self.wait_until(find, timeout_s, f"response to {request_id}")


# -- sockets --------------------------------------------------------------------------------------
def unix_listener(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(16)
    sock.setblocking(False)
    return sock


def tcp_listener_in_netns(netns: str, port: int = 0) -> socket.socket:
    """A socket listening on 127.0.0.1:`port` inside /run/netns/`netns`: a socket belongs to
    the namespace of the thread that made it, so a short-lived thread enters it (setns is
    per thread for network namespaces) and the socket outlives the thread."""
    made: list[socket.socket | BaseException] = []

    def make() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns")
            finally:
                os.close(fd)
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))
            sock.listen(16)
            sock.setblocking(False)
            made.append(sock)
        except BaseException as exc:
            made.append(exc)

    thread = threading.Thread(target=make, name=f"netns-{netns}")
    thread.start()
    thread.join(10)
    result = made[0]
    if isinstance(result, BaseException):
        raise result
    return result


class CoordinatorThread:
    """The test coordinator on its own event loop in a thread, for tests that drive the real
    daemon synchronously. Listens on 127.0.0.1 inside the test host `netns`."""

    def __init__(self, netns: str, token: str = "test-token",
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.netns = netns
        self.ssl_context = ssl_context
        self.coordinator: TestCoordinator | None = None
        self.token = token
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="coordinator",
                                        daemon=True)

    @property
    def url(self) -> str:
        scheme = "ws" if self.ssl_context is None else "wss"
        return f"{scheme}://127.0.0.1:{self.port}{PATH}"

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    def start(self) -> CoordinatorThread:
        self._thread.start()

        async def make() -> TestCoordinator:
            return TestCoordinator(self.token)

        self.coordinator = self.run(make())
        self.come_back()
        return self

    def come_back(self) -> None:
        sock = tcp_listener_in_netns(self.netns, self.port)
        self.port = sock.getsockname()[1]
        assert self.coordinator is not None
        self.run(self.coordinator.start(sock, self.ssl_context))

    def go_away(self) -> None:
        assert self.coordinator is not None
        self.run(self.coordinator.stop())

    def request(self, method: str, params: Any = None, timeout_s: float = 60.0
                ) -> dict[str, Any]:
        assert self.coordinator is not None
        return self.run(self.coordinator.request(method, params, timeout_s), timeout_s + 5)

    def snapshot(self, read: Callable[[TestCoordinator], T]) -> T:
        """Read the coordinator's records on its own loop (they are not thread-safe)."""
        async def call() -> T:
            assert self.coordinator is not None
            return read(self.coordinator)
        return self.run(call())

    def wait(self, read: Callable[[TestCoordinator], T], timeout_s: float,
             what: str = "condition") -> T:
        return wait_for(lambda: self.snapshot(read), timeout_s, interval_s=0.05, what=what)

    def close(self) -> None:
        if self._thread.is_alive():
            if self.coordinator is not None:
                self.run(self.coordinator.stop())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop.close()
