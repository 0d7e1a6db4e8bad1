"""`dynoagent build` end to end, in a test host, with a buildpack fixture that records what
Heroku's buildpack API v2 gave it: detect/compile/release, the cache kept between builds,
config vars in ENV_DIR, release YAML; a failing build, one past its time limit, hostile
sources and hostile build output, each leaving no slug, mount, cgroup or process."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.agentproc import BIN, write_config
from tests.support.names import unique
from tests.support.testhost import TestHost
from tests.support.wait import wait_for

FIXTURE = Path(__file__).with_name("buildpacks") / "fixture"


@dataclass
class Builds:
    host: TestHost
    base: Path
    config: Path
    cgroup_root: str

    @property
    def store(self) -> Path:
        return self.base / "state" / "slugs" / "builds"

    def run(self, source: Path, *args: str,
            timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
        argv = self.host.command(str(BIN / "dynoagent"), "build", str(source), "--config",
                                 str(self.config), *args)
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)

    def run_json(self, source: Path, *args: str) -> dict[str, Any]:
        result = self.run(source, "--json", *args)
        assert result.returncode == 0, result.stdout + result.stderr
        out: dict[str, Any] = json.loads(result.stdout)
        out["log"] = result.stderr
        return out

    def slugs(self) -> list[str]:
        return sorted(p.name for p in self.store.iterdir()) if self.store.is_dir() else []


def leftovers(builds: Builds) -> dict[str, list[str]]:
    mounts = [line for line in Path("/proc/self/mounts").read_text().splitlines()
              if str(builds.base) in line]
    groups = [str(p) for p in Path("/sys/fs/cgroup").glob(f"*/{builds.cgroup_root}/*/*")]
    groups += [str(p) for p in Path("/sys/fs/cgroup").glob(f"*/*/{builds.cgroup_root}/*/*")]
    work = builds.base / "run" / "builds"
    workspaces = [p.name for p in work.iterdir()] if work.is_dir() else []
    return {"mounts": mounts, "dyno cgroups": groups, "workspaces": workspaces}


@pytest.fixture(scope="module")
def builds(host: TestHost) -> Iterator[Builds]:
    base = Path(tempfile.mkdtemp(prefix="dtb", dir="/tmp"))
    config = base / "agent.toml"
    cgroup_root = f"dynoagent-{unique('db')}"
    write_config(config, {"state_dir": str(base / "state"), "run_dir": str(base / "run"),
                          "socket": str(base / "run" / "dynoagent.sock"),
                          "cgroup_root": cgroup_root, "log_level": "warning",
                          "address_pool": "172.31.224.0/22"})
    yield Builds(host, base, config, cgroup_root)
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def app(tmp_path: Path) -> Path:
    source = tmp_path / unique("fx", 4)
    source.mkdir()
    (source / "fixture.txt").write_text("a source the fixture buildpack detects\n")
    (source / ".env").write_text("GREETING=hello-from-env\nOTHER=1\n")
    (source / ".git").mkdir()
    (source / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    return source


def members(tarball: Path) -> dict[str, bytes]:
    with tarfile.open(tarball) as tar:
        return {m.name: (tar.extractfile(m).read() if m.isfile() else b"")  # type: ignore[union-attr]
                for m in tar.getmembers()}


def test_build_runs_the_buildpack_api_and_keeps_its_cache(builds: Builds, app: Path) -> None:
    first = builds.run_json(app, "-b", str(FIXTURE), "-e", "EXTRA=x")
    assert "-----> Fixture app detected" in first["log"]
    assert "-----> Fixture compiling in /app" in first["log"]
    slug = Path(first["slug"]["path"])
    assert hashlib.sha256(slug.read_bytes()).hexdigest() == first["slug"]["sha256"]
    files = members(slug)
    # Heroku's slug layout; the source's .git never reaches it.
    assert all(name == "./app" or name.startswith("./app/") for name in files), files
    assert "./app/.git/HEAD" not in files and "./app/fixture.txt" in files
    assert files["./app/greeting.txt"] == b"hello-from-env"  # .env, through ENV_DIR
    assert files["./app/env-names.txt"].split() == [b"EXTRA", b"GREETING", b"OTHER"]
    api = files["./app/api.txt"].decode()
    assert "build_dir=/app cache_dir=/tmp/cache env_dir=/tmp/env" in api
    assert "uid=0 " not in api  # the build runs as the dyno's own user, never root
    assert files["./app/build-number.txt"] == b"build 1\n"
    assert first["process_types"]["web"] == "python3 -m http.server $PORT"
    assert first["process_types"]["worker"].startswith('echo "greeting=$GREETING')
    assert first["config_vars"] == {"FROM_RELEASE": "yes", "GREETING": "from-release"}
    assert first["buildpacks"] == ["fixture"] and first["cached"] is False
    # The extracted slug beside the tarball is what a dyno mounts.
    assert (Path(first["slug"]["dir"]) / "greeting.txt").read_text() == "hello-from-env"

    # Same inputs: the slug is found, nothing is built.
    again = builds.run_json(app, "-b", str(FIXTURE), "-e", "EXTRA=x")
    assert again["cached"] is True and again["slug"]["sha256"] == first["slug"]["sha256"]
    assert "Fixture compiling" not in again["log"]

    # Built again: the buildpack's cache directory kept what the first build put there.
    rebuilt = builds.run_json(app, "-b", str(FIXTURE), "-e", "EXTRA=x", "--no-cache")
    assert members(Path(rebuilt["slug"]["path"]))["./app/build-number.txt"] == b"build 2\n"
    # A changed source is a new build.
    (app / "fixture.txt").write_text("changed\n")
    changed = builds.run_json(app, "-b", str(FIXTURE), "-e", "EXTRA=x")
    assert changed["cached"] is False and changed["key"] != first["key"]
    assert not any(leftovers(builds).values()), leftovers(builds)


def test_output_file_is_the_slug(builds: Builds, app: Path, tmp_path: Path) -> None:
    target = tmp_path / "out" / "slug.tgz"
    result = builds.run_json(app, "-b", str(FIXTURE), "-o", str(target))
    assert hashlib.sha256(target.read_bytes()).hexdigest() == result["slug"]["sha256"]


def test_failing_compile_is_a_clear_error_and_no_slug(builds: Builds, app: Path) -> None:
    before = builds.slugs()
    result = builds.run(app, "-b", str(FIXTURE), "-e", "FAIL=1")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "fixture: failing as asked" in result.stdout
    assert " !     Build failed: the build failed: a buildpack exited 1" in result.stdout
    assert builds.slugs() == before
    assert not any(leftovers(builds).values()), leftovers(builds)


def test_build_past_its_time_limit_is_killed_with_its_cgroup(builds: Builds, app: Path) -> None:
    before = builds.slugs()
    began = time.monotonic()
    result = builds.run(app, "-b", str(FIXTURE), "-e", "HANG=1", "--timeout", "3")
    took = time.monotonic() - began
    assert result.returncode == 1, result.stdout + result.stderr
    assert "fixture: hanging as asked" in result.stdout
    assert "ran past its time limit of 3 s and was stopped" in result.stdout
    assert took < 30, took  # 3 s, the stop's grace of 5 s, the agent's start and stop
    assert builds.slugs() == before
    sleepers = [p for p in Path("/proc").glob("[0-9]*/cmdline")
                if _cmdline(p) == "sleep 600"]
    assert not sleepers
    assert not any(leftovers(builds).values()), leftovers(builds)


def _cmdline(path: Path) -> str:
    try:
        return path.read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def test_nothing_detected_names_the_buildpacks_tried(builds: Builds, tmp_path: Path) -> None:
    source = tmp_path / "plain"
    source.mkdir()
    (source / "README").write_text("nothing to build\n")
    result = builds.run(source)
    assert result.returncode == 1
    assert "no buildpack detected this app (tried: python, nodejs)" in result.stdout


@pytest.mark.parametrize("hostile", ["link-out", "fifo", "setuid"])
def test_hostile_sources_are_refused(builds: Builds, app: Path, hostile: str) -> None:
    if hostile == "link-out":
        (app / "passwd").symlink_to("/etc/passwd")
        expected = "symlink to '/etc/passwd', outside the slug; refused"
    elif hostile == "fifo":
        os.mkfifo(app / "pipe")
        expected = "the source has a special file at pipe; refused"
    else:
        (app / "tool").write_text("#!/bin/sh\n")
        os.chmod(app / "tool", 0o4755)
        expected = "the source has a setuid or setgid file at tool; refused"
    before = builds.slugs()
    result = builds.run(app, "-b", str(FIXTURE))
    assert result.returncode == 1
    assert expected in result.stdout, result.stdout
    assert builds.slugs() == before
    assert not any(leftovers(builds).values()), leftovers(builds)


def test_a_link_out_left_by_the_build_is_refused(builds: Builds, app: Path) -> None:
    before = builds.slugs()
    result = builds.run(app, "-b", str(FIXTURE), "-e", "LINK_OUT=1")
    assert result.returncode == 1
    assert "the build's /app is not a safe slug" in result.stdout, result.stdout
    assert "'/etc/shadow', outside the slug" in result.stdout
    assert builds.slugs() == before


def test_up_runs_the_process_types_of_bin_release_when_there_is_no_procfile(
        builds: Builds, app: Path, tmp_path: Path) -> None:
    """No Procfile: `up` builds, takes web and worker from bin/release, and gives the dynos
    bin/release's config vars under the app's own (.env wins)."""
    base = tmp_path / "up"
    base.mkdir()
    config = base / "agent.toml"
    socket = base / "run" / "dynoagent.sock"
    write_config(config, {"state_dir": str(base / "state"), "run_dir": str(base / "run"),
                          "socket": str(socket), "cgroup_root": f"dynoagent-{unique('du')}",
                          "log_level": "warning", "stop_timeout_s": 5,
                          "address_pool": "172.31.228.0/22"})
    out = base / "up.out"
    with open(out, "wb") as sink:
        proc = subprocess.Popen(builds.host.command(
            str(BIN / "dynoagent"), "up", str(app), "--config", str(config), "-b",
            str(FIXTURE)), stdout=sink, stderr=subprocess.STDOUT)

    def states() -> dict[str, str]:
        if not socket.exists():
            return {}
        result = subprocess.run([str(BIN / "dynoctl"), "--socket", str(socket), "ps",
                                 "--json"], capture_output=True, text=True, timeout=30)
        return {d["name"]: d["state"] for d in json.loads(result.stdout or "[]")}

    try:
        wait_for(lambda: proc.poll() is not None or states() == {"web.1": "up",
                                                                "worker.1": "up"},
                 120, what="web.1 and worker.1 from bin/release up", interval_s=0.2)
        assert proc.poll() is None, out.read_text()
        wait_for(lambda: "greeting=hello-from-env from_release=yes built=hello-from-env"
                 in out.read_text(), 30, what="the worker's line")
        assert "-----> Fixture app detected" in out.read_text()
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0, out.read_text()
