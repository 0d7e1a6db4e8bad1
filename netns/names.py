"""Kernel object names of the library: short interface names derived from ids, and the
alias (IFLA_IFALIAS) that carries the full id so a sweep can find an object's owner."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Literal

IFNAMSIZ = 15  # usable characters of a Linux interface name (16 with the NUL)
ALIAS_TAG = "dynoagent"
_HASH_CHARS = 9
_PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{0,4}$")
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

LinkRole = Literal["bridge", "veth", "vxlan"]


def check_prefix(prefix: str) -> str:
    """A link prefix is 1 to 5 lowercase characters so that prefix + role + hash fits IFNAMSIZ."""
    if not _PREFIX_RE.match(prefix):
        raise ValueError(f"link prefix must match {_PREFIX_RE.pattern}, got {prefix!r}")
    return prefix


def check_id(kind: str, value: str) -> str:
    """Space ids and namespace names end up in file names and aliases: no '/', ':' or spaces."""
    if not _ID_RE.match(value):
        raise ValueError(f"{kind} must match {_ID_RE.pattern}, got {value!r}")
    return value


def _digest(value: str) -> str:
    return hashlib.blake2s(value.encode(), digest_size=8).hexdigest()[:_HASH_CHARS]


def bridge_name(prefix: str, space_id: str) -> str:
    """Bridge of a space: `<prefix>b<hash>`; the hash makes any id fit in 15 characters."""
    return f"{check_prefix(prefix)}b{_digest(space_id)}"


def _mac(value: str) -> str:
    # 0x02 first: locally administered, unicast.
    raw = hashlib.blake2s(value.encode(), digest_size=5).digest()
    return ":".join(f"{octet:02x}" for octet in (0x02, *raw))


def bridge_mac(prefix: str, space_id: str) -> str:
    """The fixed MAC of a space's bridge, the same each time the bridge is made, so a
    re-made bridge does not invalidate its namespaces' ARP caches."""
    return _mac(f"bridge:{check_prefix(prefix)}:{space_id}")


def inner_mac(namespace: str) -> str:
    """The MAC of a namespace's inner end, the same each time it is wired."""
    return _mac(f"inner:{namespace}")


def overlay_mac(space_id: str, address: IPv4Address) -> str:
    """The MAC of the eth0 holding `address` in a space: a pure function of the two, so any
    host computes a remote dyno's MAC from its address alone (for the overlay's FDB and
    neighbour entries), and a reused address comes back with the same MAC."""
    return _mac(f"dyno:{check_id('space id', space_id)}:{IPv4Address(address)}")


def vxlan_name(prefix: str, space_id: str) -> str:
    """VXLAN device of a space: `<prefix>x<hash>`."""
    return f"{check_prefix(prefix)}x{_digest(space_id)}"


def veth_name(prefix: str, namespace: str) -> str:
    """Host end of a namespace's veth pair: `<prefix>v<hash>`."""
    return f"{check_prefix(prefix)}v{_digest(namespace)}"


@dataclass(frozen=True)
class LinkOwner:
    """What an alias says about a link: its role, its space and (for a veth) its namespace."""

    role: LinkRole
    space_id: str
    namespace: str | None = None


def bridge_alias(space_id: str) -> str:
    return f"{ALIAS_TAG}:bridge:{space_id}"


def vxlan_alias(space_id: str) -> str:
    return f"{ALIAS_TAG}:vxlan:{space_id}"


def veth_alias(space_id: str, namespace: str) -> str:
    return f"{ALIAS_TAG}:veth:{space_id}:{namespace}"


def parse_alias(alias: str | None) -> LinkOwner | None:
    """The owner recorded in an alias, or None for a link this library did not make."""
    if not alias:
        return None
    parts = alias.split(":")
    if parts[0] != ALIAS_TAG:
        return None
    if len(parts) == 3 and parts[1] == "bridge" and parts[2]:
        return LinkOwner("bridge", parts[2])
    if len(parts) == 3 and parts[1] == "vxlan" and parts[2]:
        return LinkOwner("vxlan", parts[2])
    if len(parts) == 4 and parts[1] == "veth" and parts[2] and parts[3]:
        return LinkOwner("veth", parts[2], parts[3])
    return None
