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
import random
import re
import socket
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import httptools

log = logging.getLogger(__name__)

# Dynos run on this host: a connect that takes longer than this is a dyno that is not
# accepting, and the next one is tried (Heroku waits 5 s across its network, H19).
CONNECT_TIMEOUT_S = 1.0
SERVICE_TIMEOUT_S = 30.0  # Heroku's H12: the response must start within 30 s
IDLE_TIMEOUT_S = 55.0  # Heroku's rolling window: a response body silent this long is cut
CLIENT_KEEPALIVE_S = 90.0  # an idle client connection is closed after this
BACKEND_KEEPALIVE_S = 30.0  # an idle pooled connection to a dyno is closed after this
CLOSE_GRACE_S = 2.0  # requests in flight at close() get this long before they are cancelled
# llhttp bounds nothing itself: a request or response head larger than this is refused.
MAX_HEAD_BYTES = 64 * 1024
# What the router holds of a client's bytes that no dyno takes yet (a body while the dyno's
# connection opens, requests pipelined behind the current one) before it stops reading it.
BUFFER_HIGH_BYTES = 256 * 1024
MAX_PIPELINED = 16
READ_BUFFER_BYTES = 256 * 1024  # as much as asyncio reads at once with a plain Protocol

# RFC 9110 §7.6.1 hop-by-hop fields, plus the non-standard Proxy-Connection; any field
# named in Connection is hop-by-hop too. Lower case: header names are compared lowered.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization",
    b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade"})
# Request fields the router sets itself (reading the client's first), or answers (Expect).
_REPLACED = frozenset({b"x-request-id", b"x-forwarded-for", b"x-forwarded-port",
                       b"x-forwarded-proto", b"expect"})
_REQUEST_DROP = HOP_BY_HOP | _REPLACED
# Heroku keeps a client's X-Request-Id of 20-200 characters of this alphabet.
_REQUEST_ID = re.compile(rb"[A-Za-z0-9+=/-]{20,200}")
_ERROR_PAGE = (b"<!DOCTYPE html>\n<html><head><title>Application Error</title></head><body>"
               b"<h1>Application error</h1><p>An error occurred in the application and your "
               b"page could not be served. The router's log line says why.</p></body></html>\n")
_ERROR_HEAD = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/html; charset=utf-8\r\n"
               b"Cache-Control: no-cache, no-store\r\nContent-Length: %d\r\n" % len(_ERROR_PAGE))
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
_LAST_CHUNK = b"0\r\n\r\n"


def _plain_response(status: bytes, text: bytes) -> bytes:
    return (b"HTTP/1.1 %s\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n%s" % (status, len(text), text))


_BAD_REQUEST = _plain_response(b"400 Bad Request", b"Bad Request")
_HEAD_TOO_LARGE = _plain_response(b"431 Request Header Fields Too Large",
                                  b"Request Header Fields Too Large")


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


@functools.lru_cache(maxsize=1024)  # asked once per connection, of a handful of addresses
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


def _ms(seconds: float) -> int:
    return max(0, round(seconds * 1000))


Headers = Sequence[tuple[bytes, bytes]]


def _named_in_connection(values: Sequence[bytes]) -> frozenset[bytes]:
    """The fields named in Connection header `values` that are not hop-by-hop already."""
    return frozenset(token.strip().lower() for value in values
                     for token in value.split(b",") if token.strip()) - HOP_BY_HOP


def _origin_form(target: bytes) -> bytes:
    """The request target a dyno gets: a proxy-style absolute URL loses scheme and host."""
    if target.startswith(b"/") or b"://" not in target:
        return target
    _, _, rest = target.partition(b"://")
    slash = rest.find(b"/")
    return rest[slash:] if slash >= 0 else b"/"


class RequestHead(NamedTuple):
    """The head a dyno gets for a request (without Host when the client sent none, and
    without the blank line), and what the router line and the relay need from it."""

    head: bytes
    request_id: str
    fwd: str
    host: str | None
    chunked: bool
    expect_continue: bool
    websocket: bool


