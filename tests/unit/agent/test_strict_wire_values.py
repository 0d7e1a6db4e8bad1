"""Values on the wire are parsed strictly (issue 19, item 7): signals are ASCII names or ASCII
digits only, and a desired set's generation stays within 0 to 2**63 - 1, with a way back for a
coordinator whose count fell behind."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from agent import errors
from agent.api.server import build_app, signal_name
from agent.signals import parse_signal
from agent.supervision.reconcile import MAX_GENERATION, DesiredStore, Engine
from tests.unit.agent.fakes import FakeBackend, as_root, make_status
from tests.unit.agent.test_coordinator_requests import make, spec
from tests.unit.agent.test_reconcile import FakeFleet, body

ARABIC_TEN = "\u0661\u0660"  # Arabic-Indic 1 0: str.isdigit() is true and int() makes 10
FULLWIDTH_TEN = "\uff11\uff10"
LONG_S_TERM = "\u017figterm"  # a long s, then "igterm": .upper() is "SIGTERM"


@pytest.mark.parametrize(("value", "expected"), [
    ("TERM", signal.SIGTERM), ("sigterm", signal.SIGTERM), ("SIGUSR1", signal.SIGUSR1),
    ("10", signal.SIGUSR1), (10, signal.SIGUSR1), (" 15 ", signal.SIGTERM),
])
def test_ascii_names_and_numbers_are_signals(value: Any, expected: signal.Signals) -> None:
    assert parse_signal(value) is expected
    assert signal_name(value) == expected.name


@pytest.mark.parametrize("value", [
    ARABIC_TEN, FULLWIDTH_TEN, LONG_S_TERM, "\uff34\uff25\uff32\uff2d", "SIG", "", "1_0",
    "+10", "0", "-9", "10\n", "9" * 5000, 0, 10 ** 30, -1, True, None, 1.0, ["TERM"],
])
def test_anything_else_is_a_bad_request(value: Any) -> None:
    with pytest.raises(errors.BadRequest):
        parse_signal(value)


async def test_the_coordinator_refuses_non_ascii_digits() -> None:
    sup, requests = make()
    await requests.handle("dyno.start", spec("d1"))
    for value in (ARABIC_TEN, FULLWIDTH_TEN, LONG_S_TERM):
        with pytest.raises(errors.BadRequest):
            await requests.handle("dyno.signal", {"id": "d1", "signal": value})
    assert sup.signals == []


async def test_the_operator_api_refuses_non_ascii_digits() -> None:
    backend = FakeBackend()
    backend.add(make_status("w1", "demo", "web.1"))
    async with TestClient(TestServer(build_app(backend, peer_of=as_root))) as client:
        for value in (ARABIC_TEN, FULLWIDTH_TEN, LONG_S_TERM):
            resp = await client.post("/v1/dynos/web.1/signal",
                                     data=json.dumps({"signal": value}))
            assert resp.status == 400, value
            assert (await resp.json())["error"]["code"] == "bad_request"
        for tail in (ARABIC_TEN, "+5", " 5", "1_0"):
            resp = await client.get("/v1/logs", params={"tail": tail})
            assert resp.status == 400, tail
        ok = await client.post("/v1/dynos/web.1/signal", data=json.dumps({"signal": "10"}))
        assert ok.status == 200
    assert backend.calls == [("signal", "w1", "SIGUSR1")]


@pytest.mark.parametrize("generation", [MAX_GENERATION + 1, 2 ** 64 - 1])
async def test_a_generation_past_2_63_is_a_bad_request_and_changes_nothing(
        generation: int, tmp_path: Path) -> None:
    sup, requests = make()
    await requests.handle("dynos.sync", {"generation": 5, "dynos": [spec("a1")]})
    with pytest.raises(errors.BadRequest) as caught:
        await requests.handle("dynos.sync", {"generation": generation, "dynos": []})
    assert caught.value.code == "bad_request" and "generation" in caught.value.message
    assert requests.engine.generation == 5 and set(sup.specs) == {"a1"}
    # Lower generations still apply.
    report = await requests.handle("dynos.sync", {"generation": 6, "dynos": []})
    assert not report["ignored"] and report["removed"] == ["a1"]


async def test_a_coordinator_behind_the_agent_recovers_from_the_generation_it_reports(
        tmp_path: Path) -> None:
    engine = Engine(FakeFleet(), DesiredStore(tmp_path))
    await engine.apply(MAX_GENERATION, [body("a1")])
    assert (await engine.apply(3, [])).ignored
    # docs/protocol.md §4: send the generation in force (hello.generation) again.
    report = await engine.apply(engine.generation or 0, [body("b2")])
    assert not report.ignored and report.started == ["b2"] and report.removed == ["a1"]


async def test_a_persisted_generation_out_of_range_is_ignored_at_start(tmp_path: Path) -> None:
    (tmp_path / "desired.json").write_text(json.dumps({"generation": 2 ** 64 - 1,
                                                       "dynos": [body("a1")]}))
    engine = Engine(FakeFleet(), DesiredStore(tmp_path))
    assert engine.generation is None and engine.desired == {}
    report = await engine.apply(1, [body("b2")])
    assert not report.ignored and report.started == ["b2"]


@pytest.mark.parametrize("item", [f"web={ARABIC_TEN}", f"web={FULLWIDTH_TEN}", "web=+1",
                                  "web=" + "9" * 5000])
def test_formation_quantities_are_ascii_digits(item: str) -> None:
    from agent.standalone.procfile import AppDirError, parse_formation_items

    with pytest.raises(AppDirError):
        parse_formation_items([item])
    assert parse_formation_items(["web=10"])[0].quantity == 10


def test_dynoctl_numbers_are_ascii_digits() -> None:
    import argparse

    from agent.cli.dynoctl import _non_negative

    for text in (ARABIC_TEN, FULLWIDTH_TEN, "-1", "+1", " 1", "9" * 5000):
        with pytest.raises(argparse.ArgumentTypeError):
            _non_negative(text)
    assert _non_negative("10") == 10
