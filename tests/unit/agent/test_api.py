"""Operator API routes (DESIGN §7) against a FakeBackend (tests/unit/agent/fakes.py): status
codes, the error shape, query validation, log and event streaming, metrics."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from agent.api.server import Backend, build_app, signal_name
from agent.errors import AgentError, BadRequest
from agent.observability.logs import LineBlock, LogLine, LogSource
from agent.supervision.states import DynoState, Reason, StateChange
from tests.support.wait import async_wait_for
from tests.unit.agent.fakes import T0, FakeBackend, as_root, sample_backend

Client = TestClient[Any, Any]


def line(app: str, dyno: str, text: str, seconds: int = 0) -> LogLine:
    return LogLine.output(T0 + timedelta(seconds=seconds), app, dyno, text)


@pytest.fixture
def backend() -> FakeBackend:
    return sample_backend()


@pytest.fixture
async def client(backend: FakeBackend) -> AsyncIterator[Client]:
    async with TestClient(TestServer(build_app(backend, peer_of=as_root))) as c:
        yield c


async def error_of(resp: Any, status: int) -> str:
    assert resp.status == status, await resp.text()
    body = await resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    assert body["error"]["message"]
    code: str = body["error"]["code"]
    return code


def test_fake_backend_satisfies_the_protocol() -> None:
    backend: Backend = FakeBackend()  # mypy checks the structural match
    assert backend.list_dynos() == []


# -- dynos ------------------------------------------------------------------------------------

async def test_list_all_and_by_app(client: Client) -> None:
    resp = await client.get("/v1/dynos")
    assert resp.status == 200
    assert sorted(d["id"] for d in await resp.json()) == ["a1", "a2", "a3", "b1"]
    resp = await client.get("/v1/dynos", params={"app": "blog"})
    assert [d["id"] for d in await resp.json()] == ["b1"]
    resp = await client.get("/v1/dynos?app=")  # empty = any app
    assert len(await resp.json()) == 4


@pytest.mark.parametrize("path", ["/v1/dynos?apps=shop", "/v1/dynos?app=a&app=b",
                                  "/v1/dynos/a1?x=1", "/v1/info?verbose=1", "/metrics?x=1"])
async def test_bad_query_is_bad_request(client: Client, path: str) -> None:
    assert await error_of(await client.get(path), 400) == "bad_request"


async def test_create_returns_201_and_status(client: Client, backend: FakeBackend) -> None:
    spec = {"id": "n1", "app": "shop", "name": "web.3", "command": "sleep 1"}
    resp = await client.post("/v1/dynos", json=spec)
    assert resp.status == 201
    status = await resp.json()
    assert (status["id"], status["name"], status["state"]) == ("n1", "web.3", "starting")
    assert ("create", "n1") in backend.calls


@pytest.mark.parametrize("body", [b"{not json", b"", b"   ", b"[1, 2]", b'"web"', b"\xff\xfe"])
async def test_create_bad_body_is_bad_request(client: Client, backend: FakeBackend,
                                              body: bytes) -> None:
    resp = await client.post("/v1/dynos", data=body,
                             headers={"Content-Type": "application/json"})
    assert await error_of(resp, 400) == "bad_request"
    assert not [c for c in backend.calls if c[0] == "create"]


async def test_create_invalid_spec_and_conflict(client: Client) -> None:
    resp = await client.post("/v1/dynos", json={"app": "shop", "name": "web.9"})
    assert await error_of(resp, 400) == "invalid_spec"
    resp = await client.post("/v1/dynos", json={"id": "a1", "app": "shop", "name": "web.1",
                                                "command": "x"})
    assert await error_of(resp, 409) == "conflict"


async def test_create_survives_client_going_away(client: Client, backend: FakeBackend,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    backend.gate = asyncio.Event()
    request = asyncio.ensure_future(client.post("/v1/dynos", json={
        "id": "late", "app": "shop", "name": "web.5", "command": "sleep 1"}))
    await async_wait_for(_async(lambda: backend.gated == 1), 5, what="create in progress")
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request
    assert client.server.runner is not None and client.server.runner.server is not None
    server = client.server.runner.server
    # The server forgets a connection only when its handler task is over: with create_dyno
    # still held at the gate, that means the disconnect cancelled the handler.
    await async_wait_for(_async(lambda: not server.connections), 5, what="handler cancelled")
    with caplog.at_level("INFO", logger="agent.api.server"):
        backend.gate.set()
        await async_wait_for(_async(lambda: "late" in backend.dynos), 5, what="create done")
        await async_wait_for(_async(lambda: "finished after its client went away"
                                    in caplog.text), 5)


def _async(predicate: Any) -> Any:
    async def check() -> Any:
        return predicate()
    return check


async def test_get_by_id_and_name(client: Client) -> None:
    resp = await client.get("/v1/dynos/a3")
    assert resp.status == 200
    detail = await resp.json()
    for key in ("spec", "cgroup", "netns", "limits", "stats", "timings_ms"):
        assert key in detail
    resp = await client.get("/v1/dynos/worker.1")
    assert (await resp.json())["id"] == "a3"


async def test_get_ambiguous_name_needs_app(client: Client) -> None:
    assert await error_of(await client.get("/v1/dynos/web.1"), 409) == "conflict"
    resp = await client.get("/v1/dynos/web.1", params={"app": "blog"})
    assert (await resp.json())["id"] == "b1"


async def test_get_unknown_and_malformed(client: Client) -> None:
    assert await error_of(await client.get("/v1/dynos/zz9"), 404) == "not_found"
    assert await error_of(await client.get("/v1/dynos/Web%201"), 400) == "bad_request"


@pytest.mark.parametrize(("verb", "state"), [("restart", "starting"), ("stop", "down")])
async def test_lifecycle(client: Client, backend: FakeBackend, verb: str, state: str) -> None:
    resp = await client.post(f"/v1/dynos/web.2/{verb}", params={"app": "shop"})
    assert resp.status == 200
    assert (await resp.json())["state"] == state
    assert backend.calls == [(verb, "a2")]
    assert await error_of(await client.post(f"/v1/dynos/nope/{verb}"), 404) == "not_found"
    assert await error_of(await client.get(f"/v1/dynos/a2/{verb}"), 405) == "method_not_allowed"


@pytest.mark.parametrize(("given", "sent"), [("TERM", "SIGTERM"), ("sigusr1", "SIGUSR1"),
                                             (9, "SIGKILL"), ("15", "SIGTERM")])
async def test_signal(client: Client, backend: FakeBackend, given: Any, sent: str) -> None:
    resp = await client.post("/v1/dynos/a1/signal", json={"signal": given})
    assert resp.status == 200
    assert backend.calls == [("signal", "a1", sent)]


@pytest.mark.parametrize("body", [{"signal": "BOGUS"}, {}, {"signal": "TERM", "x": 1},
                                  {"signal": True}, {"signal": 999}, {"signal": None}])
async def test_signal_bad_body(client: Client, backend: FakeBackend, body: Any) -> None:
    resp = await client.post("/v1/dynos/a1/signal", json=body)
    assert await error_of(resp, 400) == "bad_request"
    assert backend.calls == []


def test_signal_name() -> None:
    assert signal_name("hup") == "SIGHUP"
    with pytest.raises(BadRequest):
        signal_name("SIG")


async def test_delete(client: Client, backend: FakeBackend) -> None:
    resp = await client.delete("/v1/dynos/a3")
    assert resp.status == 204
    assert await resp.read() == b""
    assert "a3" not in backend.dynos
    assert await error_of(await client.delete("/v1/dynos/a3"), 404) == "not_found"


async def test_backend_internal_error_is_500(client: Client, backend: FakeBackend,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(app: str | None = None) -> list[dict[str, Any]]:
        raise AgentError("record store unreadable")
    monkeypatch.setattr(backend, "list_dynos", broken)
    assert await error_of(await client.get("/v1/dynos"), 500) == "internal"


async def test_backend_bug_is_json_500_and_logged(client: Client, backend: FakeBackend,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    def broken(ref: str, app: str | None = None) -> dict[str, Any]:
        raise KeyError("state")
    monkeypatch.setattr(backend, "get_dyno", broken)
    with caplog.at_level("ERROR", logger="agent.api.server"):
        assert await error_of(await client.get("/v1/dynos/a1"), 500) == "internal"
    assert "GET /v1/dynos/a1 failed" in caplog.text and "KeyError" in caplog.text


async def test_oversized_body_is_bad_request(client: Client) -> None:
    resp = await client.post("/v1/dynos", data=io.BytesIO(b"x" * (2 * 1024 * 1024)),
                             headers={"Content-Type": "application/json"})
    assert await error_of(resp, 400) == "bad_request"


async def test_no_head_on_streams(client: Client) -> None:
    resp = await client.head("/v1/logs?follow=1")
    assert resp.status == 405


# -- logs -------------------------------------------------------------------------------------

async def test_logs_default_tail_is_100(client: Client, backend: FakeBackend) -> None:
    for i in range(150):
        backend.hub.publish(line("shop", "web.1", f"line {i}", i))
    resp = await client.get("/v1/logs")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain")
    lines = (await resp.text()).splitlines()
    assert len(lines) == 100
    assert lines[0] == "2026-11-26T10:00:50.000000+00:00 app[web.1]: line 50"
    assert lines[-1].endswith("app[web.1]: line 149")


async def test_logs_filters_and_json(client: Client, backend: FakeBackend) -> None:
    backend.hub.publish(line("shop", "web.1", "one"))
    backend.hub.publish(line("shop", "worker.1", "two"))
    backend.hub.publish(LogLine.agent(T0, "blog", "web.1", "State changed from starting to up"))
    resp = await client.get("/v1/logs", params={"app": "shop", "dyno": "worker.1"})
    assert (await resp.text()).splitlines() == [
        "2026-11-26T10:00:00.000000+00:00 app[worker.1]: two"]
    resp = await client.get("/v1/logs", params={"tail": "2", "format": "json"})
    items = [json.loads(x) for x in (await resp.text()).splitlines()]
    assert [(i["app"], i["source"], i["text"]) for i in items] == [
        ("shop", "app", "two"), ("blog", "agent", "State changed from starting to up")]
    resp = await client.get("/v1/logs", params={"tail": "0"})
    assert await resp.text() == ""


@pytest.mark.parametrize("query", ["tail=-1", "tail=abc", "tail=100001", "follow=maybe",
                                   "format=xml", "lines=5"])
async def test_logs_bad_parameters(client: Client, query: str) -> None:
    assert await error_of(await client.get(f"/v1/logs?{query}"), 400) == "bad_request"


async def read_lines(resp: Any, n: int, timeout_s: float = 5.0) -> list[str]:
    out: list[str] = []
    for _ in range(n):
        raw = await asyncio.wait_for(resp.content.readline(), timeout_s)
        assert raw, f"stream ended after {out}"
        out.append(raw.decode().rstrip("\n"))
    return out


async def test_follow_delivers_lines_published_after_connect(client: Client,
                                                             backend: FakeBackend) -> None:
    backend.hub.publish(line("shop", "web.1", "old"))
    resp = await client.get("/v1/logs", params={"follow": "1", "app": "shop"})
    assert resp.status == 200
    await async_wait_for(_async(lambda: backend.hub.followers == 1), 5)
    backend.hub.publish(line("blog", "web.1", "other app"))
    backend.hub.publish(line("shop", "web.1", "new 1", 1))
    backend.hub.publish(line("shop", "web.2", "new 2", 2))
    assert await read_lines(resp, 2) == [
        "2026-11-26T10:00:01.000000+00:00 app[web.1]: new 1",
        "2026-11-26T10:00:02.000000+00:00 app[web.2]: new 2"]
    resp.close()


async def test_follow_with_tail_then_a_backlog_in_order(client: Client,
                                                        backend: FakeBackend) -> None:
    for i in range(3):
        backend.hub.publish(line("shop", "web.1", f"old {i}"))
    resp = await client.get("/v1/logs", params={"follow": "1", "tail": "2", "format": "json"})
    await async_wait_for(_async(lambda: backend.hub.followers == 1), 5)
    for i in range(2000):  # several batches' worth, queued before the handler writes them
        backend.hub.publish(line("shop", "web.1", f"new {i}"))
    got = [json.loads(x)["text"] for x in await read_lines(resp, 2002)]
    assert got == ["old 1", "old 2"] + [f"new {i}" for i in range(2000)]
    resp.close()


@pytest.mark.parametrize("fmt", ["text", "json"])
async def test_follow_writes_blocks_as_their_lines(client: Client, backend: FakeBackend,
                                                   fmt: str) -> None:
    resp = await client.get("/v1/logs", params={"follow": "1", "app": "shop", "format": fmt})
    await async_wait_for(_async(lambda: backend.hub.followers == 1), 5)
    texts = [f"block {i}" for i in range(20_000)] + ['é "q"\t', ""]
    first = line("shop", "web.1", "alone", 1)
    block = LineBlock(first.at, LogSource.APP, "web.1", "shop", texts, "d-1")
    backend.hub.publish(first)
    backend.hub.publish_block(block)
    backend.hub.publish(line("shop", "web.2", "after", 2))
    got = await read_lines(resp, len(texts) + 2)
    expected = [first, *block.lines(), line("shop", "web.2", "after", 2)]
    if fmt == "json":
        assert [json.loads(raw) for raw in got] == [x.as_dict() for x in expected]
    else:
        assert got == [x.format() for x in expected]
    resp.close()


async def test_client_disconnect_closes_the_follower(client: Client,
                                                     backend: FakeBackend) -> None:
    resp = await client.get("/v1/logs", params={"follow": "1"})
    await async_wait_for(_async(lambda: backend.hub.followers == 1), 5)
    resp.close()
    await async_wait_for(_async(lambda: backend.hub.followers == 0), 5,
                         what="follower closed after disconnect")
    backend.hub.publish(line("shop", "web.1", "nobody listens"))  # must not raise


async def test_hub_close_ends_the_stream_cleanly(client: Client, backend: FakeBackend) -> None:
    resp = await client.get("/v1/logs", params={"follow": "1"})
    await async_wait_for(_async(lambda: backend.hub.followers == 1), 5)
    backend.hub.publish(line("shop", "web.1", "last words"))
    assert (await read_lines(resp, 1))[0].endswith("app[web.1]: last words")
    backend.hub.close()
    # A chunked body cut off without its last chunk raises ClientPayloadError here.
    assert await asyncio.wait_for(resp.read(), 5) == b""
    assert resp.connection is None  # released: the body ended as HTTP says it should


async def test_shutdown_ends_open_streams(backend: FakeBackend) -> None:
    async with TestClient(TestServer(build_app(backend, peer_of=as_root))) as c:
        logs = await c.get("/v1/logs", params={"follow": "1"})
        events = await c.get("/v1/events", params={"follow": "1"})
        await async_wait_for(_async(lambda: backend.hub.followers == 1), 5)
        closing = asyncio.ensure_future(c.server.close())
        assert await asyncio.wait_for(logs.read(), 5) == b""
        assert await asyncio.wait_for(events.read(), 5) == b""
        await asyncio.wait_for(closing, 5)
    assert backend.hub.followers == 0


# -- events and metrics -----------------------------------------------------------------------

async def test_events_snapshot_without_follow(client: Client) -> None:
    resp = await client.get("/v1/events", params={"app": "shop"})
    assert resp.status == 200
    events = [json.loads(x) for x in (await resp.text()).splitlines()]
    assert sorted(e["id"] for e in events) == ["a1", "a2", "a3"]
    first = next(e for e in events if e["id"] == "a2")
    assert first == {"id": "a2", "app": "shop", "name": "web.2", "state": "starting",
                     "previous": None, "reason": "started", "exit_status": None,
                     "at": T0.isoformat()}


async def test_events_follow(client: Client, backend: FakeBackend) -> None:
    resp = await client.get("/v1/events", params={"follow": "1", "app": "shop"})
    assert resp.headers["Content-Type"].startswith("application/x-ndjson")
    await async_wait_for(_async(lambda: len(backend.bus._followers) == 1), 5)
    backend.bus.publish(StateChange("b1", "blog", "web.1", DynoState.DOWN, DynoState.UP,
                                    Reason.STOPPED, None, T0))
    backend.bus.publish(StateChange("a1", "shop", "web.1", DynoState.CRASHED, DynoState.UP,
                                    Reason.CRASH, 1, T0))
    assert [json.loads(x) for x in await read_lines(resp, 1)] == [
        {"id": "a1", "app": "shop", "name": "web.1", "state": "crashed", "previous": "up",
         "reason": "crash", "exit_status": 1, "at": T0.isoformat(timespec="microseconds")}]
    resp.close()
    await async_wait_for(_async(lambda: not backend.bus._followers), 5)


async def test_metrics(client: Client) -> None:
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    families = list(text_string_to_metric_families(await resp.text()))
    assert [(f.name, f.samples[0].value) for f in families] == [("dyno_memory_bytes", 1048576)]


# -- builds -----------------------------------------------------------------------------------

BUILD = {"app": "shop", "source": {"url": "https://slugs.example/app.tgz", "sha256": "ab" * 32},
         "buildpacks": ["python"]}


async def test_start_build_is_202_with_the_pending_build(client: Client,
                                                         backend: FakeBackend) -> None:
    resp = await client.post("/v1/builds", json=BUILD)
    assert resp.status == 202, await resp.text()
    build = await resp.json()
    assert (build["app"], build["status"], build["dyno"]) == ("shop", "pending", None)
    assert ("build", build["id"]) in backend.calls
    resp = await client.get(f"/v1/builds/{build['id']}")
    assert resp.status == 200 and (await resp.json())["id"] == build["id"]
    assert [b["id"] for b in await (await client.get("/v1/builds")).json()] == [build["id"]]
    assert await (await client.get("/v1/builds", params={"app": "blog"})).json() == []


@pytest.mark.parametrize(("body", "code"), [
    ({**BUILD, "size": "performance-l"}, "invalid_spec"),
    ({"app": "shop"}, "invalid_spec"),
    ([BUILD], "bad_request"),
])
async def test_a_bad_build_request_is_refused(client: Client, body: Any, code: str) -> None:
    assert await error_of(await client.post("/v1/builds", json=body), 400) == code


async def test_unknown_or_malformed_build_ids(client: Client) -> None:
    missing = "00000000-0000-4000-8000-000000000000"
    assert await error_of(await client.get(f"/v1/builds/{missing}"), 404) == "not_found"
    assert await error_of(await client.get("/v1/builds/NOT_AN_ID"), 400) == "bad_request"
    assert await error_of(await client.get("/v1/builds?apps=shop"), 400) == "bad_request"


def test_local_build_sources_and_buildpack_directories_are_for_root_only() -> None:
    from agent.api.server import _check_build_paths_allowed
    from agent.errors import Forbidden

    by_path = {"app": "shop", "source": {"path": "/root/secret"}}
    with_dir = {**BUILD, "buildpacks": ["python", "/root/bp"]}
    for body in (by_path, with_dir):
        _check_build_paths_allowed(body, 0)
    _check_build_paths_allowed({**BUILD, "buildpacks": ["heroku/python",
                                                        "https://b/bp.tgz#sha256=" + "0" * 64]},
                               54321)
    with pytest.raises(Forbidden, match="local source path"):
        _check_build_paths_allowed(by_path, 54321)
    with pytest.raises(Forbidden, match="buildpack directory"):
        _check_build_paths_allowed(with_dir, 54321)