def request_head(method: bytes, target: bytes, headers: Headers, client_ip: str, port: int,
                 trusted: bool, upgrade: bool,
                 drop: frozenset[bytes] = _REQUEST_DROP) -> RequestHead:
    """The client's end-to-end headers, X-Request-Id kept when valid, and X-Forwarded-* as
    Heroku sets them. A trusted (loopback) client, such as a TLS-terminating balancer in
    front, keeps its X-Forwarded-For chain and -Proto. A WebSocket upgrade (`upgrade`: the
    parser saw Connection: upgrade) keeps its Upgrade; other upgrades are dropped."""
    lines = [b"%s %s HTTP/1.1\r\n" % (method, _origin_form(target))]
    request_id: bytes | None = None
    proto: bytes | None = None
    host: bytes | None = None
    chain: list[bytes] = []
    connection: list[bytes] = []
    coding = expect = upgrade_to = b""
    for name, value in headers:
        lower = name.lower()
        if lower in drop:
            if lower == b"connection":
                connection.append(value)
            elif lower == b"x-request-id":
                request_id = value if request_id is None else request_id
            elif lower == b"x-forwarded-for":
                chain.append(value)
            elif lower == b"x-forwarded-proto":
                proto = value if proto is None else proto
            elif lower == b"transfer-encoding":
                coding = value
            elif lower == b"expect":
                expect = value
            elif lower == b"upgrade":
                upgrade_to = value
            continue
        if lower == b"host" and host is None:
            host = value
        lines += (name, b": ", value, b"\r\n")
    if connection and drop is _REQUEST_DROP and (named := _named_in_connection(connection)):
        # Rare: Connection names fields of its own. Once more, dropping those too.
        return request_head(method, target, headers, client_ip, port, trusted, upgrade,
                            drop | named)
    request_id = request_id if request_id is not None and _REQUEST_ID.fullmatch(request_id) \
        else _uuid4().encode()
    fwd = b", ".join((*chain, client_ip.encode())) if trusted and chain else client_ip.encode()
    proto = proto if trusted and proto else b"http"
    lines += (b"X-Request-Id: ", request_id, b"\r\nX-Forwarded-For: ", fwd,
              b"\r\nX-Forwarded-Port: %d\r\nX-Forwarded-Proto: " % port, proto, b"\r\n")
    chunked = b"chunked" in coding.lower()
    if chunked:  # the body is sent on as it comes, chunked again
        lines += (b"Transfer-Encoding: ", coding, b"\r\n")
    websocket = upgrade and upgrade_to.lower() == b"websocket"
    if websocket:
        lines += (b"Connection: Upgrade\r\nUpgrade: ", upgrade_to, b"\r\n")
    return RequestHead(b"".join(lines), request_id.decode("latin-1"), fwd.decode("latin-1"),
                       None if host is None else host.decode("latin-1"), chunked,
                       expect.lower() == b"100-continue", websocket)


def _uuid4() -> str:
    """A random (version 4) UUID, as uuid.uuid4() makes, from the `random` module: a request
    id is no secret, and this is a tenth of the cost of os.urandom and uuid.UUID."""
    value = random.getrandbits(128) & ~(0xF000 << 64 | 0xC000 << 48) | 0x4000 << 64 | 0x8000 << 48
    text = f"{value:032x}"
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


class ResponseHead(NamedTuple):
    """A dyno's response head as the client gets it (without framing fields and the blank
    line), and how the dyno framed the body."""

    lines: list[bytes]
    chunked: bool
    length: bool
    upgrade: bytes
    close: bool


def response_head(status: int, reason: bytes, headers: Headers,
                  drop: frozenset[bytes] = HOP_BY_HOP) -> ResponseHead:
    """The dyno's status line and headers without its hop-by-hop ones (Content-Length stays
    unless the body is chunked: the client gets the body as the dyno framed it)."""
    lines = [b"HTTP/1.1 %d %s\r\n" % (status, reason)]
    connection: list[bytes] = []
    chunked = length = False
    upgrade = b""
    for name, value in headers:
        lower = name.lower()
        if lower in drop:
            if lower == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif lower == b"connection":
                connection.append(value)
            elif lower == b"upgrade":
                upgrade = value
            continue
        if lower == b"content-length":
            length = True
        lines += (name, b": ", value, b"\r\n")
    if connection and drop is HOP_BY_HOP and (named := _named_in_connection(connection)):
        return response_head(status, reason, headers, drop | named)
    if chunked and length:  # Transfer-Encoding overrides Content-Length (RFC 9112 §6.3)
        return response_head(status, reason, [(n, v) for n, v in headers
                                              if n.lower() != b"content-length"], drop)
    close = any(token.strip().lower() == b"close" for value in connection
                for token in value.split(b","))
    return ResponseHead(lines, chunked, length, upgrade, close)


