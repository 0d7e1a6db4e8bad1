"""The coordinator's replica logic that needs no etcd: who may answer, and when."""

from __future__ import annotations

import asyncio

import pytest

from dynocoord.election import Term
from dynocoord.etcd import Lease
from dynocoord.server import ApiError, Coordinator, Leader, Settings


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
