"""Every decoder of outside input bounds nesting depth as it decodes (issue 19, item 1) and
the coordinator link's frame-size boundary is where docs/protocol.md §8 puts it (item 4)."""

from __future__ import annotations

import contextlib
import logging
import random
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import pytest
from aiohttp.test_utils import TestClient, TestServer

from agent import config, errors
from agent.api import attachwire
from agent.api.attach import _receive_request
from agent.api.server import build_app
from agent.coordinator.frames import HARD_FRAME_BYTES, FrameError, decode
from agent.coordinator.link import CoordinatorLink
from agent.decoding import MAX_DEPTH, TooDeep, check_depth, json_loads
from agent.holder.errors import ProtocolError
from agent.holder.protocol import FrameDecoder, encode
from tests.support.coordinator import TestCoordinator, pack, unix_listener
from tests.unit.agent.fakes import FakeBackend, accept_anything, as_root

# The issue's frame: a request whose `t` is an array nested 1,000 deep.
ISSUE_FRAME = b"\x84\xa2id\x01\xa1m\xaaagent.info\xa1p\x80\xa1t" + b"\x91" * 1000 + b"\xc0"


def nested(depth: int, leaf: Any = None) -> Any:
    value = leaf
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


def test_depth_is_counted_in_levels_of_maps_and_arrays() -> None:
    assert check_depth(nested(MAX_DEPTH)) == nested(MAX_DEPTH)
    assert check_depth("scalar") == "scalar"
    with pytest.raises(TooDeep):
        check_depth(nested(MAX_DEPTH + 1))
    # Deep in one branch of a wide document counts the same.
    with pytest.raises(TooDeep):
        check_depth({"a": [1, 2, {"b": nested(MAX_DEPTH)}], "c": None})


def test_json_thousands_deep_is_too_deep_not_a_recursion_error() -> None:
    for raw in ("[" * 100_000 + "]" * 100_000, '{"a":' * 5000 + "1" + "}" * 5000,
                "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1)):
        with pytest.raises(TooDeep):
            json_loads(raw)
    assert json_loads("[" * MAX_DEPTH + "]" * MAX_DEPTH) is not None


def test_the_issue_frame_is_answered_malformed_with_its_id() -> None:
    with pytest.raises(FrameError) as caught:
        decode(ISSUE_FRAME)
    assert (caught.value.code, caught.value.request_id) == ("malformed_frame", 1)
    assert "nested deeper than 32" in caught.value.message


def test_coordinator_frames_at_and_past_the_depth_bound() -> None:
    ok = {"t": "req", "id": 2, "m": "agent.info", "p": {"x": nested(MAX_DEPTH - 2)}}
    decode(msgpack.packb(ok))
    deep = {"t": "req", "id": 3, "m": "agent.info", "p": {"x": nested(MAX_DEPTH - 1)}}
    with pytest.raises(FrameError) as caught:
        decode(msgpack.packb(deep))
    assert (caught.value.code, caught.value.request_id) == ("malformed_frame", 3)
    # Beyond msgpack's own 1,024-level stack nothing is decoded: the id cannot be read.
    with pytest.raises(FrameError) as caught:
        decode(b"\x91" * 5000 + b"\xc0")
    assert (caught.value.code, caught.value.request_id) == ("malformed_frame", None)
    assert "nested deeper than 32" in caught.value.message


def test_holder_frames_past_the_depth_bound_are_a_protocol_error() -> None:
    decoder = FrameDecoder(1 << 20)
    decoder.feed(encode({"t": "req", "id": 1, "m": "ping", "p": nested(MAX_DEPTH - 2)}))
    assert len(decoder.messages()) == 1
    for body in (encode({"t": "req", "id": 1, "m": "ping", "p": nested(1000)}),
                 len(b"\x91" * 3000 + b"\xc0").to_bytes(4, "big") + b"\x91" * 3000 + b"\xc0"):
        decoder = FrameDecoder(1 << 20)
        decoder.feed(body)
        with pytest.raises(ProtocolError, match="nested deeper than 32"):
            decoder.messages()


def test_attach_control_frames_past_the_depth_bound_are_refused() -> None:
    with pytest.raises(attachwire.FrameError, match="nested deeper than 32"):
        attachwire.parse_control(b"[" * 5000 + b"]" * 5000)


async def test_attach_requests_past_the_depth_bound_are_a_bad_request() -> None:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    try:
        theirs.sendall(b'{"v": 2, "op": ' + b"[" * 3000 + b"]" * 3000 + b"}\n")
        with pytest.raises(errors.BadRequest, match="nested deeper than 32"):
            await _receive_request(ours)
    finally:
        ours.close()
        theirs.close()


def test_a_config_past_the_depth_bound_names_the_problem(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    for text in ("restart_schedule_s = " + "[" * 3000 + "]" * 3000 + "\n",
                 "[" + ".".join(["t"] * 100) + "]\nx = 1\n"):
        path.write_text(text)
        with pytest.raises(errors.ConfigError, match="nested deeper than 32"):
            config.load(path)


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 1000, 100_000])
async def test_api_bodies_past_the_depth_bound_are_a_bad_request(
        depth: int, caplog: pytest.LogCaptureFixture) -> None:
    body = '{"id":' + "[" * depth + "]" * depth + "}"
    async with TestClient(TestServer(build_app(FakeBackend(accept_anything),
                                                 peer_of=as_root))) as client:
        resp = await client.post("/v1/dynos", data=body)
        answer = await resp.json()
        assert resp.status == 400, answer
        assert answer["error"]["code"] == "bad_request"
        assert "nested deeper than 32" in answer["error"]["message"]
        ok = await client.post("/v1/dynos", data='{"id":' + "[" * 30 + "]" * 30 + "}")
        assert ok.status == 201
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


