"""dynocoord.etcd against a real etcd: reads, paging, transactions, leases, watches, failover,
and an etcd that stops and comes back."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from dynocoord.etcd import (
    Compare,
    Delete,
    EtcdClient,
    EtcdCompacted,
    EtcdError,
    EtcdOutcomeUnknown,
    EtcdUnavailable,
    EventType,
    Get,
    LeaseNotFound,
    Put,
    Range,
    prefix_range_end,
)
from tests.support.etcd import EtcdProcess
from tests.support.wait import async_wait_for


def dead_url() -> str:
    """A loopback URL nothing listens on (connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


async def test_put_get_and_missing_key(client: EtcdClient, prefix: bytes) -> None:
    revision = await client.put(prefix + b"a", b"\x00binary\xff")
    found = await client.get(prefix + b"a")
    assert found is not None
    assert (found.key, found.value) == (prefix + b"a", b"\x00binary\xff")
    assert found.create_revision == found.mod_revision == revision
    assert found.version == 1
    assert await client.get(prefix + b"missing") is None


async def test_get_prefix_reads_pages_at_one_revision(client: EtcdClient, prefix: bytes,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    keys = [prefix + b"k%03d" % i for i in range(25)]
    for key in keys:
        await client.put(key, key[-4:])
    # Neighbours that a wrong range end would include: the prefix's successor, and the
    # prefix without its trailing slash.
    await client.put(prefix_range_end(prefix), b"outside")
    await client.put(prefix[:-1], b"outside")
    snapshot = (await client.range(prefix)).revision
    await client.put(prefix + b"k999", b"after the snapshot")

    pages: list[Range] = []
    real_range = client.range

    async def counting_range(*args: object, **kwargs: object) -> Range:
        page = await real_range(*args, **kwargs)  # type: ignore[arg-type]
        pages.append(page)
        return page

    monkeypatch.setattr(client, "range", counting_range)
    found = await client.get_prefix(prefix, page_size=4, revision=snapshot)
    assert [kv.key for kv in found.kvs] == keys
    assert found.revision == snapshot
    assert len(pages) == 7  # 25 keys, 4 a page
    assert not found.more and found.count == 25

    pages.clear()
    latest = await client.get_prefix(prefix, page_size=4)
    assert [kv.key for kv in latest.kvs] == [*keys, prefix + b"k999"]
    assert latest.revision > snapshot

    limited = await client.get_prefix(prefix, page_size=4, limit=10)
    assert [kv.key for kv in limited.kvs] == keys[:10]
    assert limited.more and limited.count == 26


async def test_delete_key_and_prefix(client: EtcdClient, prefix: bytes) -> None:
    for name in (b"a", b"b", b"c", b"\xff\xff"):
        await client.put(prefix + name, b"v")
    await client.put(prefix_range_end(prefix), b"outside")
    assert await client.delete(prefix + b"a") == 1
    assert await client.delete(prefix + b"a") == 0
    assert await client.delete(prefix, prefix=True) == 3
    assert (await client.get_prefix(prefix)).kvs == ()
    assert await client.get(prefix_range_end(prefix)) is not None


async def test_cas_on_mod_revision(client: EtcdClient, prefix: bytes) -> None:
    key = prefix + b"cas"
    assert await client.cas(key, b"one", mod_revision=0)  # absent: created
    assert not await client.cas(key, b"again", mod_revision=0)  # exists now
    current = await client.get(key)
    assert current is not None and current.value == b"one"
    assert await client.cas(key, b"two", mod_revision=current.mod_revision)
    assert not await client.cas(key, b"stale", mod_revision=current.mod_revision)
    final = await client.get(key)
    assert final is not None and final.value == b"two" and final.version == 2


async def test_txn_applies_all_ops_or_the_failure_branch(client: EtcdClient,
                                                         prefix: bytes) -> None:
    await client.put(prefix + b"gen", b"1")
    await client.put(prefix + b"old", b"x")
    gen = await client.get(prefix + b"gen")
    assert gen is not None

    result = await client.txn(
        [Compare.version(prefix + b"gen", gen.version), Compare.value_is(prefix + b"gen", b"1")],
        [Put(prefix + b"gen", b"2"), Put(prefix + b"new", b"y"), Delete(prefix + b"old"),
         Get(prefix, prefix=True)],
        [Get(prefix + b"gen")])
    assert result.succeeded
    assert result.responses[2].deleted == 1
    assert [kv.key for kv in result.responses[3].kvs] == [prefix + b"gen", prefix + b"new"]
    new = await client.get(prefix + b"new")
    changed = await client.get(prefix + b"gen")
    assert new is not None and changed is not None
    assert new.mod_revision == changed.mod_revision == result.revision  # one revision

    stale = await client.txn([Compare.version(prefix + b"gen", gen.version)],
                             [Put(prefix + b"gen", b"3")], [Get(prefix + b"gen")])
    assert not stale.succeeded
    assert stale.responses[0].kvs[0].value == b"2"
    unchanged = await client.get(prefix + b"gen")
    assert unchanged is not None and unchanged.value == b"2"


async def test_api_errors_are_etcd_errors(client: EtcdClient, prefix: bytes) -> None:
    with pytest.raises(LeaseNotFound):
        await client.put(prefix + b"k", b"v", lease=0x1234)
    with pytest.raises(EtcdError, match="future revision") as caught:
        await client.get(prefix + b"k", revision=1 << 40)
    assert not isinstance(caught.value, EtcdUnavailable)


async def test_lease_expiry_deletes_its_keys(client: EtcdClient, prefix: bytes) -> None:
    lease = await client.grant(1)
    await client.put(prefix + b"leased", b"v", lease=lease.id)
    found = await client.get(prefix + b"leased")
    assert found is not None and found.lease == lease.id
    started = time.monotonic()

    async def gone() -> bool:
        return await client.get(prefix + b"leased") is None

    await async_wait_for(gone, timeout_s=5, interval_s=0.05, what="leased key expired")
    assert time.monotonic() - started < 4
    with pytest.raises(LeaseNotFound):
        await client.keepalive_once(lease.id)


async def test_keepalive_keeps_keys_until_stopped(client: EtcdClient, prefix: bytes) -> None:
    lease = await client.grant(1)
    await client.put(prefix + b"kept", b"v", lease=lease.id)
    keeper = client.keep_alive(lease)
    try:
        # Three TTLs: without the keeper the key would be gone after one.
        await asyncio.sleep(3)
        assert await client.get(prefix + b"kept") is not None
        assert not keeper.lost.is_set()
    finally:
        await keeper.stop()

    async def gone() -> bool:
        return await client.get(prefix + b"kept") is None

    await async_wait_for(gone, timeout_s=5, interval_s=0.05, what="key expired after stop")


async def test_revoke_deletes_keys_and_the_keeper_reports_lost(client: EtcdClient,
                                                               prefix: bytes) -> None:
    lease = await client.grant(10)
    await client.put(prefix + b"a", b"v", lease=lease.id)
    await client.put(prefix + b"b", b"v", lease=lease.id)
    keeper = client.keep_alive(lease)
    try:
        await client.revoke(lease.id)
        assert (await client.get_prefix(prefix)).kvs == ()
        # The keeper's next refresh (a third of 10 s) finds the lease gone.
        await asyncio.wait_for(keeper.lost.wait(), timeout=6)
        assert "expired or was revoked" in keeper.reason
    finally:
        await keeper.stop()
    with pytest.raises(LeaseNotFound):
        await client.revoke(lease.id)


async def test_watch_sees_puts_and_deletes_in_order(client: EtcdClient,
                                                    prefix: bytes) -> None:
    await client.put(prefix_range_end(prefix), b"outside")
    async with client.watch(prefix, prefix=True, prev_kv=True) as watch:
        first = await client.put(prefix + b"a", b"1")
        await client.put(prefix_range_end(prefix), b"outside, again")
        await client.put(prefix + b"a", b"2")
        await client.delete(prefix + b"a")
        events = [await asyncio.wait_for(anext(watch), timeout=5) for _ in range(3)]
    assert [(e.type, e.kv.key, e.kv.value) for e in events] == [
        (EventType.PUT, prefix + b"a", b"1"),
        (EventType.PUT, prefix + b"a", b"2"),
        (EventType.DELETE, prefix + b"a", b""),
    ]
    assert events[0].kv.mod_revision == first
    assert events[1].prev_kv is not None and events[1].prev_kv.value == b"1"
    assert watch.next_revision == events[2].kv.mod_revision + 1


async def test_watch_from_a_revision_replays_history(client: EtcdClient,
                                                     prefix: bytes) -> None:
    start = await client.put(prefix + b"x", b"1")
    await client.put(prefix + b"y", b"2")
    async with client.watch(prefix, prefix=True, start_revision=start) as watch:
        events = [await asyncio.wait_for(anext(watch), timeout=5) for _ in range(2)]
    assert [e.kv.key for e in events] == [prefix + b"x", prefix + b"y"]


async def test_watch_from_a_compacted_revision_raises(client: EtcdClient,
                                                      prefix: bytes) -> None:
    start = await client.put(prefix + b"x", b"1")
    latest = await client.put(prefix + b"x", b"2")
    await client.compact(latest)
    with pytest.raises(EtcdCompacted) as caught:
        async with client.watch(prefix, prefix=True, start_revision=start) as watch:
            await asyncio.wait_for(anext(watch), timeout=5)
    assert caught.value.compact_revision == latest


async def test_failover_to_the_next_endpoint(etcd: EtcdProcess, prefix: bytes) -> None:
    async with EtcdClient([dead_url(), etcd.url], timeout_s=3) as client:
        await client.put(prefix + b"k", b"v")
        assert client.endpoints.preferred == etcd.url
        found = await client.get(prefix + b"k")
        assert found is not None and found.value == b"v"
        async with client.watch(prefix, prefix=True) as watch:
            await client.put(prefix + b"k", b"w")
            event = await asyncio.wait_for(anext(watch), timeout=5)
        assert event.kv.value == b"w"


async def test_no_endpoint_answering_raises_unavailable(prefix: bytes) -> None:
    async with EtcdClient([dead_url(), dead_url()], timeout_s=3) as client:
        started = time.monotonic()
        with pytest.raises(EtcdUnavailable, match="no etcd endpoint answered"):
            await client.get(prefix)
        with pytest.raises(EtcdUnavailable) as caught:
            await client.put(prefix, b"v")
        assert not isinstance(caught.value, EtcdOutcomeUnknown)
        assert time.monotonic() - started < 2
        with pytest.raises(EtcdUnavailable):
            async with client.watch(prefix, reconnect_timeout_s=0.5):
                pass


async def test_restarted_etcd_is_unavailable_then_works(own_etcd: EtcdProcess,
                                                        prefix: bytes) -> None:
    async with EtcdClient(own_etcd.url, timeout_s=3) as client:
        await client.put(prefix + b"k", b"before")
        await asyncio.to_thread(own_etcd.stop)
        with pytest.raises(EtcdUnavailable):
            await client.get(prefix + b"k")
        with pytest.raises(EtcdUnavailable) as caught:
            await client.put(prefix + b"k", b"during")
        # Refused connections: the write certainly was not applied.
        assert not isinstance(caught.value, EtcdOutcomeUnknown)
        await asyncio.to_thread(own_etcd.start)
        found = await client.get(prefix + b"k")
        assert found is not None and found.value == b"before"
        await client.put(prefix + b"k", b"after")


async def test_watch_resumes_after_an_etcd_restart(own_etcd: EtcdProcess,
                                                   prefix: bytes) -> None:
    async with EtcdClient(own_etcd.url, timeout_s=3) as client, \
            client.watch(prefix, prefix=True) as watch:
        await client.put(prefix + b"1", b"v")
        assert (await asyncio.wait_for(anext(watch), timeout=5)).kv.key == prefix + b"1"
        await asyncio.to_thread(own_etcd.restart)
        # Written before the watch notices the restart: a watch that started again "from
        # now" instead of from the revision after the last one it saw would miss it.
        await client.put(prefix + b"2", b"v")
        await client.delete(prefix + b"1")
        later = [await asyncio.wait_for(anext(watch), timeout=10) for _ in range(2)]
        assert [(e.type, e.kv.key) for e in later] == [(EventType.PUT, prefix + b"2"),
                                                       (EventType.DELETE, prefix + b"1")]
        assert watch.reconnects >= 1

        # And while the watch waits on a stopped etcd: it comes back with it.
        waiting = asyncio.ensure_future(anext(watch))
        await asyncio.to_thread(own_etcd.stop)
        await asyncio.sleep(0.3)
        assert not waiting.done()
        await asyncio.to_thread(own_etcd.start)
        await client.put(prefix + b"3", b"v")
        event = await asyncio.wait_for(waiting, timeout=10)
        assert event.kv.key == prefix + b"3"
