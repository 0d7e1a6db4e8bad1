"""The coordinator link against the test coordinator on a Unix socket: hello, auth,
buffered in-order events, heartbeats, metrics, reconnects, and hostile frames."""

from __future__ import annotations

import itertools
import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import pytest

from agent import errors
from agent.coordinator.frames import decode, encode
from agent.coordinator.link import CoordinatorLink, LinkState, backoff_delay
from agent.supervision.states import DynoState, Reason, StateChange
from tests.support.coordinator import TestCoordinator, pack, unix_listener
from tests.support.wait import async_wait_for

URL = "ws://coordinator/v1/agents/connect"


def change(dyno_id: str, state: DynoState, previous: DynoState | None) -> StateChange:
    return StateChange(dyno_id, "demo", "web.1", state, previous, Reason.START, None,
                       datetime.now(UTC))


class Harness:
    def __init__(self, tmp_path: Path) -> None:
        self.path = tmp_path / "coord.sock"
        self.token_file = tmp_path / "token"
        self.token_file.write_text("test-token\n")
        self.coordinator = TestCoordinator()
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.links: list[CoordinatorLink] = []

    async def serve(self) -> None:
        self.path.unlink(missing_ok=True)
        await self.coordinator.start(unix_listener(self.path))

    async def handler(self, method: str, params: dict[str, Any]) -> Any:
        self.calls.append((method, params))
        if method == "boom":
            raise RuntimeError("handler bug")
        if method == "missing":
            raise errors.NotFound("no dyno x")
        return {"echo": params}

    def link(self, **kwargs: Any) -> CoordinatorLink:
        options: dict[str, Any] = {
            "token_file": self.token_file, "heartbeat_interval_s": 0.2,
            "metrics_interval_s": 0.3, "backoff_min_s": 0.05, "backoff_max_s": 0.2,
            "hello_timeout_s": 2.0, "rng": random.Random(7),
            "session_factory": lambda: aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=str(self.path))),
            **kwargs}
        link = CoordinatorLink(
            URL, self.handler,
            hello=lambda: {"agent_id": "a1", "protocol": 1, "dynos": [{"id": "d1"}]},
            metrics=lambda: [{"id": "d1", "memory_rss_bytes": 1}],
            heartbeat=lambda: {"dynos": 1}, **options)
        self.links.append(link)
        return link


@pytest.fixture
async def h(tmp_path: Path) -> AsyncIterator[Harness]:
    harness = Harness(tmp_path)
    try:
        yield harness
    finally:
        for link in harness.links:
            await link.close()
        await harness.coordinator.stop()


async def test_hello_with_token_subprotocol_and_dynos(h: Harness) -> None:
    await h.serve()
    link = h.link()
    link.start()
    conn = await h.coordinator.wait_connected()
    assert conn.hello == {"agent_id": "a1", "protocol": 1, "dynos": [{"id": "d1"}]}
    assert h.coordinator.subprotocols == ["dynoagent.v1"]
    first = h.coordinator.received[0].frame
    assert first["t"] == "req" and first["m"] == "hello"
    await async_wait_for(lambda: _true(link.state is LinkState.CONNECTED), 5)
    assert link.info()["state"] == "connected" and link.info()["connected_since"]


async def _true(value: bool) -> bool:
    return value


async def test_wrong_token_is_refused_and_retried_with_backoff(h: Harness) -> None:
    await h.serve()
    h.token_file.write_text("wrong\n")
    link = h.link()
    link.start()
    await h.coordinator.wait_until(lambda: h.coordinator.refused >= 3, 10, "3 refusals")
    await async_wait_for(lambda: _true(link.counters.connect_failures >= 3), 5)
    assert link.state is not LinkState.CONNECTED
    assert "401" in (link.last_error or "")
    h.token_file.write_text("test-token\n")  # rotated: read again on the next attempt
    await h.coordinator.wait_connected()


async def test_events_while_away_are_buffered_bounded_and_flushed_in_order(
        h: Harness) -> None:
    link = h.link(buffer_limit=5)
    link.start()
    for i in range(8):
        link.publish_state(change(f"d{i}", DynoState.UP, DynoState.STARTING))
    await async_wait_for(lambda: _true(link.counters.connect_failures >= 2), 5)
    assert link.buffered == 5 and link.counters.events_dropped == 3
    await h.serve()
    await h.coordinator.wait_until(lambda: len(h.coordinator.states()) == 5, 10, "flush")
    assert [s["id"] for s in h.coordinator.states()] == ["d3", "d4", "d5", "d6", "d7"]
    seqs = [s["seq"] for s in h.coordinator.states()]
    assert seqs == [4, 5, 6, 7, 8]
    lost = h.coordinator.events("agent.events_lost")
    assert len(lost) == 1 and lost[0].params["count"] == 3
    # The loss report comes before the flushed events.
    kinds = [r.method for r in h.coordinator.events() if r.method != "agent.heartbeat"
             and r.method != "dyno.metrics"]
    assert kinds[0] == "agent.events_lost"
    assert link.buffered == 0