class _Exchange:
    """One request on its way through: the head the dyno gets, the body it has not got yet,
    the connection to the dyno once there is one, and the router line so far."""

    __slots__ = ("backends", "chunked", "client", "complete", "connect_s", "connecting",
                 "dispatched", "done", "dyno", "expect_continue", "failure", "fresh", "fwd",
                 "had_body", "head", "host", "http10", "keep_alive", "logged", "method", "path",
                 "pending", "pending_bytes", "request_id", "started", "upstream")

    def __init__(self, client: _Client, method: bytes, target: bytes, headers: Headers,
                 keep_alive: bool, http10: bool, upgrade: bool) -> None:
        self.started = time.perf_counter()
        self.client = client
        self.method = method
        self.path = _origin_form(target).decode("latin-1")
        head = request_head(method, target, headers, client.ip, client.router.address[1],
                            client.trusted, upgrade)
        self.head = head.head
        self.request_id = head.request_id
        self.fwd = head.fwd
        self.host = head.host
        self.chunked = head.chunked
        self.expect_continue = head.expect_continue and not http10
        # After an upgrade request the connection is no longer the client's to reuse.
        self.keep_alive = keep_alive and not upgrade
        self.http10 = http10
        self.pending: list[bytes] = []  # body bytes, framed, that no dyno has yet
        self.pending_bytes = 0
        self.had_body = False
        self.complete = False  # the whole request has been read from the client
        self.done = False  # answered, failed or abandoned: the rest of its body is dropped
        self.logged = False
        self.upstream: _Upstream | None = None
        self.connecting: asyncio.Task[None] | None = None
        self.dispatched = False
        self.backends: list[Backend] = []
        self.fresh = False  # the next attempt opens a new connection (a pooled one was stale)
        self.failure = H10
        self.dyno = ""
        self.connect_s = 0.0

    def head_for(self, backend: Backend) -> bytes:
        if self.host is None:  # HTTP/1.0 without Host: HTTP/1.1 requires one
            return self.head + b"Host: %s:%d\r\n\r\n" % (backend.host.encode(), backend.port)
        return self.head + b"\r\n"

    def add_body(self, piece: bytes) -> None:
        if self.done:
            return
        self.had_body = True
        if self.chunked:
            self.pending += (b"%x\r\n" % len(piece), piece, b"\r\n")
        else:
            self.pending.append(piece)
        self.pending_bytes += len(piece)
        self.client.buffered += len(piece)

    def end_body(self) -> None:
        self.complete = True
        if self.chunked and not self.done:
            self.pending.append(_LAST_CHUNK)

    def take_pending(self) -> bytes:
        data = b"".join(self.pending)
        self.pending.clear()
        self.client.buffered -= self.pending_bytes
        self.pending_bytes = 0
        return data

    def flush(self) -> None:
        """Send the dyno the body that came since the last flush, in one write."""
        if self.pending and self.upstream is not None:
            self.upstream.transport.write(self.take_pending())

    def report(self, status: int, sent: int | None, error: RouterError | None = None, *,
               timed: bool = True) -> None:
        self.logged = True
        connect_ms = service_ms = None
        if timed:
            connect_ms = _ms(self.connect_s)
            service_ms = _ms(time.perf_counter() - self.started - self.connect_s)
        line = RouterLine(self.method.decode("latin-1"), self.path, self.host or "",
                          self.request_id, self.fwd, self.dyno, connect_ms, service_ms,
                          status, sent, error)
        self.client.router._on_line(line.format())

    def fail(self, error: RouterError, *, timed: bool = True) -> None:
        """Answer the client 503 with the error page, and log `error`."""
        self.done = True
        self.report(error.status, 0 if timed else None, error, timed=timed)
        client = self.client
        keep = self.keep_alive and not client.closing
        client.transport.write(_ERROR_HEAD + (b"\r\n" if keep else b"Connection: close\r\n\r\n")
                               + _ERROR_PAGE)
        client.finished(self, keep)

    def abandon(self) -> None:
        """The client went away (or the router is closing): end the dyno's side too."""
        if self.done:
            return
        self.done = True
        if self.dispatched and not self.logged:  # one queued behind it was never begun
            self.report(H27.status, None, H27)
        if self.connecting is not None:
            self.connecting.cancel()
        if (upstream := self.upstream) is not None:
            self.upstream = None
            upstream.drop()


