"""Fixtures of the dynocoord tests against a real etcd: one etcd per module for the tests
that leave it running, a fresh one for the tests that stop or restart it, a client, and a
unique key prefix per test so tests sharing an etcd never see each other's keys."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from dynocoord.etcd import EtcdClient
from tests.support.etcd import EtcdProcess, running_etcd
from tests.support.names import unique


@pytest.fixture(scope="module")
def etcd() -> Iterator[EtcdProcess]:
    with running_etcd() as process:
        yield process


@pytest.fixture
def own_etcd() -> Iterator[EtcdProcess]:
    """An etcd of this test's own, to stop, kill or restart."""
    with running_etcd() as process:
        yield process


@pytest.fixture
async def client(etcd: EtcdProcess) -> AsyncIterator[EtcdClient]:
    async with EtcdClient(etcd.url, timeout_s=3.0) as etcd_client:
        yield etcd_client


@pytest.fixture
def prefix() -> bytes:
    return f"/{unique('t', 8)}/".encode()
