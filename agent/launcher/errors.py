"""Typed errors of the launcher: a failed launch names its phase, errno and the path involved."""

from __future__ import annotations

import errno as errno_mod


class LauncherError(Exception):
    """Base of every error the launcher raises."""


class RequestError(LauncherError):
    """A LaunchRequest field is unusable (e.g. a path an overlay option cannot carry)."""

    def __init__(self, field: str, value: object, reason: str) -> None:
        self.field = field
        self.value = value
        self.reason = reason
        super().__init__(f"invalid {field}={value!r}: {reason}")


class LaunchError(LauncherError):
    """Launching (or entering) a dyno failed in `phase`; `errno` is the kernel's answer or 0.

    Phases: fork, cgroup, namespaces, netns, mounts, pivot, user, seccomp, exec, timeout.
    """

    def __init__(self, phase: str, errno: int, message: str, path: str | None = None) -> None:
        self.phase = phase
        self.errno = errno
        self.message = message
        self.path = path
        parts = [f"launch failed in {phase}: {message}"]
        if path:
            parts.append(f"path={path}")
        if errno:
            parts.append(f"errno={errno_mod.errorcode.get(errno, str(errno))}")
        super().__init__(" ".join(parts))


class UidAllocationError(LauncherError):
    """The uid range is exhausted, or the allocation file is unreadable."""

    def __init__(self, message: str, path: str | None = None, errno: int | None = None) -> None:
        self.path = path
        self.errno = errno
        super().__init__(message if path is None else f"{message} path={path}")


class SeccompError(LauncherError):
    """The dyno's seccomp filter cannot be built: a malformed plan or an unsupported host."""
