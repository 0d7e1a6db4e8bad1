"""Errors of the dyno holder and its client: one hierarchy, each carrying what failed and why.

Wire codes (the `e.code` of a holder response) map to these classes in exactly one place,
`error_for_code`; the holder side raises `RequestFailed` subclasses with a code of their own.
"""

from __future__ import annotations


class HolderError(Exception):
    """Base of every holder failure."""

    code = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ProtocolError(HolderError):
    """A frame or message broke the protocol (too long, not msgpack, wrong shape)."""

    code = "protocol"

    def __init__(self, message: str, value: object = None) -> None:
        super().__init__(message)
        self.value = value


class HolderUnavailable(HolderError):
    """Nobody answers on the holder socket (absent, refused, or the holder failed to start)."""

    code = "unavailable"

    def __init__(self, message: str, path: str, errno: int | None = None) -> None:
        super().__init__(f"{message}: {path}" + (f" (errno {errno})" if errno else ""))
        self.path = path
        self.errno = errno


class HolderAlreadyRunning(HolderError):
    """Another live holder owns the socket (or its lock); this one refuses to start."""

    code = "already_running"

    def __init__(self, path: str) -> None:
        super().__init__(f"another holder owns {path}")
        self.path = path


class HolderTimeout(HolderError):
    """A request got no response before its deadline."""

    code = "timeout"

    def __init__(self, method: str, timeout_s: float) -> None:
        super().__init__(f"holder request {method!r} timed out after {timeout_s}s")
        self.method = method
        self.timeout_s = timeout_s


class ConnectionLost(HolderError):
    """The connection to the holder closed while a request or the event stream was open."""

    code = "connection_lost"


class RequestFailed(HolderError):
    """The holder answered a request with an error (`code`, `message`, optional `errno`)."""

    code = "failed"

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class BadRequest(RequestFailed):
    """The request is malformed; the message names the field."""

    code = "bad_request"


class NotFound(RequestFailed):
    """No held process matches (unknown dyno id, or no running PID 1 to enter)."""

    code = "not_found"


class Conflict(RequestFailed):
    """The request conflicts with what the holder holds (dyno already running, not exited yet)."""

    code = "conflict"


class LaunchFailed(RequestFailed):
    """The launcher could not start the dyno; nothing of it is left running."""

    code = "launch_failed"


class EnterFailed(RequestFailed):
    """The launcher could not start a process inside the running dyno."""

    code = "enter_failed"


_BY_CODE: dict[str, type[RequestFailed]] = {
    cls.code: cls for cls in (BadRequest, NotFound, Conflict, LaunchFailed, EnterFailed)
}


def error_for_code(code: str, message: str, errno: int | None = None) -> RequestFailed:
    """The client-side exception for an error response; unknown codes keep the base class."""
    cls = _BY_CODE.get(code, RequestFailed)
    error = cls(message, errno)
    if cls is RequestFailed:
        error.code = code
    return error