async def test_live_events_keep_per_dyno_order(h: Harness) -> None:
    await h.serve()
    link = h.link()
    link.start()
    await h.coordinator.wait_connected()
    sequence = [(DynoState.STARTING, None), (DynoState.UP, DynoState.STARTING),
                (DynoState.CRASHED, DynoState.UP), (DynoState.STARTING, DynoState.CRASHED),
                (DynoState.UP, DynoState.STARTING)]
    for state, previous in sequence:
        link.publish_state(change("d1", state, previous))
    await h.coordinator.wait_until(lambda: len(h.coordinator.states("d1")) == 5, 5)
    assert [s["state"] for s in h.coordinator.states("d1")] == [
        "starting", "up", "crashed", "starting", "up"]
    event = h.coordinator.states("d1")[1]
    assert set(event) == {"id", "app", "name", "state", "previous", "reason",
                          "exit_status", "ip", "at", "seq"}


async def test_a_finished_build_is_an_event_in_order_with_the_state_changes(
        h: Harness) -> None:
    link = h.link()
    link.start()
    link.publish_state(change("d1", DynoState.STARTING, None))
    build = {"id": "b-1", "app": "demo", "status": "succeeded", "dyno": "build.1",
             "result": {"slug": {"path": "/s/slug.tgz", "sha256": "ab" * 32}}, "error": None}
    link.publish_build(build)
    link.publish_state(change("d1", DynoState.UP, DynoState.STARTING))
    await h.serve()  # buffered while away, like dyno.state
    await h.coordinator.wait_until(lambda: len(h.coordinator.states()) == 2, 10, "flush")
    kinds = [(r.method, r.params["seq"]) for r in h.coordinator.events()
             if r.method in ("dyno.state", "build.finished")]
    assert kinds == [("dyno.state", 1), ("build.finished", 2), ("dyno.state", 3)]
    [finished] = h.coordinator.events("build.finished")
    assert finished.params == {**build, "seq": 2}


async def test_heartbeats_and_metrics_are_periodic(h: Harness) -> None:
    await h.serve()
    link = h.link()
    link.start()
    await h.coordinator.wait_until(
        lambda: len(h.coordinator.events("agent.heartbeat")) >= 3
        and len(h.coordinator.events("dyno.metrics")) >= 2, 10, "heartbeats and metrics")
    beat = h.coordinator.events("agent.heartbeat")[0].params
    assert beat["dynos"] == 1 and beat["at"].endswith("+00:00")
    metrics = h.coordinator.events("dyno.metrics")[0].params
    assert metrics["dynos"] == [{"id": "d1", "memory_rss_bytes": 1}]
    assert link.info()["last_heartbeat_at"] is not None
    beats = [r.at for r in h.coordinator.events("agent.heartbeat")]
    assert all(b - a >= 0.15 for a, b in itertools.pairwise(beats))


async def test_reconnects_and_says_hello_again_after_the_coordinator_returns(
        h: Harness) -> None:
    await h.serve()
    link = h.link()
    link.start()
    await h.coordinator.wait_connected()
    await h.coordinator.stop()
    await async_wait_for(lambda: _true(link.state is not LinkState.CONNECTED), 5)
    link.publish_state(change("d9", DynoState.UP, DynoState.STARTING))
    await h.serve()
    await h.coordinator.wait_until(lambda: len(h.coordinator.hellos) == 2, 10, "2nd hello")
    await h.coordinator.wait_until(lambda: h.coordinator.states("d9"), 5, "buffered event")
    assert link.counters.connects == 2
    # Frames of the second connection start with hello again.
    second = [r for r in h.coordinator.received if r.connection == 2]
    assert second[0].frame["m"] == "hello"


async def test_hello_refused_is_retried(h: Harness) -> None:
    h.coordinator.hello_error = {"code": "unsupported_protocol", "message": "want 2"}
    await h.serve()
    link = h.link()
    link.start()
    await h.coordinator.wait_until(lambda: len(h.coordinator.connections) >= 2, 10)
    assert link.state is not LinkState.CONNECTED
    assert "unsupported_protocol" in (link.last_error or "")
    h.coordinator.hello_error = None
    await h.coordinator.wait_connected()


async def test_several_urls_are_replicas_tried_in_turn(h: Harness, tmp_path: Path) -> None:
    """A follower that refuses (here: refuses hello) costs one attempt; the next URL leads."""
    follower = TestCoordinator(hello_error={"code": "not_leader", "message": "follow"})
    follower_path = tmp_path / "follower.sock"
    await follower.start(unix_listener(follower_path))
    await h.serve()
    urls = ["ws://follower/v1/agents/connect", "ws://leader/v1/agents/connect"]
    paths = {urls[0]: follower_path, urls[1]: h.path}
    holder: list[CoordinatorLink] = []
    link = h.link(session_factory=lambda: aiohttp.ClientSession(
        connector=aiohttp.UnixConnector(path=str(paths[holder[0].url]))))
    link = CoordinatorLink(urls, link.handler, link.hello, link.metrics,
                           token_file=h.token_file, backoff_min_s=0.05, backoff_max_s=0.2,
                           hello_timeout_s=2.0, session_factory=link.session_factory)
    h.links.append(link)
    holder.append(link)
    try:
        link.start()
        await h.coordinator.wait_connected()
        assert len(follower.connections) == 1, "the first URL was tried first, and only once"
        assert link.info()["url"] == urls[1] and link.info()["urls"] == urls
        # The leader goes away: the agent goes on to the other replica, which now leads.
        follower.hello_error = None
        await h.coordinator.stop()
        await follower.wait_connected()
        assert len(follower.connections) == 2
    finally:
        await follower.stop()


