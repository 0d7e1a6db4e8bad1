"""tests.support.etcd inside a test host's network namespace, as the fleet tests run it:
reachable at the test host's address (here over its uplink from the root namespace),
restartable there on the same data."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator

import pytest

from dynocoord.etcd import EtcdClient, EtcdUnavailable
from tests.support.etcd import EtcdProcess
from tests.support.testhost import TestHost, new_test_host


@pytest.fixture
def host() -> Iterator[TestHost]:
    with new_test_host("dt", uplink="root") as test_host:
        yield test_host


async def test_etcd_in_a_test_host_serves_and_restarts(host: TestHost) -> None:
    assert host.address is not None
    etcd = EtcdProcess(host=str(host.address.ip), netns=host)
    try:
        etcd.start()
        # It runs in the test host's namespace, not in ours.
        assert etcd.pid is not None
        assert os.stat(f"/proc/{etcd.pid}/ns/net").st_ino == os.stat(host.path).st_ino
        async with EtcdClient(etcd.url, timeout_s=3) as client:
            await client.put(b"/k", b"v")
            await asyncio.to_thread(etcd.stop)
            with pytest.raises(EtcdUnavailable):
                await client.get(b"/k")
            await asyncio.to_thread(etcd.start)
            found = await client.get(b"/k")
            assert found is not None and found.value == b"v"
    finally:
        etcd.close()
    assert not etcd.base.exists()
