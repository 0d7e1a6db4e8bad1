"""The builds an agent runs for others (operator API `POST /v1/builds`, the coordinator's
`build.start`): each request checked at the edge, its source resolved like a dyno's slug, the
build run as an owned task, and its outcome kept for a while (the last MAX_FINISHED)."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import stat
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from agent import errors
from agent.builds.builder import DEFAULT_TIMEOUT_S, BuildRequest, BuildResult
from agent.errors import excerpt
from agent.observability.logs import format_timestamp
from agent.slugs.roots import SlugPathRefused, SlugRoots
from agent.slugs.store import SlugError
from agent.spec import (
    APP,
    HOST_STACK,
    STACK,
    TIMEOUT_MAX_S,
    SlugSource,
    SpecError,
    parse_env,
    parse_slug_source,
)
from agent.tasks import OwnedTasks

log = logging.getLogger(__name__)

# Finished builds answered by `get` and `list`; older ones are forgotten (their slugs stay).
MAX_FINISHED = 100
# Builds of one agent wait for each other per app; more than this many waiting is a runaway
# client, not a workload.
MAX_UNFINISHED = 100
MAX_BUILDPACKS = 16
BUILDPACK_MAX_CHARS = 4096
_KEYS = ("app", "source", "buildpacks", "env", "stack", "timeout_s", "use_cache")
BUILD_ID_CHARS = 64


class BuildStatus(StrEnum):
    PENDING = "pending"  # accepted: its source being fetched, waiting its turn, or building
    SUCCEEDED = "succeeded"
    FAILED = "failed"


@dataclass(frozen=True)
class BuildBody:
    """A build request as it arrived, checked (DESIGN §10; docs/protocol.md `build.start`)."""

    app: str
    source: SlugSource
    buildpacks: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    stack: str = HOST_STACK
    timeout_s: float = DEFAULT_TIMEOUT_S
    use_cache: bool = True


def parse_build(data: Any) -> BuildBody:
    """Validate a build request; raises InvalidSpec naming the offending field."""
    try:
        return _parse(data)
    except SpecError as exc:
        raise errors.InvalidSpec(str(exc), exc.field) from None


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _parse(data: Any) -> BuildBody:
    if not isinstance(data, Mapping):
        raise SpecError("build", f"must be an object, got {_kind(data)}")
    for key in data:
        if key not in _KEYS:
            raise SpecError(key if isinstance(key, str) and key.isidentifier() else "build",
                            f"unknown key {excerpt(key)}; known keys: {', '.join(_KEYS)}", key)
    for required in ("app", "source"):
        if required not in data:
            raise SpecError(required, "is required")
    app = data["app"]
    if not isinstance(app, str) or not APP.fullmatch(app):
        raise SpecError("app", f"must match {APP.pattern}, got {excerpt(app)}", app)
    source = parse_slug_source(data["source"], "source")
    buildpacks = data.get("buildpacks", [])
    if not isinstance(buildpacks, list):
        raise SpecError("buildpacks", f"must be an array, got {_kind(buildpacks)}")
    if len(buildpacks) > MAX_BUILDPACKS:
        raise SpecError("buildpacks", f"names {len(buildpacks)} buildpacks; at most "
                                      f"{MAX_BUILDPACKS}")
    for index, ref in enumerate(buildpacks):
        where = f"buildpacks[{index}]"
        if not isinstance(ref, str):
            raise SpecError(where, f"must be a string, got {_kind(ref)}")
        if not ref or len(ref) > BUILDPACK_MAX_CHARS or not ref.isprintable():
            raise SpecError(where, f"must be a built-in name, a directory or a tarball URL of "
                                   f"1-{BUILDPACK_MAX_CHARS} printable characters, got "
                                   f"{excerpt(ref)}", ref)
    env = parse_env(data.get("env", {}), "env")
    stack = data.get("stack", HOST_STACK)
    if not isinstance(stack, str) or not (stack == HOST_STACK or STACK.fullmatch(stack)):
        raise SpecError("stack", f'must be "host" or a stack name matching {STACK.pattern}, '
                                 f"got {excerpt(stack)}", stack)
    timeout_s = data.get("timeout_s", DEFAULT_TIMEOUT_S)
    if (isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float)
            or not math.isfinite(timeout_s) or not 1 <= timeout_s <= TIMEOUT_MAX_S):
        raise SpecError("timeout_s", f"must be a number within 1..{TIMEOUT_MAX_S}, got "
                                     f"{excerpt(timeout_s)}", timeout_s)
    use_cache = data.get("use_cache", True)
    if not isinstance(use_cache, bool):
        raise SpecError("use_cache", f"must be true or false, got {_kind(use_cache)}")
    return BuildBody(app=app, source=source, buildpacks=tuple(buildpacks), env=dict(env),
                     stack=stack, timeout_s=float(timeout_s), use_cache=use_cache)


@dataclass
class Build:
    """One build's record, owned by `Builds` (which alone changes it)."""

    id: str
    body: BuildBody
    created_at: datetime
    status: BuildStatus = BuildStatus.PENDING
    dyno: str | None = None
    result: BuildResult | None = None
    error: dict[str, str] | None = None
    finished_at: datetime | None = None

    def to_dict(self) -> dict[str, Any]:
        """The build object of the operator API and the coordinator protocol (no config
        vars: they may hold secrets)."""
        return {"id": self.id, "app": self.body.app, "status": str(self.status),
                "dyno": self.dyno, "source": self.body.source.to_dict(),
                "buildpacks": list(self.body.buildpacks), "stack": self.body.stack,
                "created_at": format_timestamp(self.created_at),
                "finished_at": (None if self.finished_at is None
                                else format_timestamp(self.finished_at)),
                "result": None if self.result is None else self.result.to_dict(),
                "error": self.error}