class _Client(asyncio.BufferedProtocol):
    """A client's connection: requests parsed as they come (pipelined ones queue behind the
    current one), answered in order; after a WebSocket upgrade, a raw pipe to the dyno."""

    transport: asyncio.Transport

    def __init__(self, router: Router) -> None:
        self.router = router
        self.parser = httptools.HttpRequestParser(self)
        self.queue: deque[_Exchange] = deque()  # queue[0] is being answered
        self.parsing: _Exchange | None = None  # the one whose body the parser is reading
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_bytes = -1  # -1 outside a request head
        self.head_began = False  # in the bytes being parsed
        self.message_ended = False  # in the bytes being parsed
        self.raw: list[bytes] | None = None  # after an upgrade request, until the dyno answers
        self.tunnel: _Upstream | None = None
        self.buffered = 0
        self.upstream_full = False
        self.reading_paused = False
        self.write_paused = False
        self.closing = False  # close once the queue is answered
        self.bad: bytes | None = None  # the answer to an unparsable request, after the queue
        self.advancing = False
        self.gone = False
        self.eof = False
        self.ip = ""
        self.trusted = False
        self.idle_since = 0.0
        self.timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # asyncio sets TCP_NODELAY on every TCP transport (3.6+): no Nagle stall here, nor
        # towards the dynos.
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.ip = str(peer[0]) if peer else ""
        self.trusted = self.router._trusted(self.ip)
        self.router._clients.add(self)
        self._idle()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.router._read_view

    def buffer_updated(self, nbytes: int) -> None:
        data = self.router._read_view[:nbytes]  # valid until the next read: copied or parsed
        if self.tunnel is not None:
            self.tunnel.transport.write(bytes(data))
            return
        if self.raw is not None:
            self._hold(bytes(data))
            return
        self.head_began = self.message_ended = False
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._upgraded(data, int(exc.args[0]))
        except httptools.HttpParserError as exc:
            self._unparsable(exc)
            return
        if self.head_bytes >= 0:  # inside a head (httptools holds a field being read)
            if not self.head_began:
                self.head_bytes += len(data)
            elif not self.message_ended:  # nothing before it in `data`: all of it is head
                self.head_bytes = len(data)
            if self.head_bytes > MAX_HEAD_BYTES:
                self._unparsable(None)
                return
        self.advance()

    def eof_received(self) -> bool:
        self.eof = True
        if (tunnel := self.tunnel) is not None:
            if tunnel.eof or not tunnel.transport.can_write_eof():
                return False
            tunnel.transport.write_eof()
            return True
        # A client that shuts its side has gone, as aiohttp's server (and Heroku's router)
        # take it: what it asked for is abandoned, H27.
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.gone = True
        self.router._client_gone(self)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.tunnel is not None:
            self.tunnel.transport.close()
        queue, self.queue = self.queue, deque()
        for exchange in queue:
            exchange.abandon()

    def pause_writing(self) -> None:
        self.write_paused = True
        if (upstream := self._source()) is not None:
            upstream.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if (upstream := self._source()) is not None:
            upstream.resume_reading()

    # -- httptools callbacks -------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = []
        self.head_bytes = 0
        self.head_began = True

    def on_url(self, url: bytes) -> None:
        self.url += url
        self.head_bytes += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        # After the head, these are a chunked body's trailer fields: dropped, like aiohttp.
        if self.head_bytes >= 0:
            self.headers.append((name, value))
            self.head_bytes += len(name) + len(value)

    def on_headers_complete(self) -> None:
        self.head_bytes = -1
        parser = self.parser
        exchange = _Exchange(self, parser.get_method(), self.url, self.headers,
                             parser.should_keep_alive(), parser.get_http_version() == "1.0",
                             parser.should_upgrade())
        self.parsing = exchange
        self.queue.append(exchange)

    def on_body(self, body: bytes) -> None:
        if self.parsing is not None:
            self.parsing.add_body(body)

    def on_message_complete(self) -> None:
        self.message_ended = True
        if self.parsing is not None:
            self.parsing.end_body()
            self.parsing = None

    # -- the queue -------------------------------------------------------------------------------

    def advance(self) -> None:
        """Start the request at the head of the queue, or send its dyno the body that came;
        close when nothing is left to answer and the connection is closing."""
        if self.advancing or self.gone:
            return
        self.advancing = True
        try:
            while self.queue:
                exchange = self.queue[0]
                if exchange.dispatched:
                    exchange.flush()
                    break
                self.router._dispatch(exchange)
                if self.queue and self.queue[0] is exchange:
                    break
            if not self.queue and self.raw is None and self.tunnel is None:
                if self.bad is not None:
                    self.transport.write(self.bad)
                    self.transport.close()
                elif self.closing:
                    self.transport.close()
                else:
                    self._idle()
            self._update_reading()
        finally:
            self.advancing = False

    def finished(self, exchange: _Exchange, keep_alive: bool) -> None:
        """`exchange` is answered (or failed): on to the next one, or close."""
        exchange.done = True
        if self.queue and self.queue[0] is exchange:
            self.queue.popleft()
        if exchange.pending_bytes:
            exchange.take_pending()  # a body the dyno did not wait for
        self.upstream_full = False
        if not keep_alive:
            self.closing = True
            self.queue.clear()
            self.transport.close()
            return
        self.advance()

    def shutdown(self) -> None:
        """The router is closing: close now when idle, else after the current answer."""
        self.closing = True
        if not self.queue and self.tunnel is None and self.raw is None:
            self.transport.close()

    def _source(self) -> _Upstream | None:
        if self.tunnel is not None:
            return self.tunnel
        return self.queue[0].upstream if self.queue else None

    def _update_reading(self) -> None:
        pause = self.upstream_full or self.buffered > BUFFER_HIGH_BYTES \
            or len(self.queue) > MAX_PIPELINED
        if pause != self.reading_paused and not self.gone:
            self.reading_paused = pause
            if pause:
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()

    def _hold(self, data: bytes) -> None:
        assert self.raw is not None
        self.raw.append(data)
        self.buffered += len(data)
        self._update_reading()

    def _upgraded(self, data: memoryview, offset: int) -> None:
        """The parser stopped after an upgrade request: what follows is not HTTP (unless the
        dyno declines, and then the connection closes after its answer)."""
        self.raw = []
        if offset < len(data):
            self._hold(bytes(data[offset:]))

    def _unparsable(self, exc: Exception | None) -> None:
        log.debug("unparsable request from %s: %r", self.ip, exc)
        self.bad = _BAD_REQUEST if exc is not None else _HEAD_TOO_LARGE
        self.closing = True
        if not self.gone:
            self.transport.pause_reading()
            self.reading_paused = True
        if self.parsing is not None and not self.parsing.complete:
            self.transport.abort()  # a body cut off mid-way: no answer can be trusted
            return
        self.advance()

    def _idle(self) -> None:
        self.idle_since = self.router._loop.time()
        if self.timer is None:
            self.timer = self.router._loop.call_at(self.idle_since + CLIENT_KEEPALIVE_S,
                                                   self._idle_check)

    def _idle_check(self) -> None:
        self.timer = None
        if self.queue or self.tunnel is not None or self.raw is not None:
            return  # busy: the timer starts again when it is idle
        deadline = self.idle_since + CLIENT_KEEPALIVE_S
        if self.router._loop.time() >= deadline:
            self.transport.close()
        else:
            self.timer = self.router._loop.call_at(deadline, self._idle_check)


