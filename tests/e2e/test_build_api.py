"""Builds on the real daemon through its public interfaces: `POST /v1/builds` and
`GET /v1/builds/{id}` on the operator socket, `build.start` and the `build.finished` event on
the coordinator link; the slug a build keeps (its sha256, Heroku's `./app` layout) started as
a dyno; a failing build leaving no slug."""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import signal
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_supervision import FAST_CONFIG
from tests.support.agentproc import AgentProcess, write_config
from tests.support.coordinator import CoordinatorThread
from tests.support.names import unique
from tests.support.testhost import new_test_host
from tests.support.wait import wait_for

BUILD_TIMEOUT_S = 120
# A buildpack of this module's own (Heroku's buildpack API v2): detects apps with a
# fixture.txt, compiles a file from a config var (ENV_DIR), fails or hangs when asked to.
BUILDPACK = {
    "detect": """#!/bin/sh
[ -f "$1/fixture.txt" ] || exit 1
echo Fixture
""",
    "compile": """#!/bin/sh
set -eu
BUILD_DIR=$1 ENV_DIR=$3
echo "-----> Fixture compiling in $(pwd)"
if [ -f "$ENV_DIR/GREETING" ]; then
    cat "$ENV_DIR/GREETING" > "$BUILD_DIR/greeting.txt"
else
    echo none > "$BUILD_DIR/greeting.txt"
fi
if [ -f "$ENV_DIR/FAIL" ]; then
    echo " !     fixture: failing as asked"
    exit 1
fi
if [ -f "$ENV_DIR/HANG" ]; then
    echo "fixture: hanging as asked"
    sleep 600
fi
""",
    "release": """#!/bin/sh
cat <<'YAML'
---
default_process_types:
  worker: cat /app/greeting.txt
YAML
""",
}


@dataclass
class Agent:
    agent: AgentProcess
    coordinator: CoordinatorThread
    buildpack: str

    @property
    def store(self) -> Path:
        """Where the agent keeps the slugs it builds: under its first slug root."""
        return self.agent.base / "slugs" / "builds"

    def slugs(self) -> list[str]:
        return sorted(p.name for p in self.store.iterdir()) if self.store.is_dir() else []

    def source(self, name: str) -> Path:
        return make_source(self.agent, name)

    def finished(self, build_id: str) -> dict[str, Any]:
        def done() -> dict[str, Any] | None:
            build: dict[str, Any] = self.agent.api("GET", f"/v1/builds/{build_id}")
            return build if build["status"] != "pending" else None
        build = wait_for(done, BUILD_TIMEOUT_S, interval_s=0.2, what=f"build {build_id} ended")
        assert build is not None
        return build


def make_source(agent: AgentProcess, name: str) -> Path:
    """An app the fixture buildpack detects, under the agent's slug roots."""
    app = agent.base / "src" / unique(name, 4)
    app.mkdir(parents=True)
    (app / "fixture.txt").write_text("a source the fixture buildpack detects\n")
    return app


def _prepare(agent: AgentProcess) -> Path:
    """The agent's own slug roots (the first is where built slugs go: the agent's own, not
    the shared /tmp), and the fixture buildpack; returns the buildpack's directory."""
    (agent.base / "slugs").mkdir(mode=0o755)
    agent.settings["slug_roots"] = [str(agent.base / "slugs"), str(agent.base)]
    write_config(agent.config_path, agent.settings)
    buildpack = agent.base / "buildpack"
    (buildpack / "bin").mkdir(parents=True)
    for name, text in BUILDPACK.items():
        (buildpack / "bin" / name).write_text(text)
        (buildpack / "bin" / name).chmod(0o755)
    return buildpack


