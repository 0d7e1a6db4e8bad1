"""The `host` stack on a real agent: a dyno sees the host's root read-only, but not the agent's
state_dir (configured through a symlink here), run_dir, sockets or config, nor /run/netns or
the places every agent keeps state in; even when an operator left them world-readable, the
dyno of one app cannot list them or read another app's record. The agent warns at start and
once per app that the host stack is for development only."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.test_supervision import (
    agent_in_host,
    app_texts,
    delete_app,
    spec,
    wait_state,
)
from tests.support.agentproc import AgentProcess, write_config
from tests.support.names import unique
from tests.support.testhost import new_test_host
from tests.support.wait import wait_for

HOST_STACK_WARNING = "the host stack (the default when a spec names no release.stack)"


def _state_dir_through_a_symlink(agent: AgentProcess) -> None:
    (agent.base / "state").mkdir(mode=0o755)
    (agent.base / "state-link").symlink_to(agent.base / "state")
    agent.settings["state_dir"] = str(agent.base / "state-link")
    write_config(agent.config_path, agent.settings)


@pytest.fixture(scope="module")
def agent() -> Iterator[AgentProcess]:
    # Outside /tmp (every dyno has a /tmp of its own, which would hide the agent's files
    # whatever the agent did), and the state dir named through a symlink.
    with new_test_host("dt") as host, agent_in_host(
            host, parent_dir="/var/tmp", prepare=_state_dir_through_a_symlink) as running:
        yield running


def open_to_everyone(*paths: Path) -> None:
    """What a careless operator might do: every directory and file world-readable."""
    for top in paths:
        for root, _dirs, files in os.walk(top):
            os.chmod(root, 0o755)
            for name in files:
                with contextlib.suppress(OSError):
                    os.chmod(os.path.join(root, name), 0o644)


def run_in_dyno(agent: AgentProcess, app: str, slug: Path, script: str) -> list[str]:
    name = f"run.{secrets.randbelow(9000) + 1000}"
    created = agent.api("POST", "/v1/dynos", spec(app, name, script, slug), expect=201)
    try:
        wait_state(agent, created["id"], "complete", 30)
        return wait_for(lambda: [t for t in app_texts(agent, app, name)
                                 if t != ""] if any(t == "END" for t in
                                                    app_texts(agent, app, name)) else [],
                        10, what="the dyno's output")
    finally:
        agent.api("DELETE", f"/v1/dynos/{created['id']}", expect=204)


def test_a_host_stack_dyno_cannot_see_the_agents_places(agent: AgentProcess,
                                                        slug: Path) -> None:
    attacker, victim_app = unique("ta", 8), unique("tv", 8)
    secret = f"s3cr3t-{secrets.token_hex(8)}"
    try:
        victim = agent.api("POST", "/v1/dynos", spec(victim_app, "worker.1", "sleep 1000", slug,
                                                     env={"SECRET_TOKEN": secret}), expect=201)
        wait_state(agent, victim["id"], "up", 30)
        state, run_dir = agent.base / "state", agent.base / "run"
        record = state / "dynos" / f"{victim['id']}.json"
        assert secret in record.read_text()
        assert Path(f"/run/netns/dyno-{victim['id']}").exists()
        open_to_everyone(agent.base)
        assert os.stat(record).st_mode & 0o004
        # Every path is probed in its own line: "<path>: <entries or the error>".
        paths = [str(agent.base / "state-link"), str(state), str(state / "dynos"),
                 str(run_dir), "/run/netns", "/var/lib/dynoagent", "/run/dynoagent-uids"]
        script = " ; ".join(
            [f"echo \"LS {p}: $(ls -A {p} 2>&1 | tr '\\n' ' ')\"" for p in paths]
            + [f"echo \"CAT: $(cat {record} {agent.base / 'state-link' / 'dynos' / record.name}"
               f" {agent.config_path} 2>&1 | tr '\\n' ' ')\"",
               "echo END"])
        lines = run_in_dyno(agent, attacker, slug, script)
        assert lines[-1] == "END", lines
        text = "\n".join(lines)
        assert secret not in text, text
        listings = "\n".join(line for line in lines if line.startswith("LS "))
        assert victim["id"] not in listings, f"the victim's record or netns was seen:\n{text}"
        for path in paths:
            listing = next(line for line in lines if line.startswith(f"LS {path}:"))
            # Masked: an empty directory, or gone from the dyno's view altogether.
            entries = listing.partition(": ")[2].strip()
            assert entries == "" or "No such file or directory" in entries, listing
        cat = next(line for line in lines if line.startswith("CAT:"))
        # Both paths of the record are gone, and the config reads as an empty file (masked
        # with /dev/null): nothing but the two errors.
        leftover = cat.removeprefix("CAT:")
        for gone in (record, agent.base / "state-link" / "dynos" / record.name):
            leftover = leftover.replace(f"cat: {gone}: No such file or directory", "")
        assert leftover.strip() == "", cat
    finally:
        delete_app(agent, victim_app)
        delete_app(agent, attacker)


def test_the_agent_warns_that_the_host_stack_is_for_development(agent: AgentProcess,
                                                                slug: Path) -> None:
    log = agent.log()
    assert log.count(HOST_STACK_WARNING) == 1, log[-5000:]
    app = unique("tw", 8)
    try:
        for name in ("worker.1", "worker.2"):
            created = agent.api("POST", "/v1/dynos", spec(app, name, "sleep 1000", slug),
                                expect=201)
            wait_state(agent, created["id"], "up", 30)
        warning = f"app {app} runs on the host stack"
        assert agent.log().count(warning) == 1, agent.log()[-5000:]
    finally:
        delete_app(agent, app)
