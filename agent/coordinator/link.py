"""The agent's connection to its coordinator (docs/protocol.md §1, §3, §5, §6): dials out over
WebSocket (TLS, bearer token), says hello, sends buffered `dyno.state` events in order,
heartbeats and metrics, answers requests, and reconnects with jittered backoff. What lives as
long as one connection (the log subscriptions) is entered through `connection_scope`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

import aiohttp

from agent import errors
from agent.coordinator.frames import (
    HARD_FRAME_BYTES,
    MAX_FRAME_BYTES,
    CoordinatorError,
    Event,
    Frame,
    FrameError,
    Request,
    Response,
    decode,
    encode,
    error_body,
)
from agent.errors import excerpt
from agent.observability import logs
from agent.supervision.events import to_wire
from agent.supervision.states import StateChange

log = logging.getLogger(__name__)

SUBPROTOCOL = "dynoagent.v1"
CONNECT_PATH_HINT = "/v1/agents/connect"
# aiohttp refuses a message whose size reaches its max_msg_size (>=, not >): one byte more
# makes HARD_FRAME_BYTES itself the largest message that is read (docs/protocol.md §8).
WS_MAX_MSG_SIZE = HARD_FRAME_BYTES + 1
HEARTBEAT_INTERVAL_S = 10.0
METRICS_INTERVAL_S = 20.0
BACKOFF_MIN_S = 0.5
BACKOFF_MAX_S = 30.0
EVENT_BUFFER = 10_000
HELLO_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 10.0
SEND_TIMEOUT_S = 10.0
CLOSE_TIMEOUT_S = 2.0
# Requests are handled concurrently (a sync waits for graceful stops); beyond this many in
# flight a request is refused with `busy` instead of growing without bound.
MAX_REQUESTS_IN_FLIGHT = 64


# Entered once per connection, with the link's send, and left when the connection ends (after
# every request handler of that connection has ended).
ConnectionScope = Callable[[Callable[[Frame], Awaitable[None]]],
                           AbstractAsyncContextManager[object]]


class LinkError(CoordinatorError):
    """Connecting or saying hello failed; `url` and, for HTTP refusals, `status`."""

    def __init__(self, url: str, message: str, status: int | None = None) -> None:
        super().__init__(f"{url}: {message}")
        self.url = url
        self.message = message
        self.status = status


class RequestFailed(CoordinatorError):
    """The coordinator answered one of the agent's requests with an error."""

    def __init__(self, method: str, code: str, message: str) -> None:
        super().__init__(f"{method}: {code}: {message}")
        self.method = method
        self.code = code
        self.message = message


class LinkState(StrEnum):
    CONNECTING = "connecting"
    CONNECTED = "connected"  # hello answered
    DISCONNECTED = "disconnected"
    CLOSED = "closed"


def backoff_delay(attempt: int, rng: random.Random, min_s: float = BACKOFF_MIN_S,
                  max_s: float = BACKOFF_MAX_S) -> float:
    """Equal-jitter exponential backoff: half the doubled base, plus a random half, so a
    fleet whose coordinator came back does not reconnect in lock-step."""
    base = min(max_s, min_s * (2.0 ** min(attempt, 32)))
    return base / 2 + rng.uniform(0.0, base / 2)


def _now_text() -> str:
    return logs.format_timestamp(datetime.now(UTC))


@dataclass
class Counters:
    connects: int = 0
    connect_failures: int = 0
    frames_in: int = 0
    frames_out: int = 0
    requests: int = 0
    errors_sent: int = 0
    bad_frames: int = 0
    events_sent: int = 0
    events_dropped: int = 0
    heartbeats: int = 0


