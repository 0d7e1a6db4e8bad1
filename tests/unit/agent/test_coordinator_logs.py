"""Log lines for the coordinator (docs/protocol.md §4 `logs.*`, §5 `log.line`, `log.lost`):
the tail and its params, following over a real link to the test coordinator (in order, until
unfollowed, ending with the connection, 64 at most), and a stalled reader that loses lines
instead of growing the agent's memory."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agent import errors
from agent.coordinator.frames import Event, Frame
from agent.coordinator.link import CoordinatorLink, LinkState
from agent.coordinator.logfeed import LogFeed
from agent.coordinator.requests import Requests
from agent.observability.logs import LogHub, LogLine
from agent.supervision.reconcile import Engine
from tests.support.coordinator import Received, TestCoordinator, unix_listener
from tests.support.wait import async_wait_for
from tests.unit.agent.fakes import FakeSupervisor

URL = "ws://coordinator/v1/agents/connect"
LINE_KEYS = {"at", "source", "app", "dyno", "id", "text", "line"}
T0 = datetime(2026, 12, 2, 20, 0, tzinfo=UTC)


def out(n: int, text: str, app: str = "demo", dyno: str = "web.1") -> LogLine:
    return LogLine.output(T0 + timedelta(seconds=n), app, dyno, text, f"{app}-{dyno[-1]}")


def requests_on(hub: LogHub, **feed: Any) -> tuple[LogFeed, Requests]:
    sup = FakeSupervisor()
    logs = LogFeed(hub, **feed)
    return logs, Requests(sup, Engine(sup), dict, logs=logs)


# -- logs.tail ------------------------------------------------------------------------------
async def test_tail_returns_the_last_lines_of_the_app_or_dyno_in_order() -> None:
    hub = LogHub()
    for n in range(5):
        hub.publish(out(n, f"w1-{n}"))
        hub.publish(out(n, f"w2-{n}", dyno="web.2"))
        hub.publish(out(n, f"x-{n}", app="other"))
    hub.publish(LogLine.agent(T0 + timedelta(seconds=9), "demo", "web.1", "Cycling",
                              "demo-1"))
    _, requests = requests_on(hub)

    lines = await requests.handle("logs.tail", {"app": "demo"})
    assert len(lines) == 11 and [line["text"] for line in lines][:3] == ["w1-0", "w2-0", "w1-1"]
    assert all(set(line) == LINE_KEYS and line["app"] == "demo" for line in lines)
    assert lines[-1] == {"at": "2026-12-02T20:00:09.000000+00:00", "source": "agent",
                         "app": "demo", "dyno": "web.1", "id": "demo-1", "text": "Cycling",
                         "line": "2026-12-02T20:00:09.000000+00:00 agent[web.1]: Cycling"}
    assert lines == [line.as_dict() for line in hub.tail("demo")]  # the operator API's JSON

    by_name = await requests.handle("logs.tail", {"app": "demo", "dyno": "web.2", "tail": 2})
    assert [line["text"] for line in by_name] == ["w2-3", "w2-4"]
    by_id = await requests.handle("logs.tail", {"app": "demo", "dyno": "demo-1", "tail": 3})
    assert [line["text"] for line in by_id] == ["w1-3", "w1-4", "Cycling"]
    assert await requests.handle("logs.tail", {"app": "nothing-here"}) == []


async def test_tail_is_in_time_order_even_when_lines_came_out_of_it() -> None:
    """Output is stamped when the holder read it and may reach the agent after the agent's
    own message of a moment later: a coordinator merging hosts needs each host sorted."""
    hub = LogHub()
    hub.publish(out(0, "first"))
    hub.publish(LogLine.agent(T0 + timedelta(seconds=2), "demo", "web.1", "State changed"))
    hub.publish(out(1, "read before, published after"))
    hub.publish(out(2, "same time as the message, published after it"))
    _, requests = requests_on(hub)
    lines = await requests.handle("logs.tail", {"app": "demo"})
    assert [line["text"] for line in lines] == [
        "first", "read before, published after", "State changed",
        "same time as the message, published after it"]


async def test_tail_defaults_to_100_lines() -> None:
    hub = LogHub()
    for n in range(150):
        hub.publish(out(n, f"l{n}"))
    _, requests = requests_on(hub)
    lines = await requests.handle("logs.tail", {"app": "demo"})
    assert [line["text"] for line in lines] == [f"l{n}" for n in range(50, 150)]


@pytest.mark.parametrize(("method", "params", "field"), [
    ("logs.tail", {}, "p.app"),
    ("logs.tail", {"app": 7}, "p.app"),
    ("logs.tail", {"app": "Demo!"}, "p.app"),
    ("logs.tail", {"app": "demo", "dyno": 1}, "p.dyno"),
    ("logs.tail", {"app": "demo", "dyno": "web 1"}, "p.dyno"),
    ("logs.tail", {"app": "demo", "tail": 0}, "p.tail"),
    ("logs.tail", {"app": "demo", "tail": 10_001}, "p.tail"),
    ("logs.tail", {"app": "demo", "tail": "5"}, "p.tail"),
    ("logs.tail", {"app": "demo", "tail": True}, "p.tail"),
    ("logs.tail", {"app": "demo", "follow": True}, "follow"),
    ("logs.follow", {"dyno": "web.1"}, "p.app"),
    ("logs.follow", {"app": "demo", "tail": -1}, "p.tail"),
    ("logs.follow", {"app": "demo", "subscription": 1}, "subscription"),
    ("logs.unfollow", {}, "p.subscription"),
    ("logs.unfollow", {"subscription": "1"}, "p.subscription"),
    ("logs.unfollow", {"subscription": 1, "app": "demo"}, "app"),
])
async def test_bad_params_are_refused_naming_the_field(method: str, params: dict[str, Any],
                                                       field: str) -> None:
    logs, requests = requests_on(LogHub())
    async with logs.connection(_never_called):
        with pytest.raises(errors.BadRequest) as caught:
            await requests.handle(method, params)
    assert caught.value.code == "bad_request" and field in caught.value.message


async def _never_called(frame: Frame) -> None:
    raise AssertionError(f"sent {frame}")


async def test_without_a_log_feed_the_methods_are_unknown() -> None:
    sup = FakeSupervisor()
    with pytest.raises(errors.BadRequest) as caught:
        await Requests(sup, Engine(sup), dict).handle("logs.tail", {"app": "demo"})
    assert caught.value.code == "unknown_method"


# -- a stalled reader -----------------------------------------------------------------------
class Stalled:
    """A send that takes one frame and then waits for the test to let it go on."""

    def __init__(self) -> None:
        self.sent: list[Event] = []
        self.permits = asyncio.Semaphore(0)

    async def send(self, frame: Frame) -> None:
        assert isinstance(frame, Event)
        self.sent.append(frame)
        await self.permits.acquire()

    def summary(self) -> list[str]:
        return [f"lost {e.params['count']}" if e.method == "log.lost" else e.params["text"]
                for e in self.sent]


async def test_a_stalled_reader_loses_lines_with_a_count_instead_of_growing_memory() -> None:
    hub = LogHub()
    logs, requests = requests_on(hub, max_queue=10)
    reader = Stalled()
    async with logs.connection(reader.send):
        sub = (await requests.handle("logs.follow", {"app": "demo"}))["subscription"]
        hub.publish(out(0, "l0"))
        await async_wait_for(lambda: _value(len(reader.sent) == 1), 5, what="l0 in flight")
        for n in range(1, 1001):  # the reader takes nothing meanwhile
            hub.publish(out(n, f"l{n}"))
            assert logs.queued <= 10
        assert hub.dropped == 990 and hub.published == 1001
        reader.permits.release()  # l0 done, l1 in flight: room for one line
        await async_wait_for(lambda: _value(len(reader.sent) == 2), 5, what="l1 in flight")
        hub.publish(out(1001, "after the gap"))  # told after the lines it missed
        assert logs.queued == 11
        for _ in range(20):
            reader.permits.release()
        await async_wait_for(lambda: _value(len(reader.sent) == 13), 5, what="drained")
        assert reader.summary() == [*(f"l{n}" for n in range(11)), "lost 990",
                                    "after the gap"]
        lost = reader.sent[11]
        assert lost.method == "log.lost" and set(lost.params) == {"subscription", "count", "at"}
        assert lost.params["subscription"] == sub

        # A gap with no line after it is reported once the queue has emptied.
        for n in range(12):
            hub.publish(out(2000 + n, f"m{n}"))
        for _ in range(20):
            reader.permits.release()
        await async_wait_for(lambda: _value(len(reader.sent) == 24), 5, what="second gap")
        assert reader.summary()[13:] == [*(f"m{n}" for n in range(10)), "lost 2"]
    assert hub.followers == 0 and logs.queued == 0


async def _value(value: bool) -> bool:
    return value


async def test_lines_queued_before_an_unfollow_are_not_sent() -> None:
    hub = LogHub()
    logs, requests = requests_on(hub)
    reader = Stalled()
    async with logs.connection(reader.send):
        first = (await requests.handle("logs.follow", {"app": "demo"}))["subscription"]
        hub.publish(out(0, "in flight"))
        await async_wait_for(lambda: _value(len(reader.sent) == 1), 5, what="in flight")
        hub.publish(out(1, "queued"))
        await requests.handle("logs.unfollow", {"subscription": first})
        await requests.handle("logs.follow", {"app": "demo"})
        hub.publish(out(2, "for the second"))
        for _ in range(3):
            reader.permits.release()
        await async_wait_for(lambda: _value(len(reader.sent) == 2), 5, what="2 lines")
    assert [(e.params["subscription"], e.params["text"]) for e in reader.sent] == [
        (first, "in flight"), (first + 1, "for the second")]


async def test_follow_with_tail_sends_the_kept_lines_first() -> None:
    hub = LogHub()
    for n in range(5):
        hub.publish(out(n, f"old{n}"))
    logs, requests = requests_on(hub)
    reader = Stalled()
    async with logs.connection(reader.send):
        await requests.handle("logs.follow", {"app": "demo", "tail": 2})
        hub.publish(out(9, "new"))
        for _ in range(3):
            reader.permits.release()
        await async_wait_for(lambda: _value(len(reader.sent) == 3), 5, what="3 lines")
    assert reader.summary() == ["old3", "old4", "new"]


# -- over the link --------------------------------------------------------------------------
class Harness:
    def __init__(self, tmp_path: Path) -> None:
        self.path = tmp_path / "coord.sock"
        self.token_file = tmp_path / "token"
        self.token_file.write_text("test-token\n")
        self.coordinator = TestCoordinator()
        self.hub = LogHub()
        self.logs, self.requests = requests_on(self.hub)
        self.link = CoordinatorLink(
            URL, self.requests.handle, hello=lambda: {"agent_id": "a1", "protocol": 1},
            metrics=list, token_file=self.token_file, heartbeat_interval_s=5,
            metrics_interval_s=5, backoff_min_s=0.05, backoff_max_s=0.2, hello_timeout_s=2.0,
            rng=random.Random(3), connection_scope=self.logs.connection,
            session_factory=lambda: aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=str(self.path))))

    async def serve(self) -> None:
        self.path.unlink(missing_ok=True)
        await self.coordinator.start(unix_listener(self.path))

    async def ask(self, method: str, params: dict[str, Any]) -> Any:
        response = await self.coordinator.request(method, params, timeout_s=10)
        assert "p" in response, response
        return response["p"]

    def lines(self, connection: int = 1) -> list[Received]:
        return [r for r in self.coordinator.events("log.line") if r.connection == connection]

    async def wait_lines(self, count: int, connection: int = 1) -> list[dict[str, Any]]:
        await self.coordinator.wait_until(lambda: len(self.lines(connection)) >= count, 10,
                                          f"{count} log lines")
        return [r.params for r in self.lines(connection)]


@pytest.fixture
async def h(tmp_path: Path) -> AsyncIterator[Harness]:
    harness = Harness(tmp_path)
    await harness.serve()
    harness.link.start()
    await harness.coordinator.wait_connected()
    try:
        yield harness
    finally:
        await harness.link.close()
        await harness.coordinator.stop()


async def test_follow_streams_new_lines_in_order_until_unfollowed(h: Harness) -> None:
    h.hub.publish(out(0, "before the follow"))
    sub = (await h.ask("logs.follow", {"app": "demo", "dyno": "web.1"}))["subscription"]
    assert sub == 1
    for n in range(1, 51):
        h.hub.publish(out(n, f"line {n}"))
        h.hub.publish(out(n, f"other dyno {n}", dyno="web.2"))
        h.hub.publish(out(n, f"other app {n}", app="other"))
    got = await h.wait_lines(50)
    assert [p["text"] for p in got] == [f"line {n}" for n in range(1, 51)]
    assert got[0] == {"subscription": sub, **out(1, "line 1").as_dict()}
    assert set(got[0]) == {"subscription", *LINE_KEYS}

    assert await h.ask("logs.unfollow", {"subscription": sub}) == {
        "subscription": sub, "unfollowed": True}
    h.hub.publish(out(60, "after the unfollow"))
    # A later subscription's line comes after anything the first one could still send.
    other = (await h.ask("logs.follow", {"app": "other"}))["subscription"]
    h.hub.publish(out(61, "after the unfollow too"))
    h.hub.publish(out(62, "marker", app="other"))
    got = await h.wait_lines(51)
    assert [(p["subscription"], p["text"]) for p in got[50:]] == [(other, "marker")]
    assert await h.ask("logs.unfollow", {"subscription": sub}) == {
        "subscription": sub, "unfollowed": False}
    assert h.hub.followers == 1


async def test_subscriptions_end_with_the_connection(h: Harness) -> None:
    for _ in range(3):
        await h.ask("logs.follow", {"app": "demo"})
    h.hub.publish(out(1, "seen"))
    await h.wait_lines(3)
    assert h.hub.followers == 3
    await h.coordinator.stop()
    await async_wait_for(lambda: _value(h.link.state is not LinkState.CONNECTED), 5)
    await async_wait_for(lambda: _value(h.hub.followers == 0), 5, what="subscriptions gone")
    h.hub.publish(out(2, "while away"))
    assert h.logs.queued == 0
    with pytest.raises(errors.NotReady):
        h.logs.follow("demo", None)

    await h.serve()
    await h.coordinator.wait_until(lambda: len(h.coordinator.hellos) == 2, 10, "2nd hello")
    assert await h.ask("logs.unfollow", {"subscription": 1}) == {
        "subscription": 1, "unfollowed": False}
    sub = (await h.ask("logs.follow", {"app": "demo"}))["subscription"]
    h.hub.publish(out(3, "on the new connection"))
    got = await h.wait_lines(1, connection=2)
    assert [(p["subscription"], p["text"]) for p in got] == [(sub, "on the new connection")]
    assert h.hub.followers == 1


async def test_a_connection_holds_at_most_64_subscriptions(h: Harness) -> None:
    numbers = [(await h.ask("logs.follow", {"app": "demo"}))["subscription"]
               for _ in range(64)]
    assert numbers == list(range(1, 65))
    refused = await h.coordinator.request("logs.follow", {"app": "demo"})
    assert refused["e"]["code"] == "busy" and "64" in refused["e"]["message"]
    assert h.hub.followers == 64
    await h.ask("logs.unfollow", {"subscription": 7})
    assert (await h.ask("logs.follow", {"app": "demo"}))["subscription"] == 65
