"""What the agent says about itself on the link, built from the daemon's state: the params of
`hello` (docs/protocol.md §3) and the per-dyno figures of `dyno.metrics` (§5).
"""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping
from typing import Any

from agent.coordinator.frames import PROTOCOL_VERSION


def hello_payload(info: Mapping[str, Any], dynos: list[dict[str, Any]],
                  generation: int | None, draining: bool) -> dict[str, Any]:
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