async def test_requests_are_answered_with_results_or_typed_errors(h: Harness) -> None:
    await h.serve()
    h.link().start()
    await h.coordinator.wait_connected()
    ok = await h.coordinator.request("agent.info", {"x": 1})
    assert ok["p"] == {"echo": {"x": 1}}
    missing = await h.coordinator.request("missing")
    assert missing["e"]["code"] == "not_found"
    boom = await h.coordinator.request("boom")
    assert boom["e"]["code"] == "internal" and "handler bug" in boom["e"]["message"]


@pytest.mark.parametrize(("raw", "code", "answers_id"), [
    ("text frame", "malformed_frame", None),
    (b"\xc1", "malformed_frame", None),
    (pack([1, 2, 3]), "malformed_frame", None),
    (pack({"t": "what", "id": 4}), "unknown_type", 4),
    (pack({"t": "req", "id": 5, "m": 7}), "malformed_frame", 5),
    (pack({"t": "req", "id": 6, "m": "agent.info", "p": [1]}), "malformed_frame", 6),
    (pack({"t": "req", "id": -1, "m": "agent.info"}), "malformed_frame", None),
    (pack({"t": "req", "id": 8, "m": "agent.info"}) + b"\x00", "malformed_frame", None),
    (b"\x82" + b"\x00" * 3, "malformed_frame", None),
])
async def test_hostile_frames_get_an_error_and_the_link_survives(
        h: Harness, raw: bytes | str, code: str, answers_id: int | None) -> None:
    await h.serve()
    link = h.link()
    link.start()
    await h.coordinator.wait_connected()
    await h.coordinator.send_raw(raw)
    response = await h.coordinator.wait_response(answers_id)
    assert response["e"]["code"] == code
    assert link.counters.bad_frames == 1
    still = await h.coordinator.request("agent.info", {"after": True})
    assert still["p"] == {"echo": {"after": True}}
    assert len(h.coordinator.connections) == 1


async def test_oversized_frame_is_refused_without_decoding(h: Harness) -> None:
    await h.serve()
    link = h.link(max_frame_bytes=1024)
    link.start()
    await h.coordinator.wait_connected()
    await h.coordinator.send_raw(pack({"t": "req", "id": 3, "m": "dyno.start",
                                       "p": {"env": {"K": "v" * 5000}}}))
    response = await h.coordinator.wait_response(None)
    assert response["e"]["code"] == "frame_too_large"
    assert h.calls == []
    assert (await h.coordinator.request("agent.info"))["p"] == {"echo": {}}


async def test_close_goes_away_and_stops_reconnecting(h: Harness) -> None:
    await h.serve()
    link = h.link()
    link.start()
    conn = await h.coordinator.wait_connected()
    await link.close()
    await h.coordinator.wait_until(lambda: conn.closed, 5, "connection closed")
    assert conn.ws.close_code == 1001
    assert link.state is LinkState.CLOSED
    count = len(h.coordinator.connections)
    with pytest.raises(TimeoutError):
        await h.coordinator.wait_until(lambda: len(h.coordinator.connections) > count, 0.5)


def test_backoff_is_jittered_exponential_and_capped() -> None:
    rng = random.Random(1)
    for attempt in range(12):
        base = min(30.0, 0.5 * 2**attempt)
        delays = [backoff_delay(attempt, rng) for _ in range(50)]
        assert all(base / 2 <= d <= base for d in delays)
        assert len(set(delays)) > 40  # jittered, not lock-step
    assert backoff_delay(10_000, rng) <= 30.0


def test_encode_is_one_msgpack_map_per_frame() -> None:
    from agent.coordinator.frames import Event, Request, Response

    assert msgpack.unpackb(encode(Request(3, "hello", {"a": 1}))) == {
        "t": "req", "id": 3, "m": "hello", "p": {"a": 1}}
    assert msgpack.unpackb(encode(Response(3, error={"code": "x", "message": "y"}))) == {
        "t": "res", "id": 3, "e": {"code": "x", "message": "y"}}
    assert msgpack.unpackb(encode(Event("dyno.state", {}))) == {
        "t": "evt", "m": "dyno.state", "p": {}}
    frame = decode(encode(Response(9, {"ok": True})))
    assert frame == Response(9, {"ok": True}, None)



