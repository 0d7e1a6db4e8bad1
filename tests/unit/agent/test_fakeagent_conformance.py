"""The simulated agent (tests/support/fakeagent.py) against the real one: the same requests to
the agent's request handler (a real Supervisor, Engine and Requests on the fake runtime) and
to the fake give answers of the same shape, the same error codes and messages, and the same
`dyno.state` transitions, so a coordinator that works with the fake works with the agent."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.coordinator.logfeed import LogFeed
from agent.coordinator.requests import Requests
from agent.errors import AgentError
from agent.supervision.reconcile import Engine, SupervisorFleet
from agent.supervision.states import TRANSITIONS
from tests.support import fakeagent
from tests.support.fakeagent import FakeAgent, FakeError
from tests.support.virtualtime import until
from tests.unit.agent.conftest import VIRTUAL_TIME
from tests.unit.agent.fakes import SIZES, Harness, virtual_harness

pytestmark = pytest.mark.asyncio(loop_factories=[VIRTUAL_TIME])


def spec(n: int, **extra: Any) -> dict[str, Any]:
    return {"id": f"w{n}", "app": "demo", "name": f"worker.{n}", "command": "run-it",
            "release": {"version": 1, "slug": {"path": "/slug"}}, **extra}


@dataclass
class Pair:
    real: Requests
    harness: Harness
    fake: FakeAgent
    fake_events: list[dict[str, Any]]

    async def both(self, method: str, params: dict[str, Any]) -> tuple[Any, Any]:
        """Each side's answer: its result, or ("error", code, message, field)."""
        async def real() -> Any:
            try:
                return await self.real.handle(method, params)
            except AgentError as exc:
                return ("error", exc.code, exc.message, getattr(exc, "field", None))

        async def fake() -> Any:
            try:
                return await self.fake.handle(method, params)
            except FakeError as exc:
                return ("error", exc.code, exc.message, exc.field)
        return await real(), await fake()

    def real_states(self) -> dict[str, str]:
        return {s["id"]: s["state"] for s in self.harness.supervisor.list_dynos()}

    async def settle(self, states: dict[str, str]) -> None:
        await until(lambda: self.real_states() == states and self.fake.states() == states,
                    60, f"both at {states}")

    def transitions(self) -> tuple[dict[str, list[tuple[Any, ...]]],
                                   dict[str, list[tuple[Any, ...]]]]:
        """Each side's transitions, per dyno in the order they happened."""
        def project(events: list[dict[str, Any]]) -> dict[str, list[tuple[Any, ...]]]:
            out: dict[str, list[tuple[Any, ...]]] = {}
            for e in events:
                out.setdefault(e["id"], []).append(
                    (e["previous"], e["state"], e["reason"], e["exit_status"]))
            return out
        return project(self.harness.events), project(self.fake_events)


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[Pair]:
    harness = await virtual_harness(tmp_path)
    supervisor = harness.supervisor
    real = Requests(supervisor, Engine(SupervisorFleet(supervisor)), lambda: {},
                    logs=LogFeed(harness.hub))
    fake = FakeAgent("ws://unused/v1/agents/connect", "t", "a1", "h1", boot_delay_s=0.5,
                     stop_delay_s=0.5, sizes=SIZES)
    events: list[dict[str, Any]] = []
    fake.state_listeners.append(events.append)
    try:
        yield Pair(real, harness, fake, events)
    finally:
        await fake.close()
        await supervisor.detach_all()


