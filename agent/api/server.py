"""The operator API: HTTP/1.1 + JSON on the agent's Unix socket (DESIGN §7).

Handlers translate between HTTP and the agent's own calls; `AgentError` subclasses become
the JSON error shape here and nowhere else, and every query parameter is checked in `_Query`.

Routes (all bodies JSON unless said otherwise):

- `GET /v1/info`; `GET /v1/dynos?app=`; `POST /v1/dynos` (a spec, 201 + status);
  `GET /v1/dynos/{ref}?app=`; `POST /v1/dynos/{ref}/restart|stop?app=` (200 + status);
  `POST /v1/dynos/{ref}/signal?app=` with `{"signal": "TERM"}` (a name with or without `SIG`,
  or a number; 200 + status); `DELETE /v1/dynos/{ref}?app=` (204).
- `GET /v1/logs?app=&dyno=&tail=N&follow=1&format=text|json`: log lines of DESIGN §6, one
  per line (`format=json`: one `LogLine.as_dict()` object per line). `tail` defaults to 100
  without `follow` and to 0 with it (only new lines), at most `MAX_TAIL`. With `follow=1` the
  answer is a chunked stream, written in batches as lines arrive, that ends when the client
  goes away or the agent closes its log hub.
- `GET /v1/events?app=&follow=1`: JSON lines. The agent keeps no event history, so without
  `follow` the answer is a snapshot: one event per dyno for the state it is in now
  (`previous` null, `at` = when it entered that state). With `follow=1`: the state changes
  from now on, streamed, and `{"dropped": N}` when this reader fell behind by N events.
- `GET /metrics`: Prometheus text exposition, `text/plain; version=0.0.4`.
- `POST /v1/builds` with a build request (`{"app", "source": {"path"} | {"url", "sha256"},
  "buildpacks"?, "env"?, "stack"?, "timeout_s"?, "use_cache"?}`): 202 + the build, `pending`;
  `GET /v1/builds?app=` (the builds kept, oldest first); `GET /v1/builds/{id}`: the build,
  `succeeded` with its `result` (slug path and sha256) or `failed` with its `error`.
- `GET /v1/formation?app=`; `POST /v1/formation` with `{"app": A?, "formation": ["web=3",
  "worker=1:standard-2x"]}`: the formation of standalone mode (409 `conflict` from an agent
  whose formation comes from a coordinator).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import socket
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from typing import Any, Final, Protocol, TypeVar, cast

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from agent.builds.buildpacks import ALIASES, BUILTINS
from agent.decoding import TooDeep, json_loads
from agent.errors import (
    AgentError,
    BadRequest,
    Conflict,
    Forbidden,
    MethodNotAllowed,
    NotFound,
    excerpt,
)
from agent.observability.logs import Follower, LineBlock, LogHub, LogLine
from agent.peercred import PeerCred, PeerCredError, is_allowed, peer_credentials
from agent.signals import parse_signal
from agent.supervision.events import EventFollower, WireEvent, concerns, to_wire

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
T = TypeVar("T")

LOGS_TAIL_DEFAULT: Final = 100  # Heroku's `heroku logs` default
MAX_TAIL: Final = 100_000  # far above any tail buffer; larger is a typo, not a wish
FOLLOW_BATCH_LINES: Final = 500  # lines per write when a follower has a backlog
# A log follower's backlog goes out in writes of up to this many lines (blocks stay whole).
LOG_FOLLOW_BATCH_LINES: Final = 8192
# The kernel keeps this much of a log follow stream: what one turn of the loop can hand the
# reader. The default (~200 KiB, some 4,000 short lines) is less than a turn can bring when
# dynos print fast: a reader that keeps up would still fall behind and lose lines.
LOG_FOLLOW_SNDBUF_BYTES: Final = 1 << 20
OPERATIONS_DRAIN_S: Final = 10.0  # how long shutdown waits for lifecycle calls in flight
JSON_LINES: Final = "application/x-ndjson; charset=utf-8"
TEXT_LINES: Final = "text/plain; charset=utf-8"
PROMETHEUS_TEXT: Final = "text/plain; version=0.0.4; charset=utf-8"
# Dyno ids are [a-z0-9-]{1,64} (a leading dash included) and names "<type>.<n>" with type
# [a-z][a-z0-9_]{0,29}.
_REF = re.compile(r"[a-z0-9-][a-z0-9_.-]{0,99}")
# Build ids are UUIDs.
_BUILD_ID = re.compile(r"[0-9a-f-]{1,64}")
_ASCII_INT = re.compile(r"[0-9]{1,18}")
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


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

    # Optional: `list_dynos_json(app) -> str`, `list_dynos(app)` already encoded as compact
    # JSON (the daemon keeps each dyno's encoding); the API encodes `list_dynos()` without it.

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

    async def start_build(self, body: Any) -> dict[str, Any]:
        """Check a build request and start the build; returns it (`pending`) at once."""
        ...

    def get_build(self, build_id: str) -> dict[str, Any]: ...

    def list_builds(self, app: str | None = None) -> list[dict[str, Any]]: ...


def _demote_parse_errors(record: logging.LogRecord) -> bool:
    """aiohttp's parser refuses a request that is not HTTP/1.1 (a header over 8190 bytes, a
    bad Content-Length) with a 400 before any handler runs, and logs it as an exception with
    its traceback. That is the client's mistake: a warning with a bounded excerpt, so that a
    member of the socket's group cannot fill the journal with error-level tracebacks."""
    failure = record.exc_info[1] if record.exc_info else None
    if isinstance(failure, HttpProcessingError):
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.msg, record.args = "refused a request that is not HTTP/1.1: %s", (
            excerpt(f"{failure.code} {failure.message}".strip()),)
        record.exc_info, record.exc_text = None, None
    return True


