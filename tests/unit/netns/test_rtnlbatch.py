"""Raw rtnetlink requests of the attach hot path: the bytes of each request, and a batch's
answers read back in order, refusals raised as `LinkError`, against a fake kernel."""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Interface

import pytest

from netns import LinkError
from netns import rtnlbatch as rt

# Recorded from pyroute2 0.9.7 (IPRoute) making the same calls of netns.netlink.Rtnl, with
# the sequence number set to 1 and the port id to 0: header, then body.
PYROUTE2_SENT = {
    "add-veth": "78000000100005060100000000000000"
                "00000000000000000100000001000000110003006471766465616662353230370000000008"
                "000a00030000003c0012000900010076657468000000002c0002002800010000000000000000"
                "00000000000000000009000300657468300000000008001c000d000000",
    "add-veth-mtu": "78000000100005060100000000000000"
                    "00000000000000000100000001000000070003007630000008000a0002000000080004"
                    "007805000040001200090001007665746800000000300002002c0001000000000000000000"
                    "0000000000000000070003007030000008001c00060000000800040078050000",
    "get-link": "2c000000120005000100000000000000"
                "00000000000000000000000000000000090003006574683000000000",
    "link-up": "20000000100005000100000000000000"
               "00000000020000000100000001000000",
    "set-alias": "54000000100005000100000000000000"
                 "0000000000000000000000000000000011000300647176646561666235323037000000001d00"
                 "140064796e6f6167656e743a766574683a7370313a64716e733000000000",
    "add-address": "28000000140005060100000000000000"
                   "021800000200000008000100ac18000208000200ac180002",
    "add-route": "24000000180005060100000000000000"
                 "02000000fe0400010000000008000500ac180001",
    "set-mac": "2c000000100005000100000000000000"
               "000000000200000000000000000000000a00010002819c7e07810000",
    "delete-neighbour": "240000001d0005000100000000000000"
                        "02000000030000008000000008000100ac180002",
}
OURS = {
    "add-veth": rt.add_veth("dqvdeafb5207", master=3, peer_name="eth0", peer_netns_fd=13),
    "add-veth-mtu": rt.add_veth("v0", master=2, peer_name="p0", peer_netns_fd=6, mtu=1400),
    "get-link": rt.get_link("eth0"),
    "link-up": rt.set_up("eth0", 2),
    "set-alias": rt.set_alias("dqvdeafb5207", "dynoagent:veth:sp1:dqns0"),
    "add-address": rt.add_address(2, "eth0", IPv4Interface("172.24.0.2/24")),
    "add-route": rt.add_default_route(IPv4Address("172.24.0.1"), "eth0"),
    "set-mac": rt.set_mac(2, "eth0", "02:81:9c:7e:07:81"),
    "delete-neighbour": rt.delete_neighbour(3, "dqbx", IPv4Address("172.24.0.2")),
}
HEADER = struct.Struct("=IHHII")


@pytest.mark.parametrize("name", sorted(PYROUTE2_SENT))
def test_requests_are_what_pyroute2_sent(name: str) -> None:
    assert rt.encode([OURS[name]], 1).hex() == PYROUTE2_SENT[name]


def test_errors_name_the_operations_rtnl_names() -> None:
    assert {name: (r.operation, r.interface) for name, r in OURS.items()} == {
        "add-veth": ("add-veth", "dqvdeafb5207"), "add-veth-mtu": ("add-veth", "v0"),
        "get-link": ("get-link", "eth0"), "link-up": ("link-up", "eth0"),
        "set-alias": ("set-alias", "dqvdeafb5207"), "add-address": ("add-address", "eth0"),
        "add-route": ("add-route", "eth0"), "set-mac": ("set-mac", "eth0"),
        "delete-neighbour": ("delete-neighbour", "dqbx")}


def test_link_up_by_name() -> None:
    # RTM_NEWLINK, request + ack; ifindex 0 with IFLA_IFNAME "eth0"; IFF_UP set and changed.
    assert rt.encode([rt.set_up("eth0")], 1).hex() == (
        "2c000000100005000100000000000000" "00000000000000000100000001000000"
        "090003006574683000000000")


def test_no_ipv6_address_by_name() -> None:
    # RTM_NEWLINK, request + ack; IFLA_IFNAME "eth0"; IFLA_AF_SPEC { AF_INET6 {
    # IFLA_INET6_ADDR_GEN_MODE: u8 1 (none) } }, as `ip link set eth0 addrgenmode none`.
    request = rt.set_no_ipv6_address("eth0")
    assert (request.operation, request.interface) == ("set-addrgenmode", "eth0")
    assert rt.encode([request], 1).hex() == (
        "3c000000100005000100000000000000" "00000000000000000000000000000000"
        "090003006574683000000000" "10001a000c000a000500080001000000")


def test_bad_mac_refused() -> None:
    with pytest.raises(ValueError):
        rt.set_mac(2, "eth0", "02:81:9c:7e:07")


