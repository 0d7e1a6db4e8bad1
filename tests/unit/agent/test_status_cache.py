"""A dyno keeps its status, its JSON and its place in `GET /v1/dynos` until its record or state
changes (a thousand idle dynos are listed without building or encoding anything): whatever
changes must show in the very next listing, encoded exactly as `list_dynos()` would be."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import pytest
from aiohttp.test_utils import TestClient, TestServer

from agent.api.server import Backend, build_app
from tests.unit.agent.conftest import VIRTUAL_TIME
from tests.unit.agent.fakes import Harness, as_root, virtual_harness

pytestmark = pytest.mark.asyncio(loop_factories=[VIRTUAL_TIME])


@pytest.fixture
async def h(tmp_path: Path) -> AsyncIterator[Harness]:
    harness = await virtual_harness(tmp_path)
    yield harness
    await harness.supervisor.detach_all()


def _listed(h: Harness) -> list[dict[str, object]]:
    """The JSON listing, checked against an encoding of `list_dynos()` made now."""
    encoded = h.supervisor.list_dynos_json()
    assert encoded == json.dumps(h.supervisor.list_dynos(), separators=(",", ":"))
    listed: list[dict[str, object]] = json.loads(encoded)
    return listed


async def test_the_listing_follows_a_record_change(h: Harness) -> None:
    dyno_id = await h.create("web.1")
    await h.state(dyno_id, "up")
    assert _listed(h)[0]["restarts"] == 0  # cached now
    h.supervisor.dynos[dyno_id].update(restarts=3)
    assert _listed(h)[0]["restarts"] == 3
    assert h.supervisor.dynos[dyno_id].status()["restarts"] == 3


async def test_the_listing_follows_a_state_change(h: Harness) -> None:
    dyno_id = await h.create("web.1")
    await h.state(dyno_id, "up")
    before = _listed(h)[0]
    assert (before["state"], before["reason"]) == ("up", "booted")
    await h.supervisor.stop_dyno(dyno_id)
    after = _listed(h)[0]
    assert (after["state"], after["pid"]) == ("down", None)
    assert after["since"] != before["since"]


async def test_the_order_follows_a_spec_change(h: Harness) -> None:
    first = await h.create("web.2")
    second = await h.create("web.3")
    assert [d["id"] for d in _listed(h)] == [first, second]  # sort keys cached now
    dyno = h.supervisor.dynos[second]
    dyno.update(spec=replace(dyno.spec, name="web.1"))
    assert [d["name"] for d in _listed(h)] == ["web.1", "web.2"]


async def test_a_status_changed_by_its_caller_leaves_the_cache_alone(h: Harness) -> None:
    dyno_id = await h.create("web.1")
    status = h.supervisor.dynos[dyno_id].status()
    status["state"] = "bogus"
    h.supervisor.get_dyno(dyno_id)  # adds its details to a status of its own
    assert h.supervisor.dynos[dyno_id].status()["state"] != "bogus"
    assert set(h.supervisor.list_dynos()[0]) == set(json.loads(
        h.supervisor.list_dynos_json())[0])


class _Backend:
    """What the daemon's operator backend passes on to the supervisor for a listing."""

    socket_gid = None

    def __init__(self, h: Harness) -> None:
        self.supervisor = h.supervisor
        self.dict_listings = 0

    def list_dynos(self, app: str | None = None) -> list[dict[str, Any]]:
        self.dict_listings += 1
        return self.supervisor.list_dynos(app)

    def list_dynos_json(self, app: str | None = None) -> str:
        return self.supervisor.list_dynos_json(app)


async def test_the_api_serves_the_cached_listing_as_it_would_encode_it(h: Harness) -> None:
    for name in ("web.10", "web.2", "worker.1"):
        await h.create(name)
    await h.create("web.1", app="other")
    backend = _Backend(h)
    async with TestClient(TestServer(build_app(cast(Backend, backend),
                                               peer_of=as_root))) as client:
        for query, app in (("", None), ("?app=other", "other")):
            response = await client.get(f"/v1/dynos{query}")
            assert response.status == 200
            assert response.content_type == "application/json"
            assert await response.text() == json.dumps(
                h.supervisor.list_dynos(app), separators=(",", ":")) + "\n"
    assert backend.dict_listings == 0  # served from the cached encodings