@pytest.fixture(scope="module")
def a(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    token = tmp_path_factory.mktemp("token") / "token"
    token.write_text("test-token\n")
    with new_test_host() as host:
        coordinator = CoordinatorThread(host.name).start()
        agent = AgentProcess(netns=host.name, extra={
            **FAST_CONFIG, "coordinator_url": coordinator.url,
            "coordinator_token_file": str(token)})
        try:
            buildpack = _prepare(agent)
            agent.start()
            coordinator.wait(lambda c: c.current, 15, "agent connected")
            yield Agent(agent, coordinator, str(buildpack))
        except BaseException:
            print(agent.log()[-20000:])
            raise
        finally:
            with contextlib.suppress(Exception):
                for status in agent.api("GET", "/v1/dynos", timeout_s=10):
                    agent.api("DELETE", f"/v1/dynos/{status['id']}", timeout_s=30)
            coordinator.close()
            agent.cleanup()


def members(tarball: Path) -> dict[str, bytes]:
    with tarfile.open(tarball) as tar:
        return {m.name: (tar.extractfile(m).read() if m.isfile() else b"")  # type: ignore[union-attr]
                for m in tar.getmembers()}


def test_a_build_through_the_api_keeps_a_slug_that_runs_as_a_dyno(a: Agent) -> None:
    app = unique("tb", 6)
    source = a.source("ok")
    build = a.agent.api("POST", "/v1/builds", {
        "app": app, "source": {"path": str(source)}, "buildpacks": [a.buildpack],
        "env": {"GREETING": "hello-from-the-api"}, "stack": "host"}, expect=202)
    assert build["status"] == "pending" and build["app"] == app and build["result"] is None
    assert build["id"] in [b["id"] for b in a.agent.api("GET", f"/v1/builds?app={app}")]

    done = a.finished(build["id"])
    assert done["status"] == "succeeded", done
    assert done["error"] is None and done["dyno"] == "build.1"
    slug = done["result"]["slug"]
    tarball = Path(slug["path"])
    assert tarball.parent.parent == a.store
    assert hashlib.sha256(tarball.read_bytes()).hexdigest() == slug["sha256"]
    files = members(tarball)
    assert all(name == "./app" or name.startswith("./app/") for name in files), files
    assert files["./app/fixture.txt"].startswith(b"a source")
    # Compiled by bin/compile, from the config var the build was given in ENV_DIR.
    assert files["./app/greeting.txt"] == b"hello-from-the-api"
    assert done["result"]["process_types"]["worker"] == "cat /app/greeting.txt"
    # The build dyno's output, as any dyno's.
    logs = a.agent.api("GET", f"/v1/logs?app={app}&dyno=build.1&tail=1000")
    assert "Fixture app detected" in logs and "Fixture compiling in /app" in logs, logs

    # The slug it kept runs as a dyno.
    dyno = a.agent.api("POST", "/v1/dynos", {
        "app": app, "name": "worker.1", "command": "cat /app/greeting.txt; echo; sleep 600",
        "release": {"version": 1, "slug": {"path": slug["path"]}, "stack": "host"}},
        expect=201)
    try:
        wait_for(lambda: a.agent.api("GET", f"/v1/dynos/{dyno['id']}")["state"] == "up", 30,
                 what="the built dyno up")
        wait_for(lambda: "hello-from-the-api" in a.agent.api(
            "GET", f"/v1/logs?app={app}&dyno=worker.1&tail=100"), 30, what="its output")
    finally:
        a.agent.api("DELETE", f"/v1/dynos/{dyno['id']}", expect=204)


def test_a_tarball_source_is_extracted_and_built(a: Agent) -> None:
    """A tarball is extracted into the slug cache, which no release may name by path: the
    build dyno's release names the tarball itself."""
    source = a.source("tgz")
    (source / "nested").mkdir()
    (source / "nested" / "file.txt").write_text("inside the tarball\n")
    tarball = source.with_suffix(".tgz")
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(source, arcname="./app")
    build = a.agent.api("POST", "/v1/builds", {
        "app": unique("tt", 6), "source": {"path": str(tarball)},
        "buildpacks": [a.buildpack], "stack": "host"}, expect=202)
    done = a.finished(build["id"])
    assert done["status"] == "succeeded", done
    files = members(Path(done["result"]["slug"]["path"]))
    assert files["./app/nested/file.txt"] == b"inside the tarball\n"
    assert files["./app/greeting.txt"] == b"none\n"  # no GREETING given


def test_a_failing_build_is_failed_and_leaves_no_slug(a: Agent) -> None:
    before = a.slugs()
    build = a.agent.api("POST", "/v1/builds", {
        "app": unique("tf", 6), "source": {"path": str(a.source("fail"))},
        "buildpacks": [a.buildpack], "env": {"FAIL": "1"}, "stack": "host"}, expect=202)
    done = a.finished(build["id"])
    assert done["status"] == "failed" and done["result"] is None
    assert done["error"]["code"] == "build_failed", done
    assert "exited 1" in done["error"]["message"]
    assert a.slugs() == before
    assert not any((a.agent.base / "run" / "builds").iterdir())


def test_a_bad_build_request_is_refused_at_once(a: Agent) -> None:
    outside = Path("/var/tmp") / unique("outside", 4)
    outside.mkdir()
    try:
        for body, field in (({"app": "x", "source": {"path": str(outside)}}, "source.path"),
                            ({"app": "x", "source": {"path": "/a"}, "timeout_s": 0},
                             "timeout_s")):
            error = a.agent.api("POST", "/v1/builds", body, expect=400)["error"]
            assert error["code"] == "invalid_spec" and error["message"].startswith(field)
    finally:
        shutil.rmtree(outside)


def test_a_build_through_the_coordinator_ends_in_a_build_finished_event(a: Agent) -> None:
    app = unique("tc", 6)
    response = a.coordinator.request("build.start", {
        "app": app, "source": {"path": str(a.source("coord"))}, "buildpacks": [a.buildpack],
        "env": {"GREETING": "hello-coordinator"}, "stack": "host", "use_cache": False})
    assert "p" in response, response
    build = response["p"]
    assert build["status"] == "pending" and build["app"] == app

    def finished_event() -> dict[str, Any] | None:
        events = a.coordinator.snapshot(lambda c: c.events("build.finished"))
        matching = [e.params for e in events if e.params["id"] == build["id"]]
        return matching[0] if matching else None

    event = wait_for(finished_event, BUILD_TIMEOUT_S, interval_s=0.2, what="build.finished")
    assert event is not None
    assert event["status"] == "succeeded", event
    slug = event["result"]["slug"]
    assert hashlib.sha256(Path(slug["path"]).read_bytes()).hexdigest() == slug["sha256"]
    assert members(Path(slug["path"]))["./app/greeting.txt"] == b"hello-coordinator"
    assert isinstance(event["seq"], int)
    got = a.coordinator.request("build.get", {"id": build["id"]})
    assert got["p"] == {k: v for k, v in event.items() if k != "seq"}
    # Its build dyno reported its states like any dyno, then was removed.
    states = a.coordinator.snapshot(lambda c: [s["state"] for s in c.states()
                                               if s["app"] == app])
    assert states[:1] == ["starting"] and "complete" in states


def _hanging_build(agent: AgentProcess) -> dict[str, Any]:
    """Start the agent and a build whose compile hangs; return the build once it hangs."""
    buildpack = _prepare(agent)
    agent.start()
    build: dict[str, Any] = agent.api("POST", "/v1/builds", {
        "app": unique("th", 6), "source": {"path": str(make_source(agent, "hang"))},
        "buildpacks": [str(buildpack)], "env": {"HANG": "1"}, "stack": "host"}, expect=202)
    wait_for(lambda: "hanging as asked" in (agent.api(
        "GET", f"/v1/logs?app={build['app']}&tail=1000") or ""), 60, what="the build hangs")
    return build


def test_a_build_running_when_the_agent_stops_is_cancelled_and_leaves_nothing() -> None:
    with new_test_host() as host:
        agent = AgentProcess(netns=host.name, extra=FAST_CONFIG)
        try:
            build = _hanging_build(agent)
            assert [d["name"] for d in agent.api("GET", "/v1/dynos")] == ["build.1"]
            assert agent.stop() == 0
            # The build dyno was deleted (so the agent, left with no dyno, removed all it
            # had), the workspace unmounted and removed, no slug kept.
            assert agent.force_leftovers_away() == []
            assert not any((agent.base / "run" / "builds").iterdir())
            assert str(agent.base) not in Path("/proc/self/mounts").read_text()
            assert not (agent.base / "slugs" / "builds").exists() or not any(
                (agent.base / "slugs" / "builds").iterdir())
            assert "build " + build["id"] + " of " + build["app"] + " failed" in agent.log()
        except BaseException:
            print(agent.log()[-20000:])
            raise
        finally:
            agent.cleanup()


def test_a_build_of_an_agent_killed_mid_build_is_removed_by_the_next_agent() -> None:
    """SIGKILL while a build hangs: the build dyno outlives the agent (dynos do), but nobody
    will read its slug; the next agent removes it, its workspace and its cgroup."""
    with new_test_host() as host:
        agent = AgentProcess(netns=host.name, extra=FAST_CONFIG)
        try:
            _hanging_build(agent)
            agent.signal(signal.SIGKILL)
            agent.wait(10)
            assert str(agent.base / "run" / "builds") in Path("/proc/self/mounts").read_text()
            agent.start()
            wait_for(lambda: agent.api("GET", "/v1/dynos") == [], 60,
                     what="the orphan build dyno removed")
            assert "removing 1 build dynos of builds that ended" in agent.log()
            assert not any((agent.base / "run" / "builds").iterdir())
            assert str(agent.base) not in Path("/proc/self/mounts").read_text()
            assert agent.stop() == 0
            assert agent.force_leftovers_away() == []
        except BaseException:
            print(agent.log()[-20000:])
            raise
        finally:
            agent.cleanup()
