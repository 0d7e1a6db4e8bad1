"""Stacks without mmdebstrap: names, packages and mirrors refused at the edge (exit 2), the input
key, the mmdebstrap command, a build against a fake machine (metadata, nothing to do when up to
date, rebuilds on other inputs, nothing left behind by a failure, no rebuild under a running
dyno), the stacks directory, `stack ls`/`rm`, and `up --stack`."""

from __future__ import annotations

import io
import json
import os
import socket
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from agent.cli import dynoagent
from agent.cli import stack as stack_cli
from agent.config import Config
from agent.launcher.rootfs import MOUNT_POINTS
from agent.sizes import DEFAULT_SIZES
from agent.stacks import recipe as rc
from agent.stacks.build import (
    StackBuildError,
    build,
    content_hash,
    installed_packages,
)
from agent.stacks.store import StackStore, dynos_using, link_stacks
from agent.standalone import up as standalone
from agent.supervision.reconcile import Engine
from tests.unit.agent.test_standalone import PROCFILE, FakeFleet

TOOLS = rc.Tools(mmdebstrap="1.3.5", architecture="amd64")
STATUS = """\
Package: python3
Status: install ok installed
Version: 3.11.2-1+b1
Description: interactive high-level object-oriented language
 continued: line

Package: removed-one
Status: deinstall ok config-files
Version: 1.0

Package: base-files
Status: install ok installed
Version: 12.4+deb12u5
"""


# -- names, packages, mirrors: refused before anything runs --------------------------------

@pytest.mark.parametrize("name", ["host", "Bad", "../x", ".x", "", "a/b", "x" * 65, "-x"])
def test_bad_names_are_refused(name: str) -> None:
    with pytest.raises(rc.StackUsageError):
        rc.check_name(name)


@pytest.mark.parametrize("name", ["test-bookworm", "heroku-24", "b.2", "0"])
def test_good_names_pass(name: str) -> None:
    assert rc.check_name(name) == name


def test_packages_are_sorted_and_unique_and_checked() -> None:
    assert rc.parse_packages("python3, curl,python3 ,libpq5=15.6-0+deb12u1") == (
        "curl", "libpq5=15.6-0+deb12u1", "python3")
    for bad in ("", " , ", "a;b", "Foo", "x y'z", "--option"):
        with pytest.raises(rc.StackUsageError):
            rc.parse_packages(bad)


@pytest.mark.parametrize("kwargs", [{"suite": "Bookworm"}, {"suite": "bookworm main"},
                                    {"mirror": "ftp://x"}, {"mirror": "http://x y"},
                                    {"mirror": "http://x'"}, {"security_mirror": "x"}])
def test_bad_suites_and_mirrors_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(rc.StackUsageError):
        rc.Recipe(**kwargs)