def test_batch_is_numbered_and_aligned() -> None:
    batch = [OURS["get-link"], OURS["link-up"], OURS["add-route"]]
    data = rt.encode(batch, 7)
    offset, seqs = 0, []
    while offset < len(data):
        length, kind, _, seq, _ = HEADER.unpack_from(data, offset)
        assert length % 4 == 0
        seqs.append((seq, kind))
        offset += length
    assert offset == len(data)
    assert seqs == [(7, rt.RTM_GETLINK), (8, rt.RTM_NEWLINK), (9, rt.RTM_NEWROUTE)]


# --- the socket, against a fake kernel ------------------------------------------------------


def _ack(seq: int, code: int = 0) -> bytes:
    body = struct.pack("=i", -code) + HEADER.pack(16, 0, 0, seq, 0)
    return HEADER.pack(16 + len(body), rt.NLMSG_ERROR, 0, seq, 0) + body


def _link(seq: int, index: int) -> bytes:
    body = struct.pack("=BxHiII", 0, 1, index, 0x1, 0) + bytes.fromhex("0900030065746830000000")
    body += b"\0" * (-len(body) % 4)
    return HEADER.pack(16 + len(body), rt.RTM_NEWLINK, 0, seq, 0) + body


class FakeKernel:
    """The far end of a datagram socket pair: answers are queued before a batch is run
    (the kernel queues them inside send()), requests are read back afterwards."""

    def __init__(self) -> None:
        self.end, near = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.rtnl = rt.RtnlSocket(near, timeout_s=0.05)

    def answer(self, *datagrams: bytes) -> None:
        for datagram in datagrams:
            self.end.send(datagram)

    def received(self) -> list[tuple[int, int]]:
        data = self.end.recv(1 << 16, socket.MSG_DONTWAIT)
        out, offset = [], 0
        while offset < len(data):
            length, kind, _, seq, _ = HEADER.unpack_from(data, offset)
            out.append((kind, seq))
            offset += length
        return out

    def close(self) -> None:
        self.rtnl.close()
        self.end.close()


@pytest.fixture
def kernel() -> Iterator[FakeKernel]:
    fake = FakeKernel()
    yield fake
    fake.close()


def test_batch_goes_out_in_one_send_and_collects_answers(kernel: FakeKernel) -> None:
    kernel.answer(_link(1, 5), _ack(1), _ack(2))
    found, up = kernel.rtnl.run([rt.get_link("eth0"), rt.set_up("eth0")])
    assert kernel.received() == [(rt.RTM_GETLINK, 1), (rt.RTM_NEWLINK, 2)]
    assert (found.errno, up) == (0, rt.Reply(0))
    assert rt.link_index(found.messages[0]) == 5


def test_first_refusal_raised_after_every_answer_is_read(kernel: FakeKernel) -> None:
    kernel.answer(_ack(1), _ack(2, errno.EEXIST), _ack(3, errno.ENODEV))
    with pytest.raises(LinkError) as refused:
        kernel.rtnl.run([OURS["link-up"], OURS["add-address"], OURS["add-route"]])
    assert (refused.value.operation, refused.value.interface, refused.value.errno) == (
        "add-address", "eth0", errno.EEXIST)
    assert "kernel refused request" in str(refused.value)
    # Nothing of that batch is left to confuse the next one.
    kernel.answer(_ack(4))
    assert kernel.rtnl.run([OURS["set-mac"]]) == [rt.Reply(0)]


def test_tolerated_refusal_is_a_reply(kernel: FakeKernel) -> None:
    kernel.answer(_ack(1, errno.ENOENT))
    assert kernel.rtnl.run([OURS["delete-neighbour"]]) == [rt.Reply(errno.ENOENT)]
    kernel.answer(_ack(2, errno.EPERM))
    with pytest.raises(LinkError) as refused:
        kernel.rtnl.run([OURS["delete-neighbour"]])
    assert refused.value.errno == errno.EPERM


def test_answers_of_an_abandoned_batch_are_skipped(kernel: FakeKernel) -> None:
    kernel.answer(_ack(1))
    with pytest.raises(LinkError) as silent:
        kernel.rtnl.run([OURS["link-up"], OURS["set-mac"]])  # the second answer never came
    assert (silent.value.operation, silent.value.errno) == ("set-mac", errno.ETIMEDOUT)
    kernel.answer(_ack(2), _ack(3))
    assert kernel.rtnl.run([OURS["add-route"]]) == [rt.Reply(0)]


def test_link_index_refuses_other_messages() -> None:
    with pytest.raises(LinkError):
        rt.link_index(_ack(1))


def test_sequence_numbers_wrap(kernel: FakeKernel) -> None:
    kernel.rtnl._seq = (1 << 32) - 2
    kernel.answer(_ack(1), _ack(2))
    assert kernel.rtnl.run([OURS["link-up"], OURS["set-mac"]]) == [rt.Reply(0), rt.Reply(0)]
    assert kernel.received() == [(rt.RTM_NEWLINK, 1), (rt.RTM_NEWLINK, 2)]