def shape(value: Any) -> Any:
    """Keys and kinds, recursively; lists by their first element."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    if isinstance(value, tuple):
        return value
    return type(value).__name__


def status_shape(status: dict[str, Any]) -> dict[str, Any]:
    """A status without what differs between any two hosts (pids, addresses, times)."""
    return {k: v for k, v in status.items() if k not in ("since", "pid", "ip")}


async def test_the_state_tables_are_the_same() -> None:
    assert {str(k): {str(s) for s in v} for k, v in TRANSITIONS.items()} == \
        {k: set(v) for k, v in fakeagent.TRANSITIONS.items()}


async def test_sync_start_remove_replace_answer_and_publish_alike(pair: Pair) -> None:
    real, fake = await pair.both("dynos.sync", {"generation": 1,
                                                "dynos": [spec(1), spec(2), spec(3)]})
    assert real == fake and fake["started"] == ["w1", "w2", "w3"]
    await pair.settle({"w1": "up", "w2": "up", "w3": "up"})
    real_list = pair.harness.supervisor.list_dynos()
    fake_list = pair.fake.dynos()
    assert [status_shape(s) for s in real_list] == [status_shape(s) for s in fake_list]
    assert [shape(s) for s in real_list] == [shape(s) for s in fake_list]

    # w2 removed, w3 replaced (another command), w4 started.
    real, fake = await pair.both("dynos.sync", {"generation": 2, "dynos": [
        spec(1), spec(3, command="run-it --again"), spec(4)]})
    assert real == fake
    assert (fake["removed"], fake["replaced"], fake["started"], fake["unchanged"]) == (
        ["w2"], ["w3"], ["w4"], ["w1"])
    await pair.settle({"w1": "up", "w3": "up", "w4": "up"})
    real_events, fake_events = pair.transitions()
    assert real_events == fake_events
    assert fake_events["w2"][-1] == ("up", "down", "stopped", 143)

    # Older generation: ignored alike.
    real, fake = await pair.both("dynos.sync", {"generation": 1, "dynos": []})
    assert real == fake and fake["ignored"] is True


async def test_stop_restart_signal_drain_answer_alike(pair: Pair) -> None:
    await pair.both("dynos.sync", {"generation": 1, "dynos": [spec(1), spec(2)]})
    await pair.settle({"w1": "up", "w2": "up"})
    real, fake = await pair.both("dyno.stop", {"id": "w1"})
    assert status_shape(real) == status_shape(fake) and fake["state"] == "down"
    real, fake = await pair.both("dyno.signal", {"id": "w1", "signal": "TERM"})
    assert real == fake and real[1] == "conflict"  # no process to signal
    real, fake = await pair.both("dyno.restart", {"id": "w2"})
    # Answered once the old process has ended: the new one may already be up (a worker on
    # the fake runtime is, at once) or still starting (the fake boots in `boot_delay_s`).
    assert shape(real) == shape(fake) and real["restarts"] == fake["restarts"] == 1
    assert fake["state"] == "starting" and real["state"] in ("starting", "up")
    await pair.settle({"w1": "down", "w2": "up"})
    real, fake = await pair.both("dyno.signal", {"id": "w2", "signal": "USR1"})
    assert status_shape(real) == status_shape(fake) and fake["signalled"] == 1
    real, fake = await pair.both("dyno.start", spec(1))  # stopped: started again
    assert shape(real) == shape(fake) and (fake["state"], fake["reason"]) == ("starting", "start")
    assert (real["state"], real["reason"]) in (("starting", "start"), ("up", "booted"))
    await pair.settle({"w1": "up", "w2": "up"})
    real, fake = await pair.both("agent.drain", {"stop": True})
    assert shape(real) == shape(fake)
    assert [status_shape(s) for s in real["dynos"]] == [status_shape(s) for s in fake["dynos"]]
    assert (real["stopped"], real["failed"]) == (fake["stopped"], fake["failed"]) == (
        ["w1", "w2"], [])
    real, fake = await pair.both("dynos.sync", {"generation": 2,
                                                "dynos": [spec(1), spec(2), spec(3)]})
    assert real == fake and fake["resumed"] == ["w1", "w2"] and fake["failed"][0]["code"] == \
        "draining"
    await pair.settle({"w1": "up", "w2": "up"})
    real_events, fake_events = pair.transitions()
    assert real_events == fake_events


BAD_REQUESTS: list[tuple[str, dict[str, Any]]] = [
    ("dynos.sync", {"generation": 1}),
    ("dynos.sync", {"generation": 1, "dynos": [], "force": True}),
    ("dynos.sync", {"generation": True, "dynos": []}),
    ("dynos.sync", {"generation": -1, "dynos": []}),
    ("dynos.sync", {"generation": 2**63, "dynos": []}),
    ("dynos.sync", {"generation": 1, "dynos": {}}),
    ("dynos.sync", {"generation": 1, "dynos": [spec(1), spec(1)]}),
    ("dynos.sync", {"generation": 1, "dynos": [spec(1), {**spec(2), "name": "worker.1"}]}),
    ("dynos.sync", {"generation": 1, "dynos": [{**spec(1), "size": "huge"}]}),
    ("dynos.sync", {"generation": 1, "dynos": [{k: v for k, v in spec(1).items()
                                                if k != "id"}]}),
    ("dynos.sync", {"generation": 1, "dynos": ["junk"]}),
    ("dynos.sync", {"generation": 1, "dynos": [{**spec(1), "colour": "red"}]}),
    ("dyno.start", {k: v for k, v in spec(1).items() if k != "id"}),
    ("dyno.start", {**spec(1), "env": {"1X": "y"}}),
    ("dyno.start", {**spec(9), "name": "worker.1"}),
    ("dyno.start", {**spec(1), "command": "other"}),
    ("dyno.stop", {}),
    ("dyno.stop", {"id": "web.1"}),
    ("dyno.stop", {"id": "nope"}),
    ("dyno.stop", {"id": 7}),
    ("dyno.restart", {"id": "nope", "force": True}),
    ("dyno.signal", {"id": "w1"}),
    ("dyno.signal", {"id": "w1", "signal": "SIGNOPE"}),
    ("dyno.signal", {"id": "w1", "signal": 1.5}),
    ("dyno.signal", {"id": "nope", "signal": "TERM"}),
    ("agent.drain", {"stop": True, "cancel": True}),
    ("agent.drain", {"stop": 1}),
    ("agent.info", {"verbose": True}),
    ("logs.tail", {}),
    ("logs.tail", {"app": "Demo"}),
    ("logs.tail", {"app": "demo", "dyno": "web 1"}),
    ("logs.tail", {"app": "demo", "tail": 0}),
    ("logs.tail", {"app": "demo", "tail": True}),
    ("logs.tail", {"app": "demo", "follow": 1}),
    ("dyno.delete", {"id": "w1"}),
    ("hello", {}),
]


async def test_logs_tail_of_an_app_without_lines_is_empty_alike(pair: Pair) -> None:
    real, fake = await pair.both("logs.tail", {"app": "quiet", "dyno": "web.1", "tail": 5})
    assert real == fake == []


@pytest.mark.parametrize(("method", "params"), BAD_REQUESTS,
                         ids=[f"{m}-{n}" for n, (m, _) in enumerate(BAD_REQUESTS)])
async def test_refusals_carry_the_same_code_message_and_field(
        pair: Pair, method: str, params: dict[str, Any]) -> None:
    await pair.both("dynos.sync", {"generation": 1, "dynos": [spec(1)]})
    await pair.settle({"w1": "up"})
    real, fake = await pair.both(method, params)
    assert real[0] == "error", real
    assert real == fake
