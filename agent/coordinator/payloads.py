"""What the agent says about itself on the link, built from the daemon's state: the params of
`hello` (docs/protocol.md §3) and the per-dyno figures of `dyno.metrics` (§5).
"""

from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Mapping
from ipaddress import IPv4Address
from typing import Any

import netns
from agent.coordinator.frames import PROTOCOL_VERSION


def network_payload(network: netns.HostNetwork, underlay: str | None) -> dict[str, Any]:
    """`hello.network`: the underlay address, its link's MTU and the host's own networks
    (which the coordinator keeps space subnets clear of)."""
    mtu = None
    if underlay is not None:
        with contextlib.suppress(netns.NetnsError, ValueError):
            mtu = network.underlay_mtu(IPv4Address(underlay))
    try:
        networks = [str(n) for n in network.host_networks()]
    except netns.NetnsError:
        networks = []
    return {"underlay": underlay, "mtu": mtu, "networks": networks}


def hello_payload(info: Mapping[str, Any], dynos: list[dict[str, Any]],
                  generation: int | None, draining: bool,
                  network: dict[str, Any] | None = None) -> dict[str, Any]:
    """The `hello` params from the daemon's info (docs/protocol.md, "hello")."""
    return {
        "agent_id": info["agent_id"],
        "host": info["host"],
        "version": info["version"],
        "protocol": PROTOCOL_VERSION,
        "boot_id": info["boot_id"],
        "started_at": info["started_at"],
        "capacity": info["capacity"],
        "labels": {"arch": platform.machine(), "kernel": os.uname().release,
                   "cgroup_mode": info["cgroup_mode"]},
        "generation": generation,
        "draining": draining,
        "dynos": dynos,
        "network": network or {"underlay": None, "mtu": None, "networks": []},
    }


def dyno_metrics(supervisor: Any) -> list[dict[str, Any]]:
    """Per-dyno figures of the last memory sample (the same as the runtime-metrics lines)."""
    out = []
    for dyno in list(supervisor.dynos.values()):
        stats = dyno.last_stats
        out.append({
            "id": dyno.id, "app": dyno.spec.app, "name": dyno.spec.name,
            "state": str(dyno.state), "restarts": dyno.record.restarts,
            "memory_quota_bytes": dyno.spec.size.memory_quota_bytes,
            "memory_rss_bytes": None if stats is None else stats.memory_rss_bytes,
            "memory_bytes": None if stats is None else stats.memory_current_bytes,
            "cpu_seconds": None if stats is None or stats.cpu_usage_usec is None
            else stats.cpu_usage_usec / 1e6,
            "pids": None if stats is None else stats.pids_current,
        })
    return out
