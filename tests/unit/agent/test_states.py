"""The dyno state machine: every pair of states against the transition table, events, lines."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta, timezone

import pytest

from agent.supervision.events import to_wire
from agent.supervision.states import (
    TRANSITIONS,
    DynoState,
    InvalidTransition,
    NaiveTimestamp,
    Reason,
    StateChange,
    StateMachine,
)

S = DynoState
T0 = datetime(2026, 11, 26, 10, 0, 0, 123456, tzinfo=UTC)

# Written out by hand, independently of the module's table, so that an edit to the table
# that is not also made here fails.
VALID = {
    (S.STARTING, S.UP), (S.STARTING, S.CRASHED), (S.STARTING, S.DOWN), (S.STARTING, S.COMPLETE),
    (S.UP, S.STARTING), (S.UP, S.CRASHED), (S.UP, S.DOWN), (S.UP, S.COMPLETE),
    (S.CRASHED, S.STARTING), (S.CRASHED, S.DOWN),
    (S.DOWN, S.STARTING),
}
ALL_PAIRS = list(itertools.product(DynoState, DynoState))
INVALID = [pair for pair in ALL_PAIRS if pair not in VALID]


def machine(state: DynoState = S.STARTING) -> StateMachine:
    return StateMachine("d-1", "shop", "web.1", at=T0, state=state)


def test_table_matches_the_hand_written_list() -> None:
    table = {(a, b) for a, targets in TRANSITIONS.items() for b in targets}
    assert table == VALID
    assert set(TRANSITIONS) == set(DynoState)


@pytest.mark.parametrize(("current", "new"), sorted(VALID))
def test_valid_transition_records_and_returns_event(current: DynoState,
                                                    new: DynoState) -> None:
    m = machine(current)
    at = T0 + timedelta(seconds=5)
    change = m.transition(new, Reason.CRASH, exit_status=3, at=at)
    assert change == StateChange("d-1", "shop", "web.1", new, current, Reason.CRASH, 3, at)
    assert (m.state, m.previous, m.reason, m.exit_status, m.since) == (
        new, current, Reason.CRASH, 3, at)
    assert change.message == f"State changed from {current} to {new}"


@pytest.mark.parametrize(("current", "new"), INVALID)
def test_invalid_transition_raises_and_changes_nothing(current: DynoState,
                                                       new: DynoState) -> None:
    m = machine(current)
    with pytest.raises(InvalidTransition) as caught:
        m.transition(new, Reason.RESTART, at=T0 + timedelta(seconds=1))
    err = caught.value
    assert (err.dyno_id, err.current, err.requested, err.reason) == (
        "d-1", current, new, Reason.RESTART)
    assert (m.state, m.since, m.previous) == (current, T0, None)
    assert not m.can(new)


def test_complete_is_terminal_and_self_loops_are_invalid() -> None:
    assert TRANSITIONS[S.COMPLETE] == frozenset()
    for state in DynoState:
        assert state not in TRANSITIONS[state]


def test_heroku_crash_sequence() -> None:
    m = machine()
    lines = [m.transition(S.CRASHED, Reason.CRASH, 1, T0).message,
             m.transition(S.STARTING, Reason.CRASH, None, T0).message,
             m.transition(S.UP, Reason.BOOTED, None, T0).message]
    assert lines == ["State changed from starting to crashed",
                     "State changed from crashed to starting",
                     "State changed from starting to up"]
    # The last exit is remembered across the restart (status objects show it).
    assert m.exit_status == 1


def test_event_object_and_initial_event() -> None:
    m = StateMachine("d-1", "shop", "web.1", at=T0)
    first = m.current()
    assert first.previous is None
    assert first.message == "State changed from created to starting"
    change = m.transition(S.UP, Reason.BOOTED, at=T0 + timedelta(seconds=2))
    assert to_wire(change) == {
        "id": "d-1", "app": "shop", "name": "web.1", "state": "up", "previous": "starting",
        "reason": "booted", "exit_status": None, "at": "2026-11-26T10:00:02.123456+00:00"}


def test_reason_values_are_the_api_vocabulary() -> None:
    assert {r.value for r in Reason} >= {"crash", "oom", "boot-timeout", "stopped", "cycling",
                                         "restart", "exited", "agent-restart", "holder-lost"}


def test_times_are_normalised_to_utc_and_naive_times_refused() -> None:
    m = machine()
    plus_two = timezone(timedelta(hours=2))
    change = m.transition(S.UP, Reason.BOOTED, at=datetime(2026, 1, 1, 12, tzinfo=plus_two))
    assert change.at == datetime(2026, 1, 1, 10, tzinfo=UTC)
    assert change.at.utcoffset() == timedelta(0)
    with pytest.raises(NaiveTimestamp):
        m.transition(S.DOWN, Reason.STOPPED, at=datetime(2026, 1, 1))
    assert m.state is S.UP
    with pytest.raises(NaiveTimestamp):
        StateMachine("d-2", "shop", "web.2", at=datetime(2026, 1, 1))


def test_restored_machine_continues_from_its_record() -> None:
    m = StateMachine("d-1", "shop", "web.1", at=T0, state=S.UP, reason=Reason.AGENT_RESTART,
                     previous=S.STARTING, exit_status=None)
    change = m.transition(S.CRASHED, Reason.AGENT_RESTART, 137, T0 + timedelta(minutes=1))
    assert change.previous is S.UP
    assert m.exit_status == 137
