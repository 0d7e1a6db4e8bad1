"""Dyno states, the table of allowed transitions, and the per-dyno state machine.

The machine is the only thing that changes a dyno's state; each change returns a `StateChange`
event that the caller publishes (event stream, coordinator, `State changed from A to B` line).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from types import MappingProxyType
from typing import Final

from agent.observability import logs


class DynoState(StrEnum):
    """The five states of DESIGN §6 (Heroku's API vocabulary, plus `complete` for one-offs)."""

    STARTING = "starting"
    UP = "up"
    CRASHED = "crashed"
    DOWN = "down"
    COMPLETE = "complete"


class Reason(StrEnum):
    """Why a state change happened; shown as `reason` in the API and events."""

    START = "start"  # first start, or an explicit start of a stopped dyno
    BOOTED = "booted"  # the process runs (and, for web, accepts on $PORT)
    CRASH = "crash"  # a formation dyno's process exited by itself
    OOM = "oom"  # killed at the memory kill point (R15) or by the kernel's OOM killer
    BOOT_TIMEOUT = "boot-timeout"  # R10: web dyno never accepted on $PORT
    LAUNCH_FAILED = "launch-failed"  # the launcher could not start the process at all
    STOPPED = "stopped"  # operator or coordinator asked for a stop
    RESTART = "restart"  # operator or coordinator asked for a restart
    CYCLING = "cycling"  # daily cycling (24 h + jitter)
    EXITED = "exited"  # a one-off or release dyno's process exited
    AGENT_RESTART = "agent-restart"  # found dead (or re-adopted) after the agent restarted
    HOLDER_LOST = "holder-lost"  # the host's process holder died with the process: the
    # platform's failure, restarted at once and never counted as a crash


_S = DynoState

# Heroku moves a restarted or cycled dyno from `up` straight to `starting` ("State changed from
# up to starting", then SIGTERM), so up→starting is a real edge; self-loops are not (a restart
# of a dyno that is still starting emits no state line). `complete` is terminal: a one-off or
# release dyno is never run again under the same id.
TRANSITIONS: Final[MappingProxyType[DynoState, frozenset[DynoState]]] = MappingProxyType({
    _S.STARTING: frozenset({_S.UP, _S.CRASHED, _S.DOWN, _S.COMPLETE}),
    _S.UP: frozenset({_S.STARTING, _S.CRASHED, _S.DOWN, _S.COMPLETE}),
    _S.CRASHED: frozenset({_S.STARTING, _S.DOWN}),
    _S.DOWN: frozenset({_S.STARTING}),
    _S.COMPLETE: frozenset(),
})


def is_allowed(current: DynoState, new: DynoState) -> bool:
    """Whether the table allows `current` → `new`."""
    return new in TRANSITIONS[current]


class StateError(Exception):
    """Base of the state machine's errors; carries the dyno id."""

    def __init__(self, message: str, dyno_id: str) -> None:
        super().__init__(message)
        self.dyno_id = dyno_id


class InvalidTransition(StateError):
    """The transition table does not allow this change (maps to 409 on the API)."""

    def __init__(self, dyno_id: str, current: DynoState, requested: DynoState,
                 reason: Reason) -> None:
        super().__init__(
            f"dyno {dyno_id}: cannot go from {current} to {requested} (reason {reason})", dyno_id)
        self.current = current
        self.requested = requested
        self.reason = reason


class NaiveTimestamp(StateError):
    """A time without a timezone was given; events are always in UTC."""

    def __init__(self, dyno_id: str, value: datetime) -> None:
        super().__init__(f"dyno {dyno_id}: timestamp {value.isoformat()} has no timezone",
                         dyno_id)
        self.value = value


@dataclass(frozen=True, slots=True)
class StateChange:
    """One transition, as published on `/v1/events`, to the coordinator and as a log line
    (its wire form: `agent.supervision.events.to_wire`).

    `previous` is None only for the event that announces a newly created dyno.
    """

    id: str
    app: str
    name: str
    state: DynoState
    previous: DynoState | None
    reason: Reason
    exit_status: int | None
    at: datetime

    @property
    def message(self) -> str:
        """The Heroku platform line, e.g. `State changed from starting to up`."""
        return logs.state_changed(self.previous or "created", self.state)


class StateMachine:
    """The state of one dyno; `transition()` is its single mutator.

    A restored dyno (after an agent restart) is rebuilt with its recorded state and `since`.
    """

    def __init__(self, dyno_id: str, app: str, name: str, *, at: datetime,
                 state: DynoState = DynoState.STARTING, reason: Reason = Reason.START,
                 previous: DynoState | None = None, exit_status: int | None = None) -> None:
        self.id = dyno_id
        self.app = app
        self.name = name
        self._state = state
        self._previous = previous
        self._reason = reason
        self._exit_status = exit_status
        self._since = self._utc(at)

    @property
    def state(self) -> DynoState:
        return self._state

    @property
    def previous(self) -> DynoState | None:
        return self._previous

    @property
    def since(self) -> datetime:
        return self._since

    @property
    def reason(self) -> Reason:
        """The reason of the last state change."""
        return self._reason

    @property
    def exit_status(self) -> int | None:
        """The last exit status seen (kept across restarts until the next exit)."""
        return self._exit_status

    def current(self) -> StateChange:
        """The present state as an event (`previous` None when nothing happened yet), e.g. the
        announcement of a dyno that has just been created."""
        return StateChange(self.id, self.app, self.name, self._state, self._previous,
                           self._reason, self._exit_status, self._since)

    def can(self, new: DynoState) -> bool:
        return is_allowed(self._state, new)

    def transition(self, new: DynoState, reason: Reason, exit_status: int | None = None,
                   at: datetime | None = None) -> StateChange:
        """Move to `new`, or raise `InvalidTransition` leaving the machine unchanged.

        `at` defaults to now; tests pass a fake clock's time.
        """
        if not is_allowed(self._state, new):
            raise InvalidTransition(self.id, self._state, new, reason)
        when = self._utc(at if at is not None else datetime.now(UTC))
        change = StateChange(self.id, self.app, self.name, new, self._state, reason,
                             exit_status, when)
        self._previous = self._state
        self._state = new
        self._reason = reason
        if exit_status is not None:
            self._exit_status = exit_status
        self._since = when
        return change

    def _utc(self, value: datetime) -> datetime:
        if value.tzinfo is None or value.utcoffset() is None:
            raise NaiveTimestamp(self.id, value)
        return value.astimezone(UTC)
