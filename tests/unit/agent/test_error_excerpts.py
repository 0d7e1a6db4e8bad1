"""Error answers and log lines quote a bounded, escaped excerpt of what they reject (issue 19,
item 3: a 15 MiB `app` of NULs got a 62.9 MB answer and a 78.6 MB log line)."""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from agent import errors
from agent.api.server import build_app
from agent.config import from_mapping
from agent.coordinator.link import CoordinatorLink
from agent.coordinator.requests import Requests
from agent.errors import EXCERPT_CHARS, MESSAGE_MAX_CHARS, excerpt
from agent.spec import SpecError, parse_spec
from agent.supervision.reconcile import Engine
from tests.support.coordinator import TestCoordinator, pack, unix_listener
from tests.unit.agent.fakes import FakeBackend, FakeSupervisor, as_root, parse_strictly

HUGE = 15 << 20
# "A few KiB": what any answer or log line about one rejected value may weigh.
FEW_KIB = 4096


def spec(**overrides: Any) -> dict[str, Any]:
    return {"id": "d1", "app": "demo", "name": "web.1", "command": "sleep 1",
            "release": {"version": 1, "slug": {"path": "/srv/s"}}, **overrides}


def test_excerpt_is_escaped_bounded_and_says_how_long_the_value_was() -> None:
    shown = excerpt("\0" * HUGE)
    assert shown.startswith("'\\x00") and shown.endswith(f"…' ({HUGE} characters)")
    assert len(shown) <= EXCERPT_CHARS + 40
    assert excerpt("web\n1") == "'web\\n1'"
    assert len(excerpt("\U0001f600" * 1000)) <= EXCERPT_CHARS + 40
    assert excerpt(b"\xff" * 1000).endswith("(1000 bytes)")
    assert excerpt(10 ** 5000) == "an integer of 16610 bits"  # str() would refuse it
    deep: Any = None
    for _ in range(100_000):
        deep = [deep]
    assert excerpt(deep) == "an array of 1 item"  # never walked, never recursed
    assert excerpt({"k": 1}) == "a map of 1 key"


def test_an_agent_error_message_is_bounded_whatever_built_it() -> None:
    message = errors.BadRequest("x" * HUGE).message
    assert len(message) <= MESSAGE_MAX_CHARS + 40


@pytest.mark.parametrize("body", [
    spec(app="\0" * HUGE),
    spec(name="\0" * HUGE),
    spec(id="\0" * HUGE),
    spec(restart="\0" * HUGE),
    spec(size="\0" * HUGE),
    spec(**{"\0" * HUGE: 1}),
    spec(env={"\0" * HUGE: "v"}),
    spec(release={"version": 1, "slug": {"path": "rel" + "\0" * HUGE}}),
    spec(release={"version": 1, "slug": {"path": "/" + "a" * HUGE}}),
    spec(release={"version": 1, "slug": {"url": "ftp://" + "a" * HUGE, "sha256": "0" * 64}}),
    spec(release={"version": 1, "slug": {"path": "/s", "\0" * HUGE: 1}}),
    spec(release={"version": 10 ** 4000, "slug": {"path": "/s"}}),
])
def test_spec_errors_quote_a_bounded_excerpt(body: dict[str, Any]) -> None:
    with pytest.raises(SpecError) as caught:
        parse_spec(body)
    assert len(str(caught.value)) < 1024, len(str(caught.value))
    assert len(caught.value.field) <= 80


def test_config_errors_quote_a_bounded_excerpt() -> None:
    for data in ({"log_level": "\0" * HUGE}, {"state_dir": "rel" * HUGE},
                 {"coordinator_url": "http" * HUGE}, {"restart_schedule_s": ["x"] * HUGE},
                 {"\0" * HUGE: 1}):
        with pytest.raises(errors.ConfigError) as caught:
            from_mapping(data)
        assert len(str(caught.value)) < FEW_KIB