class _Upstream(asyncio.BufferedProtocol):
    """A connection to a dyno: one request at a time, its response parsed only to find where
    it ends, its bytes written on to the client as they come; kept in the router's pool
    between requests. After a 101 answer, a raw pipe to the client."""

    transport: asyncio.Transport

    def __init__(self, router: Router, backend: Backend) -> None:
        self.router = router
        self.backend = backend
        self.exchange: _Exchange | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.tunnel: _Client | None = None
        self.used = 0  # requests sent: a reused connection can be one the dyno just closed
        self.closed = False
        self.eof = False
        self.read_paused = False
        self.in_pool = False
        self.idle_since = 0.0
        self.pool_timer: asyncio.TimerHandle | None = None
        self.service_timer: asyncio.TimerHandle | None = None
        self.service_deadline = 0.0
        self.idle_timer: asyncio.TimerHandle | None = None
        self._reset()

    def _reset(self) -> None:
        self.out: list[bytes] = []  # for the client, written once per read
        self.headers: list[tuple[bytes, bytes]] = []
        self.reason = b""
        self.status = 0
        self.interim = False  # a 1xx response (other than 101): not passed on
        self.head_bytes = 0
        self.head_sent = False
        self.complete = False
        self.until_close = False  # no length, not chunked: the body ends when the dyno closes
        self.chunk_out = False  # the client gets the body chunked again
        self.client_keep = False
        self.reusable = False
        self.junk = False
        self.received = 0
        self.sent = 0
        self.last_data = 0.0
        self.fresh_parser = False

    def start(self, exchange: _Exchange) -> None:
        """Send `exchange`'s request head and the body so far, in one write."""
        if self.used:
            if self.fresh_parser:  # llhttp itself goes on to the next response
                self.parser = httptools.HttpResponseParser(self)
            self._reset()
        self.used += 1
        self.exchange = exchange
        exchange.upstream = self
        if exchange.client.write_paused:
            self.pause_reading()
        self.transport.write(exchange.head_for(self.backend) + exchange.take_pending())
        # One timer per connection, moved on lazily: most responses begin within
        # milliseconds, and arming and cancelling a timer for each costs more than the check.
        loop = self.router._loop
        self.service_deadline = loop.time() + self.router._service_timeout_s
        if self.service_timer is None:
            self.service_timer = loop.call_at(self.service_deadline, self._service_timeout)

    def drop(self) -> None:
        """The exchange was given up: this connection is in an unknown state."""
        self.exchange = None
        self._stop_timers()
        self.transport.abort()

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.router._read_view

    def buffer_updated(self, nbytes: int) -> None:
        data = self.router._read_view[:nbytes]  # valid until the next read: copied or parsed
        if self.tunnel is not None:
            self.tunnel.transport.write(bytes(data))
            return
        exchange = self.exchange
        if exchange is None:  # bytes nobody asked for: the connection cannot be reused
            self.transport.close()
            return
        self.received += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            if self.status == 101:
                self._switch(bytes(data[int(exc.args[0]):]))
                return
            self._broken(exchange, "an upgrade it was not asked for")
            return
        except httptools.HttpParserError as exc:
            self._broken(exchange, repr(exc))
            return
        if self.out:
            exchange.client.transport.write(b"".join(self.out))
            self.out.clear()
        if self.complete:
            self._done(exchange)
        elif self.head_sent:
            self.last_data = self.router._loop.time()
            if self.idle_timer is None:
                self.idle_timer = self.router._loop.call_at(
                    self.last_data + self.router._idle_timeout_s, self._idle_check)
        elif self.received > MAX_HEAD_BYTES:
            self._broken(exchange, "a response head too large")

    def eof_received(self) -> bool:
        self.eof = True
        if (client := self.tunnel) is not None:
            if client.eof or not client.transport.can_write_eof():
                return False
            client.transport.write_eof()
            return True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._stop_timers()
        if self.in_pool:
            self.router._unpool(self)
        if self.tunnel is not None:
            self.tunnel.transport.close()
            return
        exchange, self.exchange = self.exchange, None
        if exchange is None:
            return
        exchange.upstream = None
        client = exchange.client
        if not self.head_sent:
            if self.used > 1 and self.received == 0 and exchange.method in _IDEMPOTENT \
                    and not exchange.had_body and exchange.complete and not exchange.fresh:
                # A pooled connection the dyno closed as it was reused (its keep-alive ran
                # out as ours did not): nothing came back, and a request that may be sent
                # twice (RFC 9110 §9.2.2) goes again on a new connection.
                log.debug("dyno %s closed a kept-alive connection; reconnecting",
                          self.backend.name)
                exchange.fresh = True
                self.router._retry(exchange, self.backend)
                return
            log.info("dyno %s gave no response: %r", self.backend.name, exc)
            exchange.fail(H13)
        elif self.until_close and not self.junk:
            if self.chunk_out:
                self.out.append(_LAST_CHUNK)
            if self.out:
                client.transport.write(b"".join(self.out))
            exchange.report(self.status, self.sent)
            client.finished(exchange, self.client_keep)
        else:
            # The head is out: the only way left to tell the client is to cut its
            # connection (a last empty chunk would make a cut body look whole).
            log.info("dyno %s ended its response early: %r", self.backend.name, exc)
            if self.out:
                client.transport.write(b"".join(self.out))
            exchange.report(self.status, self.sent)
            client.transport.abort()

    def pause_writing(self) -> None:
        if (client := self._sink()) is not None:
            client.upstream_full = True
            client._update_reading()

    def resume_writing(self) -> None:
        if (client := self._sink()) is not None:
            client.upstream_full = False
            client._update_reading()

    def pause_reading(self) -> None:
        self.read_paused = True
        self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.read_paused:
            self.read_paused = False
            self.last_data = self.router._loop.time()  # the client was slow, not the dyno
            self.transport.resume_reading()

    # -- httptools callbacks -------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.complete:  # the dyno sent more than it was asked for
            self.junk = True
        self.headers = []
        self.reason = b""

    def on_status(self, status: bytes) -> None:
        self.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        self.interim = status < 200 and status != 101
        if self.interim:
            return
        exchange = self.exchange
        assert exchange is not None
        self.status = status
        head = response_head(status, self.reason, self.headers)
        lines, chunked = head.lines, head.chunked
        client = exchange.client
        keep = exchange.keep_alive and not client.closing
        head_only = exchange.method == b"HEAD"
        if status == 101:
            lines += (b"Connection: Upgrade\r\nUpgrade: ", head.upgrade or b"websocket", b"\r\n")
        elif head_only and chunked and not exchange.http10:
            lines.append(b"Transfer-Encoding: chunked\r\n")  # as a GET would have it
        elif head_only or status in (204, 304) or (head.length and not chunked):
            pass
        elif exchange.http10:
            keep = False  # no chunked for HTTP/1.0: the body ends when the router closes
            self.until_close = not chunked
        else:
            self.until_close = not chunked
            self.chunk_out = True
            lines.append(b"Transfer-Encoding: chunked\r\n")
        if status != 101:
            if not keep:
                lines.append(b"Connection: close\r\n")
            elif exchange.http10:
                lines.append(b"Connection: keep-alive\r\n")
        lines.append(b"\r\n")
        self.client_keep = keep
        self.out.append(b"".join(lines))
        self.head_sent = True
        if head_only:
            # llhttp would wait for the body the length announces: the response ends here.
            self.complete = True
            self.fresh_parser = True
            self.reusable = self.parser.get_http_version() == "1.1" and not head.close

    def on_body(self, body: bytes) -> None:
        if self.complete:
            self.junk = True  # bytes after a HEAD response: not reusable
            return
        self.sent += len(body)
        if self.chunk_out:
            self.out += (b"%x\r\n" % len(body), body, b"\r\n")
        else:
            self.out.append(body)

    def on_message_complete(self) -> None:
        if self.interim or self.complete or self.status == 101:
            return
        self.complete = True
        self.until_close = False
        self.reusable = self.parser.should_keep_alive()
        if self.chunk_out:
            self.out.append(_LAST_CHUNK)

    # -- the exchange ----------------------------------------------------------------------------

    def _sink(self) -> _Client | None:
        if self.tunnel is not None:
            return self.tunnel
        return self.exchange.client if self.exchange is not None else None

    def _done(self, exchange: _Exchange) -> None:
        """The response has reached the client whole: log it, pool this connection."""
        self.exchange = None
        exchange.upstream = None
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        exchange.report(self.status, self.sent)
        if self.reusable and not self.junk and exchange.complete and not exchange.pending:
            self.resume_reading()
            self.router._release(self)
        else:
            self.transport.close()
        exchange.client.finished(exchange, self.client_keep)

    def _switch(self, rest: bytes) -> None:
        """The dyno took the upgrade: from now on both connections are one raw pipe."""
        exchange = self.exchange
        assert exchange is not None
        client = exchange.client
        self.exchange = None
        exchange.upstream = None
        exchange.done = True
        self._stop_timers()
        if rest:
            self.out.append(rest)
        client.transport.write(b"".join(self.out))
        self.out.clear()
        exchange.report(101, 0)
        if client.queue and client.queue[0] is exchange:
            client.queue.popleft()
        self.tunnel = client
        client.tunnel = self
        raw, client.raw = client.raw or [], None
        client.buffered = 0
        client.upstream_full = False
        if raw:
            self.transport.write(b"".join(raw))
        client._update_reading()

    def _broken(self, exchange: _Exchange, why: str) -> None:
        log.info("dyno %s sent %s", self.backend.name, why)
        self.exchange = None
        exchange.upstream = None
        self._stop_timers()
        self.transport.abort()
        if self.head_sent:
            exchange.report(self.status, self.sent)
            exchange.client.transport.abort()
        else:
            exchange.fail(H13)

    def _service_timeout(self) -> None:
        self.service_timer = None
        exchange = self.exchange
        if exchange is None or self.head_sent:
            return  # answered in time; the next request starts the timer again
        if (loop := self.router._loop).time() < self.service_deadline:
            self.service_timer = loop.call_at(self.service_deadline, self._service_timeout)
            return
        self.drop()
        exchange.upstream = None
        exchange.fail(H12)

    def _idle_check(self) -> None:
        self.idle_timer = None
        exchange = self.exchange
        if exchange is None or self.complete:
            return
        loop = self.router._loop
        idle_s = self.router._idle_timeout_s
        if self.read_paused:
            self.idle_timer = loop.call_later(idle_s, self._idle_check)
            return
        if loop.time() < self.last_data + idle_s:
            self.idle_timer = loop.call_at(self.last_data + idle_s, self._idle_check)
            return
        log.info("dyno %s sent nothing for %s s", self.backend.name, idle_s)
        self.drop()
        exchange.upstream = None
        exchange.report(self.status, self.sent, H15)
        exchange.client.transport.abort()

    def _stop_timers(self) -> None:
        if self.service_timer is not None:
            self.service_timer.cancel()
            self.service_timer = None
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None

    # -- the pool --------------------------------------------------------------------------------

    def pool_check(self) -> None:
        self.pool_timer = None
        if not self.in_pool:
            return  # in use: the timer starts again when it is back
        deadline = self.idle_since + BACKEND_KEEPALIVE_S
        if self.router._loop.time() >= deadline:
            self.transport.close()
        else:
            self.pool_timer = self.router._loop.call_at(deadline, self.pool_check)


