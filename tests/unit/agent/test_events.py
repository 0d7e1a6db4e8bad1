"""The state-change bus: typed events, drop notices for a follower that fell behind, and the
one wire form that `/v1/events` and the coordinator send."""

from __future__ import annotations

from datetime import UTC, datetime

from agent.supervision.events import Dropped, EventBus, concerns, to_wire
from agent.supervision.states import DynoState, Reason, StateChange

T0 = datetime(2026, 11, 26, 10, 0, 0, 123456, tzinfo=UTC)


def change(dyno_id: str, app: str = "shop", state: DynoState = DynoState.UP) -> StateChange:
    return StateChange(dyno_id, app, "web.1", state, DynoState.STARTING, Reason.BOOTED, None,
                       T0)


async def test_a_follower_that_falls_behind_gets_one_drop_notice_then_the_newest() -> None:
    bus = EventBus()
    with bus.subscribe(max_queue=2) as follower:
        for n in range(5):
            bus.publish(change(f"d{n}"))
        got = [await anext(follower) for _ in range(3)]
    assert got == [Dropped(3), change("d3"), change("d4")]
    assert follower.closed


async def test_a_closed_bus_ends_every_follower() -> None:
    bus = EventBus()
    follower = bus.subscribe()
    bus.publish(change("d1"))
    bus.close()
    assert [event async for event in follower] == []
    bus.publish(change("d2"))  # nobody listens: must not raise


def test_wire_forms() -> None:
    created = StateChange("d1", "shop", "run.1234", DynoState.STARTING, None, Reason.START,
                          None, T0)
    assert to_wire(created) == {
        "id": "d1", "app": "shop", "name": "run.1234", "state": "starting", "previous": None,
        "reason": "start", "exit_status": None, "at": "2026-11-26T10:00:00.123456+00:00"}
    assert to_wire(Dropped(7)) == {"dropped": 7}


def test_drop_notices_concern_every_reader_state_changes_only_their_app() -> None:
    assert concerns(change("d1", "shop"), None)
    assert concerns(change("d1", "shop"), "shop")
    assert not concerns(change("d1", "shop"), "blog")
    assert concerns(Dropped(1), "blog")
