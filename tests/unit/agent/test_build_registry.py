"""The builds asked for through the operator API and the coordinator (agent/builds/service.py):
the request checked at the edge, its source resolved like a dyno's slug, the build run with a
fake builder, its outcome kept and told to listeners, running builds cancelled on close."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent import errors
from agent.builds import BuildRequest, BuildResult
from agent.builds.service import Builds, parse_build
from agent.coordinator.frames import UnknownMethod
from agent.coordinator.requests import Requests
from agent.slugs.roots import SlugRoots
from agent.slugs.store import ChecksumError
from agent.spec import ENV_MAX_BYTES, SlugSource
from agent.supervision.reconcile import Engine
from tests.support.wait import async_wait_for
from tests.unit.agent.fakes import FakeSupervisor

SHA = "ab" * 32


def result(key: str = "k1") -> BuildResult:
    return BuildResult(key=key, slug_path=Path(f"/slugs/builds/{key}/slug.tgz"),
                       slug_dir=Path(f"/slugs/builds/{key}/tree/app"), sha256=SHA,
                       size_bytes=10, process_types={"web": "serve"}, config_vars={},
                       buildpacks=("fixture",), stack="host", cached=False, seconds=1.5)


class FakeBuilder:
    """Builds nothing: names the build dyno, then waits for the test to let the build end
    (`finish`), or ends it at once with `outcome` (a result or an exception)."""

    def __init__(self) -> None:
        self.requests: list[BuildRequest] = []
        self.outcome: BuildResult | BaseException = result()
        self.hold = False
        self.release = asyncio.Event()
        self.cancelled = 0

    async def build(self, request: BuildRequest, say: Callable[[str], None] | None = None,
                    named: Callable[[str], None] | None = None) -> BuildResult:
        self.requests.append(request)
        if named is not None:
            named(f"build.{len(self.requests)}")
        try:
            if self.hold:
                await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome


class FakeSlugs:
    """The slug store: a tarball or URL 'extracted' into a directory named after it."""

    def __init__(self, root: Path, fail: Exception | None = None) -> None:
        self.root = root
        self.fail = fail
        self.resolved: list[SlugSource] = []

    async def resolve(self, source: SlugSource) -> Path:
        self.resolved.append(source)
        if self.fail is not None:
            raise self.fail
        return self.root / "slugs" / "slugs" / "d1" / "app"


@pytest.fixture
def roots(tmp_path: Path) -> Path:
    root = tmp_path / "slugroot"
    (root / "app").mkdir(parents=True)
    (root / "app" / "fixture.txt").write_text("x")
    (root / "app.tgz").write_bytes(b"not really a tarball")
    return root


@pytest.fixture
def builder() -> FakeBuilder:
    return FakeBuilder()


def make(builder: FakeBuilder, roots: Path, **kwargs: Any) -> tuple[Builds, FakeSlugs]:
    slugs = FakeSlugs(roots.parent, kwargs.pop("fail", None))
    registry = Builds(builder, SlugRoots(roots=(str(roots),), protected=()), slugs, **kwargs)
    return registry, slugs


async def finished(registry: Builds, build_id: str) -> dict[str, Any]:
    async def done() -> dict[str, Any] | None:
        build = registry.get(build_id)
        return build if build["status"] != "pending" else None
    build = await async_wait_for(done, 5)
    assert build is not None
    return build


# -- the request -------------------------------------------------------------------------------

def test_a_full_request_is_parsed() -> None:
    body = parse_build({"app": "shop", "source": {"url": "https://s/x.tgz", "sha256": SHA.upper()},
                        "buildpacks": ["python", "https://b/bp.tgz#sha256=" + SHA],
                        "env": {"GREETING": "hi"}, "stack": "heroku-24", "timeout_s": 90,
                        "use_cache": False})
    assert body.source == SlugSource(url="https://s/x.tgz", sha256=SHA)
    assert body.buildpacks == ("python", "https://b/bp.tgz#sha256=" + SHA)
    assert dict(body.env) == {"GREETING": "hi"} and body.stack == "heroku-24"
    assert body.timeout_s == 90.0 and body.use_cache is False
    defaults = parse_build({"app": "shop", "source": {"path": "/srv/app"}})
    assert (defaults.buildpacks, dict(defaults.env), defaults.stack, defaults.use_cache) == (
        (), {}, "host", True)


@pytest.mark.parametrize(("body", "field"), [
    ([], "build"),
    ({"app": "shop", "source": {"path": "/a"}, "size": "performance-l"}, "size"),
    ({"source": {"path": "/a"}}, "app"),
    ({"app": "Shop", "source": {"path": "/a"}}, "app"),
    ({"app": 7, "source": {"path": "/a"}}, "app"),
    ({"app": "shop"}, "source"),
    ({"app": "shop", "source": "/a"}, "source"),
    ({"app": "shop", "source": {}}, "source"),
    ({"app": "shop", "source": {"path": "relative/app"}}, "source.path"),
    ({"app": "shop", "source": {"path": "/a", "url": "https://s/x"}}, "source.url"),
    ({"app": "shop", "source": {"url": "https://s/x.tgz"}}, "source.sha256"),
    ({"app": "shop", "source": {"url": "ftp://s/x.tgz", "sha256": SHA}}, "source.url"),
    ({"app": "shop", "source": {"url": "https://s/x", "sha256": "abc"}}, "source.sha256"),
    ({"app": "shop", "source": {"path": "/a"}, "buildpacks": "python"}, "buildpacks"),
    ({"app": "shop", "source": {"path": "/a"}, "buildpacks": [3]}, "buildpacks[0]"),
    ({"app": "shop", "source": {"path": "/a"}, "buildpacks": ["python", ""]}, "buildpacks[1]"),
    ({"app": "shop", "source": {"path": "/a"}, "buildpacks": ["a\nb"]}, "buildpacks[0]"),
    ({"app": "shop", "source": {"path": "/a"}, "buildpacks": ["python"] * 17}, "buildpacks"),
    ({"app": "shop", "source": {"path": "/a"}, "env": {"1BAD": "x"}}, "env.1BAD"),
    ({"app": "shop", "source": {"path": "/a"}, "env": {"GOOD": 1}}, "env.GOOD"),
    ({"app": "shop", "source": {"path": "/a"}, "env": {"A": "x" * ENV_MAX_BYTES}}, "env"),
    ({"app": "shop", "source": {"path": "/a"}, "stack": "../etc"}, "stack"),
    ({"app": "shop", "source": {"path": "/a"}, "timeout_s": 0}, "timeout_s"),
    ({"app": "shop", "source": {"path": "/a"}, "timeout_s": 86401}, "timeout_s"),
    ({"app": "shop", "source": {"path": "/a"}, "timeout_s": True}, "timeout_s"),
    ({"app": "shop", "source": {"path": "/a"}, "timeout_s": "60"}, "timeout_s"),
    ({"app": "shop", "source": {"path": "/a"}, "timeout_s": float("nan")}, "timeout_s"),
    ({"app": "shop", "source": {"path": "/a"}, "use_cache": "yes"}, "use_cache"),
])
def test_a_bad_request_is_invalid_spec_naming_the_field(body: Any, field: str) -> None:
    with pytest.raises(errors.InvalidSpec) as caught:
        parse_build(body)
    assert caught.value.field == field, caught.value.message
    assert caught.value.message.startswith(f"{field}: ")


# -- the registry ------------------------------------------------------------------------------

async def test_a_build_is_pending_at_once_then_succeeds_and_is_told(
        builder: FakeBuilder, roots: Path) -> None:
    registry, slugs = make(builder, roots)
    told: list[dict[str, Any]] = []
    registry.listeners.append(told.append)
    builder.hold = True
    build = await registry.start({"app": "shop", "source": {"path": str(roots / "app")},
                                  "env": {"GREETING": "hi"}, "timeout_s": 60})
    assert build["status"] == "pending" and build["app"] == "shop"
    assert build["result"] is None and build["error"] is None and build["finished_at"] is None
    assert build["source"] == {"path": str(roots / "app")} and build["created_at"]
    await async_wait_for(lambda: _ready(registry.get(build["id"])["dyno"] == "build.1"), 5)
    assert registry.get(build["id"])["status"] == "pending" and told == []
    builder.release.set()
    done = await finished(registry, build["id"])
    assert done["status"] == "succeeded" and done["error"] is None and done["finished_at"]
    assert done["result"] == result().to_dict()
    assert done["result"]["slug"]["sha256"] == SHA
    assert told == [done]
    # A directory is built in place; the build dyno's release names it (no `slug`).
    [request] = builder.requests
    assert request.source == roots / "app" and request.slug is None and slugs.resolved == []
    assert (request.app, dict(request.env), request.timeout_s) == ("shop", {"GREETING": "hi"},
                                                                    60.0)
    assert registry.list() == [done] and registry.list("blog") == []


async def _ready(value: bool) -> bool:
    return value


async def test_a_failed_build_keeps_its_error_code(builder: FakeBuilder, roots: Path) -> None:
    registry, _ = make(builder, roots)
    told: list[dict[str, Any]] = []
    registry.listeners.append(told.append)
    builder.outcome = errors.BuildFailed("the build failed: a buildpack exited 1")
    build = await registry.start({"app": "shop", "source": {"path": str(roots / "app")}})
    done = await finished(registry, build["id"])
    assert done["status"] == "failed" and done["result"] is None
    assert done["error"] == {"code": "build_failed",
                             "message": "the build failed: a buildpack exited 1"}
    assert [t["status"] for t in told] == ["failed"]


async def test_an_unexpected_failure_is_internal_and_logged(
        builder: FakeBuilder, roots: Path, caplog: pytest.LogCaptureFixture) -> None:
    registry, _ = make(builder, roots)
    builder.outcome = KeyError("bug")
    build = await registry.start({"app": "shop", "source": {"path": str(roots / "app")}})
    done = await finished(registry, build["id"])
    assert done["error"]["code"] == "internal" and "KeyError" in done["error"]["message"]
    assert any(r.getMessage() == f"build {build['id']} failed" for r in caplog.records)


async def test_a_tarball_source_is_extracted_and_the_build_dyno_names_the_tarball(
        builder: FakeBuilder, roots: Path) -> None:
    registry, slugs = make(builder, roots)
    build = await registry.start({"app": "shop", "source": {"path": str(roots / "app.tgz")}})
    await finished(registry, build["id"])
    assert slugs.resolved == [SlugSource(path=str(roots / "app.tgz"))]
    [request] = builder.requests
    assert request.source == slugs.root / "slugs" / "slugs" / "d1" / "app"
    assert request.slug == SlugSource(path=str(roots / "app.tgz"))


async def test_a_url_source_is_fetched_and_named_by_its_url(builder: FakeBuilder,
                                                           roots: Path) -> None:
    registry, slugs = make(builder, roots)
    source = {"url": "https://slugs.example/app.tgz", "sha256": SHA}
    build = await registry.start({"app": "shop", "source": source})
    await finished(registry, build["id"])
    assert slugs.resolved == [SlugSource(url=source["url"], sha256=SHA)]
    assert builder.requests[0].slug == SlugSource(url=source["url"], sha256=SHA)


async def test_a_source_that_cannot_be_fetched_fails_the_build(builder: FakeBuilder,
                                                              roots: Path) -> None:
    registry, _ = make(builder, roots, fail=ChecksumError(SHA, "cd" * 32))
    build = await registry.start({"app": "shop",
                                  "source": {"url": "https://s/app.tgz", "sha256": SHA}})
    done = await finished(registry, build["id"])
    assert done["error"]["code"] == "build_failed" and "R17" in done["error"]["message"]
    assert builder.requests == []


@pytest.mark.parametrize("where", ["outside", "missing", "fifo"])
async def test_a_source_path_must_pass_the_slug_roots_and_exist(
        builder: FakeBuilder, roots: Path, tmp_path: Path, where: str) -> None:
    registry, _ = make(builder, roots)
    path = {"outside": tmp_path, "missing": roots / "nope", "fifo": roots / "fifo"}[where]
    if where == "fifo":
        os.mkfifo(path)
    with pytest.raises(errors.InvalidSpec) as caught:
        await registry.start({"app": "shop", "source": {"path": str(path)}})
    assert caught.value.field == "source.path"
    assert registry.list() == [] and builder.requests == []


async def test_only_the_last_finished_builds_are_kept(builder: FakeBuilder,
                                                      roots: Path) -> None:
    registry, _ = make(builder, roots, max_finished=3)
    ids = []
    for _ in range(5):
        build = await registry.start({"app": "shop", "source": {"path": str(roots / "app")}})
        await finished(registry, build["id"])
        ids.append(build["id"])
    assert [b["id"] for b in registry.list()] == ids[2:]
    with pytest.raises(errors.NotFound):
        registry.get(ids[0])


async def test_unfinished_builds_are_bounded(builder: FakeBuilder, roots: Path) -> None:
    registry, _ = make(builder, roots, max_unfinished=2)
    builder.hold = True
    body = {"app": "shop", "source": {"path": str(roots / "app")}}
    await registry.start(body)
    await registry.start(body)
    with pytest.raises(errors.Conflict):
        await registry.start(body)
    await registry.close()


async def test_close_cancels_running_builds_and_refuses_new_ones(
        builder: FakeBuilder, roots: Path) -> None:
    registry, _ = make(builder, roots)
    told: list[dict[str, Any]] = []
    registry.listeners.append(told.append)
    builder.hold = True
    build = await registry.start({"app": "shop", "source": {"path": str(roots / "app")}})
    await async_wait_for(lambda: _ready(builder.cancelled == 0 and len(builder.requests) == 1),
                         5)
    await registry.close()
    assert builder.cancelled == 1
    done = registry.get(build["id"])
    assert done["status"] == "failed" and done["error"]["code"] == "not_ready"
    assert [t["id"] for t in told] == [build["id"]]
    with pytest.raises(errors.NotReady):
        await registry.start({"app": "shop", "source": {"path": str(roots / "app")}})


async def test_an_unknown_build_is_not_found(builder: FakeBuilder, roots: Path) -> None:
    registry, _ = make(builder, roots)
    with pytest.raises(errors.NotFound):
        registry.get("00000000-0000-4000-8000-000000000000")


# -- the coordinator's requests ----------------------------------------------------------------

async def test_build_requests_of_the_coordinator(builder: FakeBuilder, roots: Path) -> None:
    registry, _ = make(builder, roots)
    sup = FakeSupervisor()
    requests = Requests(sup, Engine(sup), dict, builds=registry)
    assert {"build.start", "build.get", "build.list"} <= set(requests.methods)
    build = await requests.handle("build.start", {"app": "shop",
                                                  "source": {"path": str(roots / "app")}})
    assert build["status"] == "pending"
    done = await finished(registry, build["id"])
    assert await requests.handle("build.get", {"id": build["id"]}) == done
    assert await requests.handle("build.list", {"app": "shop"}) == [done]
    assert await requests.handle("build.list", {}) == [done]
    with pytest.raises(errors.InvalidSpec) as caught:
        await requests.handle("build.start", {"app": "shop", "source": {"path": "/etc"}})
    assert caught.value.field == "source.path"
    with pytest.raises(errors.BadRequest, match="unknown key"):
        await requests.handle("build.get", {"id": build["id"], "app": "shop"})
    with pytest.raises(errors.NotFound):
        await requests.handle("build.get", {"id": "nope"})


async def test_an_agent_without_builds_does_not_know_the_methods() -> None:
    sup = FakeSupervisor()
    requests = Requests(sup, Engine(sup), dict)
    with pytest.raises(UnknownMethod):
        await requests.handle("build.start", {})
