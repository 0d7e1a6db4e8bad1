"""Errors the agent reports to the outside, and their stable wire codes.

Each interface (operator API, coordinator RPC, CLI) maps these to its own shape in exactly
one place; the codes themselves are listed in the README and never change meaning.
"""

from __future__ import annotations

from http import HTTPStatus


class AgentError(Exception):
    """An unexpected failure inside the agent (see its log)."""

    code = "internal"
    http_status = HTTPStatus.INTERNAL_SERVER_ERROR

    def __init__(self, message: str) -> None:
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
        self.field = field


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


class ConfigError(Exception):
    """The configuration is unusable; `key` names the offending key."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"config: {key}: {message}")
        self.key = key


# Every code the operator API can return, for the README table and for tests.
ERROR_CODES: dict[str, tuple[int, str]] = {
    cls.code: (int(cls.http_status), (cls.__doc__ or "").strip())
    for cls in (BadRequest, InvalidSpec, NotFound, MethodNotAllowed, Conflict, Timeout, NotReady,
                Draining, Forbidden, AgentError)
}
