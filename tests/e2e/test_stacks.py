"""A dyno on a named stack (the cached test stack, `make setup-stack`) on a real agent: it runs the
stack's own python3, sees none of the host's files (markers planted in the host's /etc, /root,
/opt, /usr/local and the agent's state dir, a host-only Python package, the host's package
database, /work), and cannot write the stack, not even where its permissions would let it."""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.test_supervision import agent_in_host, app_texts, delete_app, spec, wait_state
from tests.support.agentproc import AgentProcess
from tests.support.names import unique
from tests.support.stacks import TEST_STACK, built_test_stack, share_test_stacks
from tests.support.testhost import new_test_host
from tests.support.wait import wait_for

DIST_PACKAGES = "usr/lib/python3/dist-packages"


@pytest.fixture(scope="module")
def stack_root() -> Path:
    return built_test_stack()


@pytest.fixture(scope="module")
def agent(stack_root: Path) -> Iterator[AgentProcess]:
    # Outside /tmp, whose view every dyno replaces: a state dir marker must be hidden by the
    # stack, not by the dyno's own /tmp.
    with new_test_host("dt") as host, agent_in_host(host, parent_dir="/var/tmp",
                                                    prepare=share_test_stacks) as running:
        yield running


@pytest.fixture
def markers(agent: AgentProcess) -> Iterator[list[Path]]:
    """Unique files in host directories that a named stack also has (and the agent's own)."""
    token = secrets.token_hex(6)
    places = [Path("/etc"), Path("/root"), Path("/opt"), Path("/usr/local"),
              agent.base / "state"]
    planted: list[Path] = []
    try:
        for place in places:
            path = place / f"dt-stack-marker-{token}"
            path.write_text("host-only\n")
            path.chmod(0o644)
            planted.append(path)
        yield planted
    finally:
        for path in planted:
            path.unlink(missing_ok=True)


def run_on_stack(agent: AgentProcess, slug: Path, script: str) -> dict[str, str]:
    """Run `script` in a one-off dyno on the test stack: its `KEY value` lines as a dict."""
    app = unique("ts", 8)
    body = spec(app, f"run.{secrets.randbelow(9000) + 1000}", script, slug)
    body["release"]["stack"] = TEST_STACK
    try:
        created = agent.api("POST", "/v1/dynos", body, expect=201)
        wait_state(agent, created["id"], "complete", 30)
        texts = wait_for(lambda: (t if "END" in (t := app_texts(agent, app, body["name"]))
                                  else None), 10, what="the dyno's output")
    finally:
        delete_app(agent, app)
    return {key: value for key, _, value in (t.partition(" ") for t in texts)}


def test_a_dyno_runs_the_stacks_python(agent: AgentProcess, slug: Path,
                                       stack_root: Path) -> None:
    seen = run_on_stack(agent, slug, " ; ".join([
        "echo \"PY $(python3 -I -c 'import sys; print(sys.version.split()[0])')\"",
        "echo \"INODE $(stat -L -c %i /usr/bin/python3)\"",
        "echo \"VENV $(python3 -I -c 'import ensurepip, pip, ssl, sqlite3; print(1)' 2>&1)\"",
        "echo END"]))
    assert seen["PY"].startswith("3.11."), seen
    # The very file of the stack, not the host's python3 (also a Debian 12 one).
    assert int(seen["INODE"]) == os.stat(stack_root / "usr/bin/python3").st_ino, seen
    assert int(seen["INODE"]) != os.stat("/usr/bin/python3").st_ino
    assert seen["VENV"] == "1", seen


def test_a_dyno_on_a_stack_sees_none_of_the_hosts_files(agent: AgentProcess, slug: Path,
                                                        stack_root: Path,
                                                        markers: list[Path]) -> None:
    host_only = sorted(set(os.listdir(f"/{DIST_PACKAGES}"))
                       - set(os.listdir(stack_root / DIST_PACKAGES)))
    assert host_only, "the host has no Python package the stack lacks"
    probes = [*markers, Path("/work"), Path(f"/{DIST_PACKAGES}") / host_only[0],
              Path("/usr/bin/tini"), Path("/usr/sbin/nft")]
    assert all(path.exists() for path in probes if path != Path("/work"))
    seen = run_on_stack(agent, slug, " ; ".join([
        *(f"if [ -e {p} ]; then echo \"SEEN{i} {p}\"; else echo \"GONE{i} {p}\"; fi"
          for i, p in enumerate(probes)),
        "echo \"DPKG $(sha256sum /var/lib/dpkg/status | cut -d' ' -f1)\"",
        "echo \"ROOT $(ls -A / | tr '\\n' ' ')\"",
        f"echo \"DIST $(ls -A /{DIST_PACKAGES} | tr '\\n' ' ')\"",
        "echo \"OSREL $(grep -c . /etc/os-release)\"",
        "echo END"]))
    for i, path in enumerate(probes):
        assert f"SEEN{i}" not in seen, f"the dyno sees the host's {path}: {seen}"
        assert seen[f"GONE{i}"] == str(path), seen
    # Its package database and its directories are the stack's, not the host's.
    stack_status = hashlib.sha256((stack_root / "var/lib/dpkg/status").read_bytes()).hexdigest()
    host_status = hashlib.sha256(Path("/var/lib/dpkg/status").read_bytes()).hexdigest()
    assert seen["DPKG"] == stack_status != host_status, seen
    assert set(seen["ROOT"].split()) == set(os.listdir(stack_root)), seen
    assert set(seen["DIST"].split()) == set(os.listdir(stack_root / DIST_PACKAGES)), seen


def test_a_dyno_cannot_write_its_stack(agent: AgentProcess, slug: Path,
                                       stack_root: Path) -> None:
    # The stack's /var/tmp is world-writable (1777): only the read-only mount stops a dyno.
    assert os.stat(stack_root / "var/tmp").st_mode & 0o7777 == 0o1777
    name = f"dt-probe-{secrets.token_hex(6)}"
    try:
        seen = run_on_stack(agent, slug, " ; ".join([
            f"echo \"VARTMP $(touch /var/tmp/{name} 2>&1; echo status=$?)\"",
            f"echo \"ETC $(echo x 2>&1 > /etc/{name}; echo status=$?)\"",
            f"echo \"TMP $(touch /tmp/{name} 2>&1; echo status=$?)\"",
            "echo END"]))
        assert "Read-only file system" in seen["VARTMP"], seen
        assert not seen["VARTMP"].endswith("status=0"), seen
        assert not seen["ETC"].endswith("status=0"), seen
        # Its own /tmp is writable: the refusals above are the stack's, not a broken dyno.
        assert seen["TMP"] == "status=0", seen
        assert not (stack_root / "var/tmp" / name).exists()
        assert not (stack_root / "etc" / name).exists()
    finally:
        for path in (stack_root / "var/tmp" / name, stack_root / "etc" / name):
            if path.exists():
                shutil.rmtree(path) if path.is_dir() else path.unlink()
