"""Private spaces across hosts: TCP throughput between two namespaces of one space through the
VXLAN overlay (two test hosts on a LAN, netns.HostNetwork in each) against the same pair on
one host's bridge and against the LAN itself (the underlay, no overlay); and the latency of a
DNS lookup from a dyno's namespace to its space's resolver against a bare UDP echo on the
same address. Medians of a few bounded runs each, all in one run."""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from ipaddress import IPv4Network
from pathlib import Path

from netns import HostNetwork, HostNetworkConfig
from tests.support.testhost import Netns, new_lan, new_test_host

ROOT = Path(__file__).resolve().parents[2]
SPACE = "bench"
SUBNET = IPv4Network("10.127.0.0/18")
POOL = IPv4Network("10.127.0.0/16")
VNI = 4242
VXLAN_PORT = 4789
ECHO_PORT = 5353
RUNS = 3
SECONDS = 2.0
LOOKUPS = 500

RECEIVER = r"""
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 5201)); s.listen(1)
print("ready", flush=True)
c, _ = s.accept()
n = 0
buf = bytearray(1 << 20)
while True:
    got = c.recv_into(buf)
    if not got:
        break
    n += got
print(n, flush=True)
"""

SENDER = r"""
import socket, sys, time
c = socket.create_connection((sys.argv[1], 5201))
chunk = b"x" * (1 << 18)
end = time.monotonic() + float(sys.argv[2])
start = time.monotonic()
while time.monotonic() < end:
    c.sendall(chunk)
c.shutdown(socket.SHUT_WR); c.recv(1)
print(time.monotonic() - start, flush=True)
"""

RESOLVER = r"""
import asyncio, sys
from ipaddress import IPv4Address
from agent.discovery import Member, SpaceResolver

async def main():
    resolver = SpaceResolver(upstreams=[("127.0.0.1", 9)])
    await resolver.start()
    await resolver.add_space("bench", IPv4Address(sys.argv[1]))
    resolver.set_members("bench", [Member("alpha", f"web.{n}", IPv4Address(a), "up")
                                   for n, a in enumerate(sys.argv[2:], start=1)])
    loop = asyncio.get_running_loop()

    class Echo(asyncio.DatagramProtocol):
        def connection_made(self, transport): self.t = transport
        def datagram_received(self, data, addr): self.t.sendto(data, addr)
    await loop.create_datagram_endpoint(Echo, local_addr=(sys.argv[1], 5353))
    print("ready", flush=True)
    await loop.run_in_executor(None, sys.stdin.read)
    await resolver.close()

asyncio.run(main())
"""

LOOKUP = r"""
import socket, statistics, sys, time
import dns.message
server, count = sys.argv[1], int(sys.argv[2])
# The same wire bytes each time, on connected sockets: what is timed is the server's side.
wire = dns.message.make_query("web.alpha.app.localspace", "A").to_wire()
resolver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
resolver.connect((server, 53))
echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
echo.connect((server, 5353))
resolver.send(wire)
assert dns.message.from_wire(resolver.recv(4096)).answer
dns_ms, echo_ms = [], []
for _ in range(count):
    t = time.perf_counter()
    resolver.send(wire); resolver.recv(4096)
    dns_ms.append((time.perf_counter() - t) * 1e3)
    t = time.perf_counter()
    echo.send(wire); echo.recv(4096)
    echo_ms.append((time.perf_counter() - t) * 1e3)
print(statistics.median(dns_ms), statistics.median(echo_ms), flush=True)
"""


def _python(ns: Netns | str, script: str, *args: str) -> list[str]:
    path = ns.path if isinstance(ns, Netns) else Path("/run/netns") / ns
    return ["nsenter", f"--net={path}", "--", sys.executable, "-c", script, *args]


