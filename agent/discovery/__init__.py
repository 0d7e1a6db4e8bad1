"""DNS service discovery in a space: the names of its dynos (`records.py`, pure) and the
resolver that answers them on each space's bridge address and forwards the rest
(`server.py`)."""

from agent.discovery.records import Member, dns_names, records
from agent.discovery.server import ResolverCounters, ResolverError, SpaceResolver

__all__ = [
    "Member",
    "ResolverCounters",
    "ResolverError",
    "SpaceResolver",
    "dns_names",
    "records",
]
