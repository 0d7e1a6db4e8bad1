"""dynocoord.election against a real etcd: one leader at a time, and the next one within a
few seconds of the leader resigning, dying, or losing its lease or its key."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from dynocoord.election import Election
from dynocoord.etcd import EtcdClient
from tests.support.etcd import EtcdProcess

REPO = Path(__file__).resolve().parents[3]
CANDIDATE = Path(__file__).with_name("candidate.py")
TTL_S = 1


@contextlib.asynccontextmanager
async def candidates(client: EtcdClient, prefix: bytes, *names: str,
                     ttl_s: int = TTL_S) -> AsyncIterator[list[Election]]:
    elections = [Election(client, prefix, name, ttl_s=ttl_s) for name in names]
    try:
        yield elections
    finally:
        for election in elections:
            await election.close()


async def still_waiting(campaign: asyncio.Future[Any], for_s: float = 0.5) -> bool:
    await asyncio.sleep(for_s)
    return not campaign.done()


async def test_one_candidate_leads_and_the_next_leads_when_it_resigns(
        client: EtcdClient, prefix: bytes) -> None:
    # A long TTL: b must lead because a's key was deleted, not because it expired.
    async with candidates(client, prefix, "a", "b", ttl_s=10) as (a, b):
        term_a = await asyncio.wait_for(a.campaign(), timeout=5)
        assert a.is_leader
        assert await a.leader() == b"a"
        campaign_b = asyncio.ensure_future(b.campaign())
        assert await still_waiting(campaign_b)
        assert not b.is_leader

        started = time.monotonic()
        await a.resign()
        assert term_a.lost.is_set() and term_a.reason == "resigned"
        assert not a.is_leader
        await asyncio.wait_for(campaign_b, timeout=3)
        assert time.monotonic() - started < 2
        assert b.is_leader and await b.leader() == b"b"


async def test_the_other_leads_when_the_leader_process_is_killed(
        etcd: EtcdProcess, client: EtcdClient, prefix: bytes) -> None:
    leader = await asyncio.create_subprocess_exec(
        sys.executable, str(CANDIDATE), etcd.url, prefix.decode(), "doomed", str(TTL_S),
        stdout=asyncio.subprocess.PIPE, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert leader.stdout is not None
        line = await asyncio.wait_for(leader.stdout.readline(), timeout=10)
        assert line.strip() == b"leading"
        async with candidates(client, prefix, "survivor") as (survivor,):
            campaign = asyncio.ensure_future(survivor.campaign())
            assert await still_waiting(campaign)
            assert await survivor.leader() == b"doomed"
            started = time.monotonic()
            os.kill(leader.pid, signal.SIGKILL)
            await asyncio.wait_for(campaign, timeout=5)
            # The dead leader's lease (1 s, which etcd may round up) had to expire.
            assert time.monotonic() - started < 4
            assert await survivor.leader() == b"survivor"
    finally:
        with contextlib.suppress(ProcessLookupError):
            leader.kill()
        await leader.wait()


async def test_a_revoked_lease_ends_the_term_and_the_other_leads(
        client: EtcdClient, prefix: bytes) -> None:
    async with candidates(client, prefix, "a", "b") as (a, b):
        term = await asyncio.wait_for(a.campaign(), timeout=5)
        campaign_b = asyncio.ensure_future(b.campaign())
        assert await still_waiting(campaign_b, 0.2)
        await client.revoke(term.lease.id)
        await asyncio.wait_for(term.lost.wait(), timeout=3)
        assert not a.is_leader
        assert term.reason in ("leader key deleted",) or term.reason.startswith("lease lost")
        await asyncio.wait_for(campaign_b, timeout=3)
        assert await b.leader() == b"b"


async def test_a_deleted_leader_key_ends_the_term(client: EtcdClient, prefix: bytes) -> None:
    async with candidates(client, prefix, "a") as (a,):
        term = await asyncio.wait_for(a.campaign(), timeout=5)
        await client.delete(a.key)
        await asyncio.wait_for(term.lost.wait(), timeout=3)
        assert term.reason == "leader key deleted"
        assert not a.is_leader
        # It may lead again, on a new term.
        again = await asyncio.wait_for(a.campaign(), timeout=5)
        assert again is not term and a.is_leader


async def test_etcd_gone_past_the_ttl_ends_the_term_and_campaigning_resumes(
        own_etcd: EtcdProcess, prefix: bytes) -> None:
    async with EtcdClient(own_etcd.url, timeout_s=1) as client, \
            candidates(client, prefix, "a") as (a,):
        term = await asyncio.wait_for(a.campaign(), timeout=5)
        await asyncio.to_thread(own_etcd.stop)
        try:
            await asyncio.wait_for(term.lost.wait(), timeout=TTL_S + 3)
            assert term.reason.startswith("lease lost")
            assert not a.is_leader
            campaign = asyncio.ensure_future(a.campaign())
            assert await still_waiting(campaign)  # etcd is still away
        finally:
            await asyncio.to_thread(own_etcd.start)
        again = await asyncio.wait_for(campaign, timeout=10)
        assert a.is_leader and again.lease.id != term.lease.id
        assert await a.leader() == b"a"
