"""The coordinator's logic that needs no etcd: who may answer, and when; what agents' events
keep, and when `spaces.sync` is sent."""

from __future__ import annotations

import asyncio
from ipaddress import ip_address
from typing import Any

import pytest

from dynocoord.election import Term
from dynocoord.etcd import EtcdClient, Lease
from dynocoord.keys import Keys
from dynocoord.model import Capacity, Host, HostNetwork, HostState
from dynocoord.server import ApiError, Coordinator, Leader, Session, Settings, _spaces_change


async def test_a_new_leader_answers_not_leader_until_it_has_read_etcd() -> None:
    coordinator = Coordinator(Settings(etcd=("http://127.0.0.1:1",), node_id="c1"))
    try:
        with pytest.raises(ApiError) as refused:
            coordinator._lead()
        assert (refused.value.status, refused.value.code) == (503, "not_leader")
        leader = Leader(coordinator.client, coordinator.keys, Term(Lease(1, 5), 7),
                        coordinator.settings)
        coordinator.leader = leader
        # Elected, still loading: an empty fleet must not be served, nor synced to agents.
        with pytest.raises(ApiError) as loading:
            coordinator._lead()
        assert loading.value.status == 503
        leader.loaded.set()
        assert coordinator._lead() is leader
        leader.stopped.set()
        with pytest.raises(ApiError):
            coordinator._lead()
    finally:
        await coordinator.client.close()
        await asyncio.sleep(0)


class _Session(Session):
    """A session whose requests are answered by `answer` (no WebSocket)."""

    def __init__(self, host_id: str, answer: Any) -> None:
        super().__init__(host_id, None)  # type: ignore[arg-type]
        self.answer = answer
        self.asked: list[tuple[str, dict[str, Any]]] = []

    async def request(self, method: str, params: dict[str, Any],
                      timeout_s: float = 60.0) -> Any:
        self.asked.append((method, params))
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def _leader(client: EtcdClient) -> Leader:
    return Leader(client, Keys("/t"), Term(Lease(1, 5), 7), Settings(etcd=("x",)))


async def test_dyno_state_events_keep_the_ip_and_mark_the_space_views_changed() -> None:
    client = EtcdClient(["http://127.0.0.1:1"])
    try:
        leader = _leader(client)
        session = _Session("h1", {})
        leader.event(session, "dyno.state", {"id": "d1", "app": "alpha", "name": "web.1",
                                             "state": "starting", "ip": "10.64.0.2"})
        assert session.dynos["d1"]["ip"] == "10.64.0.2" and leader.spaces_dirty.is_set()
        leader.spaces_dirty.clear()
        # An agent older than spaces sends no ip: the one from hello stays.
        leader.event(session, "dyno.state", {"id": "d1", "state": "starting"})
        assert session.dynos["d1"]["ip"] == "10.64.0.2" and not leader.spaces_dirty.is_set()
        leader.event(session, "dyno.state", {"id": "d1", "state": "up", "ip": "10.64.0.2"})
        assert leader.spaces_dirty.is_set()
    finally:
        await client.close()


async def test_spaces_sync_is_sent_when_the_view_changes_and_never_to_an_agent_without_it(
        caplog: pytest.LogCaptureFixture) -> None:
    client = EtcdClient(["http://127.0.0.1:1"])
    try:
        leader = _leader(client)
        session = _Session("h1", {"applied": [], "failed": [
            {"space": "alpha", "code": "bad_request", "message": "overlaps"}]})
        await leader.send_spaces(session)
        await leader.send_spaces(session)  # the same view: not sent again
        assert [m for m, _ in session.asked] == ["spaces.sync"]
        first = session.asked[0][1]
        assert first["spaces"] == [] and first["port"] == 4789
        assert "overlaps" in caplog.text
        leader.fleet.hosts["h2"] = Host("h2", "host-2", HostState.READY, Capacity(1, 1 << 30),
                                        {}, "b", "1", "2026-12-03T00:00:00+00:00",
                                        HostNetwork(ip_address("192.0.2.2")))
        leader.spaces_changed()
        await leader.send_spaces(session)
        assert session.asked[1][1]["hosts"] == ["192.0.2.2"]
        assert session.asked[1][1]["generation"] > first["generation"]

        old = _Session("h2", ApiError(502, "unknown_method", "'spaces.sync'"))
        await leader.send_spaces(old)
        assert not old.spaces_supported
        await leader.send_spaces(old)
        assert len(old.asked) == 1
        assert caplog.text.count("does not know spaces.sync") == 1
    finally:
        await client.close()


def test_spaces_sync_sends_the_whole_view_first_then_only_what_changed() -> None:
    def entry(name: str, members: int) -> dict[str, object]:
        return {"space": name, "subnet": "10.64.0.0/20", "slice": "10.64.0.0/27", "vni": 1,
                "mtu": 1450, "members": [{"name": f"web.{n}"} for n in range(members)]}
    first = {"port": 4789, "hosts": ["192.0.2.1"], "pools": ["10.64.0.0/10"],
             "spaces": [entry("alpha", 1), entry("beta", 1), entry("gamma", 1)]}
    assert _spaces_change(None, first) == first
    then = {**first, "spaces": [entry("alpha", 1), entry("beta", 2), entry("delta", 0)]}
    assert _spaces_change(first, then) == {**first, "partial": True,
                                           "spaces": [entry("beta", 2), entry("delta", 0)],
                                           "removed": ["gamma"]}
