"""The space resolver on real sockets: each space's names on its own loopback address (a high
port, no root), other names forwarded to a fake upstream resolver in the test (issue 16)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import random
import socket
from collections.abc import AsyncIterator, Iterator
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import dns.asyncquery
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

from agent.discovery import Member, ResolverError, SpaceResolver
from agent.discovery import server as server_module
from agent.discovery.server import read_upstreams

PORT = 10053
UPSTREAM_ANSWER = "192.0.2.1"
FAST_TIMEOUT_S = 0.3
QUERY_TIMEOUT_S = 3.0


class FakeUpstream:
    """A resolver on UDP and TCP: `example.test` → 192.0.2.1, NXDOMAIN for the rest; or, when
    `silent`, a UDP socket that reads queries and never answers (an upstream that times out)."""

    def __init__(self, address: str, *, silent: bool = False) -> None:
        self.address = address
        self.silent = silent
        self.port = 0
        self.queries: list[str] = []
        self.received = asyncio.Event()
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None

    def answer(self, data: bytes) -> bytes:
        query = dns.message.from_wire(data)
        name = query.question[0].name.to_text()
        self.queries.append(name)
        response = dns.message.make_response(query)
        if name == "example.test.":
            response.answer.append(dns.rrset.from_text(name, 60, "IN", "A", UPSTREAM_ANSWER))
        else:
            response.set_rcode(dns.rcode.NXDOMAIN)
        return response.to_wire()

    async def start(self) -> None:
        upstream = self
        loop = asyncio.get_running_loop()

        class Protocol(asyncio.DatagramProtocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = transport

            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                if upstream.silent:
                    upstream.queries.append("(ignored)")
                    upstream.received.set()
                    return
                self.transport.sendto(upstream.answer(data), addr)  # type: ignore[attr-defined]

        transport, _ = await loop.create_datagram_endpoint(
            Protocol, local_addr=(self.address, 0))
        self._udp = transport  # type: ignore[assignment]
        self.port = transport.get_extra_info("sockname")[1]

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
                size = int.from_bytes(await reader.readexactly(2))
                wire = self.answer(await reader.readexactly(size))
                writer.write(len(wire).to_bytes(2, "big") + wire)
                await writer.drain()
            writer.close()

        self._tcp = await asyncio.start_server(serve, self.address, self.port)

    async def close(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
            await self._tcp.wait_closed()


@pytest.fixture
def net() -> Iterator[str]:
    """A prefix `127.x.y.` of loopback addresses of this test's own (no clash across runs)."""
    yield f"127.{random.randint(10, 250)}.{random.randint(0, 255)}."


@pytest.fixture
async def upstream(net: str) -> AsyncIterator[FakeUpstream]:
    server = FakeUpstream(net + "100")
    await server.start()
    yield server
    await server.close()


@pytest.fixture
async def silent(net: str) -> AsyncIterator[FakeUpstream]:
    server = FakeUpstream(net + "101", silent=True)
    await server.start()
    yield server
    await server.close()


@contextlib.asynccontextmanager
async def resolver(*upstreams: FakeUpstream, **options: object) -> AsyncIterator[SpaceResolver]:
    server = SpaceResolver([(u.address, u.port) for u in upstreams], port=PORT,
                           forward_timeout_s=FAST_TIMEOUT_S, **options)  # type: ignore[arg-type]
    await server.start()
    try:
        yield server
    finally:
        await server.close()


def members(app: str, *dynos: tuple[str, str, str]) -> list[Member]:
    return [Member(app, name, IPv4Address(ip), state) for name, ip, state in dynos]


async def ask(address: str, name: str, rdtype: str = "A", *, tcp: bool = False,
              timeout_s: float = QUERY_TIMEOUT_S, port: int = PORT) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype)
    if tcp:
        return await dns.asyncquery.tcp(query, address, timeout_s, port=port)
    return await dns.asyncquery.udp(query, address, timeout_s, port=port)


def addresses(response: dns.message.Message) -> list[str]:
    """The A records of an answer, sorted: dnspython shuffles them on the wire (round robin)."""
    return sorted((r.to_text() for rrset in response.answer for r in rrset),
                  key=IPv4Address)


ALPHA = (("web.1", "10.64.1.2", "up"), ("web.2", "10.64.2.2", "up"),
         ("web.3", "10.64.1.9", "starting"), ("worker.1", "10.64.1.3", "up"))


