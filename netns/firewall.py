"""The agent's nftables table: rendering the ruleset from the live spaces is a pure
function; applying it (one atomic `nft -f -` transaction) and deleting it are the only
side effects."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, collapse_addresses

from netns.errors import FirewallError

LINK_LOCAL = IPv4Network("169.254.0.0/16")
_TABLE_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,31}$")
_IFNAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
NFT_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class SpaceRules:
    """What the firewall needs to know of one space."""

    bridge: str
    subnet: IPv4Network
    gateway: IPv4Address | None = None  # the space's resolver listens here (port 53)


@dataclass(frozen=True)
class FirewallSpec:
    """The whole table. `outbound` empty means "masquerade on any interface that is not a
    space bridge"; the allowed ports are the host services dynos may reach.

    Across hosts: dynos reach nothing in `private_pools` but their own space, and no
    `fleet_hosts` address at all; UDP to `overlay_port` is accepted only from
    `fleet_hosts` (so nobody else, a dyno least of all, can inject frames into a space)."""

    table: str
    spaces: tuple[SpaceRules, ...] = ()
    outbound: tuple[str, ...] = ()
    allowed_tcp_ports: tuple[int, ...] = ()
    allowed_udp_ports: tuple[int, ...] = ()
    private_pools: tuple[IPv4Network, ...] = ()
    fleet_hosts: tuple[IPv4Address, ...] = ()
    overlay_port: int | None = None

    def __post_init__(self) -> None:
        if not _TABLE_RE.match(self.table):
            raise ValueError(f"table name must match {_TABLE_RE.pattern}: {self.table!r}")
        for name in [s.bridge for s in self.spaces] + list(self.outbound):
            if not _IFNAME_RE.match(name):
                raise ValueError(f"bad interface name {name!r}")
        extra = () if self.overlay_port is None else (self.overlay_port,)
        for port in self.allowed_tcp_ports + self.allowed_udp_ports + extra:
            if not 0 < port < 65536:
                raise ValueError(f"bad port {port}")


def _set(values: Sequence[str]) -> str:
    return "{ " + ", ".join(values) + " }"


def _quoted(names: Sequence[str]) -> list[str]:
    return [f'"{n}"' for n in names]


def render(spec: FirewallSpec) -> str:
    """The `nft -f` script that replaces the table atomically with `spec`.

    Base chains keep policy accept and every drop matches a space bridge, so traffic that
    is not the agent's passes untouched. With br_netfilter (bridge-nf-call-iptables=1)
    bridged frames inside one space also reach the inet forward hook, with the bridge as
    both in- and out-interface: hence the explicit same-bridge accept before the drop.
    """
    t = spec.table
    lines = [
        # "add" then "delete" makes the delete valid whether or not the table existed; the
        # whole file is one transaction, so nothing ever sees a half-built table.
        f"add table inet {t}",
        f"delete table inet {t}",
        f"table inet {t} {{",
        "  set space_bridges {",
        "    type ifname",
    ]
    bridges = [s.bridge for s in spec.spaces]
    if bridges:
        lines.append(f"    elements = {_set(_quoted(bridges))}")
    lines += ["  }", "  set space_subnets {", "    type ipv4_addr", "    flags interval"]
    if spec.spaces:
        lines.append(f"    elements = {_set([str(s.subnet) for s in spec.spaces])}")
    lines += ["  }"]
    lines += [
        "  chain forward {",
        "    type filter hook forward priority filter; policy accept;",
    ]
    lines += [f'    iifname "{b}" oifname "{b}" accept' for b in bridges]
    reject = "reject with icmpx type admin-prohibited"
    if spec.private_pools:
        # Collapsed: overlapping prefixes in one anonymous interval set are refused.
        pools = _set([str(p) for p in collapse_addresses(spec.private_pools)])
        lines.append(f"    iifname @space_bridges ip daddr {pools} {reject}")
    if spec.fleet_hosts:
        hosts = _set(_sorted_addresses(spec.fleet_hosts))
        lines.append(f"    iifname @space_bridges ip daddr {hosts} {reject}")
    lines += [
        f"    iifname @space_bridges ip daddr {LINK_LOCAL} "
        "reject with icmpx type host-unreachable",
        "    iifname @space_bridges oifname @space_bridges drop",
        "    iifname @space_bridges meta nfproto ipv6 drop",
        "    oifname @space_bridges ct state established,related accept",
        "    oifname @space_bridges drop",
        "  }",
        "  chain input {",
        "    type filter hook input priority filter; policy accept;",
    ]
    if spec.overlay_port is not None:
        # The one drop that is not about space traffic: the VXLAN socket would otherwise
        # deliver any sender's frames straight onto a space bridge.
        if spec.fleet_hosts:
            hosts = _set(_sorted_addresses(spec.fleet_hosts))
            lines.append(f"    udp dport {spec.overlay_port} ip saddr != {hosts} drop")
        else:
            lines.append(f"    udp dport {spec.overlay_port} drop")
    lines += [
        "    iifname != @space_bridges accept",
        "    ct state established,related accept",
    ]
    for space in spec.spaces:
        if space.gateway is not None:
            # Each space's resolver, for that space's dynos only.
            lines += [f'    iifname "{space.bridge}" ip daddr {space.gateway} {proto} dport 53 '
                      "accept" for proto in ("udp", "tcp")]
    if spec.allowed_tcp_ports:
        ports = _set([str(p) for p in sorted(set(spec.allowed_tcp_ports))])
        lines.append(f"    ip daddr != {LINK_LOCAL} tcp dport {ports} accept")
    if spec.allowed_udp_ports:
        ports = _set([str(p) for p in sorted(set(spec.allowed_udp_ports))])
        lines.append(f"    ip daddr != {LINK_LOCAL} udp dport {ports} accept")
    lines += [
        # Reject rather than drop: a dyno learns at once that the host is off limits
        # instead of hanging in connect() until its own timeout.
        "    meta l4proto tcp reject with tcp reset",
        "    reject with icmpx type admin-prohibited",
        "  }",
        "  chain postrouting {",
        "    type nat hook postrouting priority srcnat; policy accept;",
    ]
    if spec.outbound:
        lines.append(f"    ip saddr @space_subnets oifname {_set(_quoted(spec.outbound))} "
                     "masquerade")
    else:
        lines.append("    ip saddr @space_subnets oifname != @space_bridges masquerade")
    lines += ["  }", "}"]
    return "\n".join(lines) + "\n"


def _sorted_addresses(addresses: Sequence[IPv4Address]) -> list[str]:
    return [str(a) for a in sorted(set(addresses))]


@dataclass
class Nft:
    """Runs the `nft` CLI in the calling thread's network namespace."""

    binary: str = "nft"
    timeout_s: float = NFT_TIMEOUT_S

    def run(self, operation: str, args: Sequence[str], script: str | None = None) -> str:
        try:
            done = subprocess.run([self.binary, *args], input=script, capture_output=True,
                                  text=True, timeout=self.timeout_s, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise FirewallError(f"cannot run {self.binary}", operation=operation,
                                errno=getattr(exc, "errno", None)) from exc
        if done.returncode != 0:
            raise FirewallError(f"{self.binary} exited with {done.returncode}",
                                operation=operation, stderr=done.stderr)
        return done.stdout

    def apply(self, spec: FirewallSpec) -> None:
        self.run("apply", ["-f", "-"], render(spec))

    def check(self, spec: FirewallSpec) -> None:
        """Validate the ruleset without committing it (`nft -c`)."""
        self.run("check", ["-c", "-f", "-"], render(spec))

    def delete_table(self, table: str) -> bool:
        """Delete `inet <table>`; False if it did not exist."""
        if table not in self.tables():
            return False
        self.run("delete-table", ["delete", "table", "inet", table])
        return True

    def tables(self) -> list[str]:
        """Names of the inet tables in this namespace."""
        out = self.run("list-tables", ["list", "tables", "inet"])
        return [line.split()[-1] for line in out.splitlines() if line.startswith("table inet ")]
