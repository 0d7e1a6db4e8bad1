"""Raw rtnetlink batches on the real kernel, in a namespace of their own: what the attach
hot path relies on (the kernel runs a batch to its end past a refusal, one answer each)."""

from __future__ import annotations

import errno
import subprocess
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from netns import LinkError, NamespaceDir
from netns import rtnlbatch as rt
from netns.namespace import netlink_socket_in


@pytest.fixture
def namespace(tmp_path: Path) -> Iterator[Path]:
    directory = NamespaceDir(tmp_path / "netns", shared=False)
    try:
        yield directory.create("dtbatch")
    finally:
        directory.delete("dtbatch")


def test_batch_runs_past_a_refusal(namespace: Path) -> None:
    with rt.RtnlSocket(netlink_socket_in(namespace)) as rtnl:
        with pytest.raises(LinkError) as refused:
            rtnl.run([rt.get_link("lo"), rt.set_up("dtmissing0"), rt.set_up("lo", 1)])
        assert (refused.value.operation, refused.value.interface, refused.value.errno) == (
            "link-up", "dtmissing0", errno.ENODEV)
        # The request after the refused one ran all the same.
        lo = subprocess.run(["nsenter", f"--net={namespace}", "ip", "-o", "link", "show",
                             "lo"], capture_output=True, text=True, check=True).stdout
        assert "<LOOPBACK,UP," in lo
        # And every answer was read: the next batch gets its own.
        found, missing = rtnl.run([rt.get_link("lo"),
                                   rt.delete_neighbour(1, "lo", IPv4Address("127.0.0.9"))])
        assert rt.link_index(found.messages[0]) == 1
        assert missing.errno == errno.ENOENT