async def test_a_space_answers_its_names_with_a_short_ttl(net: str, upstream: FakeUpstream,
                                                          ) -> None:
    async with resolver(upstream) as server:
        await server.add_space("alpha", IPv4Address(net + "1"))
        server.set_members("alpha", members("alpha", *ALPHA))
        formation = await ask(net + "1", "web.alpha.app.localspace")
        assert formation.rcode() == dns.rcode.NOERROR
        assert formation.flags & dns.flags.AA
        assert addresses(formation) == ["10.64.1.2", "10.64.2.2"]
        assert formation.answer[0].ttl == 5
        one = await ask(net + "1", "1.WEB.Alpha.app.localspace.")  # names are case-insensitive
        assert addresses(one) == ["10.64.1.2"]
        app = await ask(net + "1", "alpha.app.localspace", "ANY")
        assert addresses(app) == ["10.64.1.2", "10.64.1.3", "10.64.2.2"]
        assert upstream.queries == []
        assert server.counters.answered == 3


async def test_names_are_worked_out_once_at_the_first_query_after_a_change(
        net: str, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch) -> None:
    """A burst of starts sets a space's members every loop turn; the names are built when
    asked for, from the latest members, once until the next change."""
    built: list[int] = []
    real = server_module.records

    def counted(found: Any) -> Any:
        built.append(1)
        return real(found)

    monkeypatch.setattr(server_module, "records", counted)
    async with resolver(upstream) as server:
        server.set_members("alpha", members("alpha", ALPHA[0]))  # before the space is bound
        await server.add_space("alpha", IPv4Address(net + "1"))
        for n in range(1, 21):
            server.set_members("alpha", members("alpha", *[
                (f"web.{i}", f"10.64.1.{i + 1}", "up") for i in range(1, n + 1)]))
        assert built == []
        first = await ask(net + "1", "web.alpha.app.localspace")
        assert len(addresses(first)) == 20
        assert addresses(await ask(net + "1", "20.web.alpha.app.localspace")) == ["10.64.1.21"]
        assert len(built) == 1
        server.set_members("alpha", members("alpha", ALPHA[0]))
        assert addresses(await ask(net + "1", "web.alpha.app.localspace")) == ["10.64.1.2"]
        assert len(built) == 2


async def test_aaaa_is_empty_and_unknown_names_are_nxdomain(net: str, upstream: FakeUpstream,
                                                            ) -> None:
    async with resolver(upstream) as server:
        await server.add_space("alpha", IPv4Address(net + "1"))
        server.set_members("alpha", members("alpha", *ALPHA))
        aaaa = await ask(net + "1", "web.alpha.app.localspace", "AAAA")
        assert (aaaa.rcode(), aaaa.answer) == (dns.rcode.NOERROR, [])
        for name in ("3.web.alpha.app.localspace",   # starting: not named yet
                     "web.gamma.app.localspace", "anything.localspace"):
            response = await ask(net + "1", name)
            assert response.rcode() == dns.rcode.NXDOMAIN, name
            assert response.authority[0].rdtype == dns.rdatatype.SOA
        # A name above the records exists (empty), so resolvers do not cache it as absent.
        assert (await ask(net + "1", "app.localspace")).rcode() == dns.rcode.NOERROR
        assert upstream.queries == []
        assert server.counters.nxdomain == 3


async def test_other_names_are_forwarded_to_the_host_resolvers(net: str,
                                                               upstream: FakeUpstream) -> None:
    async with resolver(upstream) as server:
        await server.add_space("alpha", IPv4Address(net + "1"))
        response = await ask(net + "1", "example.test")
        assert addresses(response) == [UPSTREAM_ANSWER]
        assert (await ask(net + "1", "missing.test")).rcode() == dns.rcode.NXDOMAIN
        assert upstream.queries == ["example.test.", "missing.test."]
        assert server.counters.forwarded == 2


async def test_the_resolver_never_forwards_to_itself(net: str, upstream: FakeUpstream) -> None:
    server = SpaceResolver([(net + "1", PORT), (upstream.address, upstream.port)], port=PORT,
                           forward_timeout_s=FAST_TIMEOUT_S)
    await server.start()
    try:
        await server.add_space("alpha", IPv4Address(net + "1"))
        assert addresses(await ask(net + "1", "example.test")) == [UPSTREAM_ANSWER]
        assert server.counters.forwarded == 1  # a loop would forward its own query again
    finally:
        await server.close()