# The logger given to aiohttp's HTTP layer (the daemon's AppRunner(logger=...)).
HTTP_LAYER_LOG: Final = logging.getLogger(f"{__name__}.http")
HTTP_LAYER_LOG.addFilter(_demote_parse_errors)


def error_response(error: AgentError) -> web.Response:
    body = {"error": {"code": error.code, "message": error.message}}
    return web.json_response(body, status=int(error.http_status))


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(data, separators=(",", ":")) + "\n", status=status,
                        content_type="application/json")


# -- request validation: the only place query strings, path parts and bodies are read --------

class _Query:
    """The query string of one request, checked against the keys its route accepts.

    Unknown or repeated keys are a BadRequest: `?tial=5` silently meaning "no tail" would
    be worse than an error.
    """

    def __init__(self, request: web.Request, allowed: frozenset[str]) -> None:
        self._values: dict[str, str] = {}
        for key, value in request.query.items():
            if key not in allowed:
                accepted = ", ".join(sorted(allowed)) or "none"
                raise BadRequest(f"unknown query parameter {excerpt(key)} (accepted: "
                                 f"{accepted})")
            if key in self._values:
                raise BadRequest(f"query parameter {excerpt(key)} given more than once")
            self._values[key] = value

    def text(self, key: str) -> str | None:
        """A string parameter; empty means absent (`?app=` is "any app")."""
        value = self._values.get(key, "")
        return value or None

    def integer(self, key: str, default: int, low: int, high: int) -> int:
        raw = self._values.get(key)
        if raw is None or raw == "":
            return default
        # ASCII digits only: int() also takes Arabic-Indic digits, "+5", " 5" and "1_0".
        if not _ASCII_INT.fullmatch(raw):
            raise BadRequest(f"{key} must be an integer, got {excerpt(raw)}")
        value = int(raw, 10)
        if not low <= value <= high:
            raise BadRequest(f"{key} must be between {low} and {high}, got {value}")
        return value

    def flag(self, key: str) -> bool:
        raw = self._values.get(key, "").lower()
        if raw in _TRUE:
            return True
        if raw in _FALSE:
            return False
        raise BadRequest(f"{key} must be 1 or 0, got {excerpt(self._values[key])}")

    def choice(self, key: str, choices: tuple[str, ...]) -> str:
        raw = self._values.get(key) or choices[0]
        if raw not in choices:
            raise BadRequest(f"{key} must be one of {', '.join(choices)}, got {excerpt(raw)}")
        return raw


def _ref(request: web.Request) -> str:
    ref = request.match_info["ref"]
    if not _REF.fullmatch(ref):
        raise BadRequest(f"{excerpt(ref)} is neither a dyno id nor a dyno name")
    return ref


