"""The convergence engine against a fake fleet: plans, generations, persistence, failures."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from agent import errors
from agent.spec import DynoSpec, parse_spec
from agent.supervision.reconcile import (
    DesiredStateError,
    DesiredStore,
    Engine,
    InvalidDesiredSet,
    Observed,
    plan,
)


def body(dyno_id: str, name: str = "", command: str = "sleep 100", **extra: Any) -> dict[str, Any]:
    return {"id": dyno_id, "app": "demo", "name": name or f"worker.{dyno_id[-1]}",
            "command": command, "release": {"version": 1, "slug": {"path": "/srv/slug"}},
            **extra}


class FakeFleet:
    """Records every call; `fail` maps a dyno id to the error its next action raises."""

    def __init__(self) -> None:
        self.dynos: dict[str, Observed] = {}
        self.calls: list[tuple[str, str]] = []
        self.fail: dict[str, Exception] = {}
        self.remove_gate: asyncio.Event | None = None

    def parse(self, data: Any) -> DynoSpec:
        return parse_spec(data)

    def observe(self) -> Mapping[str, Observed]:
        return dict(self.dynos)

    def observe_one(self, dyno_id: str) -> Observed | None:
        return self.dynos.get(dyno_id)

    def _maybe_fail(self, dyno_id: str) -> None:
        exc = self.fail.pop(dyno_id, None)
        if exc is not None:
            raise exc

    async def start(self, spec: DynoSpec) -> None:
        self.calls.append(("start", spec.id))
        self._maybe_fail(spec.id)
        for other in self.dynos.values():
            if (other.spec.app, other.spec.name) == (spec.app, spec.name):
                raise errors.Conflict(f"name {spec.name} taken by {other.spec.id}")
        self.dynos[spec.id] = Observed(spec, running=True, complete=False)

    async def resume(self, dyno_id: str) -> None:
        self.calls.append(("resume", dyno_id))
        self._maybe_fail(dyno_id)
        self.dynos[dyno_id] = Observed(self.dynos[dyno_id].spec, running=True, complete=False)

    async def remove(self, dyno_id: str) -> None:
        self.calls.append(("remove", dyno_id))
        if self.remove_gate is not None:
            await self.remove_gate.wait()
        self._maybe_fail(dyno_id)
        del self.dynos[dyno_id]


def observed(*bodies: dict[str, Any], running: bool = True, complete: bool = False
             ) -> dict[str, Observed]:
    return {b["id"]: Observed(parse_spec(b), running, complete) for b in bodies}


def test_plan_is_a_pure_diff_by_id() -> None:
    desired = {b["id"]: parse_spec(b) for b in
               (body("a1"), body("b2", command="new"), body("c3"), body("d4"), body("e5"))}
    current = {**observed(body("a1"), body("b2"), body("x9")),
               **observed(body("c3"), running=False),
               **observed(body("d4"), running=False, complete=True)}
    steps = plan(desired, current)
    assert steps.remove == ("x9",)
    assert [s.id for s in steps.replace] == ["b2"]
    assert [s.id for s in steps.start] == ["e5"]
    assert steps.resume == ("c3",)
    assert steps.unchanged == ("a1", "d4")


async def test_apply_starts_removes_and_reports(tmp_path: Path) -> None:
    fleet = FakeFleet()
    engine = Engine(fleet, DesiredStore(tmp_path))
    report = await engine.apply(1, [body("a1"), body("b2"), body("c3")])
    assert report.started == ["a1", "b2", "c3"] and not report.failed
    assert set(fleet.dynos) == {"a1", "b2", "c3"}
    report = await engine.apply(2, [body("a1"), body("b2")])
    assert report.removed == ["c3"] and report.unchanged == ["a1", "b2"]
    assert set(fleet.dynos) == {"a1", "b2"}
    saved = json.loads((tmp_path / "desired.json").read_text())
    assert saved["generation"] == 2 and [d["id"] for d in saved["dynos"]] == ["a1", "b2"]
    assert os.stat(tmp_path / "desired.json").st_mode & 0o777 == 0o600


async def test_older_generation_is_ignored_and_same_generation_reconverges(
        tmp_path: Path) -> None:
    fleet = FakeFleet()
    engine = Engine(fleet, DesiredStore(tmp_path))
    await engine.apply(5, [body("a1")])
    fleet.calls.clear()
    report = await engine.apply(4, [])
    assert report.ignored and report.applied_generation == 5
    assert fleet.calls == [] and set(fleet.dynos) == {"a1"}
    del fleet.dynos["a1"]  # it vanished (say, deleted by an operator)
    report = await engine.apply(5, [body("a1")])
    assert report.started == ["a1"] and not report.ignored


async def test_changed_spec_is_replaced_remove_before_start() -> None:
    fleet = FakeFleet()
    engine = Engine(fleet)
    await engine.apply(1, [body("a1")])
    fleet.calls.clear()
    report = await engine.apply(2, [body("a1", command="python app.py")])
    assert report.replaced == ["a1"]
    assert fleet.calls == [("remove", "a1"), ("start", "a1")]
    assert fleet.dynos["a1"].spec.command == "python app.py"


async def test_a_name_moving_to_a_new_id_waits_for_the_old_dyno() -> None:
    fleet = FakeFleet()
    engine = Engine(fleet)
    await engine.apply(1, [body("old1", name="web.1")])
    report = await engine.apply(2, [body("new1", name="web.1")])
    assert report.removed == ["old1"] and report.started == ["new1"] and not report.failed


async def test_stopped_dyno_in_the_set_is_resumed_completed_one_is_left() -> None:
    fleet = FakeFleet()
    fleet.dynos.update(observed(body("a1"), running=False))
    fleet.dynos.update(observed(body("r1", name="run.1"), running=False, complete=True))
    report = await Engine(fleet).apply(1, [body("a1"), body("r1", name="run.1")])
    assert report.resumed == ["a1"] and report.unchanged == ["r1"]
    assert ("resume", "r1") not in fleet.calls


async def test_failures_are_reported_per_dyno_and_others_proceed() -> None:
    fleet = FakeFleet()
    fleet.fail["b2"] = errors.Draining("the agent is draining")
    fleet.fail["c3"] = RuntimeError("boom")
    report = await Engine(fleet).apply(1, [body("a1"), body("b2"), body("c3")])
    assert report.started == ["a1"]
    assert {(f.id, f.code) for f in report.failed} == {("b2", "draining"), ("c3", "internal")}


@pytest.mark.parametrize(("bodies", "field"), [
    ("nope", "dynos"),
    ([{"app": "demo"}], "dynos[0].id"),
    ([body("a1"), body("a1")], "dynos[1].id"),
    ([body("a1", name="web.1"), body("b2", name="web.1")], "dynos[1].name"),
    ([body("a1"), body("b2", size="huge")], "dynos[1].size"),
    ([body("a1", colour="red")], "dynos[0].colour"),
])
async def test_invalid_desired_set_changes_nothing(tmp_path: Path, bodies: Any,
                                                   field: str) -> None:
    fleet = FakeFleet()
    engine = Engine(fleet, DesiredStore(tmp_path))
    await engine.apply(1, [body("z9")])
    fleet.calls.clear()
    with pytest.raises(InvalidDesiredSet) as caught:
        await engine.apply(2, bodies)
    assert caught.value.field == field
    assert fleet.calls == [] and engine.generation == 1
    assert json.loads((tmp_path / "desired.json").read_text())["generation"] == 1


@pytest.mark.parametrize("generation", [-1, True, "3", 1.5])
async def test_bad_generation_is_refused(generation: Any) -> None:
    with pytest.raises(InvalidDesiredSet) as caught:
        await Engine(FakeFleet()).apply(generation, [])
    assert caught.value.field == "generation"


async def test_restarted_engine_loads_the_set_and_acts_on_nothing(tmp_path: Path) -> None:
    fleet = FakeFleet()
    await Engine(fleet, DesiredStore(tmp_path)).apply(7, [body("a1"), body("b2")])
    fleet.calls.clear()
    again = Engine(fleet, DesiredStore(tmp_path))
    assert again.generation == 7 and set(again.desired) == {"a1", "b2"}
    assert fleet.calls == []
    assert (await again.apply(6, [])).ignored


def test_corrupt_desired_file_is_an_error_with_the_path(tmp_path: Path) -> None:
    (tmp_path / "desired.json").write_text("{not json")
    with pytest.raises(DesiredStateError) as caught:
        DesiredStore(tmp_path).load()
    assert caught.value.path == tmp_path / "desired.json"
    # The engine starts anyway, with nothing applied.
    assert Engine(FakeFleet(), DesiredStore(tmp_path)).generation is None


def test_unwritable_desired_file_carries_errno(tmp_path: Path) -> None:
    store = DesiredStore(tmp_path / "missing-dir")
    with pytest.raises(DesiredStateError) as caught:
        store.save(1, [])
    assert caught.value.errno == 2


async def test_generations_apply_in_arrival_order() -> None:
    fleet = FakeFleet()
    engine = Engine(fleet)
    await engine.apply(1, [body("a1")])
    fleet.remove_gate = asyncio.Event()
    newer = asyncio.create_task(engine.apply(3, []))
    await asyncio.sleep(0)
    older = asyncio.create_task(engine.apply(2, [body("a1"), body("b2")]))
    await asyncio.sleep(0)
    fleet.remove_gate.set()
    assert (await newer).removed == ["a1"]
    assert (await older).ignored
    assert fleet.dynos == {}


async def test_start_is_idempotent_by_id_and_conflicts_on_another_spec() -> None:
    fleet = FakeFleet()
    engine = Engine(fleet)
    await engine.start(body("a1"))
    await engine.start(body("a1"))
    assert fleet.calls == [("start", "a1")]
    with pytest.raises(errors.Conflict):
        await engine.start(body("a1", command="other"))
    fleet.dynos["a1"] = Observed(fleet.dynos["a1"].spec, running=False, complete=False)
    await engine.start(body("a1"))
    assert fleet.calls[-1] == ("resume", "a1")
    with pytest.raises(errors.InvalidSpec) as caught:
        await engine.start({"app": "demo"})
    assert caught.value.field == "id"
    with pytest.raises(errors.InvalidSpec) as caught:
        await engine.start(body("b2", size="huge"))
    assert caught.value.field == "size"
