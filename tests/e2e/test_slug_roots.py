"""`release.slug.path` on a real agent: a path outside the slug roots, or one that reaches the
agent's state (directly, through a symlink, or as a root that contains it) is `invalid_spec`
and nothing is created. Before slug_roots, such a dyno saw every dyno record (every app's
config vars) as its own files."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.test_supervision import (
    FAST_CONFIG,
    delete_app,
    log_lines,
    make_slug,
    spec,
    wait_state,
)
from tests.support.agentproc import AgentProcess, ApiError, write_config
from tests.support.names import unique
from tests.support.testhost import TestHost, new_test_host


@pytest.fixture(scope="module")
def agent() -> Iterator[AgentProcess]:
    with new_test_host("dt") as host:
        yield from _agent(host)


def _agent(host: TestHost) -> Iterator[AgentProcess]:
    running = AgentProcess(extra={**FAST_CONFIG}, netns=host.name)
    try:
        running.start()
        yield running
    except BaseException:
        print(running.log()[-20000:], file=sys.stderr)
        raise
    finally:
        running.cleanup()


@pytest.fixture
def outside() -> Iterator[Path]:
    """A directory under no slug root (the test agent's roots are /tmp and its own base)."""
    path = Path(tempfile.mkdtemp(prefix="dtslug", dir="/var/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def refused(agent: AgentProcess, app: str, path: str, why: str) -> None:
    with pytest.raises(ApiError) as caught:
        agent.api("POST", "/v1/dynos", spec(app, "web.1", "cat /app/*", Path(path)))
    assert caught.value.status == 400, caught.value
    error = json.loads(caught.value.body)["error"]
    assert error["code"] == "invalid_spec", error
    assert error["message"].startswith("release.slug.path: ") and why in error["message"], error
    # Nothing was made: no dyno, no record, no cgroup, no network namespace.
    assert agent.api("GET", f"/v1/dynos?app={app}") == []
    records = Path(agent.settings["state_dir"]) / "dynos"
    assert not any(app in p.read_text() for p in records.glob("*.json")) if records.exists() \
        else True
    assert not list(Path("/sys/fs/cgroup/unified", agent.settings["cgroup_root"]).glob(
        f"app-{app}.slice/*"))


def test_the_state_dir_and_what_is_in_it_are_refused(agent: AgentProcess) -> None:
    state = agent.settings["state_dir"]
    app = unique("ts", 8)
    refused(agent, app, state, "would show the agent's state_dir")
    refused(agent, app, f"{state}/dynos", "lies inside the agent's state_dir")
    refused(agent, app, agent.settings["run_dir"], "would show the agent's run_dir")
    # The agent's base is a slug root here, and it contains the state dir.
    refused(agent, app, str(agent.base), "would show the agent's state_dir")


def test_a_symlink_to_the_state_dir_is_refused(agent: AgentProcess) -> None:
    app = unique("ts", 8)
    link = Path(tempfile.mkdtemp(prefix="dtslug", dir="/tmp")) / "slug"
    try:
        link.symlink_to(agent.settings["state_dir"])
        refused(agent, app, str(link), "would show the agent's state_dir")
    finally:
        shutil.rmtree(link.parent, ignore_errors=True)


def test_a_tarball_or_directory_outside_the_roots_is_refused(agent: AgentProcess,
                                                             outside: Path) -> None:
    app = unique("ts", 8)
    (outside / "app").mkdir()
    (outside / "app" / "Procfile").write_text("web: true\n")
    with tarfile.open(outside / "slug.tgz", "w:gz") as tar:
        tar.add(outside / "app", arcname="app")
    refused(agent, app, str(outside / "slug.tgz"), "is not under any of the agent's slug_roots")
    refused(agent, app, str(outside / "app"), "is not under any of the agent's slug_roots")
    # And through a symlink that lies under a root.
    link_dir = Path(tempfile.mkdtemp(prefix="dtslug", dir="/tmp"))
    try:
        (link_dir / "slug.tgz").symlink_to(outside / "slug.tgz")
        refused(agent, app, str(link_dir / "slug.tgz"), "resolves to")
    finally:
        shutil.rmtree(link_dir, ignore_errors=True)


def test_a_slug_under_a_root_still_starts(agent: AgentProcess) -> None:
    app = unique("ts", 8)
    slug = make_slug()
    try:
        created = agent.api("POST", "/v1/dynos",
                            spec(app, "worker.1", "sleep 1000", slug), expect=201)
        wait_state(agent, created["id"], "up", 30)
    finally:
        delete_app(agent, app)
        with contextlib.suppress(OSError):
            shutil.rmtree(slug)
    assert os.path.isdir(agent.settings["state_dir"])


def test_a_record_from_before_the_roots_is_adopted_but_never_launched_again() -> None:
    with new_test_host("dt") as host:
        agent = AgentProcess(extra={**FAST_CONFIG}, netns=host.name)
        slug = make_slug()
        app = unique("ts", 8)
        try:
            agent.start()
            created = agent.api("POST", "/v1/dynos",
                                spec(app, "worker.1", "sleep 1000", slug), expect=201)
            before = wait_state(agent, created["id"], "up", 30)
            # The agent restarts with roots that no longer hold the slug; the dyno runs on.
            assert agent.stop() == 0
            agent.settings["slug_roots"] = [str(agent.base / "slugs")]
            write_config(agent.config_path, agent.settings)
            agent.start()
            after = wait_state(agent, created["id"], "up", 30)
            assert after["pid"] == before["pid"]
            assert f"dyno {created['id']}: {slug} is not under any of the agent's " \
                   "slug_roots" in agent.log()
            # Its next launch is refused with the reason in its log.
            agent.api("POST", f"/v1/dynos/{created['id']}/restart")
            wait_state(agent, created["id"], "crashed", 30)
            texts = [line["text"] for line in log_lines(agent, app, "worker.1")]
            assert any(text.startswith("Error: slug refused: ") and "slug_roots" in text
                       for text in texts), texts
        except BaseException:
            print(agent.log()[-20000:], file=sys.stderr)
            raise
        finally:
            delete_app(agent, app)
            agent.cleanup()
            shutil.rmtree(slug, ignore_errors=True)
