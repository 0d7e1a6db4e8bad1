"""Who the space resolver answers for: this host's dynos (from the supervisor's state changes,
the freshest view) and the other hosts' (from the coordinator's `spaces.sync`), per space;
and its sockets, bound on a space's gateway before the first dyno of the space starts."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from ipaddress import IPv4Address
from typing import Any

import netns
from agent.coordinator.spaces import Member as RemoteMember
from agent.discovery import Member, SpaceResolver
from agent.observability import metrics
from agent.supervision.states import StateChange

log = logging.getLogger(__name__)


class SpaceNames:
    """Feeds `SpaceResolver`: `space_ready` is the runtime's hook before a launch,
    `on_state` the supervisor's state listener, `set_remote`/`forget_remote` are called by
    `spaces.sync`. Changes within one turn of the loop are pushed once per space."""

    def __init__(self, resolver: SpaceResolver, network: netns.HostNetwork,
                 supervisor: Any) -> None:
        self.resolver = resolver
        self.network = network
        self.supervisor = supervisor
        self._local: dict[str, dict[str, Member]] = {}  # space -> dyno id -> member
        self._remote: dict[str, tuple[Member, ...]] = {}
        self._bound: dict[str, IPv4Address] = {}
        self._dirty: set[str] = set()
        self._flush_scheduled = False

    async def start(self) -> None:
        """Bind every space that already has dynos (re-adopted after a restart)."""
        for dyno in list(self.supervisor.dynos.values()):
            member = self._member(dyno)
            if member is not None:
                self._local.setdefault(dyno.spec.space, {})[dyno.id] = member
        for space in sorted({d.spec.space for d in self.supervisor.dynos.values()}):
            await self.space_ready(space)
            self._dirty.add(space)
        self._flush()

    async def space_ready(self, space: str) -> str | None:
        """Listen on the space's gateway; that address (the dyno's nameserver), or None when
        it cannot listen (the dyno then keeps the host's resolvers)."""
        # Asked each time: a space's gateway moves when the coordinator gives it a slice. A
        # dyno's placement has just ensured its space: known, it costs no thread hop.
        known = self.network.known_space(space)
        if known is None:
            known = await asyncio.to_thread(self.network.ensure_space, space)
        gateway = known.gateway.ip
        if self._bound.get(space) == gateway:
            return str(gateway)
        try:
            await self.resolver.add_space(space, gateway)
        except OSError as exc:
            log.error("space %s: cannot serve DNS on %s: %s", space, gateway, exc)
            return None
        self._bound[space] = gateway
        self._push(space)
        return str(gateway)

    def on_state(self, change: StateChange) -> None:
        dyno = self.supervisor.dynos.get(change.id)
        if dyno is None:
            for space, members in self._local.items():
                if members.pop(change.id, None) is not None:
                    self._mark(space)
            return
        space = dyno.spec.space
        member = self._member(dyno)
        members = self._local.setdefault(space, {})
        if member is None:
            members.pop(change.id, None)
        else:
            members[change.id] = member
        self._mark(space)

    def set_remote(self, space: str, members: Sequence[RemoteMember]) -> None:
        self._remote[space] = tuple(Member(m.app, m.name, m.ip, m.state) for m in members)
        self._mark(space)

    def forget_remote(self, space: str) -> None:
        if self._remote.pop(space, None) is not None:
            self._mark(space)

    async def space_gone(self, space: str) -> None:
        """The space has no dyno here any more: stop answering for it."""
        self._bound.pop(space, None)
        self._local.pop(space, None)
        self._remote.pop(space, None)
        await self.resolver.remove_space(space)

    async def close(self) -> None:
        await self.resolver.close()

    def metrics_family(self) -> metrics.MetricFamily:
        """The resolver's counters: `dynoagent_dns_queries_total{outcome=…}`."""
        counts = self.resolver.counters.as_dict()
        return metrics.MetricFamily(
            "dynoagent_dns_queries_total",
            "DNS queries of dynos to their space's resolver, by outcome (queries counts all)",
            metrics.MetricType.COUNTER, tuple(metrics.Sample({"outcome": k}, float(v))
                             for k, v in sorted(counts.items())))

    @staticmethod
    def _member(dyno: Any) -> Member | None:
        placement = dyno.record.placement
        if placement is None or not placement.ip:
            return None
        return Member(dyno.spec.app, dyno.spec.name, IPv4Address(placement.ip),
                      str(dyno.state))

    def _mark(self, space: str) -> None:
        self._dirty.add(space)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        dirty, self._dirty = self._dirty, set()
        for space in dirty:
            self._push(space)

    def _push(self, space: str) -> None:
        if space not in self._bound:
            return
        local = self._local.get(space, {})
        self.resolver.set_members(space, [*local.values(), *self._remote.get(space, ())])
