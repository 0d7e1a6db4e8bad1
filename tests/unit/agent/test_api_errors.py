"""Operator API plumbing: the error shape, unknown routes and methods, peer credentials."""

from __future__ import annotations

import os
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from agent.api.server import build_app
from agent.errors import ERROR_CODES
from agent.peercred import PeerCred, is_allowed
from tests.unit.agent.fakes import FakeBackend, as_root


@pytest.fixture
async def client() -> Any:
    async with TestClient(TestServer(build_app(FakeBackend(), peer_of=as_root))) as c:
        yield c


async def test_info(client: TestClient[Any, Any]) -> None:
    resp = await client.get("/v1/info")
    assert resp.status == 200
    assert (await resp.json())["version"] == "test"


async def test_unknown_route_is_json_404(client: TestClient[Any, Any]) -> None:
    resp = await client.get("/v1/nothing")
    assert resp.status == 404
    assert (await resp.json())["error"]["code"] == "not_found"


async def test_wrong_method_is_json_405(client: TestClient[Any, Any]) -> None:
    resp = await client.post("/v1/info")
    assert resp.status == 405
    body = await resp.json()
    assert body["error"]["code"] == "method_not_allowed"
    assert "POST" in body["error"]["message"]


def test_error_codes_are_unique_and_documented() -> None:
    assert "invalid_spec" in ERROR_CODES
    for code, (status, doc) in ERROR_CODES.items():
        assert 400 <= status < 600, code
        assert doc, f"{code} has no description"


def test_peer_rules() -> None:
    assert is_allowed(PeerCred(1, 0, 0), None)
    assert is_allowed(PeerCred(1, os.geteuid(), 0), None)
    assert not is_allowed(PeerCred(1, 54321, 54321), None)
    assert is_allowed(PeerCred(1, 54321, 777), 777)
    assert not is_allowed(PeerCred(1, 54321, 778), 777)
    # A supplementary group the peer held when it connected counts like its primary group.
    assert is_allowed(PeerCred(1, 54321, 778, (5, 777)), 777)
    assert not is_allowed(PeerCred(1, 54321, 778, (5, 776)), 777)


ROUTES = [("GET", "/v1/info"), ("GET", "/v1/dynos"), ("POST", "/v1/dynos"),
          ("GET", "/v1/logs"), ("GET", "/v1/events"), ("GET", "/metrics"),
          ("DELETE", "/v1/dynos/web.1"), ("GET", "/no/such/route")]


@pytest.mark.parametrize(("method", "path"), ROUTES)
async def test_a_peer_outside_the_group_is_refused_on_every_route(method: str,
                                                                   path: str) -> None:
    def stranger(_request: Any) -> PeerCred:
        return PeerCred(pid=1, uid=54321, gid=54321, groups=(100,))

    async with TestClient(TestServer(build_app(FakeBackend(), peer_of=stranger))) as c:
        resp = await c.request(method, path, json={})
        assert resp.status == 403
        assert (await resp.json())["error"]["code"] == "forbidden"


@pytest.mark.parametrize(("method", "path"), ROUTES)
async def test_a_peer_that_cannot_be_identified_is_refused(method: str, path: str) -> None:
    # The default reader over TCP: there are no peer credentials, so nobody is let in.
    async with TestClient(TestServer(build_app(FakeBackend()))) as c:
        resp = await c.request(method, path, json={})
        assert resp.status == 403
        body = await resp.json()
        assert body["error"]["code"] == "forbidden"
        assert "cannot be identified" in body["error"]["message"]


def test_local_slug_paths_are_for_root_only() -> None:
    from agent.api.server import _check_slug_path_allowed
    from agent.errors import Forbidden

    by_path = {"release": {"version": 1, "slug": {"path": "/root/secret"}}}
    by_url = {"release": {"version": 1, "slug": {"url": "https://x/s.tgz", "sha256": "0" * 64}}}
    _check_slug_path_allowed(by_path, 0)
    _check_slug_path_allowed(by_url, 54321)
    with pytest.raises(Forbidden, match="local slug path"):
        _check_slug_path_allowed(by_path, 54321)
