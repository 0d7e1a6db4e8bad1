"""The space resolver: one UDP and one TCP socket per space on its bridge gateway, answering
that space's `.localspace` names from its own records and forwarding every other name to the
host's resolvers. dnspython does the wire format; this module only decides the answers."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from ipaddress import IPv4Address, ip_address
from typing import Any, Final, cast

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from agent.discovery.records import Member, records
from agent.tasks import OwnedTasks

log = logging.getLogger(__name__)

DNS_PORT: Final = 53
TTL_S: Final = 5
FORWARD_TIMEOUT_S: Final = 2.0
# Forwarded queries in flight, over all spaces: past this a query gets SERVFAIL at once, so a
# dyno flooding names that time out upstream cannot grow the agent's memory without bound.
MAX_FORWARDING: Final = 256
MAX_TCP_CLIENTS: Final = 128
TCP_IDLE_TIMEOUT_S: Final = 10.0
HOST_RESOLV_CONF: Final = "/etc/resolv.conf"
ZONE: Final = dns.name.from_text("localspace.")
# Without EDNS a UDP answer is at most 512 bytes (RFC 1035); with it, at most what the client
# offered, capped at the size DNS flag day 2020 recommends so answers are not fragmented.
UDP_MIN_PAYLOAD: Final = 512
UDP_MAX_PAYLOAD: Final = 1232
# Linux's IP_FREEBIND (not in Python's socket module before 3.12): bind the gateway address
# even while the bridge that carries it is not up yet (agent start-up, space re-created).
IP_FREEBIND: Final = getattr(socket, "IP_FREEBIND", 15)


class ResolverError(OSError):
    """A space's sockets could not be bound; carries the space, address and errno."""

    def __init__(self, space_id: str, address: IPv4Address, err: int, message: str) -> None:
        super().__init__(err, f"space {space_id}: DNS on {address}: {message}")
        self.space_id = space_id
        self.address = address


@dataclass(slots=True)
class ResolverCounters:
    """Totals since start, over every space (the metrics endpoint exposes them)."""

    queries: int = 0          # well-formed queries received, UDP and TCP
    answered: int = 0         # answered from a space's records (A, or an empty NOERROR)
    nxdomain: int = 0         # `.localspace` names the space does not have
    forwarded: int = 0        # sent to the host's resolvers
    forward_failed: int = 0   # no upstream answered in time: SERVFAIL
    overloaded: int = 0       # refused with SERVFAIL: MAX_FORWARDING already in flight
    malformed: int = 0        # packets that are no DNS query (dropped, or TCP closed)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def read_upstreams(path: str = HOST_RESOLV_CONF) -> list[tuple[str, int]]:
    """The `nameserver` lines of a resolv.conf, as (address, 53); glibc's 127.0.0.1 if none.

    The agent runs in the host's network namespace, so a loopback stub (systemd-resolved's
    127.0.0.53, dnsmasq) is reachable from here, unlike from a dyno.
    """
    servers: list[tuple[str, int]] = []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read(64 * 1024)
    except OSError:
        text = ""
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            address = fields[1].split("%", 1)[0]
            with contextlib.suppress(ValueError):
                servers.append((str(ip_address(address)), DNS_PORT))
    return servers or [("127.0.0.1", DNS_PORT)]


class _UpstreamFile:
    """The host's resolvers from resolv.conf, read again when the file changes (DHCP)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._servers: list[tuple[str, int]] = []

    def servers(self) -> list[tuple[str, int]]:
        try:
            st = os.stat(self.path)
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = (0, 0, 0)
        if stamp != self._stamp:
            self._servers = read_upstreams(self.path)
            self._stamp = stamp
        return self._servers


class _Listener:
    """One space's sockets and the tasks serving them."""

    def __init__(self, address: IPv4Address) -> None:
        self.address = address
        self.udp: asyncio.DatagramTransport | None = None
        self.tcp: asyncio.Server | None = None
        self.tasks = OwnedTasks()
        self.tcp_clients = 0

    async def close(self) -> None:
        if self.udp is not None:
            self.udp.close()
        if self.tcp is not None:
            self.tcp.close()
        await self.tasks.cancel_all()
        if self.tcp is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.tcp.wait_closed(), 1.0)