# -- the link, against the test coordinator -------------------------------------------------------
class _Link:
    def __init__(self, tmp_path: Path) -> None:
        self.path = tmp_path / "coord.sock"
        self.token_file = tmp_path / "token"
        self.token_file.write_text("test-token\n")
        self.coordinator = TestCoordinator()
        self.link: CoordinatorLink | None = None

    async def start(self) -> CoordinatorLink:
        await self.coordinator.start(unix_listener(self.path))

        async def handler(method: str, params: dict[str, Any]) -> Any:
            return {"echo": params}

        self.link = CoordinatorLink(
            "ws://coordinator/v1/agents/connect", handler,
            hello=lambda: {"agent_id": "a1", "protocol": 1, "dynos": []},
            metrics=lambda: [], token_file=self.token_file, heartbeat_interval_s=5.0,
            metrics_interval_s=5.0, backoff_min_s=0.05, backoff_max_s=0.2,
            rng=random.Random(7), session_factory=lambda: aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=str(self.path))))
        self.link.start()
        await self.coordinator.wait_connected()
        return self.link


@pytest.fixture
async def linked(tmp_path: Path) -> AsyncIterator[_Link]:
    harness = _Link(tmp_path)
    try:
        yield harness
    finally:
        if harness.link is not None:
            await harness.link.close()
        await harness.coordinator.stop()


async def test_the_issue_frame_gets_an_answer_and_the_session_survives(
        linked: _Link, caplog: pytest.LogCaptureFixture) -> None:
    link = await linked.start()
    await linked.coordinator.send_raw(ISSUE_FRAME)
    response = await linked.coordinator.wait_response(1)
    assert response["e"]["code"] == "malformed_frame"
    assert (await linked.coordinator.request("agent.info", {}))["p"] == {"echo": {}}
    assert len(linked.coordinator.connections) == 1
    assert link.counters.bad_frames == 1
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


def _frame_of(size: int) -> bytes:
    """A request frame of exactly `size` bytes (a bin payload padded to fit)."""
    head = pack({"t": "req", "id": 77, "m": "agent.info", "p": {"pad": b""}})
    pad = size - len(head) - 3  # bin 8 → bin 32: 3 more length bytes
    frame = pack({"t": "req", "id": 77, "m": "agent.info", "p": {"pad": b"\0" * pad}})
    assert len(frame) == size, len(frame)
    return frame


async def test_frames_up_to_32_mib_inclusive_get_frame_too_large_and_beyond_close_1009(
        linked: _Link) -> None:
    await linked.start()
    coordinator = linked.coordinator
    def answers() -> int:
        return len([r for r in coordinator.received if r.frame.get("t") == "res"])

    for size in (HARD_FRAME_BYTES - 1, HARD_FRAME_BYTES):
        answered = answers()
        await coordinator.send_raw(_frame_of(size))
        await coordinator.wait_until(lambda: answers() > answered,  # noqa: B023 (awaited at once)
                                     20, f"answer to {size}")
        assert coordinator.received[-1].frame["e"]["code"] == "frame_too_large"
        assert coordinator.received[-1].frame["id"] is None
    assert len(coordinator.connections) == 1 and not coordinator.connections[0].closed
    first = coordinator.connections[0]
    # The agent closes as soon as it reads the length: the rest may not be sent at all.
    with contextlib.suppress(ConnectionError):
        await coordinator.send_raw(_frame_of(HARD_FRAME_BYTES + 1))
    await coordinator.wait_until(lambda: first.closed, 20, "connection closed")
    assert first.ws.close_code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
    # The agent dials again.
    await coordinator.wait_until(lambda: len(coordinator.connections) == 2
                                 and coordinator.current is not None, 20, "reconnect")


def test_a_frame_of_millions_of_empty_arrays_is_refused_while_decoding() -> None:
    # 16 MB of 0x90 bytes took 1.2 GB and 4.5 s to decode before the value budget.
    inner = b"\xdd" + (99_999).to_bytes(4, "big") + b"\x90" * 99_999
    data = b"\xdd" + (160).to_bytes(4, "big") + inner * 160
    with pytest.raises(FrameError) as caught:
        decode(data, max_bytes=len(data))
    assert (caught.value.code, caught.value.request_id) == ("frame_too_large", None)
    assert "more than 2000000 values" in caught.value.message
    # One container past MAX_CONTAINER_LEN is refused before it is allocated.
    with pytest.raises(FrameError) as caught:
        decode(b"\xdd" + (1 << 24).to_bytes(4, "big") + b"\xc0" * (1 << 24), 1 << 25)
    assert caught.value.code == "frame_too_large"
    assert "more than 100000 entries in one array or map" in caught.value.message


def test_a_desired_set_of_10000_dynos_with_50_config_vars_each_decodes() -> None:
    spec = {"id": "x", "app": "demo", "name": "web.1", "command": "x" * 100,
            "env": {f"K{i}": "v" * 20 for i in range(50)},
            "release": {"version": 1, "slug": {"path": "/srv/x"}}}
    frame = msgpack.packb({"t": "req", "id": 5, "m": "dynos.sync", "p": {
        "generation": 1, "dynos": [dict(spec, id=str(i)) for i in range(10_000)]}})
    request = decode(frame)
    assert len(request.params["dynos"]) == 10_000  # type: ignore[union-attr]
