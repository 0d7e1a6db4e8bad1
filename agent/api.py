"""The operator API: HTTP/1.1 + JSON on the agent's Unix socket (DESIGN §7).

Handlers translate between HTTP and the agent's own calls; `AgentError` subclasses become
the JSON error shape here and nowhere else.
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from aiohttp import web

from agent.errors import AgentError, Forbidden, MethodNotAllowed, NotFound
from agent.peercred import is_allowed, peer_credentials

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Backend(Protocol):
    """What the API needs from the agent."""

    def info(self) -> dict[str, Any]: ...

    @property
    def socket_gid(self) -> int | None: ...


def error_response(error: AgentError) -> web.Response:
    body = {"error": {"code": error.code, "message": error.message}}
    return web.json_response(body, status=int(error.http_status))


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(data, separators=(",", ":")) + "\n", status=status,
                        content_type="application/json")


def _make_middlewares(backend: Backend) -> list[Any]:
    @web.middleware
    async def peer_check(request: web.Request, handler: Handler) -> web.StreamResponse:
        transport = request.transport
        sock = transport.get_extra_info("socket") if transport is not None else None
        if isinstance(sock, socket.socket) and sock.family == socket.AF_UNIX:
            cred = peer_credentials(sock)
            if not is_allowed(cred, backend.socket_gid):
                log.warning("operator request refused", extra={"PEER_UID": cred.uid,
                                                                "PEER_PID": cred.pid})
                return error_response(Forbidden(
                    f"uid {cred.uid} is neither root nor in the socket's group"))
        return await handler(request)

    @web.middleware
    async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except AgentError as exc:
            return error_response(exc)
        except web.HTTPNotFound:
            return error_response(NotFound(f"no route {request.method} {request.path}"))
        except web.HTTPMethodNotAllowed:
            return error_response(MethodNotAllowed(
                f"{request.method} is not allowed on {request.path}"))

    return [peer_check, errors]


def build_app(backend: Backend) -> web.Application:
    app = web.Application(middlewares=_make_middlewares(backend))

    async def info(_request: web.Request) -> web.Response:
        return json_response(backend.info())

    app.router.add_get("/v1/info", info)
    return app
