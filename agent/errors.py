"""Errors the agent reports to the outside, and their stable wire codes.

Each interface (operator API, coordinator RPC, CLI) maps these to its own shape in exactly
one place; the codes themselves are listed in the README and never change meaning.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any, Final

# What an error answer or log line may quote of the input it rejects: a 15 MiB value must
# not come back as a 60 MB answer, nor land in the journal (issue 19).
EXCERPT_CHARS: Final = 80
# Every message an interface sends is cut here, whatever built it: the last guard against
# an f-string that quotes input without excerpt().
MESSAGE_MAX_CHARS: Final = 1024
_INT_MAX_BITS: Final = 128  # a 64-bit id or generation is quoted in full


def excerpt(value: Any, limit: int = EXCERPT_CHARS) -> str:
    """A bounded, escaped quote of rejected input for error messages and log lines.

    Strings and bytes are repr-escaped (so NULs, newlines and escape sequences cannot forge
    log lines) and cut to at most `limit` escaped characters, followed by the full length
    when cut: `'\\x00\\x00…' (15728640 characters)`. Containers are described, never
    walked (a repr of a deeply nested value recurses without bound); huge integers are
    described by their size (str() refuses more than 4300 digits).
    """
    if isinstance(value, str | bytes | bytearray):
        data = bytes(value) if isinstance(value, bytearray) else value
        shown = data[:limit]
        text = repr(shown)
        while len(text) > limit + 3 and shown:
            # Escapes take up to 10 characters each: shorten until the escaped form fits.
            shown = shown[:len(shown) * 3 // 4]
            text = repr(shown)
        if len(shown) == len(data):
            return text
        unit = "characters" if isinstance(data, str) else "bytes"
        return f"{text[:-1]}…{text[-1]} ({len(data)} {unit})"
    if isinstance(value, bool) or value is None or isinstance(value, float):
        return repr(value)
    if isinstance(value, int):
        if value.bit_length() > _INT_MAX_BITS:
            return f"an integer of {value.bit_length()} bits"
        return repr(value)
    if isinstance(value, dict):
        return f"a map of {len(value)} key{'' if len(value) == 1 else 's'}"
    if isinstance(value, list | tuple):
        return f"an array of {len(value)} item{'' if len(value) == 1 else 's'}"
    return f"a value of type {type(value).__name__}"


def bounded(message: str, limit: int = MESSAGE_MAX_CHARS) -> str:
    """`message` cut to `limit` characters (with a note of its full length)."""
    if len(message) <= limit:
        return message
    return f"{message[:limit]}… ({len(message)} characters)"


class AgentError(Exception):
    """An unexpected failure inside the agent (see its log)."""

    code = "internal"
    http_status = HTTPStatus.INTERNAL_SERVER_ERROR

    def __init__(self, message: str) -> None:
        message = bounded(message)
        super().__init__(message)
        self.message = message


class BadRequest(AgentError):
    """The request is malformed (bad JSON, bad parameter)."""

    code = "bad_request"
    http_status = HTTPStatus.BAD_REQUEST


class InvalidSpec(BadRequest):
    """The dyno spec does not validate; the message names the field."""

    code = "invalid_spec"

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = None if field is None else bounded(field, EXCERPT_CHARS * 2)


class NotFound(AgentError):
    """No dyno (or route) by that id or name."""

    code = "not_found"
    http_status = HTTPStatus.NOT_FOUND


class Conflict(AgentError):
    """The request conflicts with the dyno's current state (e.g. another spec, same id)."""

    code = "conflict"
    http_status = HTTPStatus.CONFLICT


class MethodNotAllowed(AgentError):
    """The route exists but not with that HTTP method."""

    code = "method_not_allowed"
    http_status = HTTPStatus.METHOD_NOT_ALLOWED


class Timeout(AgentError):
    """A lifecycle command did not finish in time; it goes on in the background."""

    code = "timeout"
    http_status = HTTPStatus.GATEWAY_TIMEOUT


class NotReady(AgentError):
    """The agent is starting or shutting down and cannot take the request yet."""

    code = "not_ready"
    http_status = HTTPStatus.SERVICE_UNAVAILABLE


class Draining(NotReady):
    """The agent is draining and accepts no new dynos."""

    code = "draining"


class Forbidden(AgentError):
    """The peer on the operator socket is neither root nor in the socket's group."""

    code = "forbidden"
    http_status = HTTPStatus.FORBIDDEN


class BuildFailed(AgentError):
    """A build did not produce a slug; the message says why (the build's output has more)."""

    code = "build_failed"
    http_status = HTTPStatus.UNPROCESSABLE_ENTITY


class ConfigError(Exception):
    """The configuration is unusable; `key` names the offending key."""

    def __init__(self, key: str, message: str) -> None:
        key, message = bounded(key, EXCERPT_CHARS), bounded(message)
        super().__init__(f"config: {key}: {message}")
        self.key = key


# Every code the operator API can return, for the README table and for tests.
ERROR_CODES: dict[str, tuple[int, str]] = {
    cls.code: (int(cls.http_status), (cls.__doc__ or "").strip())
    for cls in (BadRequest, InvalidSpec, NotFound, MethodNotAllowed, Conflict, Timeout, NotReady,
                Draining, Forbidden, BuildFailed, AgentError)
}