async def _json_body(request: web.Request) -> Any:
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise BadRequest(f"request body over {request.client_max_size} bytes") from None
    if not raw.strip():
        raise BadRequest("request body is empty; a JSON object is required")
    try:
        return json_loads(raw)
    except TooDeep as exc:
        raise BadRequest(f"request body is {exc}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None


async def _json_object(request: web.Request) -> dict[str, Any]:
    body = await _json_body(request)
    if not isinstance(body, dict):
        raise BadRequest(f"request body must be a JSON object, got {type(body).__name__}")
    return body


def signal_name(value: Any) -> str:
    """Canonical `SIGxxx` name of a signal given as "TERM", "SIGTERM", "15" or 15."""
    return parse_signal(value).name


# -- owners of what outlives a single await in a handler --------------------------------------

class _Operations:
    """Lifecycle calls in flight, each in a task of its own shielded from its request.

    The server cancels a handler whose client went away (`handler_cancellation`, needed to end
    follow streams); a start or stop abandoned halfway would leave half-made dynos, so the call
    runs on and its outcome is logged. Shutdown waits for these tasks, then cancels them.
    """

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    async def run(self, coro: Coroutine[Any, Any, T], name: str) -> T:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.done():
                task.add_done_callback(_log_orphan_outcome)
            raise

    async def drain(self, timeout_s: float) -> None:
        if not self._tasks:
            return
        _done, pending = await asyncio.wait(set(self._tasks), timeout=timeout_s)
        for task in pending:
            log.warning("cancelling %s: still running at shutdown", task.get_name())
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


def _log_orphan_outcome(task: asyncio.Task[Any]) -> None:
    if task.cancelled():
        log.info("%s cancelled after its client went away", task.get_name())
    elif (exc := task.exception()) is not None:
        log.info("%s failed after its client went away: %s", task.get_name(), exc)
    else:
        log.info("%s finished after its client went away", task.get_name())


class _Streams:
    """Followers behind open follow responses; shutdown closes them so each stream ends with
    a proper last chunk instead of being cut off at the runner's deadline."""

    def __init__(self) -> None:
        self._open: set[Follower | EventFollower] = set()

    def __len__(self) -> int:
        return len(self._open)

    @contextlib.contextmanager
    def track(self, follower: Follower | EventFollower) -> Iterator[None]:
        self._open.add(follower)
        try:
            yield
        finally:
            self._open.discard(follower)
            follower.close()

    def close_all(self) -> None:
        for follower in list(self._open):
            follower.close()


_OPERATIONS = web.AppKey("operations", _Operations)
_PEER_UID = web.RequestKey("peer_uid", int)
_STREAMS = web.AppKey("streams", _Streams)


async def _stream(request: web.Request, items: AsyncIterator[T], encode: Callable[[T], str],
                  content_type: str, drain: Callable[[], T | None] | None = None,
                  ) -> web.StreamResponse:
    """Write `items` as a chunked body until they end or the client goes away.

    `drain` takes what is already queued without waiting, so a backlog goes out in batches
    of up to FOLLOW_BATCH_LINES lines per write rather than one write per line.
    """
    response = web.StreamResponse(headers={"Content-Type": content_type,
                                           "Cache-Control": "no-store"})
    response.enable_chunked_encoding()
    await response.prepare(request)
    try:
        async for item in items:
            batch = [encode(item)]
            while drain is not None and len(batch) < FOLLOW_BATCH_LINES:
                more = drain()
                if more is None:
                    break
                batch.append(encode(more))
            await response.write("".join(batch).encode("utf-8", "surrogateescape"))
        await response.write_eof()
    except ConnectionResetError:
        # aiohttp's ClientConnectionResetError is a ConnectionResetError: the reader left.
        log.debug("follow stream %s ended: client went away", request.path)
    return response


async def _stream_logs(request: web.Request, follower: Follower,
                       as_json: bool) -> web.StreamResponse:
    """A follower's lines as a chunked body: whatever is queued goes out in one write (up to
    LOG_FOLLOW_BATCH_LINES lines), a block of lines formatted whole."""
    response = web.StreamResponse(headers={
        "Content-Type": JSON_LINES if as_json else TEXT_LINES, "Cache-Control": "no-store"})
    response.enable_chunked_encoding()
    await response.prepare(request)
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, LOG_FOLLOW_SNDBUF_BYTES)
    try:
        while items := await follower.batch(LOG_FOLLOW_BATCH_LINES):
            if as_json:
                text = "".join([item.format_json() if isinstance(item, LineBlock)
                                else _json_line(item) for item in items])
            else:
                text = "".join([item.format_text() if isinstance(item, LineBlock)
                                else _text_line(item) for item in items])
            await response.write(text.encode("utf-8", "surrogateescape"))
        await response.write_eof()
    except ConnectionResetError:
        log.debug("follow stream %s ended: client went away", request.path)
    return response


