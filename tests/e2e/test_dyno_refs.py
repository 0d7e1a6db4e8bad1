"""Every dyno id the spec allows (`[a-z0-9-]{1,64}`) addresses its dyno on the operator API,
ids that start with a dash included (found by the fuzz tier: such a dyno could be created but
never looked at, stopped or deleted)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.test_supervision import agent_in_host, spec
from tests.support.agentproc import AgentProcess
from tests.support.names import unique
from tests.support.testhost import new_test_host


@pytest.fixture(scope="module")
def agent() -> Iterator[AgentProcess]:
    with new_test_host() as host, agent_in_host(host, log_level="info") as running:
        yield running


@pytest.mark.parametrize("dyno_id", ["-", "-x", "--0", "0-", "-" * 64, "0" * 64])
def test_any_valid_id_addresses_its_dyno(agent: AgentProcess, slug: Path, dyno_id: str) -> None:
    body = spec(unique("t", 6), "worker.1", "sleep 600", slug, id=dyno_id, stop_timeout_s=2)
    assert agent.api("POST", "/v1/dynos", body, expect=201)["id"] == dyno_id
    try:
        assert agent.api("GET", f"/v1/dynos/{dyno_id}")["id"] == dyno_id
        assert agent.api("POST", f"/v1/dynos/{dyno_id}/stop")["state"] == "down"
    finally:
        agent.api("DELETE", f"/v1/dynos/{dyno_id}", expect=204)
    assert dyno_id not in {d["id"] for d in agent.api("GET", "/v1/dynos")}