class Router:
    """Serves HTTP/1.1 on `listener` and forwards each request to the next `up` web dyno;
    `on_line` gets one router line per request. A dyno refusing the connection (or not
    accepting within the connect timeout) is skipped for the next one: nothing was sent yet.
    When none is left the client gets 503 and the line says H10 (H19 when the last one timed
    out) — Heroku's codes for an app whose dynos do not take connections.

    Both sides are asyncio protocols whose heads httptools (llhttp) parses; bodies pass as
    they come, one write per read, with flow control both ways."""

    _loop: asyncio.AbstractEventLoop  # set by start()

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
        self._server: asyncio.Server | None = None
        self._clients: set[_Client] = set()
        self._no_clients = asyncio.Event()
        self._idle: dict[tuple[str, int], list[_Upstream]] = {}
        self._connecting: set[asyncio.Task[None]] = set()
        # Every connection reads into this one buffer, and its bytes are parsed or copied at
        # once (the loop runs one callback at a time). A plain Protocol would get a new
        # 256 KiB bytes object per read: mmap, mremap and munmap for each, three syscalls.
        self._read_view = memoryview(bytearray(READ_BUFFER_BYTES))

    @property
    def address(self) -> tuple[str, int]:
        return self._address

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._server = await self._loop.create_server(functools.partial(_Client, self),
                                                      sock=self._listener)

    async def close(self) -> None:
        """Stop listening, let requests in flight finish for a moment, then end them all and
        the connections to the dynos. Safe to call twice."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for client in list(self._clients):
            client.shutdown()
        await self._drain(CLOSE_GRACE_S)
        for client in list(self._clients):
            client.transport.abort()
        await self._drain(CLOSE_GRACE_S)  # their connection_lost: H27 lines, dynos' ends
        for task in list(self._connecting):
            task.cancel()
        await asyncio.gather(*self._connecting, return_exceptions=True)
        for idle in self._idle.values():
            for upstream in list(idle):
                upstream.transport.close()
        self._idle.clear()
        await server.wait_closed()

    async def _drain(self, timeout_s: float) -> None:
        if self._clients:
            self._no_clients.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await self._no_clients.wait()

    def _client_gone(self, client: _Client) -> None:
        self._clients.discard(client)
        if not self._clients:
            self._no_clients.set()

    def _order(self) -> list[Backend]:
        """Backends to try for the next request: round-robin, failing over to the rest."""
        backends = list(self._backends())
        if not backends:
            return []
        start = self._turn % len(backends)
        self._turn += 1
        return backends[start:] + backends[:start]

    def _dispatch(self, exchange: _Exchange) -> None:
        exchange.dispatched = True
        exchange.backends = self._order()
        if not exchange.backends:
            exchange.fail(H10, timed=False)
            return
        if exchange.expect_continue:
            # The dyno then gets the body without an Expect of its own.
            exchange.client.transport.write(_CONTINUE)
        self._attempt(exchange)

    def _attempt(self, exchange: _Exchange) -> None:
        """Send `exchange` over an idle pooled connection to the next backend, or open one."""
        if not exchange.backends:
            exchange.dyno = ""
            exchange.fail(exchange.failure)
            return
        backend = exchange.backends.pop(0)
        exchange.dyno = backend.name
        if not exchange.fresh and (upstream := self._acquire(backend)) is not None:
            upstream.start(exchange)
            return
        task = self._loop.create_task(self._connect(exchange, backend),
                                      name=f"router-connect-{exchange.request_id}")
        exchange.connecting = task
        self._connecting.add(task)
        task.add_done_callback(self._connecting.discard)

    def _retry(self, exchange: _Exchange, backend: Backend) -> None:
        exchange.backends.insert(0, backend)
        self._attempt(exchange)

    async def _connect(self, exchange: _Exchange, backend: Backend) -> None:
        attempt = time.perf_counter()
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                _, upstream = await self._loop.create_connection(
                    functools.partial(_Upstream, self, backend), backend.host, backend.port)
        except TimeoutError:
            exchange.failure = H19
            log.info("dyno %s did not accept a connection in time", backend.name)
        except OSError as exc:
            exchange.failure = H10
            log.info("dyno %s refused a connection: %s", backend.name, exc)
        else:
            exchange.connect_s += time.perf_counter() - attempt
            exchange.connecting = None
            if exchange.done:  # the client left as the connection opened
                self._release(upstream)
            else:
                upstream.start(exchange)
            return
        exchange.connect_s += time.perf_counter() - attempt
        exchange.connecting = None
        if not exchange.done:
            self._attempt(exchange)

    def _acquire(self, backend: Backend) -> _Upstream | None:
        idle = self._idle.get((backend.host, backend.port))
        while idle:
            upstream = idle.pop()  # the most recently used: the least likely to be stale
            upstream.in_pool = False
            if not upstream.closed and not upstream.transport.is_closing():
                return upstream
        return None

    def _release(self, upstream: _Upstream) -> None:
        if self._server is None or upstream.transport.is_closing():
            upstream.transport.close()
            return
        upstream.in_pool = True
        upstream.idle_since = self._loop.time()
        backend = upstream.backend
        self._idle.setdefault((backend.host, backend.port), []).append(upstream)
        if upstream.pool_timer is None:
            upstream.pool_timer = self._loop.call_at(upstream.idle_since + BACKEND_KEEPALIVE_S,
                                                     upstream.pool_check)

    def _unpool(self, upstream: _Upstream) -> None:
        upstream.in_pool = False
        idle = self._idle.get((upstream.backend.host, upstream.backend.port), [])
        with contextlib.suppress(ValueError):
            idle.remove(upstream)
        if upstream.pool_timer is not None:
            upstream.pool_timer.cancel()
            upstream.pool_timer = None
