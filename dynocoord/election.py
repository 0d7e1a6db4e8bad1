"""Leader election on an etcd lease: the leader is the candidate whose id is in
`<prefix>/leader`, a key written only where none exists and attached to the candidate's lease,
so it disappears when the leader resigns, dies or loses etcd for longer than the lease's TTL.
The others watch the key and try again as soon as it is gone."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

from dynocoord.etcd import (
    Compare,
    EtcdClient,
    EtcdCompacted,
    EtcdError,
    EventType,
    Get,
    KeyValue,
    Lease,
    LeaseKeeper,
    LeaseNotFound,
    Put,
    backoff_s,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

LEADER_KEY: Final = b"/leader"
DEFAULT_TTL_S: Final = 5
# Revoking the lease on the way out deletes the leader key at once; without etcd, the key
# goes when the lease expires anyway.
REVOKE_TIMEOUT_S: Final = 2.0


@dataclass
class Term:
    """One stretch of leadership: the lease the leader key is attached to and the revision
    that wrote it. `lost` is set when it ends, `reason` says why."""

    lease: Lease
    revision: int
    lost: asyncio.Event = field(default_factory=asyncio.Event)
    reason: str = ""


class Election:
    """One candidate (`candidate` is its id or address, the leader key's value).

        election = Election(client, b"/dynocoord", b"10.0.0.5:8080", ttl_s=5)
        term = await election.campaign()      # returns once this candidate leads
        ... lead, until term.lost is set ...
        await election.resign()               # or close(): resign if leading

    A lost term (lease expired or revoked, keep-alive failing past the lease's deadline,
    leader key deleted or overwritten) sets `term.lost`; `campaign()` may be called again.
    One owner drives it: cancel a pending `campaign()` before `close()`.
    """

    def __init__(self, client: EtcdClient, prefix: bytes, candidate: bytes | str, *,
                 ttl_s: int = DEFAULT_TTL_S) -> None:
        self.client = client
        self.key = prefix.rstrip(b"/") + LEADER_KEY
        self.candidate = candidate.encode() if isinstance(candidate, str) else candidate
        self.ttl_s = ttl_s
        self.term: Term | None = None
        self._keeper: LeaseKeeper | None = None
        self._guard: asyncio.Task[None] | None = None
        self._rng = random.Random()

    @property
    def is_leader(self) -> bool:
        return self.term is not None and not self.term.lost.is_set()

    async def __aenter__(self) -> Election:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def leader(self) -> bytes | None:
        """The current leader's id, None when there is none."""
        found = await self.client.get(self.key)
        return found.value if found is not None else None

    async def campaign(self) -> Term:
        """Wait until this candidate leads (retrying while etcd is unreachable); the term."""
        if self.term is not None and self.is_leader:
            return self.term
        attempt = 0
        while True:
            try:
                keeper = await self._live_keeper()
                result = await self.client.txn(
                    [Compare.create_revision(self.key, 0)],
                    [Put(self.key, self.candidate, keeper.lease.id)], [Get(self.key)])
                if result.succeeded:
                    return self._elected(keeper, result.revision)
                holder = result.responses[0].kvs[0] if result.responses[0].kvs else None
                if holder is not None and holder.lease == keeper.lease.id:
                    # Our own write, whose answer was lost on the way (EtcdOutcomeUnknown).
                    return self._elected(keeper, holder.mod_revision)
                if holder is not None:
                    log.debug("election %r: %r leads, waiting", self.key, holder.value)
                    await self._wait_gone(holder, keeper)
                attempt = 0
            except EtcdError as error:
                if isinstance(error, LeaseNotFound):
                    await self._drop_lease()
                delay = backoff_s(attempt, self._rng)
                attempt += 1
                log.info("election %r: campaign failed, retrying in %.2fs: %s", self.key,
                         delay, error)
                await asyncio.sleep(delay)

    async def resign(self) -> None:
        """Stop leading (and campaigning): the lease is revoked, which deletes the leader
        key, so another candidate leads at once."""
        await self._end("resigned")

    async def close(self) -> None:
        await self._end("closed")

    # -- internals -----------------------------------------------------------------------

    async def _live_keeper(self) -> LeaseKeeper:
        """A lease kept alive for this candidate: the current one, or a new one if it was
        lost while waiting."""
        if self._keeper is not None and not self._keeper.lost.is_set():
            return self._keeper
        await self._drop_lease()
        granted_at = asyncio.get_running_loop().time()
        lease = await self.client.grant(self.ttl_s)
        self._keeper = self.client.keep_alive(lease, granted_at=granted_at)
        return self._keeper

    def _elected(self, keeper: LeaseKeeper, revision: int) -> Term:
        term = Term(lease=keeper.lease, revision=revision)
        self.term = term
        self._guard = asyncio.create_task(self._watch_term(term, keeper),
                                          name=f"election-guard-{keeper.lease.id:x}")
        log.info("election %r: %r leads (lease %x, revision %d)", self.key, self.candidate,
                 keeper.lease.id, revision, extra={"ETCD_LEASE": f"{keeper.lease.id:x}"})
        return term

    async def _wait_gone(self, holder: KeyValue, keeper: LeaseKeeper) -> None:
        """Until the leader key written at `holder` is deleted (or expires), or our own
        lease is lost, or the history to watch it by was compacted (the caller tries again
        in each case)."""
        async def deleted() -> bool:
            async with self.client.watch(self.key,
                                         start_revision=holder.mod_revision + 1) as changes:
                async for event in changes:
                    if event.type is EventType.DELETE:
                        return True
            return False

        with contextlib.suppress(EtcdCompacted):
            await _first(deleted(), keeper.lost.wait())

    async def _watch_term(self, term: Term, keeper: LeaseKeeper) -> None:
        """The guard of one term (a task): ends the term when the lease is lost or the leader
        key stops being this term's."""
        async def key_changed() -> str:
            start = term.revision + 1
            while True:
                try:
                    async with self.client.watch(self.key, start_revision=start) as changes:
                        async for event in changes:
                            if event.type is EventType.DELETE:
                                return "leader key deleted"
                            if event.kv.lease != term.lease.id:
                                return "leader key overwritten"
                except EtcdCompacted:
                    # The history was compacted under us: check the key as it is now.
                    found = await self.client.range(self.key)
                    if not found.kvs or found.kvs[0].lease != term.lease.id:
                        return "leader key gone"
                    start = found.revision + 1
                except EtcdError as error:
                    # Canceled by etcd (not a dropped stream: the watch resumes those itself).
                    log.info("election %r: guard watch failed: %s", self.key, error)
                    await asyncio.sleep(backoff_s(0, self._rng))

        async def lease_lost() -> str:
            await keeper.lost.wait()
            return f"lease lost: {keeper.reason}"

        try:
            reason = await _first(key_changed(), lease_lost())
        except EtcdError as error:
            reason = f"guard failed: {error}"
        log.warning("election %r: %r no longer leads: %s", self.key, self.candidate, reason)
        self._finish(term, reason)
        # Whatever is left of the lease guards nothing now.
        await self._drop_lease()

    def _finish(self, term: Term, reason: str) -> None:
        if not term.lost.is_set():
            term.reason = reason
            term.lost.set()
        if self.term is term:
            self.term = None

    async def _end(self, reason: str) -> None:
        guard, self._guard = self._guard, None
        if guard is not None:
            guard.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await guard
        if self.term is not None:
            self._finish(self.term, reason)
        await self._drop_lease()

    async def _drop_lease(self) -> None:
        keeper, self._keeper = self._keeper, None
        if keeper is None:
            return
        await keeper.stop()
        if not keeper.lost.is_set():
            try:
                await self.client.revoke(keeper.lease.id, timeout_s=REVOKE_TIMEOUT_S)
            except EtcdError as error:
                log.info("election %r: revoking lease %x failed (it expires in %ds): %s",
                         self.key, keeper.lease.id, keeper.lease.ttl_s, error)


async def _first(*coroutines: Coroutine[Any, Any, T]) -> T:
    """The result (or exception) of whichever coroutine finishes first; the others are
    cancelled and awaited."""
    tasks = [asyncio.ensure_future(coroutine) for coroutine in coroutines]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        return next(task for task in tasks if task.done()).result()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
