"""The router of standalone mode: an HTTP/1.1 reverse proxy on 127.0.0.1:PORT that spreads
requests round-robin over the web dynos that are `up`, adds Heroku's request headers, and
reports one Heroku-style router line per request (`at=info method=GET path="/" …`)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import ipaddress
import logging
import re
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from types import SimpleNamespace
from typing import Any, NamedTuple

import aiohttp
from aiohttp import WSMsgType, hdrs, web
from multidict import CIMultiDict, MultiMapping, istr
from yarl import URL

log = logging.getLogger(__name__)

# Dynos run on this host: a connect that takes longer than this is a dyno that is not
# accepting, and the next one is tried (Heroku waits 5 s across its network, H19).
CONNECT_TIMEOUT_S = 1.0
SERVICE_TIMEOUT_S = 30.0  # Heroku's H12: the response must start within 30 s
IDLE_TIMEOUT_S = 55.0  # Heroku's rolling window: a response body silent this long is cut
CLIENT_KEEPALIVE_S = 90.0  # an idle client connection is closed after this
BACKEND_KEEPALIVE_S = 30.0  # an idle pooled connection to a dyno is closed after this
CLOSE_GRACE_S = 2.0  # requests in flight at close() get this long before they are cancelled

# RFC 9110 §7.6.1 hop-by-hop fields, plus the non-standard Proxy-Connection; any field
# named in Connection is hop-by-hop too. Expect is answered by the router itself.
HOP_BY_HOP = frozenset(istr(name) for name in (
    "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization",
    "Proxy-Connection", "TE", "Trailer", "Transfer-Encoding", "Upgrade"))
X_REQUEST_ID = istr("X-Request-Id")
X_FORWARDED_FOR = istr("X-Forwarded-For")
X_FORWARDED_PORT = istr("X-Forwarded-Port")
X_FORWARDED_PROTO = istr("X-Forwarded-Proto")
# Heroku keeps a client's X-Request-Id of 20-200 characters of this alphabet.
_REQUEST_ID = re.compile(r"[A-Za-z0-9+=/-]{20,200}")
# The client's own headers that aiohttp's client would otherwise add defaults for.
_NO_AUTO_HEADERS = (hdrs.ACCEPT, hdrs.ACCEPT_ENCODING, hdrs.USER_AGENT, hdrs.CONTENT_TYPE)
_ERROR_PAGE = (b"<!DOCTYPE html>\n<html><head><title>Application Error</title></head><body>"
               b"<h1>Application error</h1><p>An error occurred in the application and your "
               b"page could not be served. The router's log line says why.</p></body></html>\n")


class Backend(NamedTuple):
    """A web dyno that is `up`: its name (for log lines) and where it listens."""

    name: str
    host: str
    port: int


class ProxyError(Exception):
    """The router cannot listen; carries the address and the errno."""

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


@functools.lru_cache(maxsize=1024)  # asked once per request, of a handful of addresses
def is_loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False


class RouterError(NamedTuple):
    """A Heroku router error: its code, its description and the status the client gets."""

    code: str
    desc: str
    status: int


# Heroku's codes and wording (devcenter "Heroku Error Codes"); people grep for them.
H10 = RouterError("H10", "App crashed", 503)  # no web dyno up, or none accepts a connection
H12 = RouterError("H12", "Request timeout", 503)
H13 = RouterError("H13", "Connection closed without response", 503)
H15 = RouterError("H15", "Idle connection", 503)
H19 = RouterError("H19", "Backend connection timeout", 503)
H27 = RouterError("H27", "Client Request Interrupted", 499)


@dataclass(frozen=True, slots=True)
class RouterLine:
    """One request as Heroku's router logs it; None prints as an empty value (`connect=`)."""

    method: str
    path: str
    host: str
    request_id: str
    fwd: str
    dyno: str = ""
    connect_ms: int | None = None
    service_ms: int | None = None
    status: int = 0
    bytes: int | None = None
    error: RouterError | None = None

    def format(self) -> str:
        def opt(value: int | None, unit: str = "") -> str:
            return "" if value is None else f"{value}{unit}"

        head = "at=info" if self.error is None else (
            f'at=error code={self.error.code} desc="{self.error.desc}"')
        return (f'{head} method={self.method} path="{_quoted(self.path)}" host={self.host} '
                f'request_id={self.request_id} fwd="{_quoted(self.fwd)}" dyno={self.dyno} '
                f"connect={opt(self.connect_ms, 'ms')} service={opt(self.service_ms, 'ms')} "
                f"status={self.status} bytes={opt(self.bytes)} protocol=http")