def _text_line(line: LogLine) -> str:
    return line.format() + "\n"


def _json_line(item: Any) -> str:
    if isinstance(item, LogLine):
        item = item.as_dict()
    return json.dumps(item, separators=(",", ":")) + "\n"


def _snapshot_event(status: dict[str, Any]) -> dict[str, Any]:
    return {"id": status.get("id"), "app": status.get("app"), "name": status.get("name"),
            "state": status.get("state"), "previous": None, "reason": status.get("reason"),
            "exit_status": status.get("exit_status"), "at": status.get("since")}


# -- middlewares ----------------------------------------------------------------------------

PeerReader = Callable[[web.Request], PeerCred]


def transport_peer(request: web.Request) -> PeerCred:
    """The credentials of the process on the other end of the request's Unix socket.

    asyncio's transports hand out a TransportSocket (not a socket.socket), which reads
    SO_PEERCRED all the same; anything else (no socket, TCP) raises PeerCredError.
    """
    transport = request.transport
    return peer_credentials(transport.get_extra_info("socket") if transport is not None
                            else None)


def _make_middlewares(backend: Backend, peer_of: PeerReader) -> list[Any]:
    @web.middleware
    async def peer_check(request: web.Request, handler: Handler) -> web.StreamResponse:
        # Every route, /metrics included: fail closed when the peer cannot be identified.
        try:
            cred = peer_of(request)
        except PeerCredError as exc:
            log.warning("operator request refused: %s", exc)
            return error_response(Forbidden(f"the peer cannot be identified: {exc.strerror}"))
        if not is_allowed(cred, backend.socket_gid):
            log.warning("operator request refused", extra={"PEER_UID": cred.uid,
                                                            "PEER_PID": cred.pid})
            return error_response(Forbidden(
                f"uid {cred.uid} is neither root nor in the socket's group"))
        request[_PEER_UID] = cred.uid
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
        except web.HTTPException as exc:
            if exc.status >= 500:
                raise
            # What aiohttp itself refuses (an oversized body, a bad header) is the client's
            # mistake; it still gets the one error shape.
            return error_response(BadRequest(f"{exc.status} {exc.reason}: {exc.text or ''}"
                                              .strip(" :")))
        except Exception:
            # A request is a task root: a bug behind one route must not become aiohttp's
            # text/plain 500, and it must be in the agent's log with its traceback.
            log.exception("operator request %s %s failed", request.method, request.path)
            return error_response(AgentError(
                f"internal error in {request.method} {request.path}; see the agent's log"))

    return [peer_check, errors]


# -- the application ------------------------------------------------------------------------

def _check_slug_path_allowed(body: dict[str, Any], peer_uid: int) -> None:
    """A local slug path is read by the agent, as root, and mounted into the dyno: from a
    peer that is not root it would expose files that peer cannot read. Such peers give a
    `url` with its `sha256` instead."""
    if peer_uid in (0, os.geteuid()):
        return
    release = body.get("release")
    slug = release.get("slug") if isinstance(release, dict) else None
    if isinstance(slug, dict) and "path" in slug:
        raise Forbidden(f"uid {peer_uid} may not start a dyno from a local slug path; "
                        "give release.slug.url and sha256")


def _check_build_paths_allowed(body: dict[str, Any], peer_uid: int) -> None:
    """As for a slug path: a build's source path and buildpack directories are read by the
    agent, as root, and given to the build; a peer that is not root names URLs (with their
    sha256) and built-in buildpacks only."""
    if peer_uid in (0, os.geteuid()):
        return
    source = body.get("source")
    if isinstance(source, dict) and "path" in source:
        raise Forbidden(f"uid {peer_uid} may not build from a local source path; give "
                        "source.url and sha256")
    packs = body.get("buildpacks")
    for ref in packs if isinstance(packs, list) else ():
        if isinstance(ref, str) and "://" not in ref and ref not in (*BUILTINS, *ALIASES):
            raise Forbidden(f"uid {peer_uid} may not build with a buildpack directory "
                            f"({excerpt(ref)}); give a built-in name or a tarball URL")


