"""Test hosts: uniquely named network namespaces that a test (or the daemon under test)
runs in, optionally with an uplink to the root namespace or to an "upstream" namespace, or
several joined on one bridge (a LAN). Entered with `nsenter --net=` (never `ip netns exec`,
which remounts /sys), or from a thread of the test (`NetnsThread`); always deleted."""

from __future__ import annotations

import ctypes
import os
import secrets
import subprocess
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from ipaddress import IPv4Interface, IPv4Network
from pathlib import Path
from typing import Any, Literal, TypeVar

from tests.support.names import unique

NETNS_DIR = Path("/run/netns")
UPLINK_IFNAME = "up0"
# Test hosts and upstreams are private namespaces, so one fixed pair of addresses serves
# every "upstream" uplink; a root uplink gets a random /30 of 198.18.0.0/15 (RFC 2544).
UPSTREAM_HOST_ADDRESS = IPv4Interface("198.18.0.1/24")
UPSTREAM_PEER_ADDRESS = IPv4Interface("198.18.0.2/24")
# A LAN's hosts: the Nth host joined is 198.19.0.N/24 on its `lan0` (RFC 2544 space too;
# each LAN lives only in the namespaces it joins, so every LAN can use the same addresses).
LAN_NETWORK = IPv4Network("198.19.0.0/24")
LAN_IFNAME = "lan0"
CLONE_NEWNET = 0x40000000

T = TypeVar("T")

