"""The dyno holder: the long-lived, single-threaded fork server that parents every dyno.

`server` is the holder process, `client` the daemon's asyncio side, `protocol` the wire format.
"""

from __future__ import annotations

from agent.holder.client import ExitEvent, HeldProcess, HolderClient, Launched, OutputEvent
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