class Runner(Protocol):
    """What a build needs of the builder (agent/builds/builder.py `Builder`)."""

    async def build(self, request: BuildRequest, say: Callable[[str], None] | None = None,
                    named: Callable[[str], None] | None = None) -> BuildResult: ...


class SlugResolver(Protocol):
    """What a build needs of the slug store: a tarball or URL as an extracted directory."""

    async def resolve(self, source: SlugSource) -> Path: ...


@dataclass(frozen=True)
class _Local:
    """A local source path, checked against the slug roots and resolved."""

    path: str
    is_dir: bool


class Builds:
    """The builds of one agent: started (`start`), looked up (`get`, `list`), each finished
    one told to `listeners` (the coordinator link) with its final build object."""

    def __init__(self, builder: Runner, slug_roots: SlugRoots, slugs: SlugResolver, *,
                 max_finished: int = MAX_FINISHED, max_unfinished: int = MAX_UNFINISHED,
                 now: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.builder = builder
        self.slug_roots = slug_roots
        self.slugs = slugs
        self.max_finished = max_finished
        self.max_unfinished = max_unfinished
        self.now = now
        self.listeners: list[Callable[[dict[str, Any]], None]] = []
        self._builds: dict[str, Build] = {}
        self._finished: deque[str] = deque()
        self._tasks = OwnedTasks()
        self._closed = False

    async def start(self, body: Any) -> dict[str, Any]:
        """Check `body` and start its build; returns the build, `pending`, at once (the
        source is fetched and built in the background)."""
        request = parse_build(body)
        local = None
        if request.source.path is not None:
            local = await asyncio.to_thread(self._check_local, request.source.path)
        if self._closed:
            raise errors.NotReady("the agent is shutting down")
        unfinished = len(self._builds) - len(self._finished)
        if unfinished >= self.max_unfinished:
            raise errors.Conflict(f"{unfinished} builds are already waiting or running on this "
                                  "agent; start this one when some have finished")
        build = Build(id=str(uuid.uuid4()), body=request, created_at=self.now())
        self._builds[build.id] = build
        self._tasks.spawn(self._run(build, local), f"build-{build.id}")
        log.info("build %s of %s accepted", build.id, request.app,
                 extra={"BUILD_ID": build.id, "APP": request.app})
        return build.to_dict()

    def get(self, build_id: str) -> dict[str, Any]:
        build = self._builds.get(build_id)
        if build is None:
            raise errors.NotFound(f"no build {excerpt(build_id)} (finished builds are kept "
                                  f"for the last {self.max_finished})")
        return build.to_dict()

    def list(self, app: str | None = None) -> list[dict[str, Any]]:
        """Every build kept, oldest first (`app`: that app's only)."""
        return [b.to_dict() for b in self._builds.values() if app is None or b.body.app == app]

    async def close(self) -> None:
        """Cancel the builds still running (each build dyno is deleted and its workspace
        removed on the way out) and accept no more."""
        self._closed = True
        await self._tasks.cancel_all()

    # -- one build ---------------------------------------------------------------------------
    def _check_local(self, path: str) -> _Local:
        """A source path must pass the slug roots, as a dyno's slug path must (it is read by
        the agent, as root); a directory is built in place, a file is a tarball."""
        try:
            real = self.slug_roots.resolve(path)
        except SlugPathRefused as exc:
            raise errors.InvalidSpec(f"source.path: {exc}", "source.path") from None
        try:
            mode = os.stat(real).st_mode
        except OSError as exc:
            raise errors.InvalidSpec(f"source.path: {excerpt(path, 200)}: {exc.strerror}",
                                     "source.path") from None
        if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
            raise errors.InvalidSpec(f"source.path: {excerpt(path, 200)} is neither a "
                                     "directory nor a tarball", "source.path")
        return _Local(real, stat.S_ISDIR(mode))

    async def _request(self, build: Build, local: _Local | None) -> BuildRequest:
        body = build.body
        slug: SlugSource | None = None
        if local is not None and local.is_dir:
            source = Path(local.path)
        else:
            # Extracted into the slug cache, which no release may name by path: the build
            # dyno's release names the tarball or URL instead (the cache answers for it).
            slug = SlugSource(path=local.path) if local is not None else body.source
            try:
                source = await self.slugs.resolve(slug)
            except SlugError as exc:
                raise errors.BuildFailed(f"the source cannot be used: {exc}") from None
        return BuildRequest(app=body.app, source=source, buildpacks=body.buildpacks,
                            env=body.env, stack=body.stack, timeout_s=body.timeout_s,
                            use_cache=body.use_cache, slug=slug)

    def _named(self, build: Build, dyno: str) -> None:
        build.dyno = dyno

    async def _run(self, build: Build, local: _Local | None) -> None:
        """The root of a build's task: every outcome ends in `_finish`."""
        try:
            request = await self._request(build, local)
            result = await self.builder.build(
                request, named=lambda dyno: self._named(build, dyno))
        except asyncio.CancelledError:
            self._finish(build, error=errors.NotReady("the agent stopped before the build "
                                                      "finished"))
            raise
        except errors.AgentError as exc:
            self._finish(build, error=exc)
        except OSError as exc:
            self._finish(build, error=errors.BuildFailed(f"the build failed: {exc}"))
        except Exception as exc:
            log.exception("build %s failed", build.id, extra={"BUILD_ID": build.id})
            self._finish(build, error=errors.AgentError(f"{type(exc).__name__}: {exc}"))
        else:
            self._finish(build, result=result)

    def _finish(self, build: Build, *, result: BuildResult | None = None,
                error: errors.AgentError | None = None) -> None:
        build.status = BuildStatus.FAILED if error is not None else BuildStatus.SUCCEEDED
        build.result = result
        build.error = None if error is None else {"code": error.code, "message": error.message}
        build.finished_at = self.now()
        self._finished.append(build.id)
        while len(self._finished) > self.max_finished:
            self._builds.pop(self._finished.popleft(), None)
        log.info("build %s of %s %s", build.id, build.body.app, build.status,
                 extra={"BUILD_ID": build.id, "APP": build.body.app})
        final = build.to_dict()
        for listener in list(self.listeners):
            listener(final)
