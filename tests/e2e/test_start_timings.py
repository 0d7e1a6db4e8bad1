"""Where a start's time goes, through the real agent: a one-off's `timings_ms` has every
phase of its start and exit; `dynoctl inspect` shows them in order with units and prints no
`None` nor unrounded float; `/metrics` has a histogram per phase that promtool accepts."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.test_supervision import agent_in_host, spec, wait_state
from tests.support.agentproc import AgentProcess
from tests.support.testhost import new_test_host

PHASES = ["record", "queue", "slug", "uid", "dir", "cgroup", "netns", "prepare", "launch", "up",
          "run", "exit_event", "exit"]


@pytest.fixture(scope="module")
def agent() -> Iterator[AgentProcess]:
    with new_test_host() as host, agent_in_host(host) as running:
        yield running


def test_a_one_offs_phases_show_in_inspect_and_metrics(agent: AgentProcess, slug: Path,
                                                       app: str) -> None:
    created = agent.api("POST", "/v1/dynos", spec(app, "run.1", "true", slug), expect=201)
    done = wait_state(agent, created["id"], "complete", 30)
    timings = done["timings_ms"]
    assert [p for p in timings if "." not in p] == PHASES, timings
    assert {"launch.fork", "launch.exec", "launch.total"} <= set(timings)
    assert all(isinstance(ms, float) and ms >= 0 for ms in timings.values()), timings

    shown = agent.ctl("inspect", created["id"]).stdout
    assert "None" not in shown, shown
    assert not re.search(r"\d\.\d{3,}", shown), shown
    row = re.search(r"^Timings:\s+(.*)$", shown, re.M)
    assert row is not None, shown
    assert [part.split()[0] for part in row.group(1).split(", ")] == PHASES, shown
    assert re.fullmatch(r"(\w+ \d+\.\d{1,2} ms)(, \w+ \d+\.\d{1,2} ms)*", row.group(1)), shown
    assert re.search(r"^Launch:\s+prepare \d+\.\d+ ms, fork ", shown, re.M), shown

    text = agent.api("GET", "/metrics")
    for phase in PHASES:
        assert re.search(rf'^dynoagent_start_phase_seconds_count\{{phase="{phase}"\}} [1-9]',
                         text, re.M), phase
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    checked = subprocess.run([promtool, "check", "metrics"], input=text, text=True,
                             capture_output=True, timeout=30, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr
