"""Fixtures shared by the e2e modules: a test host and a slug per module, fresh apps for
modules that define an `agent` fixture, and an agent driven by a test coordinator
(`coordinated`)."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_supervision import delete_app, make_slug
from tests.support.agentproc import AgentProcess
from tests.support.coordinator import CoordinatorThread
from tests.support.names import unique
from tests.support.testhost import TestHost, new_test_host
from tests.support.wait import wait_for


@pytest.fixture(scope="module")
def host() -> Iterator[TestHost]:
    """A test host (network namespace) for the module's agent."""
    with new_test_host("dt") as test_host:
        yield test_host


@pytest.fixture(scope="module")
def slug_files() -> Mapping[str, str]:
    """The files (name -> text) a module's slug holds besides server.py; a module that runs
    scripts of its own overrides this fixture."""
    return {}


@pytest.fixture(scope="module")
def slug(slug_files: Mapping[str, str]) -> Iterator[Path]:
    """A slug with test_supervision's server.py and the module's `slug_files`."""
    path = make_slug(slug_files)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def app(agent: AgentProcess) -> Iterator[str]:
    """A fresh app (and so a fresh space) per test; its dynos are deleted even on failure."""
    name = unique("t", 8)
    try:
        yield name
    finally:
        delete_app(agent, name)


@pytest.fixture
def apps(agent: AgentProcess) -> Iterator[tuple[str, str]]:
    """Two fresh apps (so two spaces), e.g. an attacker and its victim."""
    names = (unique("ta", 8), unique("tv", 8))
    try:
        yield names
    finally:
        for name in names:
            delete_app(agent, name)


# The agent settings of `coordinated`: a cool-off short enough to watch a crashed dyno come
# back, stops that end within a test's patience.
COORDINATED_SETTINGS = {"restart_schedule_s": [2.0], "stop_timeout_s": 3, "log_level": "info"}


@dataclass
class Coordinated:
    """An agent in a test host of its own, connected to a test coordinator, and a slug
    (a Procfile `worker: sleep 1000`) in the agent's directory."""

    host: TestHost
    coordinator: CoordinatorThread
    agent: AgentProcess
    slug: Path
    prefix: str  # of the dyno ids `spec` makes, unique to the test

    def spec(self, n: int, command: str = "sleep 1000") -> dict[str, Any]:
        return {"id": f"{self.prefix}-{n}", "app": "demo", "name": f"worker.{n}",
                "command": command, "release": {"version": 1, "slug": {"path": str(self.slug)}},
                "stop_timeout_s": 5}

    def sync(self, generation: int, specs: list[dict[str, Any]]) -> dict[str, Any]:
        response = self.coordinator.request("dynos.sync",
                                            {"generation": generation, "dynos": specs})
        assert "p" in response, response
        result: dict[str, Any] = response["p"]
        return result

    def ps(self) -> dict[str, dict[str, Any]]:
        return {d["id"]: d for d in self.agent.ctl_json("ps")}

    def states(self, dyno_id: str) -> list[tuple[str | None, str]]:
        return [(s["previous"], s["state"])
                for s in self.coordinator.snapshot(lambda c: c.states(dyno_id))]

    def wait_up(self, ids: list[str], timeout_s: float = 30) -> dict[str, dict[str, Any]]:
        def all_up() -> dict[str, dict[str, Any]] | None:
            ps = self.ps()
            return ps if all(ps.get(i, {}).get("state") == "up" for i in ids) else None
        found = wait_for(all_up, timeout_s, interval_s=0.1, what=f"{ids} up")
        assert found is not None
        return found


@pytest.fixture
def coordinated(tmp_path: Path) -> Iterator[Coordinated]:
    """A `Coordinated` agent, connected once the test begins. On the way out every dyno is
    removed through the coordinator (brought back first if the test sent it away) and
    everything the agent left is cleaned up."""
    with new_test_host() as host:
        coordinator = CoordinatorThread(host.name).start()
        token = tmp_path / "token"
        token.write_text("test-token\n")
        agent = AgentProcess(netns=host.name, extra={
            "coordinator_url": coordinator.url, "coordinator_token_file": str(token),
            **COORDINATED_SETTINGS})
        slug = agent.base / "slug"
        slug.mkdir()
        (slug / "Procfile").write_text("worker: sleep 1000\n")
        try:
            agent.start()
            coordinator.wait(lambda c: c.current, 15, "agent connected")
            yield Coordinated(host, coordinator, agent, slug, unique("dt", 6))
        except BaseException:
            print(agent.log()[-20000:])
            raise
        finally:
            try:
                if agent.proc is not None and agent.proc.poll() is None:
                    with contextlib.suppress(Exception):
                        if coordinator.snapshot(lambda c: c.current) is None:
                            coordinator.come_back()
                        coordinator.wait(lambda c: c.current, 15, "agent connected")
                        coordinator.request("dynos.sync", {"generation": 2**62, "dynos": []},
                                            timeout_s=60)
                agent.stop()
            finally:
                coordinator.close()
                # cleanup() also ends what a failed test left (holder, cgroups, namespaces).
                agent.cleanup()