def _throughput(receiver_ns: Netns | str, sender_ns: Netns | str, address: str) -> float:
    """Gbit/s of one bounded TCP stream from `sender_ns` to `address` in `receiver_ns`."""
    receiver = subprocess.Popen(_python(receiver_ns, RECEIVER, address),
                                stdout=subprocess.PIPE, text=True)
    try:
        assert receiver.stdout is not None
        assert receiver.stdout.readline().strip() == "ready"
        sent = subprocess.run(_python(sender_ns, SENDER, address, str(SECONDS)),
                              capture_output=True, text=True, timeout=60, check=True)
        received = int(receiver.stdout.readline())
        return received * 8 / float(sent.stdout) / 1e9
    finally:
        receiver.kill()
        receiver.wait()


def main() -> None:
    with new_test_host("dq") as h1, new_test_host("dq") as h2, \
            new_lan([h1, h2], prefix="dq") as lan, tempfile.TemporaryDirectory() as tmp:
        underlay = [lan.address(h).ip for h in (h1, h2)]
        nets = [HostNetwork(HostNetworkConfig(
            state_dir=Path(tmp) / f"h{i}", link_prefix=f"dq{i}", table=f"dt_q{i}",
            host_netns=h.path, durable_state=False, allowed_udp_ports=(ECHO_PORT,)))
            for i, h in enumerate((h1, h2))]
        try:
            mtu = nets[0].underlay_mtu(underlay[0]) - 50
            for i, net in enumerate(nets):
                net.set_fleet([POOL], underlay, VXLAN_PORT)
                net.configure_space(SPACE, subnet=SUBNET,
                                    slice=IPv4Network(f"10.127.{i + 1}.0/24"), vni=VNI,
                                    underlay=underlay[i], port=VXLAN_PORT, mtu=mtu)
            a1 = nets[0].create_attached(SPACE, f"{h1.name}a1")
            a2 = nets[0].create_attached(SPACE, f"{h1.name}a2")
            b1 = nets[1].create_attached(SPACE, f"{h2.name}b1")
            nets[0].set_space_peers(SPACE, {b1.address.ip: underlay[1]})
            nets[1].set_space_peers(SPACE, {a1.address.ip: underlay[0],
                                            a2.address.ip: underlay[0]})
            overlay = [_throughput(b1.namespace, a1.namespace, str(b1.address.ip))
                       for _ in range(RUNS)]
            bridge = [_throughput(a2.namespace, a1.namespace, str(a2.address.ip))
                      for _ in range(RUNS)]
            lan_only = [_throughput(h2, h1, str(underlay[1])) for _ in range(RUNS)]
            gateway = str(nets[0].ensure_space(SPACE).gateway.ip)
            resolver = subprocess.Popen(
                _python(h1, RESOLVER, gateway, str(a1.address.ip), str(b1.address.ip)),
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
            try:
                assert resolver.stdout is not None
                assert resolver.stdout.readline().strip() == "ready"
                looked = subprocess.run(_python(a1.namespace, LOOKUP, gateway, str(LOOKUPS)),
                                        capture_output=True, text=True, timeout=120,
                                        check=True, cwd=ROOT)
                dns_ms, echo_ms = (float(v) for v in looked.stdout.split())
            finally:
                assert resolver.stdin is not None
                resolver.stdin.close()
                resolver.wait(10)
        finally:
            for net in nets:
                net.sweep((), ())
                net.close()
    o, b, u = (statistics.median(v) for v in (overlay, bridge, lan_only))
    print(f"TCP throughput, one stream of {SECONDS:g} s, median of {RUNS} (MTU {mtu}):")
    print(f"  across hosts through the overlay   {o:6.2f} Gbit/s")
    print(f"  same host, the space's bridge      {b:6.2f} Gbit/s   overlay/bridge {o / b:5.2f}x")
    print(f"  the LAN itself (underlay, no VXLAN) {u:5.2f} Gbit/s   overlay/LAN    {o / u:5.2f}x")
    print(f"DNS lookup from a dyno, {LOOKUPS} sequential (web.alpha.app.localspace, A):")
    print(f"  space resolver    median {dns_ms:6.3f} ms")
    print(f"  bare UDP echo     median {echo_ms:6.3f} ms   ratio {dns_ms / echo_ms:5.2f}x "
          "(the same bytes, same address)")


if __name__ == "__main__":
    started = time.monotonic()
    main()
    print(f"({time.monotonic() - started:.1f} s)")
