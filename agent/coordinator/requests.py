"""The requests a coordinator may send (docs/protocol.md §4): each one's params checked, then
mapped onto the supervisor and the convergence engine.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from agent import errors
from agent.coordinator.frames import UnknownMethod, msgpack_kind
from agent.coordinator.logfeed import LogFeed
from agent.errors import excerpt
from agent.spec import APP, ID, NAME
from agent.supervision.reconcile import Engine, InvalidDesiredSet

DYNO_ID = re.compile(r"[a-z0-9-]{1,64}")
LOGS_TAIL_DEFAULT = 100  # the operator API's `GET /v1/logs` default, Heroku's too
LOGS_TAIL_MAX = 10_000


class DynoHost(Protocol):
    """What request handlers need of the supervisor."""

    draining: bool

    def list_dynos(self, app: str | None = None) -> list[dict[str, Any]]: ...

    async def stop_dyno(self, ref: str, app: str | None = None) -> dict[str, Any]: ...

    async def restart_dyno(self, ref: str, app: str | None = None) -> dict[str, Any]: ...

    async def signal_dyno(self, ref: str, signal: str,
                          app: str | None = None) -> dict[str, Any]: ...


class BuildHost(Protocol):
    """What request handlers need of the build registry (agent/builds/service.py)."""

    async def start(self, body: Any) -> dict[str, Any]: ...

    def get(self, build_id: str) -> dict[str, Any]: ...

    def list(self, app: str | None = None) -> list[dict[str, Any]]: ...


def _fields(params: Mapping[str, Any], required: Mapping[str, type | tuple[type, ...]],
            optional: Mapping[str, type | tuple[type, ...]] | None = None) -> dict[str, Any]:
    """Check a request's params: every required key, no unknown key, each of its type."""
    optional = optional or {}
    for key in params:
        if key not in required and key not in optional:
            known = ", ".join([*required, *optional]) or "none"
            raise errors.BadRequest(f"p: unknown key {excerpt(key)} (known keys: {known})")
    out: dict[str, Any] = {}
    for key, kind in {**required, **optional}.items():
        if key not in params:
            if key in required:
                raise errors.BadRequest(f"p.{key}: is required")
            continue
        value = params[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds:
            raise errors.BadRequest(f"p.{key}: must be {kinds[0].__name__}, got boolean")
        if not isinstance(value, kinds):
            raise errors.BadRequest(f"p.{key}: must be {kinds[0].__name__}, "
                                    f"got {msgpack_kind(value)}")
        out[key] = value
    return out


def _dyno_id(value: str) -> str:
    if not DYNO_ID.fullmatch(value):
        raise errors.BadRequest(f"p.id: must match [a-z0-9-]{{1,64}}, got {excerpt(value)}")
    return value


def _log_filter(p: Mapping[str, Any]) -> tuple[str, str | None]:
    """The `app` and optional `dyno` (a name or an id) of a logs request."""
    app, dyno = p["app"], p.get("dyno")
    if not APP.fullmatch(app):
        raise errors.BadRequest(f"p.app: must match [a-z][a-z0-9-]{{0,29}}, got {excerpt(app)}")
    if dyno is not None and not (NAME.fullmatch(dyno) or ID.fullmatch(dyno)):
        raise errors.BadRequest(f"p.dyno: must be a dyno name (web.1) or id, got "
                                f"{excerpt(dyno)}")
    return app, dyno


def _tail(p: Mapping[str, Any], default: int, low: int) -> int:
    tail: int = p.get("tail", default)
    if not low <= tail <= LOGS_TAIL_MAX:
        raise errors.BadRequest(f"p.tail: must be an integer from {low} to {LOGS_TAIL_MAX}, "
                                f"got {tail}")
    return tail


class Requests:
    """The requests a coordinator may send, each validated and mapped onto the supervisor
    and the convergence engine (and, given `builds`, onto the build registry; given `logs`,
    onto the log feed). `handle` raises only `errors.AgentError`."""

    def __init__(self, dynos: DynoHost, engine: Engine,
                 info: Callable[[], dict[str, Any]], *,
                 builds: BuildHost | None = None, logs: LogFeed | None = None,
                 spaces: Callable[[dict[str, Any]], Awaitable[Any]] | None = None,
                 drains: Callable[[dict[str, Any]], Awaitable[Any]] | None = None) -> None:
        self.dynos = dynos
        self.engine = engine
        self.info = info
        self.builds = builds
        self.logs = logs
        self._methods: dict[str, Callable[[dict[str, Any]], Awaitable[Any]]] = {
            "dynos.sync": self.sync,
            "dyno.start": self.start,
            "dyno.stop": self.stop,
            "dyno.restart": self.restart,
            "dyno.signal": self.signal,
            "agent.drain": self.drain,
            "agent.info": self.agent_info,
        }
        if builds is not None:
            self._methods.update({"build.start": self.build_start, "build.get": self.build_get,
                                  "build.list": self.build_list})
        if spaces is not None:
            self._methods["spaces.sync"] = spaces
        if drains is not None:
            self._methods["drains.sync"] = drains
        if logs is not None:
            self._methods.update({"logs.tail": self.logs_tail, "logs.follow": self.logs_follow,
                                  "logs.unfollow": self.logs_unfollow})

    @property
    def methods(self) -> tuple[str, ...]:
        return tuple(self._methods)

    async def handle(self, method: str, params: dict[str, Any]) -> Any:
        call = self._methods.get(method)
        if call is None:
            raise UnknownMethod(method)
        return await call(params)

    def _status(self, dyno_id: str) -> dict[str, Any]:
        for status in self.dynos.list_dynos():
            if status["id"] == dyno_id:
                return status
        raise errors.NotFound(f"no dyno {dyno_id}")

    async def sync(self, params: dict[str, Any]) -> dict[str, Any]:
        p = _fields(params, {"generation": int, "dynos": list})
        try:
            report = await self.engine.apply(p["generation"], p["dynos"])
        except InvalidDesiredSet as exc:
            if exc.field in ("generation", "dynos"):
                raise errors.BadRequest(f"p.{exc}") from None
            raise errors.InvalidSpec(str(exc), exc.field) from None
        return report.as_dict()

    async def start(self, params: dict[str, Any]) -> dict[str, Any]:
        spec = await self.engine.start(params)
        return self._status(spec.id)

    async def stop(self, params: dict[str, Any]) -> dict[str, Any]:
        dyno_id = _dyno_id(_fields(params, {"id": str})["id"])
        self._status(dyno_id)
        return await self.dynos.stop_dyno(dyno_id)

    async def restart(self, params: dict[str, Any]) -> dict[str, Any]:
        dyno_id = _dyno_id(_fields(params, {"id": str})["id"])
        self._status(dyno_id)
        return await self.dynos.restart_dyno(dyno_id)

    async def signal(self, params: dict[str, Any]) -> dict[str, Any]:
        p = _fields(params, {"id": str, "signal": (str, int)})
        dyno_id = _dyno_id(p["id"])
        self._status(dyno_id)
        return await self.dynos.signal_dyno(dyno_id, str(p["signal"]))

    async def drain(self, params: dict[str, Any]) -> dict[str, Any]:
        """Stop accepting starts; with `stop`, also stop every dyno gracefully; with
        `cancel`, accept starts again."""
        p = _fields(params, {}, {"stop": bool, "cancel": bool})
        if p.get("cancel") and p.get("stop"):
            raise errors.BadRequest("p: stop and cancel exclude each other")
        self.dynos.draining = not p.get("cancel", False)
        stopped: list[str] = []
        failed: list[dict[str, str]] = []
        if p.get("stop"):
            running = [s["id"] for s in self.dynos.list_dynos()
                       if s["state"] in ("starting", "up", "crashed")]
            outcomes = await asyncio.gather(*(self.dynos.stop_dyno(i) for i in running),
                                            return_exceptions=True)
            for dyno_id, outcome in zip(running, outcomes, strict=True):
                if isinstance(outcome, errors.AgentError):
                    failed.append({"id": dyno_id, "code": outcome.code,
                                   "message": outcome.message})
                elif isinstance(outcome, BaseException):
                    failed.append({"id": dyno_id, "code": errors.AgentError.code,
                                   "message": str(outcome)})
                else:
                    stopped.append(dyno_id)
        return {"draining": self.dynos.draining, "stopped": stopped, "failed": failed,
                "dynos": self.dynos.list_dynos()}

    async def agent_info(self, params: dict[str, Any]) -> dict[str, Any]:
        _fields(params, {})
        return self.info()

    async def build_start(self, params: dict[str, Any]) -> dict[str, Any]:
        """Start a build (`p` is the build request itself); answered with the pending build,
        its outcome arrives as a `build.finished` event."""
        assert self.builds is not None
        return await self.builds.start(params)

    async def build_get(self, params: dict[str, Any]) -> dict[str, Any]:
        assert self.builds is not None
        return self.builds.get(_fields(params, {"id": str})["id"])

    async def build_list(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        assert self.builds is not None
        return self.builds.list(_fields(params, {}, {"app": str}).get("app"))

    async def logs_tail(self, params: dict[str, Any]) -> list[dict[str, str]]:
        """The last `tail` lines of an app (or one of its dynos) kept here, in time order."""
        assert self.logs is not None
        p = _fields(params, {"app": str}, {"dyno": str, "tail": int})
        app, dyno = _log_filter(p)
        return self.logs.tail(app, dyno, _tail(p, LOGS_TAIL_DEFAULT, 1))

    async def logs_follow(self, params: dict[str, Any]) -> dict[str, int]:
        """New lines of an app (or dyno) as `log.line` events on this connection, after the
        last `tail` lines kept (none by default)."""
        assert self.logs is not None
        p = _fields(params, {"app": str}, {"dyno": str, "tail": int})
        app, dyno = _log_filter(p)
        return {"subscription": self.logs.follow(app, dyno, _tail(p, 0, 0))}

    async def logs_unfollow(self, params: dict[str, Any]) -> dict[str, Any]:
        assert self.logs is not None
        number = _fields(params, {"subscription": int})["subscription"]
        return {"subscription": number, "unfollowed": self.logs.unfollow(number)}