async def test_api_answers_quote_a_bounded_excerpt() -> None:
    # The API takes bodies up to 1 MiB: the largest app of control characters that fits.
    body = json.dumps(spec(app="\x01" * 150_000))
    async with TestClient(TestServer(build_app(FakeBackend(parse_strictly),
                                                 peer_of=as_root))) as client:
        for path, data in (("/v1/dynos", body),
                           ("/v1/dynos/web.1/signal", json.dumps({"signal": "\0" * 150_000})),
                           ("/v1/dynos/web.1/signal", json.dumps({"\0" * 150_000: 1}))):
            resp = await client.post(path, data=data)
            raw = await resp.read()
            assert resp.status == 400
            assert len(raw) < FEW_KIB, len(raw)
        resp = await client.get("/v1/logs", params={"tail": "9" * 500_000})
        assert resp.status == 400 and len(await resp.read()) < FEW_KIB


# -- the coordinator link: the answer frame and the log line ----------------------------------
@pytest.fixture
async def link_with_requests(tmp_path: Path) -> AsyncIterator[TestCoordinator]:
    path = tmp_path / "coord.sock"
    token = tmp_path / "token"
    token.write_text("test-token\n")
    coordinator = TestCoordinator()
    await coordinator.start(unix_listener(path))
    sup = FakeSupervisor()
    requests = Requests(sup, Engine(sup), lambda: {"version": "test"})
    link = CoordinatorLink(
        "ws://coordinator/v1/agents/connect", requests.handle,
        hello=lambda: {"agent_id": "a1", "protocol": 1, "dynos": []}, metrics=lambda: [],
        token_file=token, heartbeat_interval_s=5.0, metrics_interval_s=5.0,
        backoff_min_s=0.05, backoff_max_s=0.2, rng=random.Random(7),
        session_factory=lambda: aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=str(path))))
    link.start()
    try:
        await coordinator.wait_connected()
        yield coordinator
    finally:
        await link.close()
        await coordinator.stop()


async def test_a_15_mib_app_gets_a_small_answer_and_a_small_log_line(
        link_with_requests: TestCoordinator, caplog: pytest.LogCaptureFixture) -> None:
    coordinator = link_with_requests
    caplog.set_level(logging.DEBUG, logger="agent")
    await coordinator.send_raw(pack({"t": "req", "id": 10, "m": "dyno.start", "p": spec()}))
    assert "p" in await coordinator.wait_response(10)
    hostile = [
        (11, "dyno.start", spec(app="\0" * HUGE), "invalid_spec"),
        (12, "dynos.sync", {"generation": 1, "dynos": [spec(env={"\0" * HUGE: "v"})]},
         "invalid_spec"),
        (13, "dyno.stop", {"id": "\0" * HUGE}, "bad_request"),
        (14, "dyno.signal", {"id": "d1", "signal": "\0" * HUGE}, "bad_request"),
        (15, "agent.info", {"\0" * HUGE: 1}, "bad_request"),
        (16, "x" * 128, {}, "unknown_method"),
    ]
    for request_id, method, params, _code in hostile:
        await coordinator.send_raw(pack({"t": "req", "id": request_id, "m": method,
                                         "p": params}))
    for request_id, _method, _params, code in hostile:
        answer = await coordinator.wait_response(request_id, timeout_s=30)
        assert answer["e"]["code"] == code, answer
        assert len(pack(answer)) < FEW_KIB, (request_id, len(pack(answer)))
    lines = [record.getMessage() for record in caplog.records if record.name.startswith("agent")]
    assert lines
    assert max(len(line) for line in lines) < FEW_KIB


async def test_a_coordinator_refusal_of_15_mib_stays_out_of_the_log_and_last_error(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "coord.sock"
    token = tmp_path / "token"
    token.write_text("test-token\n")
    coordinator = TestCoordinator(hello_error={"code": "c" * 5000, "message": "\0" * HUGE})
    await coordinator.start(unix_listener(path))
    caplog.set_level(logging.DEBUG, logger="agent")
    link = CoordinatorLink(
        "ws://coordinator/v1/agents/connect", lambda _m, _p: asyncio.sleep(0),
        hello=lambda: {"agent_id": "a1", "protocol": 1, "dynos": []}, metrics=lambda: [],
        token_file=token, backoff_min_s=0.05, backoff_max_s=0.2, rng=random.Random(7),
        session_factory=lambda: aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=str(path))))
    link.start()
    try:
        await coordinator.wait_until(lambda: link.last_error, 10, "a refused hello")
        assert len(link.last_error or "") < FEW_KIB
        assert max(len(r.getMessage()) for r in caplog.records) < FEW_KIB
    finally:
        await link.close()
        await coordinator.stop()
