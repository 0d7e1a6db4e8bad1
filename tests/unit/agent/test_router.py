"""The router of standalone mode (agent/standalone/proxy.py) between a real aiohttp client and
real aiohttp backends, all on 127.0.0.1: headers, Heroku's router lines and error codes,
round-robin and failover, keep-alive, streaming both ways, WebSockets, and close()."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import json
import re
import socket
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from agent.standalone.proxy import Backend, Router, bind_listener

PLAIN = b"hello, router\n" * 1000
GZIPPED = gzip.compress(PLAIN)
SKIP_AUTO = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")
LINE = re.compile(
    r'at=(?P<at>info|error)(?: code=(?P<code>H\d\d) desc="(?P<desc>[^"]*)")? '
    r'method=(?P<method>\S+) path="(?P<path>[^"]*)" host=(?P<host>\S*) '
    r'request_id=(?P<request_id>\S+) fwd="(?P<fwd>[^"]*)" dyno=(?P<dyno>\S*) '
    r"connect=(?P<connect>\d*)(?:ms)? service=(?P<service>\d*)(?:ms)? "
    r"status=(?P<status>\d+) bytes=(?P<bytes>\d*) protocol=http")


@dataclass
class Upstream:
    """One web dyno stand-in: an aiohttp server with a few routes, and what it saw."""

    name: str
    port: int = 0
    seen: list[dict[str, Any]] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    got_first_piece: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def backend(self) -> Backend:
        return Backend(self.name, "127.0.0.1", self.port)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/ws", self.websocket)
        app.router.add_route("*", "/stream", self.stream)
        app.router.add_route("*", "/slow", self.slow)
        app.router.add_route("*", "/upload", self.upload)
        app.router.add_route("*", "/gzip", self.gzipped)
        app.router.add_route("*", "/cut", self.cut)
        app.router.add_route("*", "/status/{code}", self.status)
        app.router.add_route("*", "/{tail:.*}", self.echo)
        return app

    async def echo(self, request: web.Request) -> web.Response:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.seen.append({"headers": list(request.headers.items()), "peer": peer,
                          "path": request.raw_path, "method": request.method})
        response = web.json_response({"dyno": self.name, "path": request.raw_path,
                                      "headers": dict(request.headers)})
        response.headers["Keep-Alive"] = "timeout=5"
        response.headers["Connection"] = "X-Hop"
        response.headers["X-Hop"] = "secret"
        response.headers.add("Set-Cookie", "a=1")
        response.headers.add("Set-Cookie", "b=2")
        return response

    async def stream(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"first\n")
        await self.release.wait()
        await response.write(b"second\n")
        await response.write_eof()
        return response

    async def slow(self, request: web.Request) -> web.Response:
        await self.release.wait()
        return web.Response(text="late")

    async def upload(self, request: web.Request) -> web.Response:
        digest = hashlib.sha256()
        total = 0
        async for piece in request.content.iter_any():
            self.got_first_piece.set()
            digest.update(piece)
            total += len(piece)
        return web.json_response({
            "bytes": total, "sha256": digest.hexdigest(),
            "transfer_encoding": request.headers.get("Transfer-Encoding"),
            "content_length": request.headers.get("Content-Length"),
            "content_type": request.headers.get("Content-Type")})

    async def gzipped(self, request: web.Request) -> web.Response:
        return web.Response(body=GZIPPED, headers={"Content-Encoding": "gzip"},
                            content_type="text/plain")

    async def cut(self, request: web.Request) -> web.StreamResponse:
        """A response that ends, connection and all, before its body does."""
        response = web.StreamResponse()
        if "length" in request.query:
            response.content_length = int(request.query["length"])
        await response.prepare(request)
        await response.write(b"part of it")
        assert request.transport is not None
        request.transport.abort()
        return response

    async def status(self, request: web.Request) -> web.Response:
        return web.Response(status=int(request.match_info["code"]))

    async def websocket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(protocols=("chat",))
        await ws.prepare(request)
        async for message in ws:
            if message.type is aiohttp.WSMsgType.TEXT and message.data == "bye":
                await ws.close(code=4000, message=b"bye")
            elif message.type is aiohttp.WSMsgType.TEXT:
                await ws.send_str(f"{self.name}:{message.data}")
            elif message.type is aiohttp.WSMsgType.BINARY:
                await ws.send_bytes(message.data[::-1])
        return ws


@contextlib.asynccontextmanager
async def upstreams(count: int) -> AsyncIterator[list[Upstream]]:
    ups = [Upstream(f"web.{n}") for n in range(1, count + 1)]
    runners = []
    try:
        for up in ups:
            runner = web.AppRunner(up.app(), access_log=None, handler_cancellation=True,
                                   shutdown_timeout=0.5)
            await runner.setup()
            runners.append(runner)
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            up.port = runner.addresses[0][1]
        yield ups
    finally:
        for up in ups:
            up.release.set()
        for runner in runners:
            await runner.cleanup()


@dataclass
class Running:
    router: Router
    lines: list[str]
    logged: asyncio.Event

    def on_line(self, text: str) -> None:
        self.lines.append(text)
        self.logged.set()

    def url(self, path: str) -> str:
        host, port = self.router.address
        return f"http://{host}:{port}{path}"

    def parsed(self) -> list[dict[str, str]]:
        matches = [LINE.fullmatch(line) for line in self.lines]
        assert all(matches), self.lines
        return [m.groupdict() for m in matches if m is not None]


@contextlib.asynccontextmanager
async def running_router(backends: Callable[[], Sequence[Backend]],
                         **options: Any) -> AsyncIterator[Running]:
    lines: list[str] = []
    router = Router(bind_listener("127.0.0.1", 0), backends, lambda text: running.on_line(text),
                    **options)
    running = Running(router, lines, asyncio.Event())
    await router.start()
    try:
        yield running
    finally:
        await router.close()


@contextlib.asynccontextmanager
async def client(**options: Any) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(skip_auto_headers=SKIP_AUTO, **options) as session:
        yield session


def header_values(seen: dict[str, Any], name: str) -> list[str]:
    return [value for key, value in seen["headers"] if key.lower() == name.lower()]


# -- headers ----------------------------------------------------------------------------------

async def test_forwarded_headers_added_kept_and_replaced() -> None:
    valid_id = "abcdefghij0123456789+/=-"
    async with upstreams(1) as ups, running_router(lambda: [ups[0].backend]) as running, \
            client() as session:
        port = running.router.address[1]
        async with session.get(running.url("/a?b=1"), headers={
                "X-Request-Id": valid_id, "X-Forwarded-For": "203.0.113.7",
                "X-Forwarded-Proto": "https", "Connection": "keep-alive, X-Private",
                "X-Private": "1", "Keep-Alive": "timeout=5", "Proxy-Authorization": "Basic x",
                "Proxy-Connection": "keep-alive", "TE": "trailers",
                "X-Kept": "yes"}) as response:
            assert response.status == 200
            body = await response.read()
            # The dyno's hop-by-hop headers stop at the router; the rest pass, repeats too.
            assert "X-Hop" not in response.headers and "Keep-Alive" not in response.headers
            assert response.headers.getall("Set-Cookie") == ["a=1", "b=2"]
        async with session.get(running.url("/"), headers={"X-Request-Id": "too-short"}):
            pass
        async with session.get(running.url("/"), headers={"X-Request-Id": "x" * 19 + " "}):
            pass
    first, second, third = ups[0].seen
    assert first["path"] == "/a?b=1"
    assert header_values(first, "X-Request-Id") == [valid_id]
    assert header_values(first, "X-Forwarded-For") == ["203.0.113.7, 127.0.0.1"]
    assert header_values(first, "X-Forwarded-Proto") == ["https"]
    assert header_values(first, "X-Forwarded-Port") == [str(port)]
    assert header_values(first, "X-Kept") == ["yes"]
    for gone in ("Connection", "X-Private", "Keep-Alive", "Proxy-Authorization",
                 "Proxy-Connection", "TE", "Via", "User-Agent", "Accept"):
        assert header_values(first, gone) == [], gone
    for seen in (second, third):
        (request_id,) = header_values(seen, "X-Request-Id")
        assert uuid.UUID(request_id).version == 4
        assert header_values(seen, "X-Forwarded-For") == ["127.0.0.1"]
        assert header_values(seen, "X-Forwarded-Proto") == ["http"]
    line = running.parsed()[0]
    assert line == {"at": "info", "code": None, "desc": None, "method": "GET",
                    "path": "/a?b=1", "host": f"127.0.0.1:{port}", "request_id": valid_id,
                    "fwd": "203.0.113.7, 127.0.0.1", "dyno": "web.1",
                    "connect": line["connect"], "service": line["service"],
                    "status": "200", "bytes": str(len(body))}
    assert line["connect"] and line["service"]


async def test_untrusted_client_gets_its_forwarded_headers_replaced() -> None:
    async with upstreams(1) as ups, running_router(lambda: [ups[0].backend],
                                                   trusted=lambda ip: False) as running, \
            client() as session, session.get(running.url("/"), headers={
            "X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https",
            "X-Forwarded-Port": "443"}) as response:
        assert response.status == 200
    (seen,) = ups[0].seen
    assert header_values(seen, "X-Forwarded-For") == ["127.0.0.1"]
    assert header_values(seen, "X-Forwarded-Proto") == ["http"]
    assert header_values(seen, "X-Forwarded-Port") == [str(running.router.address[1])]


# -- errors -----------------------------------------------------------------------------------

async def test_no_web_dyno_is_503_and_h10() -> None:
    async with running_router(lambda: []) as running, client() as session, \
            session.get(running.url("/"), headers={"Host": "hello.local"}) as response:
        assert response.status == 503
        assert response.content_type == "text/html"
        assert b"Application error" in await response.read()
    (line,) = running.lines
    assert re.fullmatch(
        r'at=error code=H10 desc="App crashed" method=GET path="/" host=hello.local '
        r'request_id=[0-9a-f-]{36} fwd="127.0.0.1" dyno= connect= service= status=503 '
        r"bytes= protocol=http", line), line


async def test_slow_dyno_is_503_and_h12() -> None:
    async with upstreams(1) as ups, running_router(lambda: [ups[0].backend],
                                                   service_timeout_s=0.3) as running, \
            client() as session:
        async with session.get(running.url("/slow")) as response:
            assert response.status == 503
        (line,) = running.parsed()
        assert (line["at"], line["code"], line["desc"], line["dyno"], line["status"],
                line["bytes"]) == ("error", "H12", "Request timeout", "web.1", "503", "0")
        assert 300 <= int(line["connect"]) + int(line["service"]) < 3000


async def test_refusing_dyno_fails_over_then_h10_when_none_accepts() -> None:
    dead = bind_listener("127.0.0.1", 0)
    dead_port = dead.getsockname()[1]
    dead.close()  # nothing listens here any more: connections are refused
    refusing = Backend("web.2", "127.0.0.1", dead_port)
    async with upstreams(1) as ups:
        current = [refusing, ups[0].backend]
        async with running_router(lambda: current) as running, client() as session:
            for _ in range(3):
                async with session.get(running.url("/")) as response:
                    assert response.status == 200
                    assert (await response.json())["dyno"] == "web.1"
            current[:] = [refusing]
            async with session.get(running.url("/")) as response:
                assert response.status == 503
    lines = running.parsed()
    assert [(line["dyno"], line["status"]) for line in lines[:3]] == [("web.1", "200")] * 3
    assert (lines[3]["code"], lines[3]["desc"], lines[3]["dyno"]) == ("H10", "App crashed", "")


async def test_client_going_away_is_h27_and_ends_the_dyno_request() -> None:
    async with upstreams(1) as ups, running_router(lambda: [ups[0].backend]) as running, \
            client() as session:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3), session.get(running.url("/slow")):
                pass
        async with asyncio.timeout(5):
            await running.logged.wait()
    (line,) = running.parsed()
    assert (line["code"], line["status"], line["dyno"]) == ("H27", "499", "web.1")


# -- balancing and connections ----------------------------------------------------------------

async def test_round_robin_over_up_dynos_named_in_lines() -> None:
    async with upstreams(2) as ups, \
            running_router(lambda: [u.backend for u in ups]) as running, client() as session:
        served = []
        for _ in range(6):
            async with session.get(running.url("/")) as response:
                served.append((await response.json())["dyno"])
    assert served == ["web.1", "web.2"] * 3
    assert [line["dyno"] for line in running.parsed()] == served


async def test_connections_are_kept_alive_both_sides() -> None:
    created = 0

    async def on_create(*_: Any) -> None:
        nonlocal created
        created += 1

    trace = aiohttp.TraceConfig()
    trace.on_connection_create_end.append(on_create)
    async with upstreams(1) as ups, running_router(lambda: [ups[0].backend]) as running, \
            client(connector=aiohttp.TCPConnector(limit=1), trace_configs=[trace]) as session:
        for _ in range(20):
            async with session.get(running.url("/")) as response:
                assert response.status == 200
                assert "Connection" not in response.headers
    assert created == 1  # one client connection to the router for all 20
    assert len({seen["peer"] for seen in ups[0].seen}) == 1  # and one router → dyno


# -- streaming --------------------------------------------------------------------------------

async def test_streamed_response_arrives_as_it_is_sent() -> None:
    async with upstreams(1) as ups, running_router(lambda: [ups[0].backend]) as running, \
            client() as session, session.get(running.url("/stream")) as response:
        assert response.headers["Transfer-Encoding"] == "chunked"
        async with asyncio.timeout(5):  # the dyno has not finished: it waits for us
            first = await response.content.readuntil(b"\n")
        assert first == b"first\n" and not ups[0].release.is_set()
        ups[0].release.set()
        assert await response.read() == b"second\n"
    assert running.parsed()[0]["bytes"] == str(len(b"first\nsecond\n"))


async def test_chunked_upload_is_relayed_as_it_comes() -> None:
    piece = bytes(range(256)) * 256  # 64 KiB
    pieces = 128  # 8 MiB in all
    expected = hashlib.sha256(piece * pieces).hexdigest()

    async with upstreams(1) as ups, running_router(lambda: [ups[0].backend]) as running, \
            client() as session:
        async def body() -> AsyncIterator[bytes]:
            yield piece
            # The dyno reads the first piece before the client sends the rest.
            async with asyncio.timeout(5):
                await ups[0].got_first_piece.wait()
            for _ in range(pieces - 1):
                yield piece

        async with session.post(running.url("/upload"), data=body()) as response:
            assert response.status == 200
            chunked = await response.json()
        async with session.post(running.url("/upload"), data=piece * 16,
                                headers={"Content-Type": "application/x-thing"}) as response:
            sized = await response.json()
    assert chunked == {"bytes": len(piece) * pieces, "sha256": expected,
                       "transfer_encoding": "chunked", "content_length": None,
                       "content_type": None}
    assert sized == {"bytes": len(piece) * 16, "sha256": hashlib.sha256(piece * 16).hexdigest(),
                     "transfer_encoding": None, "content_length": str(len(piece) * 16),
                     "content_type": "application/x-thing"}
    assert [line["status"] for line in running.parsed()] == ["200", "200"]


async def test_bodiless_and_encoded_messages_pass_unchanged() -> None:
    async with upstreams(1) as ups, running_router(lambda: [ups[0].backend]) as running, \
            client(auto_decompress=False,
                   connector=aiohttp.TCPConnector(limit=1)) as session:
        async with session.get(running.url("/")) as response:
            length = len(await response.read())
        async with session.head(running.url("/")) as response:
            assert response.status == 200
            assert response.headers["Content-Length"] == str(length)
            assert await response.read() == b""
        for code in (204, 304):
            async with session.get(running.url(f"/status/{code}")) as response:
                assert response.status == code and await response.read() == b""
        # Content-Encoding is end to end: the router decompresses nothing, either way.
        async with session.get(running.url("/gzip")) as response:
            assert response.headers["Content-Encoding"] == "gzip"
            assert await response.read() == GZIPPED
        async with session.post(running.url("/upload"), data=GZIPPED,
                                headers={"Content-Encoding": "gzip"}) as response:
            assert response.status == 200
            assert (await response.json())["sha256"] == hashlib.sha256(PLAIN).hexdigest()
    assert [line["status"] for line in running.parsed()] == [
        "200", "200", "204", "304", "200", "200"]


async def test_expect_100_continue_is_answered_by_the_router() -> None:
    async with upstreams(1) as ups, running_router(lambda: [ups[0].backend]) as running, \
            client() as session, asyncio.timeout(5), \
            session.post(running.url("/upload"), data=b"x" * 4096, expect100=True) as response:
        assert response.status == 200
        assert (await response.json())["bytes"] == 4096


@pytest.mark.parametrize("length", [100_000, None])
async def test_a_body_the_dyno_cuts_short_is_cut_for_the_client_too(length: int | None) -> None:
    async with upstreams(1) as ups, running_router(lambda: [ups[0].backend]) as running, \
            client() as session:
        query = "" if length is None else f"?length={length}"
        async with session.get(running.url(f"/cut{query}")) as response:
            assert response.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                async with asyncio.timeout(5):
                    await response.read()


# -- WebSockets -------------------------------------------------------------------------------

async def test_websocket_is_relayed_both_ways() -> None:
    async with upstreams(1) as ups, running_router(lambda: [ups[0].backend]) as running, \
            client() as session:
        async with session.ws_connect(running.url("/ws"), protocols=("chat",)) as ws:
            assert ws.protocol == "chat"
            await ws.send_str("hello")
            assert await ws.receive_str(timeout=5) == "web.1:hello"
            await ws.send_bytes(b"\x00\x01\x02")
            assert await ws.receive_bytes(timeout=5) == b"\x02\x01\x00"
            await ws.send_str("bye")  # the dyno closes, with its own code
            message = await ws.receive(timeout=5)
            assert message.type is aiohttp.WSMsgType.CLOSE and message.data == 4000
        async with session.ws_connect(running.url("/ws")) as ws:
            await ws.send_str("again")
            assert await ws.receive_str(timeout=5) == "web.1:again"
            await ws.close()  # the client closes
            assert ws.close_code == 1000
    assert [(line["path"], line["status"]) for line in running.parsed()] == [
        ("/ws", "101"), ("/ws", "101")]


# -- lifecycle --------------------------------------------------------------------------------

async def test_close_stops_listening_and_ends_idle_connections() -> None:
    async with upstreams(1) as ups:
        router = Router(bind_listener("127.0.0.1", 0), lambda: [ups[0].backend], lambda _: None)
        await router.start()
        address = router.address
        reader, writer = await asyncio.open_connection(*address)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        async with asyncio.timeout(5):
            assert (await reader.readline()).startswith(b"HTTP/1.1 200")
            await router.close()
            await router.close()  # twice is fine
            while await reader.read(65536):
                pass  # the rest of the response, then EOF: the kept-alive connection ends
        writer.close()
        await writer.wait_closed()
        with pytest.raises(OSError), socket.create_connection(address, timeout=1):
            pass


# -- HTTP/1.1 framing and flow control --------------------------------------------------------

async def read_response(reader: asyncio.StreamReader) -> tuple[bytes, dict[str, str], bytes]:
    """One response off a raw connection: status line, headers, and a Content-Length body."""
    head = await reader.readuntil(b"\r\n\r\n")
    status, *fields = head.decode("latin-1").split("\r\n")[:-2]
    headers = {name.lower(): value for name, _, value in (f.partition(": ") for f in fields)}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status.encode(), headers, body


def json_of(body: bytes) -> dict[str, Any]:
    value = json.loads(body)
    assert isinstance(value, dict)
    return value


async def test_pipelined_requests_are_answered_in_order() -> None:
    async with upstreams(2) as ups, \
            running_router(lambda: [u.backend for u in ups]) as running:
        reader, writer = await asyncio.open_connection(*running.router.address)
        # Three requests in one write: the second and third wait behind the first.
        writer.write(b"".join(b"GET /p%d HTTP/1.1\r\nHost: x\r\n\r\n" % n for n in range(3))
                     + b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
        async with asyncio.timeout(5):
            answers = [await read_response(reader) for _ in range(4)]
        writer.close()
        await writer.wait_closed()
    assert [status for status, _, _ in answers] == [b"HTTP/1.1 200 OK"] * 4
    assert [json_of(body)["path"] for _, _, body in answers[:3]] == ["/p0", "/p1", "/p2"]
    assert json_of(answers[3][2])["bytes"] == 5
    assert [line["path"] for line in running.parsed()] == ["/p0", "/p1", "/p2", "/upload"]


@contextlib.asynccontextmanager
async def until_close_dyno(body: bytes) -> AsyncIterator[Backend]:
    """A dyno that answers without Content-Length or chunking: its body ends at its close."""
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n" + body[:7])
        await writer.drain()
        writer.write(body[7:])
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    try:
        yield Backend("web.1", "127.0.0.1", server.sockets[0].getsockname()[1])
    finally:
        server.close()
        await server.wait_closed()


async def test_a_body_that_ends_at_the_dyno_close_reaches_the_client_whole() -> None:
    body = b"until the end\n" * 5000
    async with until_close_dyno(body) as backend, running_router(lambda: [backend]) as running:
        async with client(connector=aiohttp.TCPConnector(limit=1)) as session:
            for _ in range(2):  # the client's connection stays usable: chunked for it
                async with session.get(running.url("/")) as response:
                    assert response.headers["Transfer-Encoding"] == "chunked"
                    assert await response.read() == body
        # An HTTP/1.0 client cannot take chunks: the body ends with the connection.
        reader, writer = await asyncio.open_connection(*running.router.address)
        writer.write(b"GET / HTTP/1.0\r\n\r\n")
        async with asyncio.timeout(5):
            answer = await reader.read()
        writer.close()
        await writer.wait_closed()
    head, _, rest = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and b"Connection: close" in head
    assert rest == body
    assert [(line["status"], line["bytes"]) for line in running.parsed()] == [
        ("200", str(len(body)))] * 3


async def test_a_slow_client_holds_the_dyno_back_not_the_router_memory() -> None:
    total = 48 * 1024 * 1024
    written = 0
    finished = asyncio.Event()

    async def flood(request: web.Request) -> web.StreamResponse:
        nonlocal written
        response = web.StreamResponse()
        response.content_length = total
        await response.prepare(request)
        piece = b"x" * 65536
        while written < total:
            await response.write(piece)  # waits while the router does not read
            written += len(piece)
        finished.set()
        return response

    app = web.Application()
    app.router.add_get("/flood", flood)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    backend = Backend("web.1", "127.0.0.1", runner.addresses[0][1])
    try:
        async with running_router(lambda: [backend]) as running:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, running.router.address)
            reader, writer = await asyncio.open_connection(sock=sock)
            writer.write(b"GET /flood HTTP/1.1\r\nHost: x\r\n\r\n")
            # The client reads nothing: wait until the dyno cannot write any more.
            async with asyncio.timeout(20):
                last = -1
                while written != last and not finished.is_set():
                    last = written
                    await asyncio.sleep(0.3)
            assert written < total // 2, "the router read on with nobody taking the bytes"
            held = sum(c.transport.get_write_buffer_size() for c in running.router._clients)
            assert held < 1024 * 1024
            async with asyncio.timeout(20):  # and everything arrives once the client reads
                head = await reader.readuntil(b"\r\n\r\n")
                assert b"Content-Length: %d" % total in head
                received = 0
                while received < total and (chunk := await reader.read(1 << 20)):
                    received += len(chunk)
            assert received == total
            writer.close()
            await writer.wait_closed()
    finally:
        await runner.cleanup()


async def test_a_pooled_connection_the_dyno_closed_is_replaced_for_a_get() -> None:
    connections = 0

    async def answer_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answers the first request on each connection, then closes on the next one unanswered,
        as a dyno does whose keep-alive runs out just as the router reuses the connection."""
        nonlocal connections
        connections += 1
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        with contextlib.suppress(asyncio.IncompleteReadError):
            await reader.readuntil(b"\r\n\r\n")
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(answer_once, "127.0.0.1", 0)
    backend = Backend("web.1", "127.0.0.1", server.sockets[0].getsockname()[1])
    try:
        async with running_router(lambda: [backend]) as running, client() as session:
            for _ in range(3):
                async with session.get(running.url("/")) as response:
                    assert response.status == 200 and await response.read() == b"ok"
            async with session.post(running.url("/")) as response:
                assert response.status == 503  # not sent twice: POST may not be idempotent
    finally:
        server.close()
        await server.wait_closed()
    assert connections == 3  # the first, and one for each retried GET
    assert [(line["status"], line["code"]) for line in running.parsed()] == [
        ("200", None)] * 3 + [("503", "H13")]


async def test_a_request_head_too_large_is_refused() -> None:
    async with running_router(lambda: []) as running:
        reader, writer = await asyncio.open_connection(*running.router.address)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000)  # and no end
        async with asyncio.timeout(5):
            answer = await reader.read()  # then EOF: the router closes
        writer.close()
        await writer.wait_closed()
    assert answer.startswith(b"HTTP/1.1 431 ")
    assert running.lines == []
