"""Log drains without a network stack of their own: URLs, Heroku's RFC 5424 bytes, octet
counting, logplex POSTs (frame by frame, frame id kept on a retry), the bounded queue with its
L10 accounting, and the spool that outlives an agent."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from aiohttp import web

from agent.config import from_mapping
from agent.drains.drain import Drain, Notice, backoff_s
from agent.drains.manager import DrainManager
from agent.drains.rfc5424 import Formatter, split_frames
from agent.drains.senders import HttpSender, SyslogSender
from agent.drains.spool import Spool
from agent.drainurl import DrainUrlError, Transport, parse_drain_list, parse_drain_url
from agent.errors import ConfigError
from agent.observability import metrics
from agent.observability.logs import LogHub, LogLine, LogSource
from agent.spec import SpecError, parse_spec
from tests.support.httpserve import start_local
from tests.support.wait import async_wait_for

AT = datetime(2026, 11, 26, 10, 0, 0, 123456, tzinfo=UTC)


def _spec(**extra: object) -> dict[str, object]:
    return {"app": "shop", "name": "web.1", "command": "true",
            "release": {"version": 1, "slug": {"path": "/srv/slug"}}, **extra}


# -- URLs ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("raw", "transport", "host", "port"), [
    ("syslog://logs.example:514", Transport.SYSLOG, "logs.example", 514),
    ("syslog+tls://10.0.0.1:6514", Transport.SYSLOG_TLS, "10.0.0.1", 6514),
    ("https://user:secret@drain.example/logs?t=1", Transport.HTTPS, "drain.example", 443),
    ("http://127.0.0.1:8080/", Transport.HTTP, "127.0.0.1", 8080),
])
def test_drain_urls_parse(raw: str, transport: Transport, host: str, port: int) -> None:
    url = parse_drain_url(raw)
    assert (url.url, url.transport, url.host, url.port) == (raw, transport, host, port)
    assert "secret" not in url.redacted and "t=1" not in url.redacted
    assert url.token("shop").startswith("d.") and url.token("shop") == url.token("shop")
    assert url.token("shop") != url.token("other") != url.token(None)


@pytest.mark.parametrize(("raw", "says"), [
    ("ftp://x:1", "must be a syslog://"),
    ("syslog://logs.example", "needs a port"),
    ("syslog://logs.example:514/path", "HOST:PORT only"),
    ("https:///nohost", "has no host"),
    ("https://x:99999/", "not a URL"),
    ("https://x/ a", "no spaces"),
    (5, "must be a string"),
])
def test_bad_drain_urls_are_refused_with_a_reason(raw: object, says: str) -> None:
    with pytest.raises(DrainUrlError, match=says):
        parse_drain_url(raw)


def test_at_most_five_distinct_drains() -> None:
    urls = [f"syslog://h:{514 + i}" for i in range(5)]
    assert len(parse_drain_list(urls)) == 5
    with pytest.raises(DrainUrlError, match="at most 5"):
        parse_drain_list([*urls, "syslog://h:1"])
    with pytest.raises(DrainUrlError, match="listed twice"):
        parse_drain_list(["syslog://h:1", "syslog://h:1"])


def test_spec_carries_drains_and_another_drain_is_another_spec() -> None:
    spec = parse_spec(_spec(log_drains=["syslog://h:514"]))
    assert spec.log_drains == ("syslog://h:514",)
    assert parse_spec(spec.to_dict()) == spec
    assert parse_spec(_spec(id=spec.id)) != spec
    assert "log_drains" not in parse_spec(_spec()).to_dict()
    with pytest.raises(SpecError) as caught:
        parse_spec(_spec(log_drains=["gopher://h:70"]))
    assert caught.value.field == "log_drains"


def test_config_log_drains() -> None:
    config = from_mapping({"log_drains": ["https://drain.example/x"],
                           "log_drains_ca_file": "/etc/ca.pem"})
    assert [d.url for d in config.log_drains] == ["https://drain.example/x"]
    with pytest.raises(ConfigError, match="log_drains"):
        from_mapping({"log_drains": ["syslog://nowhere"]})


# -- formatting ------------------------------------------------------------------------------
def test_app_and_platform_lines_byte_for_byte() -> None:
    f = Formatter()
    app = LogLine.output(AT, "shop", "web.1", "Hello, wörld")
    assert f.message(app) == ("<190>1 2026-11-26T10:00:00.123456+00:00 host app web.1 - "
                              "Hello, wörld").encode()
    platform = LogLine.agent(AT, "shop", "web.1", "State changed from starting to up")
    assert f.frame(platform) == (b"93 <158>1 2026-11-26T10:00:00.123456+00:00 host heroku "
                                 b"web.1 - State changed from starting to up")
    assert len(f.message(platform)) == 93


def test_octet_counting_counts_bytes_not_characters() -> None:
    frame = Formatter().frame(LogLine.output(AT, "shop", "worker.1", "é" * 3))
    length, _, message = frame.partition(b" ")
    assert int(length) == len(message) and len(message) != len(message.decode())


def test_split_frames_keeps_a_torn_frame_out() -> None:
    f = Formatter()
    frames = [f.frame(LogLine.output(AT, "a", "web.1", str(i))) for i in range(3)]
    data = b"".join(frames)
    assert split_frames(data) == (frames, len(data))
    assert split_frames(data[:-2]) == (frames[:2], len(frames[0]) + len(frames[1]))


# -- the queue ---------------------------------------------------------------------------------
class _NoSender:
    async def deliver(self, drain: Drain) -> None:
        await asyncio.Event().wait()

    def failed(self, drain: Drain) -> None:
        drain.unsend()

    async def aclose(self) -> None:
        pass


def _lines(n: int, start: int = 0) -> list[LogLine]:
    return [LogLine.output(AT, "shop", "web.1", str(start + i)) for i in range(n)]


async def test_overflow_is_counted_and_reported_in_band_once_there_is_room() -> None:
    drain = Drain(parse_drain_url("syslog://h:1"), "shop", _NoSender(), capacity=3,
                  clock=lambda: AT)
    kept = [drain.offer(line) for line in _lines(5)]
    assert kept == [True, True, True, False, False]
    assert (drain.emitted, drain.dropped, drain.queued) == (5, 2, 3)
    assert len(drain.take(10, 1 << 20)) == 3
    drain.confirm(3)
    assert drain.delivered == 3
    drain.offer(_lines(1, 5)[0])
    frames = drain.take(10, 1 << 20)
    assert type(frames[0]) is Notice
    assert frames[0].endswith(b"host heroku logplex - Error L10 (output buffer overflow): 2 "
                              b"messages dropped since 2026-11-26T10:00:00.123456+00:00")
    assert frames[1].endswith(b" - 5")
    drain.confirm(2)
    # The notice is not a line: delivered + dropped == emitted.
    assert (drain.delivered, drain.dropped, drain.queued, drain.emitted) == (4, 2, 0, 6)


async def test_a_gap_with_no_line_after_it_is_reported_when_caught_up() -> None:
    drain = Drain(parse_drain_url("syslog://h:1"), "shop", _NoSender(), capacity=1,
                  clock=lambda: AT)
    for line in _lines(3):
        drain.offer(line)
    drain.confirm(len(drain.take(10, 1 << 20)))
    (notice,) = drain.take(10, 1 << 20)
    assert b"2 messages dropped" in notice
    assert drain.delivered + drain.dropped == drain.emitted == 3


def test_backoff_doubles_up_to_its_bound() -> None:
    assert [backoff_s(a, rand=lambda: 1.0) for a in range(8)] == \
        [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert backoff_s(0, rand=lambda: 0.0) == 0.25


# -- the spool ---------------------------------------------------------------------------------
async def test_spool_gives_back_what_was_not_delivered(tmp_path: Path) -> None:
    url = parse_drain_url("syslog://h:1")
    drain = Drain(url, "shop", _NoSender(), spool=Spool(tmp_path, segment_bytes=200))
    for line in _lines(10):
        drain.offer(line)
    drain.flush()
    drain.confirm(len(drain.take(4, 1 << 20)))
    drain.take(2, 1 << 20)  # taken, not confirmed: sent again
    drain.spool.close()  # type: ignore[union-attr]  # the agent is killed here
    again = Spool(tmp_path, segment_bytes=200)
    frames = again.load()
    assert [f.rsplit(b" ", 1)[1] for f in frames] == [b"4", b"5", b"6", b"7", b"8", b"9"]
    # Segments wholly delivered are gone.
    assert len(sorted(tmp_path.glob("*.spool"))) <= 4  # noqa: ASYNC240 - a tmp dir
    restored = Drain(url, "shop", _NoSender(), spool=again)
    restored.restore(frames)
    assert restored.queued == restored.emitted == 6
    restored.confirm(len(restored.take(100, 1 << 20)))
    restored.spool.close()  # type: ignore[union-attr]
    assert Spool(tmp_path).load() == []


# -- senders against real servers on loopback -------------------------------------------------
def _delivered(drain: Drain, n: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return drain.delivered >= n
    return check


async def test_logplex_posts_frame_by_frame_and_a_retry_keeps_its_frame_id() -> None:
    posts: list[tuple[str, int, bytes]] = []

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        posts.append((request.headers["Logplex-Frame-Id"],
                      int(request.headers["Logplex-Msg-Count"]), body))
        assert request.headers["Content-Type"] == "application/logplex-1"
        assert request.headers["Logplex-Drain-Token"].startswith("d.")
        return web.Response(status=503 if len(posts) == 1 else 200)

    app = web.Application()
    app.router.add_post("/logs", handle)
    runner, port = await start_local(app)
    try:
        url = parse_drain_url(f"http://127.0.0.1:{port}/logs")
        sender = HttpSender(url, url.token("shop"), batch_frames=4)
        drain = Drain(url, "shop", sender, backoff_first_s=0.01)
        drain.start()
        for line in _lines(6):
            drain.offer(line)
        await async_wait_for(_delivered(drain, 6), 10, what="6 lines delivered")
        await drain.aclose()
    finally:
        await runner.cleanup()
    assert [count for _, count, _ in posts] == [4, 4, 2]
    assert posts[0][0] == posts[1][0] != posts[2][0]  # the 503'd frame posted again as it was
    assert posts[0][2] == posts[1][2]
    frames, used = split_frames(posts[1][2] + posts[2][2])
    assert used == len(posts[1][2] + posts[2][2])
    assert [f.rsplit(b" ", 1)[1] for f in frames] == [str(i).encode() for i in range(6)]
    assert drain.retries == 1 and drain.delivered == 6


async def test_syslog_stream_is_octet_counted_and_goes_on_after_a_reconnect() -> None:
    # What the receiver's kernel acknowledged counts as delivered (syslog over TCP has no
    # acknowledgement of its own); the rest is sent again on the next connection.
    received: list[bytes] = []
    connections = 0

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        if connections == 1:
            writer.transport.abort()  # the first connection is refused at once
            return
        while data := await reader.read(65536):
            received.append(data)
        writer.close()

    server = await asyncio.start_server(client, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        url = parse_drain_url(f"syslog://127.0.0.1:{port}")
        drain = Drain(url, "shop", SyslogSender(url), backoff_first_s=0.01)
        drain.start()
        for line in _lines(1000):
            drain.offer(line)
        await async_wait_for(_delivered(drain, 1000), 10, what="1000 lines delivered")
        await drain.aclose()
        await asyncio.sleep(0.05)
    finally:
        server.close()
        await server.wait_closed()
    frames, used = split_frames(b"".join(received))
    numbers = [int(f.rsplit(b" ", 1)[1]) for f in frames]
    assert used == len(b"".join(received)) and numbers
    assert numbers == list(range(numbers[0], 1000))
    assert drain.retries >= 1 and drain.delivered == 1000
    assert frames[0].split(b" ", 1)[1].startswith(
        b"<190>1 2026-11-26T10:00:00.123456+00:00 host app web.1 - ")


class _Block:
    def __init__(self, texts: list[str]) -> None:
        self.at, self.source, self.dyno, self.app, self.texts = (
            AT, LogSource.APP, "web.1", "shop", texts)


async def test_a_block_is_framed_as_its_lines_are_and_cut_at_the_bound() -> None:
    one = Drain(parse_drain_url("syslog://h:1"), "shop", _NoSender(), capacity=4,
                clock=lambda: AT)
    block = Drain(parse_drain_url("syslog://h:1"), "shop", _NoSender(), capacity=4,
                  clock=lambda: AT)
    texts = ["a", "bé", "c", "d", "e", "f"]
    for text in texts:
        one.offer(LogLine.output(AT, "shop", "web.1", text))
    assert block.offer_block(_Block(texts)) == 4
    assert block.take(10, 1 << 20) == one.take(10, 1 << 20)
    assert (block.emitted, block.dropped) == (one.emitted, one.dropped) == (6, 2)


# -- the manager -------------------------------------------------------------------------------
async def test_manager_routes_each_app_to_its_drains_and_the_host_wide_ones(
        tmp_path: Path) -> None:
    wanted: dict[str, list[str] | None] = {"shop": ["syslog://127.0.0.1:1"], "blog": []}
    manager = DrainManager(tmp_path, [parse_drain_url("http://127.0.0.1:1/all")],
                           lambda app: wanted.get(app))
    hub = LogHub()
    await manager.start(hub)
    try:
        hub.publish(LogLine.output(AT, "shop", "web.1", "to both"))
        hub.publish(LogLine.output(AT, "blog", "web.1", "to the host's drain only"))
        counts = {(d.app, d.url.url): d.emitted for d in manager.drains}
        assert counts == {("shop", "syslog://127.0.0.1:1"): 1, (None, "http://127.0.0.1:1/all"): 2}
        text = metrics.render(manager.metrics_families())
        assert 'dynoagent_drain_lines_emitted_total{drain="d.' in text
        assert 'app="*",url="http://127.0.0.1:1/all"} 2' in text
        # The spec no longer names the drain: it retires, and new lines do not reach it.
        wanted["shop"] = []
        manager.refresh("shop")
        hub.publish(LogLine.output(AT, "shop", "web.1", "host only"))
        (shop,) = [d for d in manager.drains if d.app == "shop"]
        assert shop.retiring and shop.emitted == 1
    finally:
        await manager.aclose()
        hub.close()
    # Its undelivered line is still on disk for the next agent, which restores it.
    again = DrainManager(tmp_path, (), lambda app: None)
    await again.start(LogHub())
    try:
        (restored,) = [d for d in again.drains if d.app == "shop"]
        assert restored.queued == 1 and restored.retiring
    finally:
        await again.aclose()


async def test_a_receiver_that_takes_nothing_is_given_up_on_and_dialled_again() -> None:
    connections: list[asyncio.StreamWriter] = []

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)  # never reads

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.bind(("127.0.0.1", 0))
    server = await asyncio.start_server(client, sock=sock)
    port = sock.getsockname()[1]
    try:
        url = parse_drain_url(f"syslog://127.0.0.1:{port}")
        drain = Drain(url, "shop", SyslogSender(url, stall_s=0.3), backoff_first_s=0.01)
        drain.start()
        for line in _lines(20_000):
            drain.offer(line)

        async def redialled() -> bool:
            return drain.retries >= 1 and len(connections) >= 2
        await async_wait_for(redialled, 10, what="a second connection")
        # Nothing lost: what was not acknowledged is queued again.
        assert drain.delivered + drain.queued == drain.emitted == 20_000
        await drain.aclose()
    finally:
        for writer in connections:
            writer.transport.abort()
        server.close()
        await server.wait_closed()
