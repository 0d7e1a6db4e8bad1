"""An agent's log drain counters, read from its /metrics."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from tests.support.agentproc import AgentProcess


def drain_metrics(agent: AgentProcess, app: str) -> dict[str, float]:
    """This app's drain samples: metric name -> value (one drain per app in these tests)."""
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(agent.api("GET", "/metrics")):
        for sample in family.samples:
            if sample.name.startswith("dynoagent_drain_") and sample.labels.get("app") == app:
                found[sample.name] = sample.value
    return found