class _Once:
    """Logs the first occurrence of each kind of problem per connection at WARNING and the
    rest at DEBUG, so a misbehaving peer cannot flood the journal."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def warn(self, kind: str, message: str, *args: Any) -> None:
        level = logging.DEBUG if kind in self.seen else logging.WARNING
        self.seen.add(kind)
        log.log(level, message, *args)


class CoordinatorLink:
    """One agent's connection to its coordinator, kept up for the agent's whole life.

    `publish_state` is the supervisor's state listener: every transition is queued in a
    bounded buffer (newest kept, losses counted) and sent in order once connected; so is
    every finished build (`publish_build`).
    """

    def __init__(self, url: str | Sequence[str],
                 handler: Callable[[str, dict[str, Any]], Awaitable[Any]],
                 hello: Callable[[], dict[str, Any]],
                 metrics: Callable[[], list[dict[str, Any]]], *,
                 token_file: Path | None = None, ca_file: Path | None = None,
                 client_cert_file: Path | None = None, client_key_file: Path | None = None,
                 heartbeat: Callable[[], dict[str, Any]] | None = None,
                 heartbeat_interval_s: float = HEARTBEAT_INTERVAL_S,
                 metrics_interval_s: float = METRICS_INTERVAL_S,
                 backoff_min_s: float = BACKOFF_MIN_S, backoff_max_s: float = BACKOFF_MAX_S,
                 buffer_limit: int = EVENT_BUFFER, max_frame_bytes: int = MAX_FRAME_BYTES,
                 hello_timeout_s: float = HELLO_TIMEOUT_S,
                 session_factory: Callable[[], aiohttp.ClientSession] | None = None,
                 connection_scope: ConnectionScope | None = None,
                 rng: random.Random | None = None) -> None:
        # Several URLs are replicas of one coordinator: each connection attempt takes the next.
        self.urls = (url,) if isinstance(url, str) else tuple(url)
        if not self.urls:
            raise ValueError("no coordinator URL")
        self._url_index = 0
        self.handler = handler
        self.hello = hello
        self.metrics = metrics
        self.heartbeat = heartbeat or (lambda: {})
        self.token_file = token_file
        self.ca_file = ca_file
        self.client_cert_file = client_cert_file
        self.client_key_file = client_key_file
        self.heartbeat_interval_s = heartbeat_interval_s
        self.metrics_interval_s = metrics_interval_s
        self.backoff_min_s = backoff_min_s
        self.backoff_max_s = backoff_max_s
        self.max_frame_bytes = max_frame_bytes
        self.hello_timeout_s = hello_timeout_s
        self.session_factory = session_factory or aiohttp.ClientSession
        self.connection_scope: ConnectionScope = connection_scope or (
            lambda send: contextlib.nullcontext())
        self.rng = rng or random.Random()
        self.state = LinkState.DISCONNECTED
        self.counters = Counters()
        self.connected_since: float | None = None
        self.last_heartbeat_at: float | None = None
        self.last_error: str | None = None
        # This end's address of the current (or last) connection: the default underlay
        # address of private spaces (`hello.network`).
        self.local_address: str | None = None
        self._outbox: deque[Event] = deque(maxlen=buffer_limit)
        self._lost_unreported = 0
        self._seq = itertools.count(1)
        self._ids = itertools.count(1)
        self._outbox_ready = asyncio.Event()
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._send_lock = asyncio.Lock()
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._task: asyncio.Task[None] | None = None
        self._attempt = 0
        self._once = _Once()

    # -- what the agent calls ---------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="coordinator-link")

    async def close(self) -> None:
        """Close the connection (1001, going away) and stop reconnecting."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
            # The session's sockets (a connect cut short by the cancel) close on the loop's
            # next turn: give it that turn, so none is left to the garbage collector.
            await asyncio.sleep(0)
        self.state = LinkState.CLOSED

    def publish_state(self, change: StateChange, ip: str | None = None) -> None:
        """The supervisor's state listener (with the dyno's private address, when it has
        one); never blocks, never raises."""
        self._queue(Event("dyno.state", {**to_wire(change), "ip": ip,
                                         "seq": next(self._seq)}))

    def publish_build(self, build: dict[str, Any]) -> None:
        """The build registry's listener: a finished build, buffered and sent in order with
        the state changes (one `seq` for both); never blocks, never raises."""
        self._queue(Event("build.finished", {**build, "seq": next(self._seq)}))

    def _queue(self, event: Event) -> None:
        if len(self._outbox) == self._outbox.maxlen:
            self.counters.events_dropped += 1
            self._lost_unreported += 1
        self._outbox.append(event)
        self._outbox_ready.set()

    @property
    def url(self) -> str:
        """The URL of the current (or next) connection attempt."""
        return self.urls[self._url_index]

    @property
    def buffered(self) -> int:
        return len(self._outbox)

    def info(self) -> dict[str, Any]:
        def stamp(value: float | None) -> str | None:
            return None if value is None else logs.format_timestamp(
                datetime.fromtimestamp(value, UTC))

        return {"state": str(self.state), "url": self.url, "urls": list(self.urls),
                "connected_since": stamp(self.connected_since),
                "last_heartbeat_at": stamp(self.last_heartbeat_at),
                "last_error": self.last_error, "events_buffered": len(self._outbox),
                "counters": dict(vars(self.counters))}

    # -- connection loop ----------------------------------------------------------------------
    async def _run(self) -> None:
        failures = _Once()
        while True:
            self.state = LinkState.CONNECTING
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except (LinkError, aiohttp.ClientError, OSError, TimeoutError,
                    RequestFailed) as exc:
                self.counters.connect_failures += 1
                self.last_error = str(exc) or type(exc).__name__
                failures.warn(type(exc).__name__, "coordinator link: %s; retrying with backoff",
                              self.last_error)
            except Exception as exc:
                # The task root: a bug in one session must not end reporting for good.
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("coordinator session failed")
            else:
                failures = _Once()
            finally:
                self.state = LinkState.DISCONNECTED
                self.connected_since = None
                # The next replica (a follower refuses until it leads; a leader that died
                # leaves the others). The backoff grows once per round over every URL.
                self._url_index = (self._url_index + 1) % len(self.urls)
            delay = backoff_delay(self._attempt // len(self.urls), self.rng,
                                  self.backoff_min_s, self.backoff_max_s)
            self._attempt += 1
            log.debug("reconnecting to the coordinator in %.2fs", delay)
            await asyncio.sleep(delay)

    def _ssl(self) -> ssl.SSLContext | bool:
        if not self.url.startswith("wss://"):
            return True
        context = ssl.create_default_context(
            cafile=str(self.ca_file) if self.ca_file is not None else None)
        if self.client_cert_file is not None:
            context.load_cert_chain(str(self.client_cert_file),
                                    str(self.client_key_file) if self.client_key_file else None)
        return context

    def _headers(self) -> dict[str, str]:
        if self.token_file is None:
            return {}
        try:
            # Read at every connect: a rotated token is used without restarting the agent.
            token = self.token_file.read_text().strip()
        except OSError as exc:
            raise LinkError(self.url, f"cannot read the token file {self.token_file}: "
                                      f"{exc.strerror}") from None
        if not token or any(c in token for c in "\r\n"):
            raise LinkError(self.url, f"the token file {self.token_file} holds no token")
        return {"Authorization": f"Bearer {token}"}

    async def _session(self) -> None:
        try:
            ssl_context = self._ssl()
        except (OSError, ssl.SSLError) as exc:
            raise LinkError(self.url, f"TLS set-up failed: {exc}") from None
        headers = self._headers()
        async with self.session_factory() as session:
            try:
                # A coordinator that accepts TCP but never answers the upgrade must cost one
                # failed attempt and a backoff, not aiohttp's default of minutes.
                async with asyncio.timeout(CONNECT_TIMEOUT_S):
                    ws = await session.ws_connect(
                        self.url, protocols=(SUBPROTOCOL,), headers=headers, ssl=ssl_context,
                        heartbeat=self.heartbeat_interval_s, max_msg_size=WS_MAX_MSG_SIZE,
                        timeout=aiohttp.ClientWSTimeout(ws_close=CLOSE_TIMEOUT_S),
                        autoclose=True, autoping=True)
            except TimeoutError:
                raise LinkError(self.url, f"no handshake within {CONNECT_TIMEOUT_S:g}s") \
                    from None
            except aiohttp.WSServerHandshakeError as exc:
                raise LinkError(self.url, f"handshake refused: {exc.status} {exc.message}",
                                exc.status) from None
            try:
                if ws.protocol != SUBPROTOCOL:
                    await ws.close(code=aiohttp.WSCloseCode.PROTOCOL_ERROR,
                                   message=f"subprotocol {SUBPROTOCOL} required".encode())
                    raise LinkError(self.url, f"the server did not accept subprotocol "
                                              f"{SUBPROTOCOL}")
                self._ws = ws
                self._once = _Once()
                sockname = ws.get_extra_info("sockname")
                if isinstance(sockname, tuple) and sockname:
                    self.local_address = str(sockname[0])
                async with self.connection_scope(self._send):
                    await self._serve(ws)
            finally:
                self._ws = None
                for future in self._pending.values():
                    if not future.done():
                        future.cancel()
                self._pending.clear()
                if not ws.closed:
                    with contextlib.suppress(Exception):
                        async with asyncio.timeout(CLOSE_TIMEOUT_S):
                            await ws.close(code=aiohttp.WSCloseCode.GOING_AWAY,
                                           message=b"agent going away")

    async def _serve(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        handlers: set[asyncio.Task[None]] = set()
        reader = asyncio.create_task(self._read(ws, handlers), name="coordinator-read")
        hello = asyncio.create_task(self._request("hello", self.hello()),
                                    name="coordinator-hello")
        others: list[asyncio.Task[None]] = []
        try:
            await asyncio.wait([reader, hello], timeout=self.hello_timeout_s,
                               return_when=asyncio.FIRST_COMPLETED)
            if not hello.done():
                if reader.done():
                    raise LinkError(self.url, "connection closed before hello was answered")
                raise LinkError(self.url, f"no answer to hello within "
                                          f"{self.hello_timeout_s:g}s")
            ack = hello.result()
            self.state = LinkState.CONNECTED
            self.connected_since = time.time()
            self.counters.connects += 1
            self._attempt = 0
            self.last_error = None
            log.info("connected to coordinator %s", self.url)
            log.debug("hello acknowledged: %s", excerpt(ack))
            others = [asyncio.create_task(self._write(), name="coordinator-write"),
                      asyncio.create_task(self._tick(self.heartbeat_interval_s, self._beat),
                                          name="coordinator-heartbeat"),
                      asyncio.create_task(self._tick(self.metrics_interval_s, self._metrics),
                                          name="coordinator-metrics")]
            done, _ = await asyncio.wait([reader, *others],
                                         return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                failure = None if task.cancelled() else task.exception()
                if failure is not None:
                    raise failure
            log.warning("coordinator connection closed (code %s)", ws.close_code)
        finally:
            for task in [reader, hello, *others, *handlers]:
                task.cancel()
            await asyncio.gather(reader, hello, *others, *handlers, return_exceptions=True)

    # -- sending ------------------------------------------------------------------------------
    async def _send(self, frame: Frame) -> None:
        ws = self._ws
        if ws is None or ws.closed:
            raise ConnectionResetError("not connected to the coordinator")
        data = encode(frame)
        async with self._send_lock, asyncio.timeout(SEND_TIMEOUT_S):
            await ws.send_bytes(data)
        self.counters.frames_out += 1

    async def _request(self, method: str, params: dict[str, Any]) -> Any:
        request_id = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            await self._send(Request(request_id, method, params))
            response: Response = await future
        finally:
            self._pending.pop(request_id, None)
        if response.error is not None:
            # The coordinator's words end up in the log and in `last_error`: bounded too.
            code = str(response.error.get("code"))
            raise RequestFailed(method, code if len(code) <= 64 and code.isprintable()
                                else excerpt(code),
                                errors.bounded(str(response.error.get("message", ""))))
        return response.result

    async def _write(self) -> None:
        """Send buffered events in order. An event leaves the buffer only once sent, so a
        connection lost mid-send delivers it again after reconnect (at least once; `seq`
        lets the coordinator drop duplicates)."""
        while True:
            if self._lost_unreported:
                lost, self._lost_unreported = self._lost_unreported, 0
                await self._send(Event("agent.events_lost", {"count": lost,
                                                             "at": _now_text()}))
            if not self._outbox:
                self._outbox_ready.clear()
                await self._outbox_ready.wait()
                continue
            event = self._outbox[0]
            await self._send(event)
            if self._outbox and self._outbox[0] is event:
                self._outbox.popleft()
            self.counters.events_sent += 1

    async def _tick(self, interval_s: float, call: Callable[[], Awaitable[None]]) -> None:
        while True:
            await call()
            await asyncio.sleep(interval_s)

    async def _beat(self) -> None:
        await self._send(Event("agent.heartbeat", {"at": _now_text(), **self.heartbeat()}))
        self.last_heartbeat_at = time.time()
        self.counters.heartbeats += 1

    async def _metrics(self) -> None:
        await self._send(Event("dyno.metrics", {"at": _now_text(), "dynos": self.metrics()}))

    # -- receiving ----------------------------------------------------------------------------
    async def _read(self, ws: aiohttp.ClientWebSocketResponse,
                    handlers: set[asyncio.Task[None]]) -> None:
        async for message in ws:
            self.counters.frames_in += 1
            if message.type is aiohttp.WSMsgType.ERROR:
                self._once.warn("ws-error", "coordinator connection failed: %s", message.data)
                return
            if message.type not in (aiohttp.WSMsgType.BINARY, aiohttp.WSMsgType.TEXT):
                continue
            try:
                frame = decode(message.data, self.max_frame_bytes)
            except FrameError as exc:
                self.counters.bad_frames += 1
                self._once.warn(exc.code, "refusing a coordinator frame: %s", exc)
                await self._reply_error(exc.request_id, exc.code, exc.message)
                continue
            if isinstance(frame, Response):
                future = self._pending.get(frame.id) if frame.id is not None else None
                if future is None:
                    self._once.warn("unexpected-response",
                                    "response to no pending request (id %s) ignored", frame.id)
                elif not future.done():
                    future.set_result(frame)
            elif isinstance(frame, Event):
                # The coordinator defines no events in protocol 1; later ones are ignored.
                self._once.warn(f"event-{frame.method}"[:80],
                                "ignoring unknown event %s from the coordinator",
                                excerpt(frame.method))
            elif len(handlers) >= MAX_REQUESTS_IN_FLIGHT:
                await self._reply_error(frame.id, "busy", f"more than "
                                        f"{MAX_REQUESTS_IN_FLIGHT} requests in flight")
            else:
                task = asyncio.create_task(self._answer(frame),
                                           name=f"coordinator-req-{frame.id}")
                handlers.add(task)
                task.add_done_callback(handlers.discard)

    async def _answer(self, request: Request) -> None:
        self.counters.requests += 1
        try:
            result = await self.handler(request.method, request.params)
        except errors.AgentError as exc:
            if not isinstance(exc, errors.NotFound | errors.Conflict | errors.Draining):
                self._once.warn(exc.code, "coordinator request %s refused: %s",
                                excerpt(request.method), exc.message)
            details = {"field": exc.field} if isinstance(exc, errors.InvalidSpec) else {}
            await self._reply_error(request.id, exc.code, exc.message, **details)
            return
        except Exception as exc:
            # The root of a request task: answer, never let the agent go down with it.
            log.exception("coordinator request %s failed", excerpt(request.method))
            await self._reply_error(request.id, errors.AgentError.code,
                                    errors.bounded(f"{type(exc).__name__}: {exc}"))
            return
        with contextlib.suppress(ConnectionError, TimeoutError, aiohttp.ClientError):
            await self._send(Response(request.id, result))

    async def _reply_error(self, request_id: int | None, code: str, message: str,
                           **details: Any) -> None:
        self.counters.errors_sent += 1
        with contextlib.suppress(ConnectionError, TimeoutError, aiohttp.ClientError):
            await self._send(Response(request_id, error=error_body(code, message, **details)))
