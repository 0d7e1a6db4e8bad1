"""`drains.sync`: the coordinator's drains per app — checked strictly, kept on disk, added to
the specs' drains, and the drain manager refreshed for exactly the apps whose drains changed."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from agent import errors
from agent.config import Config
from agent.coordinator.appdrains import FILE_NAME, AppDrains
from agent.coordinator.frames import UnknownMethod
from agent.coordinator.requests import Requests
from agent.daemon.service import Daemon
from agent.drains.manager import DrainManager
from agent.observability.logs import LogHub, LogLine
from agent.supervision.reconcile import Engine
from tests.unit.agent.fakes import FakeSupervisor

AT = datetime(2026, 12, 3, tzinfo=UTC)
A = "syslog://127.0.0.1:1"
B = "https://user:pass@127.0.0.1:1/drain"


@pytest.mark.parametrize(("params", "says"), [
    ({}, "p.apps: is required"),
    ({"apps": {}, "extra": 1}, "p: unknown key"),
    ({"apps": []}, "p.apps: must be a map"),
    ({"apps": {"Shop": [A]}}, "p.apps: key must be an app name"),
    ({"apps": {"shop": A}}, "p.apps.shop: must be a list"),
    ({"apps": {"shop": ["ftp://x:1"]}}, "p.apps.shop: [0]: must be a syslog://"),
    ({"apps": {"shop": [A, A]}}, "p.apps.shop: [1]:"),
    ({"apps": {"shop": [f"syslog://127.0.0.1:{n}" for n in range(1, 7)]}},
     "p.apps.shop: at most 5 drains"),
])
async def test_a_bad_sync_is_refused_naming_the_field_and_changes_nothing(
        tmp_path: Path, params: dict[str, Any], says: str) -> None:
    refreshed: list[str] = []
    store = AppDrains(tmp_path / FILE_NAME, refreshed.append)
    await store.handle({"apps": {"blog": [A]}})
    refreshed.clear()
    with pytest.raises(errors.BadRequest) as refused:
        await store.handle(params)
    assert refused.value.code == "bad_request" and says in refused.value.message
    assert store.apps == {"blog": (A,)} and refreshed == []
    assert AppDrains(tmp_path / FILE_NAME).apps == {"blog": (A,)}


async def test_the_map_is_kept_on_disk_for_the_next_agent(tmp_path: Path) -> None:
    path = tmp_path / FILE_NAME
    store = AppDrains(path)
    assert store.apps == {}  # no file yet
    result = await store.handle({"apps": {"shop": [A, B], "blog": []}})
    assert result == {"apps": ["shop"], "changed": ["shop"]}
    assert json.loads(path.read_text()) == {"apps": {"shop": [A, B]}}
    assert path.stat().st_mode & 0o777 == 0o600
    assert AppDrains(path).get("shop") == (A, B)
    # A file that cannot be read is no drains, not a failure to start.
    path.write_text("{not json")
    assert AppDrains(path).apps == {}
    path.write_text(json.dumps({"apps": {"shop": ["ftp://nope"]}}))
    assert AppDrains(path).apps == {}


async def test_only_apps_whose_drains_changed_are_refreshed(tmp_path: Path) -> None:
    refreshed: list[str] = []
    store = AppDrains(tmp_path / FILE_NAME, refreshed.append)
    await store.handle({"apps": {"shop": [A], "blog": [A]}})
    assert sorted(refreshed) == ["blog", "shop"]
    refreshed.clear()
    result = await store.handle({"apps": {"shop": [A], "blog": [A, B], "wiki": [B]}})
    assert sorted(refreshed) == ["blog", "wiki"] and result["changed"] == ["blog", "wiki"]
    refreshed.clear()
    # An app left out of the map has no coordinator drains any more.
    await store.handle({"apps": {"blog": [A, B], "wiki": [B]}})
    assert refreshed == ["shop"] and store.get("shop") == ()
    refreshed.clear()
    await store.handle({"apps": {"blog": [A, B], "wiki": [B]}})
    assert refreshed == []


def test_an_apps_drains_are_its_specs_and_the_coordinators_each_once(tmp_path: Path) -> None:
    store = AppDrains(None)
    store.apps = {"shop": (A, B)}
    assert store.merged("shop", ["syslog://127.0.0.1:9", A]) == ["syslog://127.0.0.1:9", A, B]
    assert store.merged("blog", [A]) == [A]


async def test_drains_sync_reaches_the_drain_manager_without_touching_a_dyno(
        tmp_path: Path) -> None:
    """The agent's wiring: the specs' drains and the coordinator's, and a sync refreshes the
    manager at once (its routes are otherwise looked up once per app)."""
    store = AppDrains(tmp_path / FILE_NAME)
    spec_drains = {"shop": ["syslog://127.0.0.1:9"]}
    manager = DrainManager(None, (), lambda app: store.merged(app, spec_drains.get(app, [])))
    store.on_change = manager.refresh
    sup = FakeSupervisor()
    requests = Requests(sup, Engine(sup), dict, drains=store.handle)
    hub = LogHub()
    await manager.start(hub)
    try:
        hub.publish(LogLine.output(AT, "shop", "web.1", "spec drain only"))
        await requests.handle("drains.sync", {"apps": {"shop": [A, "syslog://127.0.0.1:9"]}})
        hub.publish(LogLine.output(AT, "shop", "web.1", "both"))
        counts = {d.url.url: d.emitted for d in manager.drains if not d.retiring}
        assert counts == {"syslog://127.0.0.1:9": 2, A: 1}
        await requests.handle("drains.sync", {"apps": {}})
        hub.publish(LogLine.output(AT, "shop", "web.1", "spec drain again"))
        counts = {d.url.url: d.emitted for d in manager.drains if not d.retiring}
        assert counts == {"syslog://127.0.0.1:9": 3}
    finally:
        await manager.aclose()
        hub.close()


async def test_drains_sync_is_a_method_only_when_given() -> None:
    sup = FakeSupervisor()
    assert "drains.sync" not in Requests(sup, Engine(sup), dict).methods
    with pytest.raises(UnknownMethod):
        await Requests(sup, Engine(sup), dict).handle("drains.sync", {"apps": {}})
    store = AppDrains(None)
    answer = await Requests(sup, Engine(sup), dict, drains=store.handle).handle(
        "drains.sync", {"apps": {"shop": [A]}})
    assert answer == {"apps": ["shop"], "changed": ["shop"]}


async def test_the_daemon_sends_to_the_drains_kept_on_disk_and_follows_a_sync(
        tmp_path: Path) -> None:
    """The daemon's log drains step: the map the agent before kept is used from the start,
    with the specs' drains, and a `drains.sync` changes the drains at once."""
    state = tmp_path / "state"
    state.mkdir()
    (state / FILE_NAME).write_text(json.dumps({"apps": {"shop": [A]}}))
    daemon = Daemon(Config(state_dir=state, run_dir=tmp_path / "run"), None)
    spec = SimpleNamespace(log_drains=("syslog://127.0.0.1:9",))
    daemon.supervisor = SimpleNamespace(  # type: ignore[assignment]
        specs=lambda app: [spec] if app == "shop" else [])
    async with daemon._log_drains():
        assert daemon.drains is not None and daemon.app_drains is not None
        daemon.hub.publish(LogLine.output(AT, "shop", "web.1", "to both"))
        assert {d.url.url: d.emitted for d in daemon.drains.drains if not d.retiring} == \
            {A: 1, "syslog://127.0.0.1:9": 1}
        await daemon.app_drains.handle({"apps": {"shop": [B]}})
        daemon.hub.publish(LogLine.output(AT, "shop", "web.1", "to the new one"))
        assert {d.url.url: d.emitted for d in daemon.drains.drains if not d.retiring} == \
            {B: 1, "syslog://127.0.0.1:9": 2}
        await daemon._tasks.cancel_all()
    assert json.loads((state / FILE_NAME).read_text()) == {"apps": {"shop": [B]}}