async def test_a_silent_upstream_is_skipped_then_servfail(net: str, upstream: FakeUpstream,
                                                          silent: FakeUpstream) -> None:
    async with resolver(silent, upstream) as server:
        await server.add_space("alpha", IPv4Address(net + "1"))
        assert addresses(await ask(net + "1", "example.test")) == [UPSTREAM_ANSWER]
    async with resolver(silent) as server:
        await server.add_space("alpha", IPv4Address(net + "1"))
        response = await ask(net + "1", "example.test")
        assert response.rcode() == dns.rcode.SERVFAIL
        assert server.counters.forward_failed == 1
    assert silent.queries == ["(ignored)", "(ignored)"]


async def test_forwarded_queries_in_flight_are_bounded(net: str, silent: FakeUpstream) -> None:
    async with resolver(silent, max_forwarding=1) as server:
        await server.add_space("alpha", IPv4Address(net + "1"))
        first = asyncio.ensure_future(ask(net + "1", "slow.test"))
        await asyncio.wait_for(silent.received.wait(), QUERY_TIMEOUT_S)
        started = asyncio.get_running_loop().time()
        second = await ask(net + "1", "other.test")
        assert second.rcode() == dns.rcode.SERVFAIL
        assert asyncio.get_running_loop().time() - started < FAST_TIMEOUT_S
        assert server.counters.overloaded == 1
        assert (await first).rcode() == dns.rcode.SERVFAIL


async def test_a_space_never_sees_another_space_s_names(net: str,
                                                        upstream: FakeUpstream) -> None:
    async with resolver(upstream) as server:
        await server.add_space("alpha", IPv4Address(net + "1"))
        await server.add_space("beta", IPv4Address(net + "2"))
        server.set_members("alpha", members("alpha", ("web.1", "10.64.1.2", "up")))
        server.set_members("beta", members("beta", ("web.1", "10.64.64.2", "up")))
        assert addresses(await ask(net + "1", "web.alpha.app.localspace")) == ["10.64.1.2"]
        assert addresses(await ask(net + "2", "web.beta.app.localspace")) == ["10.64.64.2"]
        assert (await ask(net + "2", "web.alpha.app.localspace")).rcode() == dns.rcode.NXDOMAIN
        assert (await ask(net + "1", "web.beta.app.localspace")).rcode() == dns.rcode.NXDOMAIN
        assert (await ask(net + "2", "web.alpha.app.localspace", tcp=True)
                ).rcode() == dns.rcode.NXDOMAIN
        # set_members replaces the whole set
        server.set_members("alpha", members("alpha", ("web.2", "10.64.2.2", "up")))
        assert addresses(await ask(net + "1", "web.alpha.app.localspace")) == ["10.64.2.2"]


async def test_queries_over_tcp_local_and_forwarded(net: str, upstream: FakeUpstream) -> None:
    async with resolver(upstream) as server:
        await server.add_space("alpha", IPv4Address(net + "1"))
        server.set_members("alpha", members("alpha", *ALPHA))
        local = await ask(net + "1", "web.alpha.app.localspace", tcp=True)
        assert addresses(local) == ["10.64.1.2", "10.64.2.2"]
        assert addresses(await ask(net + "1", "example.test", tcp=True)) == [UPSTREAM_ANSWER]
        # Several queries on one connection.
        reader, writer = await asyncio.open_connection(net + "1", PORT)
        try:
            for name in ("1.web.alpha.app.localspace", "1.worker.alpha.app.localspace"):
                wire = dns.message.make_query(name, "A").to_wire()
                writer.write(len(wire).to_bytes(2, "big") + wire)
                size = int.from_bytes(await reader.readexactly(2))
                response = dns.message.from_wire(await reader.readexactly(size))
                assert len(addresses(response)) == 1
        finally:
            writer.close()
            await writer.wait_closed()


