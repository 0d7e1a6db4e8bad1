"""`spaces.sync` (docs/protocol.md §4): the coordinator's view of the private spaces this host
runs — each space's subnet, this host's slice of it, its VNI and MTU, and every member dyno
on every host. Checked strictly, then applied: the host network gets the overlay (VXLAN
device, forwarding and neighbour entries for the remote members, the firewall's fleet rules),
and the space resolver gets the members it answers for."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Any, Protocol

import netns
from agent import errors
from agent.coordinator.frames import msgpack_kind
from agent.errors import excerpt
from agent.spec import APP, NAME

log = logging.getLogger(__name__)

MAX_SPACES = 1_000
MAX_MEMBERS = 100_000  # over every space of one request
MAX_HOSTS = 10_000
MAX_POOLS = 16
VNI_MAX = 2**24 - 1
MTU_MIN, MTU_MAX = 576, 9_000
STATE = re.compile(r"[a-z][a-z_-]{0,31}")


@dataclass(frozen=True)
class Member:
    """One dyno of a space, on whichever host runs it."""

    app: str
    name: str
    ip: IPv4Address
    host: IPv4Address | None  # its host's underlay address; None when that host has none
    state: str


@dataclass(frozen=True)
class SpaceView:
    space: str
    subnet: IPv4Network
    slice: IPv4Network
    vni: int
    mtu: int
    members: tuple[Member, ...]


@dataclass(frozen=True)
class SpacesView:
    generation: int
    port: int
    hosts: tuple[IPv4Address, ...]
    pools: tuple[IPv4Network, ...]
    spaces: tuple[SpaceView, ...]
    # partial: `spaces` holds only the spaces that changed and `removed` those that left;
    # every other space stays as it is.
    partial: bool = False
    removed: tuple[str, ...] = ()


class Names(Protocol):
    """What `spaces.sync` needs of the space resolver glue (agent/daemon/spacenames.py)."""

    def set_remote(self, space: str, members: Sequence[Member]) -> None: ...

    def forget_remote(self, space: str) -> None: ...


# ------------------------------------------------------------------------- checking params

def _check(where: str, value: Any, kind: type, what: str) -> Any:
    if isinstance(value, bool) or not isinstance(value, kind):
        raise errors.BadRequest(f"{where}: must be {what}, got {msgpack_kind(value)}")
    return value


def _keys(where: str, value: Any, required: Sequence[str],
          optional: Sequence[str] = ()) -> Mapping[str, Any]:
    _check(where, value, dict, "a map")
    for key in value:
        if key not in required and key not in optional:
            raise errors.BadRequest(f"{where}: unknown key {excerpt(key)} "
                                    f"(known keys: {', '.join([*required, *optional])})")
    for key in required:
        if key not in value:
            raise errors.BadRequest(f"{where}.{key}: is required")
    return value  # type: ignore[no-any-return]


def _int(where: str, value: Any, low: int, high: int) -> int:
    _check(where, value, int, "an integer")
    if not low <= value <= high:
        raise errors.BadRequest(f"{where}: must be from {low} to {high}, got {value}")
    return int(value)


def _address(where: str, value: Any) -> IPv4Address:
    _check(where, value, str, "an IPv4 address")
    try:
        return IPv4Address(value)
    except ValueError:
        raise errors.BadRequest(f"{where}: must be an IPv4 address, got {excerpt(value)}") \
            from None


def _network(where: str, value: Any) -> IPv4Network:
    _check(where, value, str, "an IPv4 CIDR")
    try:
        return IPv4Network(value, strict=True)
    except ValueError as exc:
        raise errors.BadRequest(f"{where}: must be an IPv4 CIDR such as 10.64.0.0/18: {exc}") \
            from None


def _list(where: str, value: Any, limit: int) -> list[Any]:
    _check(where, value, list, "an array")
    if len(value) > limit:
        raise errors.BadRequest(f"{where}: at most {limit} entries, got {len(value)}")
    return value  # type: ignore[no-any-return]


def _member(where: str, value: Any) -> Member:
    p = _keys(where, value, ("app", "name", "ip", "host", "state"))
    app = _check(f"{where}.app", p["app"], str, "a string")
    if not APP.fullmatch(app):
        raise errors.BadRequest(f"{where}.app: must match {APP.pattern}, got {excerpt(app)}")
    name = _check(f"{where}.name", p["name"], str, "a string")
    if not NAME.fullmatch(name):
        raise errors.BadRequest(f"{where}.name: must be a dyno name such as web.1, got "
                                f"{excerpt(name)}")
    state = _check(f"{where}.state", p["state"], str, "a string")
    if not STATE.fullmatch(state):
        raise errors.BadRequest(f"{where}.state: must be a dyno state such as up, got "
                                f"{excerpt(state)}")
    host = None if p["host"] is None else _address(f"{where}.host", p["host"])
    return Member(app, name, _address(f"{where}.ip", p["ip"]), host, state)


def _space(where: str, value: Any, budget: list[int]) -> SpaceView:
    p = _keys(where, value, ("space", "subnet", "slice", "vni", "mtu", "members"))
    space = _check(f"{where}.space", p["space"], str, "a string")
    if not APP.fullmatch(space):
        raise errors.BadRequest(f"{where}.space: must match {APP.pattern}, got "
                                f"{excerpt(space)}")
    subnet = _network(f"{where}.subnet", p["subnet"])
    part = _network(f"{where}.slice", p["slice"])
    if not part.subnet_of(subnet) or part.prefixlen > 29:
        raise errors.BadRequest(f"{where}.slice: must be a /29 or larger inside {subnet}, "
                                f"got {part}")
    members = _list(f"{where}.members", p["members"], MAX_MEMBERS)
    budget[0] -= len(members)
    if budget[0] < 0:
        raise errors.BadRequest(f"p.spaces: at most {MAX_MEMBERS} members in all")
    parsed = tuple(_member(f"{where}.members[{i}]", m) for i, m in enumerate(members))
    for i, member in enumerate(parsed):
        if member.ip not in subnet:
            raise errors.BadRequest(f"{where}.members[{i}].ip: {member.ip} is not in {subnet}")
    return SpaceView(space, subnet, part, _int(f"{where}.vni", p["vni"], 1, VNI_MAX),
                     _int(f"{where}.mtu", p["mtu"], MTU_MIN, MTU_MAX), parsed)


def parse(params: Mapping[str, Any]) -> SpacesView:
    """The request's params, checked; `errors.BadRequest` names the first offending field."""
    p = _keys("p", params, ("generation", "port", "hosts", "pools", "spaces"),
              ("partial", "removed"))
    partial = p.get("partial", False)
    if not isinstance(partial, bool):
        raise errors.BadRequest(f"p.partial: must be a boolean, got {msgpack_kind(partial)}")
    removed = tuple(_check(f"p.removed[{i}]", r, str, "a space")
                    for i, r in enumerate(_list("p.removed", p.get("removed", []), MAX_SPACES)))
    if removed and not partial:
        raise errors.BadRequest("p.removed: only with partial: true (a complete set names "
                                "every space that stays)")
    budget = [MAX_MEMBERS]
    spaces = tuple(_space(f"p.spaces[{i}]", s, budget)
                   for i, s in enumerate(_list("p.spaces", p["spaces"], MAX_SPACES)))
    seen: set[str] = set()
    for view in spaces:
        if view.space in seen:
            raise errors.BadRequest(f"p.spaces: space {view.space} is listed twice")
        seen.add(view.space)
    return SpacesView(
        generation=_int("p.generation", p["generation"], 0, 2**63 - 1),
        port=_int("p.port", p["port"], 1, 65535),
        hosts=tuple(_address(f"p.hosts[{i}]", h)
                    for i, h in enumerate(_list("p.hosts", p["hosts"], MAX_HOSTS))),
        pools=tuple(_network(f"p.pools[{i}]", n)
                    for i, n in enumerate(_list("p.pools", p["pools"], MAX_POOLS))),
        spaces=spaces, partial=partial, removed=removed)