@pytest.mark.parametrize("argv", [
    ["stack", "build", "host"], ["stack", "build", "Bad_Name"], ["stack", "rm", "host"],
    ["stack", "rm", "../etc"], ["stack", "build", "ok", "--packages", "a;rm -rf /"],
    ["stack", "build", "ok", "--suite", "BOOKWORM"],
    ["stack", "build", "ok", "--mirror", "file:///x y"],
])
def test_the_cli_refuses_bad_arguments_with_exit_2(argv: list[str], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert dynoagent.main([*argv, "--state-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"dynoagent stack {argv[1]}: ") and err.count("\n") == 1, err
    assert not (tmp_path / "stacks").exists()  # refused before touching anything


def test_the_cli_refuses_a_bad_source_date_epoch(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    assert dynoagent.main(["stack", "build", "ok", "--state-dir", str(tmp_path)]) == 2
    assert "SOURCE_DATE_EPOCH" in capsys.readouterr().err


# -- the input key and the command -----------------------------------------------------------

def key(recipe: rc.Recipe, tools: rc.Tools = TOOLS) -> str:
    return rc.input_key(rc.inputs(recipe, tools))


def test_equal_inputs_have_equal_keys_and_any_change_changes_it() -> None:
    base = rc.Recipe()
    assert key(base) == key(rc.Recipe()) and len(key(base)) == 64
    assert key(rc.Recipe(packages=rc.parse_packages("bb,aa"))) == \
        key(rc.Recipe(packages=rc.parse_packages("aa, bb,aa")))
    changed = [rc.Recipe(suite="trixie"), rc.Recipe(packages=("python3",)),
               rc.Recipe(mirror="http://mirror.example/debian"),
               rc.Recipe(security_mirror=None), rc.Recipe(source_date_epoch=1)]
    keys = {key(base), *(key(r) for r in changed),
            key(base, rc.Tools("1.4.0", "amd64")), key(base, rc.Tools("1.3.5", "arm64"))}
    assert len(keys) == len(changed) + 3


def test_the_inputs_record_what_the_build_depends_on() -> None:
    data = rc.inputs(rc.Recipe(), TOOLS)
    assert data["packages"] == sorted(rc.DEFAULT_PACKAGES)
    assert data["suite"] == "bookworm" and data["mmdebstrap"] == "1.3.5"
    assert data["sources"] == ["deb http://deb.debian.org/debian bookworm main",
                               "deb http://deb.debian.org/debian bookworm-updates main",
                               "deb http://deb.debian.org/debian-security bookworm-security main"]
    json.dumps(data)  # JSON data, as the metadata stores it


def test_default_packages_give_python_with_venv_and_pip() -> None:
    assert {"python3", "python3-venv", "python3-pip", "ca-certificates"} <= \
        set(rc.DEFAULT_PACKAGES)
    assert tuple(sorted(set(rc.DEFAULT_PACKAGES))) == rc.DEFAULT_PACKAGES


def test_the_mmdebstrap_command() -> None:
    argv = rc.mmdebstrap_argv(rc.Recipe(packages=("curl", "python3")), "/s/.x.tmp-1")
    assert argv[:4] == ["mmdebstrap", "--mode=root", "--variant=minbase",
                        "--format=directory"]
    assert "--include=curl,python3" in argv
    sources = list(rc.Recipe().sources())
    assert argv[-len(sources) - 2:] == ["bookworm", "/s/.x.tmp-1", *sources]
    hook = next(a for a in argv if a.startswith("--customize-hook="))
    for name in MOUNT_POINTS:
        assert f'mkdir -m 0755 "$1/{name}"' in hook
    assert 'echo localhost > "$1/etc/hostname"' in hook


def test_a_rolling_suite_has_no_updates_or_security_sources() -> None:
    assert rc.Recipe(suite="sid").sources() == ("deb http://deb.debian.org/debian sid main",)
    assert len(rc.Recipe(security_mirror=None).sources()) == 2


def test_the_build_environment_is_reproducible() -> None:
    env = rc.build_env(rc.Recipe(source_date_epoch=42), {"PATH": "/bin", "LANG": "de_DE",
                                                         "LC_TIME": "x"})
    assert env == {"PATH": "/bin", "SOURCE_DATE_EPOCH": "42", "LC_ALL": "C.UTF-8",
                   "DEBIAN_FRONTEND": "noninteractive"}


# -- a build against a fake machine -----------------------------------------------------------

class FakeMachine:
    """mmdebstrap writes a tiny root into its target; chroot answers as a good stack would."""

    def __init__(self, status: int = 0, python: tuple[int, str] = (0, "python 3.11.2\n"),
                 mount_points: Sequence[str] = MOUNT_POINTS,
                 tools: rc.Tools = TOOLS) -> None:
        self.status = status
        self.python = python
        self.mount_points = mount_points
        self.tools = tools
        self.builds: list[list[str]] = []
        self.envs: list[Mapping[str, str]] = []
        self.run: list[list[str]] = []

    def versions(self) -> rc.Tools:
        return self.tools

    def mmdebstrap(self, argv: Sequence[str], env: Mapping[str, str],
                   line: Callable[[str], None], timeout_s: float) -> int:
        self.builds.append(list(argv))
        self.envs.append(env)
        target = Path(next(arg for arg in argv if ".tmp-" in arg))
        assert target.is_dir() and not any(target.iterdir()), "the target must start empty"
        for name in self.mount_points:
            (target / name).mkdir()
        for path, text in {"usr/bin/python3": "#!", "etc/hostname": "localhost\n",
                           "var/lib/dpkg/status": STATUS}.items():
            (target / path).parent.mkdir(parents=True, exist_ok=True)
            (target / path).write_text(text)
        line("I: success in 1.0 seconds")
        return self.status

    def run_in(self, root: Path, argv: Sequence[str], timeout_s: float) -> tuple[int, str]:
        self.run.append(list(argv))
        if argv[0] == "/usr/bin/python3":
            return self.python
        return 0, ""


@pytest.fixture
def store(tmp_path: Path) -> StackStore:
    return StackStore(tmp_path / "state" / "stacks")


def do_build(store: StackStore, machine: FakeMachine, recipe: rc.Recipe | None = None,
             **kwargs: Any) -> tuple[Any, str]:
    out = io.StringIO()
    result = build(store, "web-22", recipe or rc.Recipe(), machine, out, **kwargs)
    return result, out.getvalue()


def leftovers(store: StackStore) -> list[str]:
    return sorted(p.name for p in store.dir.iterdir() if p.name != ".lock")


def test_a_build_installs_the_stack_with_its_metadata(store: StackStore) -> None:
    machine = FakeMachine()
    result, out = do_build(store, machine)
    assert result.built and leftovers(store) == [".web-22.json", "web-22"]
    assert "-----> Building stack web-22 (bookworm, 10 packages)" in out
    assert "       I: success in 1.0 seconds" in out  # mmdebstrap's output, passed through
    assert "-----> Stack web-22 ready" in out
    info = store.info("web-22")
    assert info is not None and info == result.info
    assert info.key == key(rc.Recipe())
    assert info.inputs == rc.inputs(rc.Recipe(), TOOLS)
    assert info.packages == ["base-files=12.4+deb12u5", "python3=3.11.2-1+b1"]
    assert info.python == "3.11.2" and info.size_bytes > 0
    assert info.content_sha256 == content_hash(store.root("web-22"))[0]
    assert machine.envs[0]["SOURCE_DATE_EPOCH"] == str(rc.DEFAULT_SOURCE_DATE_EPOCH)
    # The check imports what python3-venv and python3-pip bring, writing no bytecode.
    assert machine.run[-1][:3] == ["/usr/bin/python3", "-I", "-B"]
    assert machine.run[-1][-2:] == ["ensurepip", "pip"]


def test_the_same_inputs_again_do_nothing(store: StackStore) -> None:
    machine = FakeMachine()
    first, _ = do_build(store, machine)
    second, out = do_build(store, machine)
    assert not second.built and len(machine.builds) == 1
    assert second.info == first.info
    assert out.startswith("-----> Stack web-22 is up to date (bookworm, 10 packages, key ")


@pytest.mark.parametrize("change", [
    {"recipe": rc.Recipe(packages=("python3",))}, {"recipe": rc.Recipe(suite="trixie")},
    {"machine": FakeMachine(tools=rc.Tools("1.4.0", "amd64"))}, {"rebuild": True},
])
def test_other_inputs_or_rebuild_build_again(store: StackStore, change: dict[str, Any]) -> None:
    machine = FakeMachine()
    first, _ = do_build(store, machine)
    again = change.get("machine", machine)
    result = build(store, "web-22", change.get("recipe", rc.Recipe()), again, io.StringIO(),
                   rebuild=change.get("rebuild", False))
    assert result.built
    assert (result.info.key == first.info.key) == bool(change.get("rebuild"))
    assert len(machine.builds) + (len(again.builds) if again is not machine else 0) == 2
    assert leftovers(store) == [".web-22.json", "web-22"]
    assert store.info("web-22") == result.info


def test_a_stack_without_metadata_or_a_mount_point_is_rebuilt(store: StackStore) -> None:
    machine = FakeMachine()
    do_build(store, machine)
    store.meta_path("web-22").unlink()  # a crash between rename and metadata
    do_build(store, machine)
    (store.root("web-22") / "proc").rmdir()
    do_build(store, machine)
    assert len(machine.builds) == 3


@pytest.mark.parametrize("machine, reason", [
    (FakeMachine(status=100), "mmdebstrap exited with status 100; its last lines:\n"
                              "I: success in 1.0 seconds"),
    (FakeMachine(python=(1, "ImportError: No module named 'ensurepip'")),
     "python3 fails (status 1): ImportError"),
    (FakeMachine(mount_points=("dev", "proc", "sys", "tmp")), "lacks the mount points /app"),
])
def test_a_failed_build_leaves_nothing_and_says_why(store: StackStore, machine: FakeMachine,
                                                    reason: str) -> None:
    with pytest.raises(StackBuildError) as caught:
        do_build(store, machine)
    assert reason in str(caught.value)
    assert leftovers(store) == []


def test_a_failed_rebuild_keeps_the_stack_that_was_there(store: StackStore) -> None:
    first, _ = do_build(store, FakeMachine())
    with pytest.raises(StackBuildError):
        do_build(store, FakeMachine(status=1), rebuild=True)
    assert leftovers(store) == [".web-22.json", "web-22"]
    assert store.info("web-22") == first.info


def test_an_interrupted_build_leaves_nothing(store: StackStore) -> None:
    class Interrupted(FakeMachine):
        def mmdebstrap(self, argv: Sequence[str], env: Mapping[str, str],
                       line: Callable[[str], None], timeout_s: float) -> int:
            super().mmdebstrap(argv, env, line, timeout_s)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        do_build(store, Interrupted())
    assert leftovers(store) == []


def test_a_stack_in_use_is_not_rebuilt(store: StackStore) -> None:
    machine = FakeMachine()
    first, _ = do_build(store, machine)
    with pytest.raises(StackBuildError, match=r"in use by dyno\(s\) d-1, d-2"):
        do_build(store, machine, recipe=rc.Recipe(packages=("python3",)),
                 in_use=lambda: ["d-1", "d-2"])
    assert store.info("web-22") == first.info and len(machine.builds) == 1


def test_what_killed_builds_left_is_swept(store: StackStore) -> None:
    store.ensure()
    (store.dir / ".web-22.tmp-abc" / "usr").mkdir(parents=True)
    (store.dir / ".old.old-xyz").mkdir()
    (store.dir / ".web-22.json.tmp-1").write_text("{")
    do_build(store, FakeMachine())
    assert leftovers(store) == [".web-22.json", "web-22"]


def test_the_wrong_hostname_fails_verification(store: StackStore) -> None:
    class Leaky(FakeMachine):
        def mmdebstrap(self, argv: Sequence[str], env: Mapping[str, str],
                       line: Callable[[str], None], timeout_s: float) -> int:
            status = super().mmdebstrap(argv, env, line, timeout_s)
            Path(next(arg for arg in argv if ".tmp-" in arg), "etc/hostname").write_text("vm\n")
            return status

    with pytest.raises(StackBuildError, match="hostname"):
        do_build(store, Leaky())
    assert leftovers(store) == []


# -- contents, the directory, ls and rm --------------------------------------------------------

def test_installed_packages_reads_only_installed_ones(tmp_path: Path) -> None:
    (tmp_path / "status").write_text(STATUS)
    assert installed_packages(tmp_path / "status") == ["base-files=12.4+deb12u5",
                                                       "python3=3.11.2-1+b1"]


def test_the_content_hash_sees_content_mode_and_links_but_not_mtimes(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("one")
    (tmp_path / "l").symlink_to("/etc/passwd")
    first = content_hash(tmp_path)
    assert first[1:] == (3, 2)
    os.utime(tmp_path / "a", (1, 1))
    assert content_hash(tmp_path) == first
    (tmp_path / "a").write_text("two")
    second = content_hash(tmp_path)
    assert second[0] != first[0]
    (tmp_path / "a").chmod(0o600)
    assert content_hash(tmp_path)[0] != second[0]


def test_names_are_stack_directories_only(store: StackStore) -> None:
    store.ensure()
    for name in ("b", "a", ".a.tmp-1"):
        (store.dir / name).mkdir()
    (store.dir / "file").write_text("")
    (store.dir / "link").symlink_to(store.dir / "a")
    assert store.names() == ["a", "b"]


def record(state_dir: Path, dyno_id: str, stack: str) -> None:
    (state_dir / "dynos").mkdir(parents=True, exist_ok=True)
    (state_dir / "dynos" / f"{dyno_id}.json").write_text(json.dumps(
        {"spec": {"id": dyno_id, "release": {"version": 1, "stack": stack}}}))


def test_dynos_using_reads_the_agents_records(tmp_path: Path) -> None:
    record(tmp_path, "d-2", "web-22")
    record(tmp_path, "d-1", "web-22")
    record(tmp_path, "d-3", "other")
    (tmp_path / "dynos" / "bad.json").write_text("{")
    assert dynos_using(tmp_path, "web-22") == ["d-1", "d-2"]
    assert dynos_using(tmp_path / "none", "web-22") == []


def test_rm_removes_the_stack_and_refuses_while_a_dyno_uses_it(
        store: StackStore, capsys: pytest.CaptureFixture[str]) -> None:
    do_build(store, FakeMachine())
    state_dir = store.dir.parent
    record(state_dir, "d-1", "web-22")
    assert stack_cli._rm(store, state_dir, "web-22") == 1
    assert "in use by dyno(s) d-1" in capsys.readouterr().err
    assert store.exists("web-22")
    (state_dir / "dynos" / "d-1.json").unlink()
    assert stack_cli._rm(store, state_dir, "web-22") == 0
    assert leftovers(store) == []
    assert stack_cli._rm(store, state_dir, "web-22") == 1
    assert "no stack web-22" in capsys.readouterr().err


def test_ls_lists_the_stacks(store: StackStore, capsys: pytest.CaptureFixture[str]) -> None:
    assert dynoagent.main(["stack", "ls", "--state-dir", str(store.dir.parent)]) == 0
    assert capsys.readouterr().out == f"no stacks in {store.dir}\n"
    do_build(store, FakeMachine())
    (store.dir / "bare").mkdir()
    assert dynoagent.main(["stack", "ls", "--json", "--state-dir", str(store.dir.parent)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["name"], r["key"]) for r in rows] == [("bare", None),
                                                     ("web-22", key(rc.Recipe()))]
    assert rows[1]["python"] == "3.11.2" and rows[1]["path"] == str(store.root("web-22"))
    assert dynoagent.main(["stack", "ls", "--state-dir", str(store.dir.parent)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "SUITE", "PACKAGES", "SIZE", "PYTHON", "BUILT"]
    assert lines[1].split()[:2] == ["bare", "?"]
    assert lines[2].split()[:3] == ["web-22", "bookworm", "2"]


# -- dynoagent up --stack ---------------------------------------------------------------------

def test_link_stacks_points_a_private_state_dir_at_the_hosts_stacks(tmp_path: Path) -> None:
    state = tmp_path / "run" / "state"
    link_stacks(state, tmp_path / "system" / "stacks")
    assert os.readlink(state / "stacks") == str(tmp_path / "system" / "stacks")
    assert state.stat().st_mode & 0o777 == 0o700
    link_stacks(state, tmp_path / "other")
    assert os.readlink(state / "stacks") == str(tmp_path / "other")
    (state / "stacks").unlink()
    (state / "stacks").mkdir()
    link_stacks(state, tmp_path / "other")  # stacks of its own: left alone
    assert not (state / "stacks").is_symlink()


def test_up_stack_checks_the_stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert stack_cli.stack_for_up(None, tmp_path, private=True) == "host"
    with pytest.raises(stack_cli.UpStackError) as caught:
        stack_cli.stack_for_up("Bad", tmp_path, private=False)
    assert caught.value.exit_code == 2
    with pytest.raises(stack_cli.UpStackError) as caught:
        stack_cli.stack_for_up("web-22", tmp_path, private=False)
    assert caught.value.exit_code == 1
    assert "dynoagent stack build web-22" in str(caught.value)
    (tmp_path / "stacks" / "web-22").mkdir(parents=True)
    assert stack_cli.stack_for_up("web-22", tmp_path, private=False) == "web-22"
    # A private state dir (no --config) reaches the stacks of the host's agent config.
    system = tmp_path / "system-state"
    (system / "stacks" / "web-22").mkdir(parents=True)
    config = tmp_path / "agent.toml"
    config.write_text(f'state_dir = "{system}"\n')
    monkeypatch.setenv("DYNOAGENT_CONFIG", str(config))
    private = tmp_path / "up" / "state"
    assert stack_cli.stack_for_up("web-22", private, private=True) == "web-22"
    assert (private / "stacks").resolve() == (system / "stacks").resolve()


def test_up_refuses_a_missing_stack_before_starting(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "Procfile").write_text("web: python3 -m http.server $PORT\n")
    config = tmp_path / "agent.toml"
    config.write_text(f'state_dir = "{tmp_path / "state"}"\nrun_dir = "{tmp_path / "run"}"\n')
    assert dynoagent.main(["up", str(tmp_path), "--config", str(config),
                           "--stack", "web-22"]) == 1
    assert "stack web-22 is not installed" in capsys.readouterr().err


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    sock = socket.socket()
    try:
        yield sock
    finally:
        sock.close()


def controller(stack: str) -> standalone.FormationController:
    source = standalone.AppSource(Path("/srv/hello"), "hello", PROCFILE, {})
    formation = standalone.initial_formation(PROCFILE, [], DEFAULT_SIZES)
    return standalone.FormationController(source, formation, Engine(FakeFleet()), None,
                                          DEFAULT_SIZES, stack)


@pytest.mark.parametrize("stack", ["host", "web-22"])
def test_up_runs_its_dynos_on_the_stack_and_warns_only_on_host(
        stack: str, listener: socket.socket) -> None:
    ctrl = controller(stack)
    assert all(body["release"]["stack"] == stack for body in ctrl.desired())
    out = io.StringIO()
    source = ctrl.source
    options = standalone.UpOptions(source, ctrl.formation, listener, out=out, stack=stack)
    daemon = standalone.StandaloneDaemon(Config(), options)

    class Proxy:
        address = ("127.0.0.1", 5000)

    daemon._banner(ctrl, Proxy())  # type: ignore[arg-type]
    text = out.getvalue()
    assert ("development only" in text) == (stack == "host"), text
    assert f"stack {stack}" in text