def build_app(backend: Backend, peer_of: PeerReader = transport_peer) -> web.Application:
    """The operator API over `backend`. `peer_of` identifies a request's peer (the seam for
    tests served over TCP); it raises PeerCredError when it cannot, and the request is
    refused."""
    # handler_cancellation: a follow stream that is waiting for the next line learns that its
    # client left only through the cancellation of its handler (a GET has no body whose EOF
    # could tell it). Lifecycle calls are shielded from that by _Operations.
    app = web.Application(middlewares=_make_middlewares(backend, peer_of),
                          handler_args={"handler_cancellation": True})
    operations = app[_OPERATIONS] = _Operations()
    streams = app[_STREAMS] = _Streams()

    async def close_streams(_app: web.Application) -> None:
        streams.close_all()

    async def drain_operations(_app: web.Application) -> None:
        await operations.drain(OPERATIONS_DRAIN_S)

    app.on_shutdown.append(close_streams)
    app.on_cleanup.append(drain_operations)

    async def info(request: web.Request) -> web.Response:
        _Query(request, frozenset())
        return json_response(backend.info())

    async def list_dynos(request: web.Request) -> web.Response:
        query = _Query(request, frozenset({"app"}))
        encoded = getattr(backend, "list_dynos_json", None)
        if encoded is None:
            return json_response(backend.list_dynos(query.text("app")))
        return web.Response(text=encoded(query.text("app")) + "\n",
                            content_type="application/json")

    async def create_dyno(request: web.Request) -> web.Response:
        _Query(request, frozenset())
        body = await _json_object(request)
        _check_slug_path_allowed(body, request[_PEER_UID])
        status = await operations.run(backend.create_dyno(body),
                                      f"api-create-{str(body.get('id') or 'new')[:64]}")
        return json_response(status, status=201)

    async def get_dyno(request: web.Request) -> web.Response:
        ref, app_name = _ref(request), _Query(request, frozenset({"app"})).text("app")
        return json_response(backend.get_dyno(ref, app_name))

    async def restart_dyno(request: web.Request) -> web.Response:
        ref, app_name = _ref(request), _Query(request, frozenset({"app"})).text("app")
        return json_response(await operations.run(backend.restart_dyno(ref, app_name),
                                                  f"api-restart-{ref}"))

    async def stop_dyno(request: web.Request) -> web.Response:
        ref, app_name = _ref(request), _Query(request, frozenset({"app"})).text("app")
        return json_response(await operations.run(backend.stop_dyno(ref, app_name),
                                                  f"api-stop-{ref}"))

    async def signal_dyno(request: web.Request) -> web.Response:
        ref, app_name = _ref(request), _Query(request, frozenset({"app"})).text("app")
        body = await _json_object(request)
        unknown = sorted(set(body) - {"signal"})
        if unknown:
            raise BadRequest(f"unknown key {excerpt(unknown[0])} in signal request")
        if "signal" not in body:
            raise BadRequest('signal request needs {"signal": NAME or NUMBER}')
        name = signal_name(body["signal"])
        return json_response(await operations.run(backend.signal_dyno(ref, name, app_name),
                                                  f"api-signal-{ref}"))

    async def delete_dyno(request: web.Request) -> web.Response:
        ref, app_name = _ref(request), _Query(request, frozenset({"app"})).text("app")
        await operations.run(backend.delete_dyno(ref, app_name), f"api-delete-{ref}")
        return web.Response(status=204)

    async def logs(request: web.Request) -> web.StreamResponse:
        query = _Query(request, frozenset({"app", "dyno", "tail", "follow", "format"}))
        app_name, dyno = query.text("app"), query.text("dyno")
        follow = query.flag("follow")
        tail = query.integer("tail", 0 if follow else LOGS_TAIL_DEFAULT, 0, MAX_TAIL)
        as_json = query.choice("format", ("text", "json")) == "json"
        encode: Callable[[LogLine], str] = _json_line if as_json else _text_line
        content_type = JSON_LINES if as_json else TEXT_LINES
        hub = backend.log_hub
        if not follow:
            body = "".join(encode(line) for line in hub.tail(app_name, dyno, tail))
            return web.Response(body=body.encode("utf-8", "surrogateescape"),
                                headers={"Content-Type": content_type})
        follower = hub.subscribe(app_name, dyno, tail=tail)
        with streams.track(follower):
            return await _stream_logs(request, follower, as_json)

    async def events(request: web.Request) -> web.StreamResponse:
        query = _Query(request, frozenset({"app", "follow"}))
        app_name = query.text("app")
        if not query.flag("follow"):
            body = "".join(_json_line(_snapshot_event(status))
                           for status in backend.list_dynos(app_name))
            return web.Response(body=body.encode(), headers={"Content-Type": JSON_LINES})
        follower = backend.subscribe_events()
        with streams.track(follower):
            async with contextlib.aclosing(_events_of(follower, app_name)) as items:
                return await _stream(request, items, _json_line, JSON_LINES)

    def formation_backend(name: str) -> Callable[..., Any]:
        # Optional: only an agent with a formation of its own (standalone mode) has these.
        method = getattr(backend, name, None)
        if method is None:
            raise Conflict("this agent has no formation of its own; scale works in standalone "
                           "mode (dynoagent up)")
        return cast(Callable[..., Any], method)

    async def get_formation(request: web.Request) -> web.Response:
        app_name = _Query(request, frozenset({"app"})).text("app")
        return json_response(formation_backend("get_formation")(app_name))

    async def scale(request: web.Request) -> web.Response:
        _Query(request, frozenset())
        body = await _json_object(request)
        unknown = sorted(set(body) - {"app", "formation"})
        if unknown:
            raise BadRequest(f"unknown key {excerpt(unknown[0])} in formation request")
        app_name = body.get("app")
        if app_name is not None and not isinstance(app_name, str):
            raise BadRequest("app must be a string")
        call = formation_backend("scale")(app_name, body.get("formation"))
        return json_response(await operations.run(call, "api-scale"))

    async def start_build(request: web.Request) -> web.Response:
        _Query(request, frozenset())
        body = await _json_object(request)
        _check_build_paths_allowed(body, request[_PEER_UID])
        build = await operations.run(backend.start_build(body), "api-build")
        return json_response(build, status=202)

    async def list_builds(request: web.Request) -> web.Response:
        query = _Query(request, frozenset({"app"}))
        return json_response(backend.list_builds(query.text("app")))

    async def get_build(request: web.Request) -> web.Response:
        _Query(request, frozenset())
        build_id = request.match_info["id"]
        if not _BUILD_ID.fullmatch(build_id):
            raise BadRequest(f"{excerpt(build_id)} is not a build id")
        return json_response(backend.get_build(build_id))

    async def metrics(request: web.Request) -> web.Response:
        _Query(request, frozenset())
        return web.Response(body=backend.metrics_text().encode(),
                            headers={"Content-Type": PROMETHEUS_TEXT})

    router = app.router
    router.add_get("/v1/info", info)
    router.add_get("/v1/dynos", list_dynos)
    router.add_post("/v1/dynos", create_dyno)
    router.add_get("/v1/dynos/{ref}", get_dyno)
    router.add_delete("/v1/dynos/{ref}", delete_dyno)
    router.add_post("/v1/dynos/{ref}/restart", restart_dyno)
    router.add_post("/v1/dynos/{ref}/stop", stop_dyno)
    router.add_post("/v1/dynos/{ref}/signal", signal_dyno)
    # No HEAD on the streams: a HEAD of a follow stream would hold a follower with no body
    # to write it to.
    router.add_get("/v1/logs", logs, allow_head=False)
    router.add_get("/v1/events", events, allow_head=False)
    router.add_get("/metrics", metrics)
    router.add_post("/v1/builds", start_build)
    router.add_get("/v1/builds", list_builds)
    router.add_get("/v1/builds/{id}", get_build)
    router.add_get("/v1/formation", get_formation)
    router.add_post("/v1/formation", scale)
    return app


async def _events_of(follower: EventFollower,
                     app: str | None) -> AsyncGenerator[WireEvent, None]:
    async for event in follower:
        if concerns(event, app):
            yield to_wire(event)