# ------------------------------------------------------------------------------ applying

class SpaceSync:
    """Applies `spaces.sync` requests, the newest generation only, one at a time.

    `underlay` gives this host's underlay address (config `overlay_address`, else the local
    address of the coordinator connection). A space that cannot be applied (its subnet
    overlaps the host's own networks, its subnet changed while dynos use it) is reported in
    `failed` and left as it was; the others are applied.

    Generations are compared within one connection only (`new_connection` forgets the last
    one): a coordinator numbers them from its clock, and a new leader's may be behind."""

    def __init__(self, network: netns.HostNetwork, underlay: Callable[[], str | None],
                 names: Names | None = None) -> None:
        self.network = network
        self.underlay = underlay
        self.names = names
        self.generation: int | None = None
        self.configured: set[str] = set()
        self._lock = asyncio.Lock()

    def new_connection(self) -> None:
        self.generation = None

    async def handle(self, params: dict[str, Any]) -> dict[str, Any]:
        view = parse(params)
        async with self._lock:
            if self.generation is not None and view.generation < self.generation:
                return {"generation": view.generation, "ignored": True, "applied": [],
                        "failed": []}
            underlay_text = self.underlay()
            if underlay_text is None:
                raise errors.NotReady("this host has no underlay address yet "
                                      "(set overlay_address in the agent's config)")
            underlay = IPv4Address(underlay_text)
            applied, failed, gone = await asyncio.to_thread(self._apply, view, underlay)
            if self.names is not None:
                # On the loop: the resolver's records are the loop's.
                for space in view.spaces:
                    if space.space in applied:
                        # This host's own dynos come from its supervisor, which is fresher.
                        self.names.set_remote(space.space, [m for m in space.members
                                                            if m.host != underlay])
                for space_id in gone:
                    self.names.forget_remote(space_id)
            self.generation = view.generation
            return {"generation": view.generation, "ignored": False, "applied": applied,
                    "failed": failed}

    def _apply(self, view: SpacesView, underlay: IPv4Address
               ) -> tuple[list[str], list[dict[str, str]], list[str]]:
        """The kernel's part (on a thread): (applied, failed, spaces unconfigured)."""
        net = self.network
        net.set_fleet(view.pools, view.hosts, view.port)
        applied: list[str] = []
        failed: list[dict[str, str]] = []
        for space in view.spaces:
            try:
                net.configure_space(space.space, subnet=space.subnet, slice=space.slice,
                                    vni=space.vni, underlay=underlay, port=view.port,
                                    mtu=space.mtu)
                net.set_space_peers(space.space, {m.ip: m.host for m in space.members
                                                  if m.host is not None and m.host != underlay})
            except (netns.NetnsError, ValueError) as exc:
                log.error("space %s: %s", space.space, exc)
                failed.append({"space": space.space, "code": "bad_request",
                               "message": str(exc)})
                continue
            self.configured.add(space.space)
            applied.append(space.space)
        listed = {s.space for s in view.spaces}
        leaving = (set(view.removed) if view.partial else self.configured - listed) - listed
        gone: list[str] = []
        for space_id in sorted(leaving & self.configured):
            try:
                net.unconfigure_space(space_id)
            except netns.NetnsError as exc:
                log.warning("space %s: cannot remove its overlay: %s", space_id, exc)
                continue
            self.configured.discard(space_id)
            gone.append(space_id)
        return applied, failed, gone
