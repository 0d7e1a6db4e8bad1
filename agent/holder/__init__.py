"""The dyno holder: the long-lived, single-threaded fork server that parents every dyno.

`server` is the holder process, `client` the daemon's asyncio side, `protocol` the wire format.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from agent.holder.errors import (
    BadRequest,
    Conflict,
    ConnectionLost,
    EnterFailed,
    HolderAlreadyRunning,
    HolderError,
    HolderTimeout,
    HolderUnavailable,
    LaunchFailed,
    NotFound,
    ProtocolError,
    RequestFailed,
)
from agent.holder.protocol import PROTOCOL_VERSION

if TYPE_CHECKING:
    from agent.holder.client import ExitEvent, HeldProcess, HolderClient, Launched, OutputEvent

# The client is the daemon's (asyncio) side. The holder process imports this package too, and
# every module it imports makes each of its forks dearer (more pages to copy and to fault), so
# the client is loaded when one of its names is first asked for.
_CLIENT_NAMES = frozenset(("ExitEvent", "HeldProcess", "HolderClient", "Launched", "OutputEvent"))


def __getattr__(name: str) -> Any:
    if name in _CLIENT_NAMES:
        from agent.holder import client
        return getattr(client, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "PROTOCOL_VERSION",
    "BadRequest",
    "Conflict",
    "ConnectionLost",
    "EnterFailed",
    "ExitEvent",
    "HeldProcess",
    "HolderAlreadyRunning",
    "HolderClient",
    "HolderError",
    "HolderTimeout",
    "HolderUnavailable",
    "LaunchFailed",
    "Launched",
    "NotFound",
    "OutputEvent",
    "ProtocolError",
    "RequestFailed",
]