async def test_a_big_answer_is_truncated_over_udp_and_whole_over_tcp(
        net: str, upstream: FakeUpstream) -> None:
    many = [(f"web.{n}", f"10.64.{n // 250}.{n % 250 + 2}", "up") for n in range(1, 101)]
    async with resolver(upstream) as server:
        await server.add_space("alpha", IPv4Address(net + "1"))
        server.set_members("alpha", members("alpha", *many))
        query = dns.message.make_query("web.alpha.app.localspace", "A")
        udp = await dns.asyncquery.udp(query, net + "1", QUERY_TIMEOUT_S, port=PORT)
        assert udp.flags & dns.flags.TC
        assert len(udp.to_wire()) <= 512
        tcp = await ask(net + "1", "web.alpha.app.localspace", tcp=True)
        assert len(addresses(tcp)) == 100


async def test_malformed_packets_are_dropped_and_the_server_goes_on(
        net: str, upstream: FakeUpstream) -> None:
    async with resolver(upstream) as server:
        await server.add_space("alpha", IPv4Address(net + "1"))
        server.set_members("alpha", members("alpha", *ALPHA))
        answer = dns.message.make_response(dns.message.make_query("x.test", "A")).to_wire()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for junk in (b"", b"\x00", b"\xff" * 40, answer):  # an answer is no query either
                sock.sendto(junk, (net + "1", PORT))
        reader, writer = await asyncio.open_connection(net + "1", PORT)
        writer.write(b"\x00\x05hello")
        assert await asyncio.wait_for(reader.read(), QUERY_TIMEOUT_S) == b""  # closed
        writer.close()
        await writer.wait_closed()
        assert addresses(await ask(net + "1", "1.web.alpha.app.localspace")) == ["10.64.1.2"]
        assert addresses(await ask(net + "1", "1.web.alpha.app.localspace", tcp=True)
                         ) == ["10.64.1.2"]
        assert server.counters.malformed == 5
        assert upstream.queries == []


async def test_add_space_is_idempotent_and_rebinds_a_changed_address(
        net: str, upstream: FakeUpstream) -> None:
    async with resolver(upstream) as server:
        server.set_members("alpha", members("alpha", *ALPHA))  # before add_space: kept
        await server.add_space("alpha", IPv4Address(net + "1"))
        await server.add_space("alpha", IPv4Address(net + "1"))
        assert addresses(await ask(net + "1", "1.web.alpha.app.localspace")) == ["10.64.1.2"]
        await server.add_space("alpha", IPv4Address(net + "3"))
        assert server.spaces() == {"alpha": IPv4Address(net + "3")}
        assert addresses(await ask(net + "3", "1.web.alpha.app.localspace")) == ["10.64.1.2"]
        with pytest.raises((ConnectionRefusedError, dns.exception.Timeout)):
            await ask(net + "1", "1.web.alpha.app.localspace", timeout_s=FAST_TIMEOUT_S)
        await server.remove_space("alpha")
        with pytest.raises((ConnectionRefusedError, dns.exception.Timeout)):
            await ask(net + "3", "1.web.alpha.app.localspace", timeout_s=FAST_TIMEOUT_S)
        await server.remove_space("alpha")  # unknown: nothing


async def test_an_address_in_use_is_a_resolver_error(net: str, upstream: FakeUpstream) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind((net + "1", PORT))
        async with resolver(upstream) as server:
            with pytest.raises(ResolverError) as caught:
                await server.add_space("alpha", IPv4Address(net + "1"))
            assert caught.value.space_id == "alpha"
            assert caught.value.errno == errno.EADDRINUSE
            assert isinstance(caught.value, OSError)
            assert server.spaces() == {}


def test_upstreams_are_the_nameservers_of_resolv_conf(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text("# x\nsearch example.internal\nnameserver 127.0.0.53\n"
                    "nameserver fe80::1%eth0\nnameserver bogus\n")
    assert read_upstreams(str(conf)) == [("127.0.0.53", 53), ("fe80::1", 53)]
    conf.write_text("search example.internal\n")
    assert read_upstreams(str(conf)) == [("127.0.0.1", 53)]  # glibc's default
    assert read_upstreams(str(tmp_path / "missing")) == [("127.0.0.1", 53)]


async def test_resolv_conf_is_read_again_when_it_changes(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text("nameserver 192.0.2.53\n")
    server = SpaceResolver(resolv_conf=str(conf), port=PORT)
    await server.start()
    assert server.upstreams() == [("192.0.2.53", 53)]
    conf.write_text("nameserver 192.0.2.54\nnameserver 192.0.2.55\n")
    assert server.upstreams() == [("192.0.2.54", 53), ("192.0.2.55", 53)]
    await server.close()
