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
from agent.events import EventFollower
from agent.logs import LogHub
from agent.peercred import is_allowed, peer_credentials

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Backend(Protocol):
    """What the API needs from the agent (the daemon implements it over the supervisor).

    `ref` is a dyno id or a dyno name (`web.1`); a name shared by dynos of several apps needs
    `app` and is otherwise a Conflict. Every method raises AgentError subclasses only.
    Status objects and event dicts have the fields of DESIGN §7.
    """

    @property
    def socket_gid(self) -> int | None: ...

    def info(self) -> dict[str, Any]: ...

    def list_dynos(self, app: str | None = None) -> list[dict[str, Any]]: ...

    def get_dyno(self, ref: str, app: str | None = None) -> dict[str, Any]:
        """Status plus detail: spec, cgroup, netns, limits, last exit, stats, launch timings."""
        ...

    async def create_dyno(self, body: Any) -> dict[str, Any]:
        """Start a dyno from a spec (DESIGN §5); idempotent by id. Returns its status."""
        ...

    async def restart_dyno(self, ref: str, app: str | None = None) -> dict[str, Any]: ...

    async def stop_dyno(self, ref: str, app: str | None = None) -> dict[str, Any]: ...

    async def signal_dyno(self, ref: str, signal: str, app: str | None = None) -> dict[str, Any]:
        """Send a signal (name like "USR1" or "SIGUSR1", or a number) to every process."""
        ...

    async def delete_dyno(self, ref: str, app: str | None = None) -> None:
        """Stop the dyno and forget it (frees its cgroup, address, user and record)."""
        ...

    @property
    def log_hub(self) -> LogHub: ...

    def subscribe_events(self) -> EventFollower:
        """State changes from now on; `async for event in follower`, `with follower:`."""
        ...

    def metrics_text(self) -> str:
        """Prometheus text exposition of every dyno and the agent."""
        ...


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
