"""The space resolver on the real kernel: bound in a test host's namespace on a gateway
address that does not exist yet, asked by glibc (`getent`) from a dyno's namespace through
the resolv.conf a space dyno gets; other names forwarded to a loopback stub of the host."""

from __future__ import annotations

import asyncio
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path

import dns.message
import dns.rcode
import dns.rrset
import pytest

from agent.discovery import Member, SpaceResolver
from agent.launcher import etc
from tests.support.testhost import Netns, NetnsThread, TestHost, ip, new_test_host

GATEWAY = "10.64.3.1"
DYNO = "10.64.3.2"
STUB_ANSWER = "192.0.2.7"


@dataclass
class Running:
    """The resolver's loop in its thread, and how the test stops it."""

    ready: threading.Event = field(default_factory=threading.Event)
    loop: asyncio.AbstractEventLoop | None = None
    stop: asyncio.Event | None = None
    error: BaseException | None = None


async def _serve(running: Running) -> None:
    loop = asyncio.get_running_loop()

    class Stub(asyncio.DatagramProtocol):
        """The host's loopback resolver (as systemd-resolved's 127.0.0.53)."""

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport

        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            query = dns.message.from_wire(data)
            response = dns.message.make_response(query)
            if query.question[0].name.to_text() == "example.test.":
                response.answer.append(dns.rrset.from_text("example.test.", 60, "IN", "A",
                                                           STUB_ANSWER))
            else:
                response.set_rcode(dns.rcode.NXDOMAIN)
            self.transport.sendto(response.to_wire(), addr)  # type: ignore[attr-defined]

    stub, _ = await loop.create_datagram_endpoint(Stub, local_addr=("127.0.0.53", 53))
    resolver = SpaceResolver([("127.0.0.53", 53)])
    await resolver.start()
    try:
        # Before the bridge has its gateway: IP_FREEBIND lets the agent bind it anyway.
        await resolver.add_space("alpha", IPv4Address(GATEWAY))
        resolver.set_members("alpha", [
            Member("alpha", "web.1", IPv4Address(DYNO), "up"),
            Member("alpha", "web.2", IPv4Address("10.64.9.2"), "up")])
        running.loop, running.stop = loop, asyncio.Event()
        running.ready.set()
        await running.stop.wait()
    finally:
        await resolver.close()
        stub.close()


def _run(running: Running) -> None:
    try:
        asyncio.run(_serve(running))
    except BaseException as exc:
        running.error = exc
        running.ready.set()


@pytest.fixture
def hosts() -> Iterator[tuple[TestHost, TestHost]]:
    with new_test_host("dr") as host, new_test_host("dn") as dyno:
        yield host, dyno


def _getent(dyno: Netns, resolv_conf: Path, name: str) -> subprocess.CompletedProcess[str]:
    # A private mount namespace for the dyno's own resolv.conf, as the launcher binds it.
    return dyno.run("unshare", "--mount", "--", "sh", "-c",
                    'mount --bind "$1" /etc/resolv.conf && exec getent ahostsv4 "$2"',
                    "sh", str(resolv_conf), name, check=False, timeout_s=20)


def test_a_dyno_resolves_its_space_names_and_the_rest_through_the_gateway(
        hosts: tuple[TestHost, TestHost], tmp_path: Path) -> None:
    host, dyno = hosts
    running = Running()
    with NetnsThread(host) as thread:
        served = thread.submit(_run, running)
        assert running.ready.wait(20)
        assert running.error is None, running.error
        try:
            ip("-n", host.name, "link", "add", "gw0", "type", "veth", "peer", "name", "eth0",
               "netns", dyno.name)
            host.run("ip", "addr", "add", f"{GATEWAY}/24", "dev", "gw0")
            host.run("ip", "link", "set", "gw0", "up")
            dyno.run("ip", "addr", "add", f"{DYNO}/24", "dev", "eth0")
            dyno.run("ip", "link", "set", "eth0", "up")
            conf = tmp_path / "resolv.conf"
            conf.write_text(etc.resolv_conf_for_space(GATEWAY))

            found = _getent(dyno, conf, "web.alpha.app.localspace")
            assert found.returncode == 0, found.stderr
            assert {line.split()[0] for line in found.stdout.splitlines()} == {
                DYNO, "10.64.9.2"}
            one = _getent(dyno, conf, "1.web.alpha.app.localspace")
            assert one.stdout.split()[0] == DYNO
            assert _getent(dyno, conf, "3.web.alpha.app.localspace").returncode == 2
            forwarded = _getent(dyno, conf, "example.test")
            assert forwarded.returncode == 0, forwarded.stderr
            assert forwarded.stdout.split()[0] == STUB_ANSWER
        finally:
            assert running.loop is not None and running.stop is not None
            running.loop.call_soon_threadsafe(running.stop.set)
            served.result(20)
    assert running.error is None, running.error
