"""Fixtures of the netns privileged tests: a test host with an upstream, and a HostNetwork
whose bridges, veths, rules and forwarding all live inside that test host."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from netns import HostNetwork, HostNetworkConfig
from tests.privileged.netns.helpers import ALLOWED_TCP_PORT, LINK_PREFIX, TABLE, Server
from tests.support.testhost import TestHost, new_test_host


@pytest.fixture
def host() -> Iterator[TestHost]:
    with new_test_host("dt", uplink="upstream") as test_host:
        yield test_host


@pytest.fixture
def net(host: TestHost, tmp_path: Path) -> Iterator[HostNetwork]:
    assert host.uplink is not None
    network = HostNetwork(HostNetworkConfig(
        state_dir=tmp_path / "state", link_prefix=LINK_PREFIX, table=TABLE,
        host_netns=host.path, outbound=(host.uplink,), allowed_tcp_ports=(ALLOWED_TCP_PORT,),
        durable_state=False))
    try:
        yield network
    finally:
        try:
            network.sweep((), ())
        finally:
            network.close()


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    for server in started:
        server.stop()