Uplink = Literal["none", "root", "upstream"]


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run iproute2 (`ip -n NAME …` only switches the namespace of that one `ip` process)."""
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30,
                          check=check)


@dataclass
class Netns:
    """A named network namespace under /run/netns and how to run things inside it."""

    name: str

    @property
    def path(self) -> Path:
        return NETNS_DIR / self.name

    def command(self, *argv: str) -> list[str]:
        return ["nsenter", f"--net={self.path}", "--", *argv]

    def run(self, *argv: str, check: bool = True, timeout_s: float = 30.0,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command(*argv), capture_output=True, text=True,
                              timeout=timeout_s, check=check, input=input)

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[str]:
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
        return subprocess.Popen(self.command(*argv), text=True, **kwargs)


@dataclass
class TestHost(Netns):
    """A test host: `address` is its end of the uplink (None without one), `peer_address`
    the other end (its default gateway), `upstream` the upstream namespace if any."""

    __test__ = False  # not a pytest test class despite the name

    uplink: str | None = None
    address: IPv4Interface | None = None
    peer_address: IPv4Interface | None = None
    upstream: Netns | None = None
    root_link: str | None = None


def _add_netns(stack: ExitStack, name: str) -> Netns:
    ip("netns", "add", name)
    stack.callback(ip, "netns", "del", name, check=False)
    return Netns(name)


@contextmanager
def new_test_host(prefix: str = "dt", *, uplink: Uplink = "none") -> Iterator[TestHost]:
    """Create a test host (and its uplink); delete everything on exit, even on failure.

    uplink="upstream": a second namespace `<name>u` reached through `up0`, with
    198.18.0.1/24 on the test host and 198.18.0.2/24 upstream (the default route).
    uplink="root": a veth `<name>r` in the root namespace, a random /30, default route.
    """
    name = unique(prefix, 8)
    with ExitStack() as stack:
        base = _add_netns(stack, name)
        host = TestHost(base.name)
        host.run("ip", "link", "set", "lo", "up")
        if uplink == "upstream":
            upstream = _add_netns(stack, f"{name}u")
            upstream.run("ip", "link", "set", "lo", "up")
            ip("-n", name, "link", "add", UPLINK_IFNAME, "type", "veth", "peer", "name", "eth0",
               "netns", upstream.name)
            _configure(host, UPLINK_IFNAME, UPSTREAM_HOST_ADDRESS)
            _configure(upstream, "eth0", UPSTREAM_PEER_ADDRESS)
            host.run("ip", "route", "add", "default", "via", str(UPSTREAM_PEER_ADDRESS.ip))
            host.upstream = upstream
            host.address, host.peer_address = UPSTREAM_HOST_ADDRESS, UPSTREAM_PEER_ADDRESS
            host.uplink = UPLINK_IFNAME
        elif uplink == "root":
            root_link = f"{name}r"
            ip("link", "add", root_link, "type", "veth", "peer", "name", UPLINK_IFNAME,
               "netns", name)
            stack.callback(ip, "link", "del", root_link, check=False)
            block = secrets.randbelow(1 << 15) * 4  # a /30 inside 198.18.0.0/15
            base_ip = (198 << 24) | (18 << 16) | block
            peer = IPv4Interface(f"{_dotted(base_ip + 1)}/30")
            mine = IPv4Interface(f"{_dotted(base_ip + 2)}/30")
            ip("addr", "add", str(peer), "dev", root_link)
            ip("link", "set", root_link, "up")
            _configure(host, UPLINK_IFNAME, mine)
            host.run("ip", "route", "add", "default", "via", str(peer.ip))
            host.address, host.peer_address = mine, peer
            host.uplink, host.root_link = UPLINK_IFNAME, root_link
        yield host


def _configure(ns: Netns, ifname: str, address: IPv4Interface) -> None:
    ns.run("ip", "addr", "add", str(address), "dev", ifname)
    ns.run("ip", "link", "set", ifname, "up")


def _dotted(value: int) -> str:
    return ".".join(str((value >> shift) & 0xFF) for shift in (24, 16, 8, 0))


@dataclass
class Lan:
    """Test hosts joined on one bridge. The bridge sits in a namespace of its own (`switch`),
    so no LAN traffic ever passes through the root namespace; `addresses` are the hosts'
    addresses on their `lan0`, by namespace name."""

    switch: Netns
    addresses: dict[str, IPv4Interface] = field(default_factory=dict)

    def address(self, host: Netns) -> IPv4Interface:
        return self.addresses[host.name]

    def set_link(self, host: Netns, up: bool) -> None:
        """Cable in or out: `lan0` up or down inside `host`."""
        host.run("ip", "link", "set", LAN_IFNAME, "up" if up else "down")


@contextmanager
def new_lan(hosts: Sequence[Netns], prefix: str = "dl") -> Iterator[Lan]:
    """Join `hosts` on one bridge: a switch namespace holding `br0`, and a veth from it to each
    host (`lan0` there; the Nth host 198.19.0.N/24). Deleting the switch namespace (on exit,
    even on failure) deletes the bridge and every veth with it, both ends."""
    if len(hosts) >= LAN_NETWORK.num_addresses - 2:
        raise ValueError(f"{len(hosts)} hosts do not fit in {LAN_NETWORK}")
    with ExitStack() as stack:
        lan = Lan(_add_netns(stack, unique(prefix, 8)))
        lan.switch.run("ip", "link", "add", "br0", "type", "bridge")
        lan.switch.run("ip", "link", "set", "br0", "up")
        for n, host in enumerate(hosts, start=1):
            port = f"p{n}"
            ip("-n", lan.switch.name, "link", "add", port, "type", "veth", "peer", "name",
               LAN_IFNAME, "netns", host.name)
            lan.switch.run("ip", "link", "set", port, "master", "br0", "up")
            address = IPv4Interface(f"{LAN_NETWORK[n]}/{LAN_NETWORK.prefixlen}")
            _configure(host, LAN_IFNAME, address)
            lan.addresses[host.name] = address
        yield lan


class NetnsThread:
    """One worker thread inside a network namespace: the sockets of what it runs are made
    there (setns is per thread for network namespaces), so a test talks to a server in a test
    host without a veth to the root namespace."""

    def __init__(self, ns: Netns) -> None:
        self.ns = ns
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"netns-{ns.name}",
                                            initializer=_enter_netns, initargs=(ns.path,))

    def call(self, fn: Callable[..., T], *args: Any, timeout_s: float = 60.0) -> T:
        return self.submit(fn, *args).result(timeout_s)

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        return self._executor.submit(fn, *args)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> NetnsThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _enter_netns(path: Path) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"setns {path}: {os.strerror(errno)}")
    finally:
        os.close(fd)
