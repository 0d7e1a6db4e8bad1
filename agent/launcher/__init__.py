"""Dyno isolation: launch a request into fresh namespaces, an ephemeral overlay filesystem and
an unprivileged user under a reaping PID 1; enter running dynos; allocate per-dyno uids."""

from typing import TYPE_CHECKING, Any

from agent.launcher.enter import enter, enter_pty
from agent.launcher.errors import LauncherError, LaunchError, RequestError, UidAllocationError
from agent.launcher.launch import launch, launch_steps
from agent.launcher.request import LaunchRequest, LaunchResult
from agent.launcher.terminal import PtyRequest

if TYPE_CHECKING:
    from agent.launcher.uids import UidAllocator

__all__ = [
    "LaunchError",
    "LaunchRequest",
    "LaunchResult",
    "LauncherError",
    "PtyRequest",
    "RequestError",
    "UidAllocationError",
    "UidAllocator",
    "enter",
    "enter_pty",
    "launch",
    "launch_steps",
]


def __getattr__(name: str) -> Any:
    # The uid allocator is the daemon's; the holder, which forks every dyno, does without it
    # (each module a forking process imports adds pages that every fork copies).
    if name == "UidAllocator":
        from agent.launcher.uids import UidAllocator
        return UidAllocator
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