def _quoted(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


def _hop_by_hop(headers: MultiMapping[str]) -> frozenset[str]:
    named = {istr(token.strip()) for value in headers.getall(hdrs.CONNECTION, ())
             for token in value.split(",") if token.strip()}
    return HOP_BY_HOP.union(named)


def forwarded_headers(headers: MultiMapping[str], client_ip: str, port: int,
                      trusted: bool) -> CIMultiDict[str]:
    """The request headers a dyno gets: the client's end-to-end ones, X-Request-Id kept when
    valid, and X-Forwarded-* as Heroku sets them. A trusted (loopback) client, such as a
    TLS-terminating balancer in front, keeps its X-Forwarded-For chain and -Proto."""
    drop = _hop_by_hop(headers) | {hdrs.EXPECT}
    out: CIMultiDict[str] = CIMultiDict(
        (name, value) for name, value in headers.items() if name not in drop)
    request_id = headers.get(X_REQUEST_ID, "")
    out[X_REQUEST_ID] = request_id if _REQUEST_ID.fullmatch(request_id) else str(uuid.uuid4())
    chain = ", ".join(headers.getall(X_FORWARDED_FOR, ()))
    out[X_FORWARDED_FOR] = f"{chain}, {client_ip}" if trusted and chain else client_ip
    out[X_FORWARDED_PORT] = str(port)
    proto = headers.get(X_FORWARDED_PROTO, "")
    out[X_FORWARDED_PROTO] = proto if trusted and proto else "http"
    return out


def response_headers(headers: MultiMapping[str]) -> CIMultiDict[str]:
    """The dyno's response headers without its hop-by-hop ones (Content-Length stays: the
    client gets the body as the dyno framed it, or chunked when the dyno gave no length)."""
    drop = _hop_by_hop(headers)
    return CIMultiDict((name, value) for name, value in headers.items() if name not in drop)


@dataclass(slots=True)
class _Exchange:
    """One request on its way through: its router line so far and its clock. It is also the
    client's per-request trace context, which adds the time spent opening connections."""

    line: RouterLine
    started: float
    connect_s: float = 0.0
    create_started: float = 0.0
    logged: bool = False

    def elapsed(self, **changes: Any) -> RouterLine:
        """The line with connect and service times now, and `changes`."""
        service_s = time.perf_counter() - self.started - self.connect_s
        return replace(self.line, connect_ms=_ms(self.connect_s), service_ms=_ms(service_s),
                       **changes)


# ws_connect takes no trace context: a WebSocket's line has its connect time in service.
async def _create_start(_session: Any, ctx: SimpleNamespace, _params: Any) -> None:
    if isinstance(exchange := ctx.trace_request_ctx, _Exchange):
        exchange.create_started = time.perf_counter()


async def _create_end(_session: Any, ctx: SimpleNamespace, _params: Any) -> None:
    if isinstance(exchange := ctx.trace_request_ctx, _Exchange):
        exchange.connect_s += time.perf_counter() - exchange.create_started


def _ms(seconds: float) -> int:
    return max(0, round(seconds * 1000))


class Router:
    """Serves HTTP/1.1 on `listener` and forwards each request to the next `up` web dyno;
    `on_line` gets one router line per request. A dyno refusing the connection (or not
    accepting within the connect timeout) is skipped for the next one: nothing was sent yet.
    When none is left the client gets 503 and the line says H10 (H19 when the last one timed
    out) — Heroku's codes for an app whose dynos do not take connections."""

    def __init__(self, listener: socket.socket, backends: Callable[[], Sequence[Backend]],
                 on_line: Callable[[str], None], *,
                 service_timeout_s: float = SERVICE_TIMEOUT_S,
                 connect_timeout_s: float = CONNECT_TIMEOUT_S,
                 idle_timeout_s: float = IDLE_TIMEOUT_S,
                 trusted: Callable[[str], bool] = is_loopback) -> None:
        self._listener = listener
        self._backends = backends
        self._on_line = on_line
        self._service_timeout_s = service_timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._idle_timeout_s = idle_timeout_s
        self._trusted = trusted
        host, port = listener.getsockname()[:2]
        self._address = (str(host), int(port))  # kept: close() closes the listener
        self._turn = 0
        self._runner: web.ServerRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def address(self) -> tuple[str, int]:
        return self._address

    async def start(self) -> None:
        trace = aiohttp.TraceConfig(trace_config_ctx_factory=SimpleNamespace)
        trace.on_connection_create_start.append(_create_start)
        trace.on_connection_create_end.append(_create_end)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=BACKEND_KEEPALIVE_S,
                                           use_dns_cache=False),
            # sock_read bounds each wait for the dyno once it is connected (the body's
            # rolling window); the wait for the response head is bounded by H12 instead.
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self._connect_timeout_s,
                                          sock_read=self._idle_timeout_s),
            cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False,
            skip_auto_headers=_NO_AUTO_HEADERS, trace_configs=[trace])
        # handler_cancellation: a client that goes away cancels its request to the dyno too.
        server = web.Server(self._handle, handler_cancellation=True, access_log=None,
                            keepalive_timeout=CLIENT_KEEPALIVE_S, auto_decompress=False)
        self._runner = web.ServerRunner(server, shutdown_timeout=CLOSE_GRACE_S)
        try:
            await self._runner.setup()
            await web.SockSite(self._runner, self._listener).start()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Stop listening, let requests in flight finish for a moment, then end them all and
        the connections to the dynos. Safe to call twice."""
        runner, self._runner = self._runner, None
        session, self._session = self._session, None
        if runner is not None:
            await runner.cleanup()
        if session is not None:
            await session.close()

    def _order(self) -> list[Backend]:
        """Backends to try for the next request: round-robin, failing over to the rest."""
        backends = list(self._backends())
        if not backends:
            return []
        start = self._turn % len(backends)
        self._turn += 1
        return backends[start:] + backends[:start]

    def _report(self, exchange: _Exchange, line: RouterLine) -> None:
        exchange.logged = True
        self._on_line(line.format())

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        started = time.perf_counter()
        client_ip = request.remote or ""
        headers = forwarded_headers(request.headers, client_ip, self._address[1],
                                    self._trusted(client_ip))
        exchange = _Exchange(RouterLine(
            request.method, request.raw_path, request.headers.get(hdrs.HOST, ""),
            headers[X_REQUEST_ID], headers[X_FORWARDED_FOR]), started)
        try:
            return await self._forward(request, headers, exchange)
        except asyncio.CancelledError:
            # The client went away before its response began (or the router is closing).
            if not exchange.logged:
                self._report(exchange, exchange.elapsed(status=H27.status, error=H27))
            raise

    async def _forward(self, request: web.BaseRequest, headers: CIMultiDict[str],
                       exchange: _Exchange) -> web.StreamResponse:
        backends = self._order()
        if not backends:
            return self._error(exchange, exchange.line, H10)
        if request.headers.get(hdrs.EXPECT, "").lower() == "100-continue" \
                and request.version >= (1, 1):
            # What aiohttp's default expect handler does; the bare server has no router
            # to call it. The dyno then gets the body without an Expect of its own.
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0
        upgrade = request.headers.get(hdrs.UPGRADE, "").lower() == "websocket"
        session = self._session
        assert session is not None
        target = request.raw_path if request.raw_path.startswith("/") \
            else request.rel_url.raw_path_qs
        path, _, query = target.partition("?")
        failure = H10
        for backend in backends:
            exchange.line = replace(exchange.line, dyno=backend.name)
            url = URL.build(scheme="http", host=backend.host, port=backend.port, path=path,
                            query_string=query, encoded=True)
            attempt = time.perf_counter()
            try:
                if upgrade:
                    return await self._websocket(request, session, url, headers, exchange)
                async with asyncio.timeout(self._service_timeout_s):
                    response = await session.request(
                        request.method, url, headers=headers, allow_redirects=False,
                        data=request.content if request.body_exists else None,
                        trace_request_ctx=exchange)
            except aiohttp.ConnectionTimeoutError:
                exchange.connect_s += time.perf_counter() - attempt
                failure = H19
                log.info("dyno %s did not accept a connection in time", backend.name)
                continue
            except aiohttp.ClientConnectorError as exc:
                exchange.connect_s += time.perf_counter() - attempt
                failure = H10
                log.info("dyno %s refused a connection: %s", backend.name, exc.os_error)
                continue
            except TimeoutError:
                return self._error(exchange, exchange.elapsed(bytes=0), H12)
            except aiohttp.ClientError as exc:
                log.info("dyno %s gave no response: %r", backend.name, exc)
                return self._error(exchange, exchange.elapsed(bytes=0), H13)
            return await self._relay(request, response, exchange)
        return self._error(exchange, exchange.elapsed(dyno="", bytes=0), failure)

    async def _relay(self, request: web.BaseRequest, response: aiohttp.ClientResponse,
                     exchange: _Exchange) -> web.StreamResponse:
        """Send the dyno's response on as it comes: each piece the dyno sends is written to
        the client at once (never buffered whole), with back-pressure both ways."""
        sent = 0
        error: RouterError | None = None
        headers = response_headers(response.headers)
        if response.content.is_eof() and request.method != hdrs.METH_HEAD \
                and response.status >= 200 and response.status not in (204, 304):
            # The whole body came with the head (most responses do): head and body leave in
            # one send, as the dyno sent them, instead of two.
            try:
                body = await response.read()
            except aiohttp.ClientError as exc:  # a body shorter than its Content-Length
                log.info("dyno %s ended its response early: %r", exchange.line.dyno, exc)
                return self._error(exchange, exchange.elapsed(bytes=0), H13)
            finally:
                response.release()
            headers.popall(hdrs.CONTENT_LENGTH, None)  # set again from the body
            self._report(exchange, exchange.elapsed(status=response.status, bytes=len(body)))
            return web.Response(status=response.status, reason=response.reason,
                                headers=headers, body=body)
        try:
            out = web.StreamResponse(status=response.status, reason=response.reason,
                                     headers=headers)
            await out.prepare(request)
            try:
                async for chunk in response.content.iter_any():
                    await out.write(chunk)
                    sent += len(chunk)
            except aiohttp.ClientError as exc:
                # The head is out: the only way left to tell the client is to cut its
                # connection (a last empty chunk would make a cut body look whole).
                if isinstance(exc, TimeoutError):
                    error = H15
                log.info("dyno %s ended its response early: %r", exchange.line.dyno, exc)
                if request.transport is not None:
                    request.transport.abort()
            else:
                await out.write_eof()
        finally:
            response.release()
        self._report(exchange, exchange.elapsed(status=response.status, bytes=sent, error=error))
        return out

    async def _websocket(self, request: web.BaseRequest, session: aiohttp.ClientSession,
                         url: URL, headers: CIMultiDict[str],
                         exchange: _Exchange) -> web.StreamResponse:
        """Open the WebSocket to the dyno first (so a refusal fails over like any request),
        then accept the client's with the subprotocol the dyno chose, and relay messages
        both ways until either side closes. The router line is logged at the upgrade."""
        protocols = [p.strip() for p in request.headers.get(hdrs.SEC_WEBSOCKET_PROTOCOL,
                                                              "").split(",") if p.strip()]
        forwarded = CIMultiDict((name, value) for name, value in headers.items()
                                if not name.startswith("Sec-WebSocket-"))
        try:
            async with asyncio.timeout(self._service_timeout_s):
                upstream = await session.ws_connect(
                    url, headers=forwarded, protocols=protocols, max_msg_size=0,
                    autoclose=False)
        except aiohttp.WSServerHandshakeError as exc:
            # The dyno answered without upgrading: the client gets its status.
            self._report(exchange, exchange.elapsed(status=exc.status, bytes=0))
            return web.Response(status=exc.status)
        async with upstream:
            client = web.WebSocketResponse(
                protocols=(upstream.protocol,) if upstream.protocol else (), max_msg_size=0,
                autoclose=False)
            await client.prepare(request)
            self._report(exchange, exchange.elapsed(status=101, bytes=0))
            async with asyncio.TaskGroup() as group:
                request_id = exchange.line.request_id
                group.create_task(_pump(client, upstream), name=f"router-ws-up-{request_id}")
                group.create_task(_pump(upstream, client), name=f"router-ws-down-{request_id}")
        return client

    def _error(self, exchange: _Exchange, line: RouterLine,
               error: RouterError) -> web.StreamResponse:
        self._report(exchange, replace(line, status=error.status, error=error))
        return web.Response(status=error.status, body=_ERROR_PAGE, content_type="text/html",
                            charset="utf-8", headers={hdrs.CACHE_CONTROL: "no-cache, no-store"})


# Close codes that only report what happened and must never be sent (RFC 6455 §7.4.1).
_UNSENDABLE_CLOSE = {1005: aiohttp.WSCloseCode.OK, 1006: aiohttp.WSCloseCode.INTERNAL_ERROR,
                     1015: aiohttp.WSCloseCode.INTERNAL_ERROR}


async def _pump(source: Any, sink: Any) -> None:
    """Relay messages from one WebSocket to the other until `source` closes or breaks; then
    close `sink` with the same code (the other pump then ends too)."""
    try:
        async for message in source:
            if message.type is WSMsgType.TEXT:
                await sink.send_str(message.data)
            elif message.type is WSMsgType.BINARY:
                await sink.send_bytes(message.data)
    except (ConnectionError, aiohttp.ClientError) as exc:
        log.debug("WebSocket relay ended: %r", exc)
    code = source.close_code or aiohttp.WSCloseCode.OK
    with contextlib.suppress(ConnectionError, aiohttp.ClientError):
        await sink.close(code=_UNSENDABLE_CLOSE.get(code, code))
