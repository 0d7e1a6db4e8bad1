"""The envelope of the coordinator protocol (docs/protocol.md §2, §7, §8): the three frame
kinds, their msgpack codec with its size and shape checks, and every error code an answer of
the agent can carry on the link (`ERROR_CODES`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgpack

from agent import errors
from agent.decoding import TooDeep, TooMany, check_depth, msgpack_loads
from agent.errors import excerpt

PROTOCOL_VERSION = 1
# A desired set of a few hundred dynos with 32 KiB of config vars each fits; far more
# would not fit one host. Frames up to twice this (inclusive) are read and refused with an
# error; aiohttp closes the connection (1009) on anything larger, before it is buffered.
MAX_FRAME_BYTES = 16 * 1024 * 1024
HARD_FRAME_BYTES = 2 * MAX_FRAME_BYTES
METHOD_MAX_CHARS = 128
ID_MAX = 2**63 - 1

FRAME_TYPES = ("req", "res", "evt")


class CoordinatorError(Exception):
    """Base of the coordinator link's errors."""


class FrameError(CoordinatorError):
    """A frame that cannot be processed; answered with `code` (and `request_id` when the
    frame's id could be read) and never allowed further."""

    def __init__(self, code: str, message: str, request_id: int | None = None,
                 size_bytes: int | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id
        self.size_bytes = size_bytes


@dataclass(frozen=True)
class Request:
    id: int
    method: str
    params: dict[str, Any]


@dataclass(frozen=True)
class Response:
    id: int | None
    result: Any = None
    error: dict[str, Any] | None = None


@dataclass(frozen=True)
class Event:
    method: str
    params: dict[str, Any]


Frame = Request | Response | Event


def encode(frame: Frame) -> bytes:
    """One frame as the msgpack map of the protocol's envelope."""
    data: dict[str, Any]
    if isinstance(frame, Request):
        data = {"t": "req", "id": frame.id, "m": frame.method, "p": frame.params}
    elif isinstance(frame, Response):
        data = {"t": "res", "id": frame.id}
        if frame.error is not None:
            data["e"] = frame.error
        else:
            data["p"] = frame.result
    else:
        data = {"t": "evt", "m": frame.method, "p": frame.params}
    packed: bytes = msgpack.packb(data, use_bin_type=True)
    return packed


def _request_id(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= ID_MAX:
        return value
    return None


def _method(data: Mapping[str, Any], request_id: int | None) -> str:
    method = data.get("m")
    if not isinstance(method, str) or not method or len(method) > METHOD_MAX_CHARS:
        raise FrameError("malformed_frame", f"m must be a method name of 1 to "
                                            f"{METHOD_MAX_CHARS} characters", request_id)
    return method


def _params(data: Mapping[str, Any], request_id: int | None) -> dict[str, Any]:
    params = data.get("p", {})
    if not isinstance(params, dict):
        raise FrameError("malformed_frame", f"p must be a map, got {msgpack_kind(params)}",
                         request_id)
    return params


_KINDS: dict[type, str] = {dict: "map", list: "array", str: "string", bytes: "binary",
                           bool: "boolean", int: "integer", float: "float", type(None): "nil"}


def msgpack_kind(value: Any) -> str:
    """The msgpack name of a value's type, for error messages."""
    return _KINDS.get(type(value), type(value).__name__)


def decode(data: bytes | str, max_bytes: int = MAX_FRAME_BYTES) -> Frame:
    """Parse one received frame; raises only FrameError (its `request_id` set when the
    frame's id could be read, so that the error can answer the request)."""
    if isinstance(data, str):
        raise FrameError("malformed_frame", "frames are binary (msgpack); got a text frame")
    if len(data) > max_bytes:
        raise FrameError("frame_too_large", f"frame of {len(data)} bytes exceeds the limit of "
                                            f"{max_bytes}", size_bytes=len(data))
    try:
        message = msgpack_loads(data)
    except TooMany as exc:
        # Too many values to build: as for a frame too large, nothing is kept (id nil).
        raise FrameError("frame_too_large", f"frame {exc}", size_bytes=len(data)) from None
    except TooDeep as exc:
        raise FrameError("malformed_frame", str(exc)) from None
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise FrameError("malformed_frame",
                         f"not one msgpack value: {errors.bounded(str(exc))}") from None
    if not isinstance(message, dict):
        raise FrameError("malformed_frame", f"a frame is a map, got {msgpack_kind(message)}")
    request_id = _request_id(message.get("id"))
    try:
        # Before anything (an error message, a repr, a comparison) walks the frame.
        check_depth(message)
    except TooDeep as exc:
        raise FrameError("malformed_frame", str(exc), request_id) from None
    kind = message.get("t")
    if kind not in FRAME_TYPES:
        raise FrameError("unknown_type", f"t must be one of {', '.join(FRAME_TYPES)}, "
                                         f"got {excerpt(kind)}", request_id)
    if kind == "evt":
        return Event(_method(message, None), _params(message, None))
    if request_id is None:
        raise FrameError("malformed_frame", f"id must be an integer from 0 to {ID_MAX}")
    if kind == "req":
        return Request(request_id, _method(message, request_id), _params(message, request_id))
    if ("p" in message) == ("e" in message):
        raise FrameError("malformed_frame", "a response has exactly one of p and e", request_id)
    error = message.get("e")
    if error is not None and not (isinstance(error, dict)
                                  and isinstance(error.get("code"), str)
                                  and isinstance(error.get("message", ""), str)):
        raise FrameError("malformed_frame", "e must be a map with string code and message",
                         request_id)
    return Response(request_id, message.get("p"), error)


def error_body(code: str, message: str, **details: Any) -> dict[str, Any]:
    return {"code": code, "message": message, **details}


# -- error codes ----------------------------------------------------------------------------------
class UnknownMethod(errors.BadRequest):
    """The method is not part of this protocol version."""

    code = "unknown_method"

    def __init__(self, method: str) -> None:
        super().__init__(f"unknown method {excerpt(method)}")
        self.method = method


class Busy(errors.AgentError):
    """A per-connection bound is reached (requests in flight, log subscriptions)."""

    code = "busy"


# Every code an error response of the agent can carry on this link (docs/protocol.md §7,
# checked against it by tests/unit/test_readme.py): the frame checks' codes, `busy`, and
# the codes of the AgentErrors that requests raise (the supervisor's `timeout` included;
# any other exception is answered `internal`), and `build_failed`, which a failed build's
# `error` carries (`build.get`, `build.finished`).
FRAME_ERROR_CODES = ("malformed_frame", "unknown_type", "frame_too_large")
REQUEST_ERRORS: tuple[type[errors.AgentError], ...] = (
    errors.BadRequest, errors.InvalidSpec, errors.NotFound, errors.Conflict, errors.Draining,
    errors.NotReady, errors.Timeout, UnknownMethod, Busy, errors.BuildFailed,
    errors.AgentError)
ERROR_CODES = (*(cls.code for cls in REQUEST_ERRORS), *FRAME_ERROR_CODES)