class _Zone:
    """A space's names: A records, and the names above them (no data, but not NXDOMAIN)."""

    def __init__(self, table: Mapping[str, tuple[IPv4Address, ...]]) -> None:
        self.table = dict(table)
        self.parents: set[str] = set()
        for name in self.table:
            labels = name.split(".")
            self.parents.update(".".join(labels[i:]) for i in range(1, len(labels)))


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, resolver: SpaceResolver, space_id: str, listener: _Listener) -> None:
        self.resolver = resolver
        self.space_id = space_id
        self.listener = listener
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # asyncio's selector datagram transport is no DatagramTransport subclass (3.11).
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        if self.transport is not None:
            self.resolver._on_datagram(self.space_id, self.listener, self.transport, data, addr)

    def error_received(self, exc: Exception) -> None:
        # ICMP errors of earlier answers (a client gone): nothing to do.
        log.debug("space %s: DNS socket error: %s", self.space_id, exc)


class SpaceResolver:
    """The agent's DNS server for every space on this host.

    `upstreams` are (address, port) pairs tried in order, each for `forward_timeout_s`; None:
    the `nameserver`s of `resolv_conf`, re-read when it changes. `port` is 53 but for tests.
    """

    def __init__(self, upstreams: Sequence[tuple[str, int]] | None = None, *,
                 port: int = DNS_PORT, ttl_s: int = TTL_S,
                 forward_timeout_s: float = FORWARD_TIMEOUT_S,
                 max_forwarding: int = MAX_FORWARDING, max_tcp_clients: int = MAX_TCP_CLIENTS,
                 tcp_idle_timeout_s: float = TCP_IDLE_TIMEOUT_S,
                 resolv_conf: str = HOST_RESOLV_CONF) -> None:
        self.port = port
        self.ttl_s = ttl_s
        self.forward_timeout_s = forward_timeout_s
        self.max_forwarding = max_forwarding
        self.max_tcp_clients = max_tcp_clients
        self.tcp_idle_timeout_s = tcp_idle_timeout_s
        self.counters = ResolverCounters()
        self._fixed_upstreams = None if upstreams is None else list(upstreams)
        self._upstream_file = _UpstreamFile(resolv_conf)
        # Each space's members as last set, and its names worked out from them at the first
        # query after (a burst of starts sets a space's members every loop turn, and rebuilt
        # every name each time: 1.3 % of the agent's CPU in a burst of 200, for names nobody
        # had asked for).
        self._members: dict[str, tuple[Member, ...]] = {}
        self._zones: dict[str, _Zone] = {}
        self._listeners: dict[str, _Listener] = {}
        self._forwarding = 0
        self._started = False
        self._lock = asyncio.Lock()

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Read the host's resolvers once (logged); spaces are added afterwards."""
        self._started = True
        log.info("DNS discovery: forwarding to %s",
                 " ".join(f"{a}:{p}" for a, p in self.upstreams()))

    async def close(self) -> None:
        """Close every space's sockets and end what they were serving."""
        async with self._lock:
            listeners = list(self._listeners.values())
            self._listeners.clear()
            self._started = False
        for listener in listeners:
            await listener.close()

    async def add_space(self, space_id: str, address: IPv4Address) -> None:
        """Serve `space_id` on address:port, UDP and TCP; nothing if already so, the old
        sockets closed first if its address changed. Raises ResolverError."""
        if not self._started:
            raise RuntimeError("SpaceResolver.add_space before start()")
        async with self._lock:
            current = self._listeners.get(space_id)
            if current is not None and current.address == address:
                return
            if current is not None:
                del self._listeners[space_id]
                await current.close()
            self._listeners[space_id] = await self._bind(space_id, address)
            log.info("DNS discovery: space %s on %s:%d", space_id, address, self.port)

    def set_members(self, space_id: str, members: Iterable[Member]) -> None:
        """Replace the space's names with those of `members` (kept even before add_space)."""
        self._members[space_id] = tuple(members)
        self._zones.pop(space_id, None)

    async def remove_space(self, space_id: str) -> None:
        """Stop serving the space and forget its names (nothing if unknown)."""
        async with self._lock:
            listener = self._listeners.pop(space_id, None)
            self._zones.pop(space_id, None)
            self._members.pop(space_id, None)
        if listener is not None:
            await listener.close()
            log.info("DNS discovery: space %s removed", space_id)

    def _zone(self, space_id: str) -> _Zone:
        zone = self._zones.get(space_id)
        if zone is None:
            zone = _Zone(records(self._members.get(space_id, ())))
            if space_id in self._members:
                self._zones[space_id] = zone
        return zone

    def spaces(self) -> dict[str, IPv4Address]:
        return {space: listener.address for space, listener in self._listeners.items()}

    def upstreams(self) -> list[tuple[str, int]]:
        if self._fixed_upstreams is not None:
            return self._fixed_upstreams
        return self._upstream_file.servers()

    # --- sockets ---------------------------------------------------------------------------

    async def _bind(self, space_id: str, address: IPv4Address) -> _Listener:
        loop = asyncio.get_running_loop()
        listener = _Listener(address)
        udp_sock = tcp_sock = None
        try:
            udp_sock = _socket(socket.SOCK_DGRAM, address, self.port)
            tcp_sock = _socket(socket.SOCK_STREAM, address, self.port)
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _UdpProtocol(self, space_id, listener), sock=udp_sock)
            udp_sock = None
            listener.udp = transport

            async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                # Python 3.11's start_server calls task.exception() on its handler task when
                # done, which raises (and is logged as an error) if the task was cancelled:
                # end normally when the space closes.
                with contextlib.suppress(asyncio.CancelledError):
                    await self._serve_tcp(space_id, listener, reader, writer)

            listener.tcp = await asyncio.start_server(serve, sock=tcp_sock)
            tcp_sock = None
        except OSError as exc:
            for sock in (udp_sock, tcp_sock):
                if sock is not None:
                    sock.close()
            await listener.close()
            raise ResolverError(space_id, address, exc.errno or errno.EIO,
                                exc.strerror or str(exc)) from exc
        return listener

    def _on_datagram(self, space_id: str, listener: _Listener,
                     transport: asyncio.DatagramTransport, data: bytes,
                     addr: tuple[Any, ...]) -> None:
        query = self._parse(data)
        if query is None:
            return
        try:
            local = self._local_answer(space_id, query)
        except Exception:  # the event loop's callback root: one bad query, not the socket
            log.exception("space %s: DNS query not answered", space_id)
            return
        if local is not None:
            _send_udp(transport, query, local, addr)
            return
        if self._forwarding >= self.max_forwarding:
            self.counters.overloaded += 1
            _send_udp(transport, query, _error(query, dns.rcode.SERVFAIL), addr)
            return
        self._forwarding += 1

        async def forward() -> None:
            try:
                response = await self._forward(query, tcp=False)
            finally:
                self._forwarding -= 1
            if not transport.is_closing():
                _send_udp(transport, query, response, addr)

        listener.tasks.spawn(forward(), f"dns-forward-{space_id}")

    async def _serve_tcp(self, space_id: str, listener: _Listener,
                         reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            listener.tasks.adopt(task)
        if listener.tcp_clients >= self.max_tcp_clients:
            writer.close()
            return
        listener.tcp_clients += 1
        try:
            while True:
                try:
                    head = await asyncio.wait_for(reader.readexactly(2),
                                                  self.tcp_idle_timeout_s)
                    data = await asyncio.wait_for(reader.readexactly(int.from_bytes(head)),
                                                  self.tcp_idle_timeout_s)
                except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
                    return
                query = self._parse(data)
                if query is None:
                    return
                response = self._local_answer(space_id, query)
                if response is None:
                    if self._forwarding >= self.max_forwarding:
                        self.counters.overloaded += 1
                        response = _error(query, dns.rcode.SERVFAIL)
                    else:
                        self._forwarding += 1
                        try:
                            response = await self._forward(query, tcp=True)
                        finally:
                            self._forwarding -= 1
                wire = _to_wire(response, 65535, truncate=False)
                if wire is None:
                    wire = _to_wire(_error(query, dns.rcode.SERVFAIL), 65535, truncate=False)
                    assert wire is not None
                writer.write(len(wire).to_bytes(2, "big") + wire)
                try:
                    await asyncio.wait_for(writer.drain(), self.tcp_idle_timeout_s)
                except (TimeoutError, ConnectionError):
                    return
        finally:
            listener.tcp_clients -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    # --- answers ---------------------------------------------------------------------------

    def _parse(self, data: bytes) -> dns.message.Message | None:
        """A query with one question, else None (counted as malformed)."""
        try:
            query = dns.message.from_wire(data)
        except Exception:  # dnspython raises many types (DNSException, ValueError, ...)
            self.counters.malformed += 1
            return None
        if query.flags & dns.flags.QR or len(query.question) != 1:
            self.counters.malformed += 1
            return None
        self.counters.queries += 1
        return query

    def _local_answer(self, space_id: str,
                      query: dns.message.Message) -> dns.message.Message | None:
        """The answer from the space's records, or None when the name is not ours to answer."""
        if query.opcode() != dns.opcode.QUERY:
            return _error(query, dns.rcode.NOTIMP)
        question = query.question[0]
        if not question.name.is_subdomain(ZONE):
            return None
        name = question.name.to_text(omit_final_dot=True).lower()
        zone = self._zone(space_id)
        response = dns.message.make_response(query, recursion_available=True,
                                             our_payload=UDP_MAX_PAYLOAD)
        response.flags |= dns.flags.AA
        addresses = zone.table.get(name)
        if question.rdclass != dns.rdataclass.IN:
            response.set_rcode(dns.rcode.REFUSED)
        elif addresses is not None:
            self.counters.answered += 1
            if question.rdtype in (dns.rdatatype.A, dns.rdatatype.ANY):
                response.answer.append(dns.rrset.from_text_list(
                    question.name, self.ttl_s, dns.rdataclass.IN, dns.rdatatype.A,
                    [str(a) for a in addresses]))
            else:
                response.authority.append(self._soa())
        elif name in zone.parents or name == "localspace":
            self.counters.answered += 1
            response.authority.append(self._soa())
        else:
            self.counters.nxdomain += 1
            response.set_rcode(dns.rcode.NXDOMAIN)
            response.authority.append(self._soa())
        return response

    def _soa(self) -> dns.rrset.RRset:
        # Negative answers carry the zone's SOA so that caching resolvers keep them only as
        # long as a positive answer (RFC 2308: the SOA's minimum bounds the negative TTL).
        t = self.ttl_s
        return dns.rrset.from_text(ZONE, t, "IN", "SOA",
                                   f"localspace. hostmaster.localspace. 1 {t} {t} {t} {t}")

    async def _forward(self, query: dns.message.Message, *, tcp: bool) -> dns.message.Message:
        """The first answer of the host's resolvers, each tried for forward_timeout_s; else
        SERVFAIL. Never raises."""
        self.counters.forwarded += 1
        own = {(str(listener.address), self.port) for listener in self._listeners.values()}
        for address, port in self.upstreams():
            if (address, port) in own:
                continue  # never to ourselves: a loop
            try:
                if tcp:
                    return await dns.asyncquery.tcp(query, address, self.forward_timeout_s,
                                                    port=port)
                return await dns.asyncquery.udp(query, address, self.forward_timeout_s,
                                                port=port, ignore_unexpected=True)
            except (dns.exception.DNSException, OSError, ValueError, EOFError) as exc:
                log.debug("DNS upstream %s:%d: %s", address, port, exc or type(exc).__name__)
        self.counters.forward_failed += 1
        return _error(query, dns.rcode.SERVFAIL)


def _socket(kind: int, address: IPv4Address, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, kind)
    try:
        sock.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setblocking(False)
        sock.bind((str(address), port))
    except OSError:
        sock.close()
        raise
    return sock


def _udp_limit(query: dns.message.Message) -> int:
    if query.edns < 0:
        return UDP_MIN_PAYLOAD
    return max(UDP_MIN_PAYLOAD, min(query.payload, UDP_MAX_PAYLOAD))


def _error(query: dns.message.Message, rcode: dns.rcode.Rcode) -> dns.message.Message:
    response = dns.message.make_response(query, recursion_available=True,
                                         our_payload=UDP_MAX_PAYLOAD)
    response.set_rcode(rcode)
    return response


def _to_wire(message: dns.message.Message, limit: int, *, truncate: bool) -> bytes | None:
    """The message's wire form within `limit` bytes (truncated, with TC, if `truncate`:
    the client asks again over TCP); None if it cannot be written."""
    try:
        return message.to_wire(max_size=limit, prefer_truncation=truncate)
    except Exception:  # dns.exception.TooBig and anything an odd upstream answer trips on
        log.debug("DNS answer not encodable", exc_info=True)
        return None


def _send_udp(transport: asyncio.DatagramTransport, query: dns.message.Message,
              response: dns.message.Message, addr: tuple[Any, ...]) -> None:
    limit = _udp_limit(query)
    wire = _to_wire(response, limit, truncate=True)
    if wire is None:
        wire = _to_wire(_error(query, dns.rcode.SERVFAIL), limit, truncate=True)
    if wire is not None:
        transport.sendto(wire, addr)
