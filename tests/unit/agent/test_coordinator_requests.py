"""Property tests: arbitrary frames at the decoder and arbitrary params at the request
handlers — nothing but a typed error escapes, and every bad input is refused."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import errors
from agent.coordinator.frames import (
    Event,
    FrameError,
    Request,
    Response,
    UnknownMethod,
    decode,
)
from agent.coordinator.requests import Requests
from agent.spec import SpecError, parse_spec
from agent.supervision.reconcile import Engine
from tests.unit.agent.fakes import FakeSupervisor


def make() -> tuple[FakeSupervisor, Requests]:
    sup = FakeSupervisor()
    return sup, Requests(sup, Engine(sup), lambda: {"version": "0.1.0"})


def spec(dyno_id: str = "d1", **extra: Any) -> dict[str, Any]:
    return {"id": dyno_id, "app": "demo", "name": f"worker.{dyno_id[-1]}",
            "command": "sleep 1", "release": {"version": 1, "slug": {"path": "/srv/s"}},
            **extra}


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# Values msgpack can carry (string keys only, as the decoder demands).
leaves = (st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1)
          | st.floats(allow_nan=False) | st.text(max_size=20) | st.binary(max_size=20))
values = st.recursive(leaves, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=20)
envelopes = st.fixed_dictionaries({}, optional={
    "t": st.sampled_from(["req", "res", "evt", "nope"]) | values,
    "id": st.integers(-5, 2**64 - 1) | values,
    "m": st.sampled_from(["dynos.sync", "dyno.start", "hello"]) | values,
    "p": values, "e": values})


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_decoder_takes_arbitrary_bytes(data: bytes) -> None:
    try:
        frame = decode(data)
    except FrameError as exc:
        # frame_too_large: an array or map header declaring more than 100,000 entries.
        assert exc.code in ("malformed_frame", "unknown_type", "frame_too_large")
        return
    assert isinstance(frame, Request | Response | Event)


@settings(max_examples=400, deadline=None)
@given(envelopes | values)
def test_decoder_takes_arbitrary_msgpack_values(value: Any) -> None:
    data = msgpack.packb(value, use_bin_type=True)
    try:
        frame = decode(data)
    except FrameError as exc:
        assert exc.code in ("malformed_frame", "unknown_type")
        if isinstance(value, dict) and value.get("t") in ("req", "res") \
                and isinstance(value.get("id"), int) \
                and not isinstance(value.get("id"), bool) and 0 <= value["id"] < 2**63:
            assert exc.request_id == value["id"]  # so the error can answer the request
        return
    assert isinstance(value, dict) and value["t"] in ("req", "res", "evt")
    if isinstance(frame, Request):
        assert frame.id == value["id"] and frame.method == value["m"]
        assert isinstance(frame.params, dict)
    elif isinstance(frame, Response):
        assert ("p" in value) != ("e" in value)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 64))
def test_decoder_refuses_frames_over_the_limit(extra: int) -> None:
    data = msgpack.packb({"t": "evt", "m": "x", "p": {"k": "v" * (100 + extra)}})
    with pytest.raises(FrameError) as caught:
        decode(data, max_bytes=len(data) - 1)
    assert caught.value.code == "frame_too_large" and caught.value.size_bytes == len(data)
    assert isinstance(decode(data, max_bytes=len(data)), Event)


METHODS = ["dynos.sync", "dyno.start", "dyno.stop", "dyno.restart", "dyno.signal",
           "agent.drain", "agent.info"]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([*METHODS, "dyno.delete", "x"]),
       st.dictionaries(st.text(max_size=12) | st.sampled_from(
           ["id", "generation", "dynos", "signal", "stop", "cancel", "app", "name"]),
           values, max_size=5))
def test_handlers_take_arbitrary_params(method: str, params: dict[str, Any]) -> None:
    sup, requests = make()
    run(sup.start(parse_spec(spec("d1"))))
    try:
        result = run(requests.handle(method, params))
    except errors.AgentError as exc:
        assert exc.code in ("bad_request", "invalid_spec", "not_found", "conflict",
                            "unknown_method", "draining")
        if method not in METHODS:
            assert isinstance(exc, UnknownMethod)
        return
    assert method in METHODS and isinstance(result, dict)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["id", "app", "name", "command", "env", "release",
                                        "size", "space", "restart", "boot_timeout_s",
                                        "stop_timeout_s", "colour"]), values, max_size=6),
       st.booleans())
def test_malformed_specs_are_refused_as_invalid_spec(mutation: dict[str, Any],
                                                     drop_id: bool) -> None:
    body = {**spec("d2"), **mutation}
    if drop_id:
        body.pop("id", None)
    try:
        parse_spec(body)
        valid = "id" in body
    except SpecError:
        valid = False
    sup, requests = make()
    try:
        run(requests.handle("dyno.start", body))
    except errors.InvalidSpec as exc:
        assert not valid and exc.field
        assert sup.specs == {}
        return
    except (errors.Conflict, errors.NotFound):
        assert valid
        return
    assert valid and body["id"] in sup.specs


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["ok", "dup-id", "dup-name", "bad-size", "no-id", "junk"]),
                max_size=5), st.integers(-3, 5) | values)
def test_sync_is_all_or_nothing(kinds: list[str], generation: Any) -> None:
    sup, requests = make()
    dynos: list[Any] = []
    for n, kind in enumerate(kinds):
        body = spec(f"s{n + 1}")
        if kind == "dup-id" and dynos:
            body["id"] = "s1"
        elif kind == "dup-name" and dynos:
            body["name"] = "worker.1"
        elif kind == "bad-size":
            body["size"] = "huge"
        elif kind == "no-id":
            body.pop("id")
        elif kind == "junk":
            body = "junk"  # type: ignore[assignment]
        dynos.append(body)
    valid_generation = (isinstance(generation, int) and not isinstance(generation, bool)
                        and 0 <= generation <= 2**63 - 1)
    try:
        report = run(requests.handle("dynos.sync", {"generation": generation, "dynos": dynos}))
    except (errors.InvalidSpec, errors.BadRequest):
        assert sup.specs == {}
        assert not valid_generation or any(k != "ok" for k in kinds[1:]) or (
            kinds and kinds[0] in ("bad-size", "no-id", "junk"))
        return
    assert valid_generation
    assert report["started"] == sorted(sup.specs)


async def test_handlers_on_the_supervisor_vocabulary() -> None:
    sup, requests = make()
    report = await requests.handle("dynos.sync", {"generation": 1, "dynos": [spec("a1")]})
    assert report["started"] == ["a1"]
    assert (await requests.handle("dyno.stop", {"id": "a1"}))["state"] == "down"
    assert (await requests.handle("dyno.restart", {"id": "a1"}))["state"] == "up"
    out = await requests.handle("dyno.signal", {"id": "a1", "signal": int(signal.SIGUSR1)})
    assert out["signalled"] == 1 and sup.signals == [("a1", str(int(signal.SIGUSR1)))]
    with pytest.raises(errors.BadRequest):
        await requests.handle("dyno.signal", {"id": "a1", "signal": "SIGNOPE"})
    with pytest.raises(errors.BadRequest):
        await requests.handle("dyno.stop", {"id": "web.1"})  # names are not ids
    with pytest.raises(errors.NotFound):
        await requests.handle("dyno.restart", {"id": "zz"})
    drained = await requests.handle("agent.drain", {"stop": True})
    assert drained["draining"] is True and drained["stopped"] == ["a1"]
    with pytest.raises(errors.Draining):
        await requests.handle("dyno.start", spec("b2"))
    with pytest.raises(errors.BadRequest):
        await requests.handle("agent.drain", {"stop": True, "cancel": True})
    assert (await requests.handle("agent.drain", {"cancel": True}))["draining"] is False
    assert await requests.handle("agent.info", {}) == {"version": "0.1.0"}
    with pytest.raises(errors.BadRequest) as caught:
        await requests.handle("agent.info", {"verbose": True})
    assert "verbose" in caught.value.message
    older = await requests.handle("dynos.sync", {"generation": 0, "dynos": []})
    assert older["ignored"] is True and sup.specs
