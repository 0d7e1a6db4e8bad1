"""The A records of a space's DNS zone, computed from its members: a pure function of the
dynos the coordinator lists (`spaces.sync`), so the resolver only looks names up."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address

from agent.spec import APP, DNS_APPS_ZONE, NAME, dns_names

__all__ = ["DNS_APPS_ZONE", "UP", "Member", "dns_names", "records"]

# Only dynos in this state are named: a starting or crashed dyno is not listening yet.
UP = "up"


@dataclass(frozen=True, slots=True)
class Member:
    """One dyno of a space, on any host: its app, its name (`web.1`), address and state."""

    app: str
    name: str
    ip: IPv4Address
    state: str


def records(members: Iterable[Member]) -> dict[str, tuple[IPv4Address, ...]]:
    """Name (lowercase, no final dot) -> its addresses, sorted, for the `up` members:
    `<type>.<app>.app.localspace` (every dyno of that type), `<n>.<type>.<app>.app.localspace`
    (that dyno) and `<app>.app.localspace` (every dyno of the app, HEROKU_DNS_APP_NAME).

    Members whose name is not `<type>.<n>` (or app not an app name) are left out; a name
    with no `up` dyno has no record (the resolver answers NXDOMAIN).
    """
    found: defaultdict[str, set[IPv4Address]] = defaultdict(set)
    for member in members:
        if (member.state != UP or NAME.fullmatch(member.name.lower()) is None
                or APP.fullmatch(member.app.lower()) is None):
            continue
        for name in dns_names(member.app, member.name):
            found[name].add(member.ip)
    return {name: tuple(sorted(addresses)) for name, addresses in sorted(found.items())}
