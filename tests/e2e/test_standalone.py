"""Issue 8 end to end: `dynoagent up examples/hello` in a test host (its 127.0.0.1:5000 is the
test host's own loopback), driven only with `dynoctl` and HTTP: the page, ps, scale with 30
requests over three web dynos, run (exit status, piped stdin), exec, refusals that change
nothing, and Ctrl-C (SIGINT) leaving no dyno, cgroup, namespace, link, mount, table or holder."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.agentproc import BIN, write_config
from tests.support.names import unique
from tests.support.testhost import TestHost, ip
from tests.support.wait import wait_for

HELLO = Path(__file__).resolve().parents[2] / "examples" / "hello"
PORT = 5000
STOP_DEADLINE_S = 35

# Runs inside the test host: GET the proxy `n` times, print each answer's X-Dyno and status.
FETCH_PY = """\
import json, sys, urllib.request
out = []
for _ in range(int(sys.argv[2])):
    with urllib.request.urlopen(sys.argv[1], timeout=10) as response:
        body = response.read().decode()
        out.append({"dyno": response.headers.get("X-Dyno"), "status": response.status,
                    "body": body})
print(json.dumps(out))
"""


class Up:
    """One `dynoagent up` in a test host, on a private config, socket and cgroup root."""

    def __init__(self, host: TestHost, app: str, base: Path, *extra: str,
                 directory: Path = HELLO) -> None:
        self.host = host
        self.app = app
        self.base = base
        self.socket = base / "run" / "dynoagent.sock"
        self.cgroup_root = f"dynoagent-{unique('dt')}"
        self.config = base / "agent.toml"
        write_config(self.config, {
            "state_dir": str(base / "state"), "run_dir": str(base / "run"),
            "socket": str(self.socket), "cgroup_root": self.cgroup_root,
            "log_level": "warning", "stop_timeout_s": 10, "restart_schedule_s": [2, 4]})
        self.out_path = base / "up.out"
        self.err_path = base / "up.err"
        self.argv = [*host.command(str(BIN / "dynoagent"), "up", str(directory), "--app", app,
                                   "--config", str(self.config), *extra)]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Up:
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=err)
        return self

    def output(self) -> str:
        return self.out_path.read_text(errors="replace") + self.err_path.read_text(
            errors="replace")

    def ctl(self, *args: str, input: str | None = None,
            timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "dynoctl"), "--socket", str(self.socket), *args],
                              capture_output=True, text=True, timeout=timeout_s, input=input)

    def ps(self) -> list[dict[str, Any]]:
        result = self.ctl("ps", "--json")
        assert result.returncode == 0, result.stderr
        dynos: list[dict[str, Any]] = json.loads(result.stdout)
        return dynos

    def states(self) -> dict[str, str]:
        return {d["name"]: d["state"] for d in self.ps()}

    def fetch(self, count: int) -> list[dict[str, Any]]:
        result = self.host.run(sys.executable, "-c", FETCH_PY, f"http://127.0.0.1:{PORT}/",
                               str(count), timeout_s=60)
        answers: list[dict[str, Any]] = json.loads(result.stdout)
        return answers

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout=STOP_DEADLINE_S + 10)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGINT)  # the second Ctrl-C forces
            try:
                return self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                return self.proc.wait(timeout=10)


def leftovers(up: Up) -> dict[str, list[str]]:
    """Every kind of kernel object (and the holder) this `up` could have left behind."""
    prefix = f"dyno-{up.app}-"
    cgroups = [str(p) for p in Path("/sys/fs/cgroup").glob(f"*/{up.cgroup_root}")]
    cgroups += [str(p) for p in Path("/sys/fs/cgroup").glob(f"*/*/{up.cgroup_root}")]
    namespaces = [n for n in ip("netns", "list").stdout.split() if n.startswith(prefix)]
    links = [line for line in up.host.run("ip", "-o", "link").stdout.splitlines()
             if ": lo:" not in line]
    mounts = [line for line in Path("/proc/self/mounts").read_text().splitlines()
              if prefix in line or str(up.base) in line]
    tables = up.host.run("nft", "list", "tables").stdout.split("\n")
    holders = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "agent.holder" in text and str(up.base) in text:
            holders.append(text)
    return {"cgroups": cgroups, "namespaces": namespaces, "links": links, "mounts": mounts,
            "nft tables": [t for t in tables if t.strip()], "holders": holders}


@pytest.fixture(scope="module")
def up(host: TestHost) -> Iterator[Up]:
    # Dyno ids name global objects (/run/netns/dyno-<app>-web-1): a unique app per module.
    with running_up(host, unique("hello", 6)) as running:
        yield running


@contextlib.contextmanager
def running_up(host: TestHost, app: str) -> Iterator[Up]:
    """`dynoagent up` of the example app in `host`; on the way out, nothing may be left."""
    base = Path(tempfile.mkdtemp(prefix="dt", dir="/tmp"))
    running = Up(host, app, base).start()
    try:
        wait_for(lambda: running.proc is not None and (
            running.proc.poll() is not None or running.socket.exists()), 30, what="up socket")
        assert running.proc is not None and running.proc.poll() is None, running.output()
        yield running
    finally:
        running.stop()
        try:
            left = leftovers(running)
            assert not any(left.values()), left
        finally:
            shutil.rmtree(base, ignore_errors=True)


def test_page_and_ps(up: Up) -> None:
    wait_for(lambda: up.states() == {"web.1": "up", "worker.1": "up"}, 60,
             what="web.1 and worker.1 up")
    page = up.fetch(1)[0]
    assert page["status"] == 200 and page["dyno"] == "web.1"
    assert "Hello from dynoagent" in page["body"]  # GREETING from examples/hello/.env
    assert 'served by <b id="dyno">web.1</b>' in page["body"]
    # The router's line for it, on the terminal and in `dynoctl logs` (Heroku's heroku[router]).
    line = (r'at=info method=GET path="/" host=127\.0\.0\.1:5000 request_id=[0-9a-f-]{36} '
            r'fwd="127\.0\.0\.1" dyno=web\.1 connect=\d+ms service=\d+ms status=200 '
            r"bytes=\d+ protocol=http")
    wait_for(lambda: re.search(rf"^\d\d:\d\d:\d\d router +\| {line}$", up.output(), re.M), 10,
             what="router line printed")
    logs = up.ctl("logs", "-d", "router")
    assert logs.returncode == 0 and re.search(rf" agent\[router\]: {line}$", logs.stdout,
                                               re.M), logs
    output = up.output()
    # The release ran first and completed; the banner named the socket; lines are formatted.
    assert "release.1 | release phase of release.1: nothing to migrate" in output
    assert output.index("release.1 | State changed from up to complete") < output.index(
        "web.1     | Starting process")
    assert f"system | operator socket {up.socket}" in output
    assert "\x1b[" not in output  # not a terminal: no colour


def test_scale_web_3_spreads_30_requests(up: Up) -> None:
    wait_for(lambda: up.states().get("web.1") == "up", 60, what="web.1 up")
    result = up.ctl("scale", "web=3")
    assert result.returncode == 0, result.stderr
    assert "now running web at 3:Standard-1X, worker at 1:Standard-1X" in result.stdout
    wait_for(lambda: up.states() == {"web.1": "up", "web.2": "up", "web.3": "up",
                                     "worker.1": "up"}, 60, what="three web dynos up")
    answers = up.fetch(30)
    seen = Counter(a["dyno"] for a in answers)
    assert set(seen) == {"web.1", "web.2", "web.3"}, seen
    assert all(a["status"] == 200 for a in answers)


def test_scale_of_an_unknown_type_changes_nothing(up: Up) -> None:
    before = up.ctl("scale", "--json")
    result = up.ctl("scale", "clock=1")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "no process type 'clock'" in result.stderr
    assert up.ctl("scale", "--json").stdout == before.stdout


def test_run_passes_the_exit_status(up: Up) -> None:
    result = up.ctl("run", "--", "sh", "-c", "exit 7")
    assert result.returncode == 7, result.stderr
    assert not [d for d in up.ps() if d["name"].startswith("run.")]  # removed once complete


def test_run_cat_echoes_piped_stdin(up: Up) -> None:
    text = "hello from stdin\nsecond line\n"
    result = up.ctl("run", "--", "cat", input=text)
    assert result.returncode == 0, result.stderr
    assert result.stdout == text


def test_run_python_version(up: Up) -> None:
    result = up.ctl("run", "--", "python3 -V")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Python 3.")


def test_run_detached_goes_to_the_logs(up: Up) -> None:
    marker = unique("mark", 8)
    result = up.ctl("run", "--detached", "--", f"echo {marker}")
    assert result.returncode == 0, result.stderr
    name = result.stdout.split("up, ")[1].split()[0]
    assert name.startswith("run.")
    line = re.compile(rf"^\d\d:\d\d:\d\d {re.escape(name)} +\| {marker}$", re.MULTILINE)
    wait_for(lambda: line.search(up.output()), 30, what="detached output in logs")
    # Once complete, the one-off is removed (its cgroup and namespace with it).
    wait_for(lambda: name not in {d["name"] for d in up.ps()}, 30, what=f"{name} removed")


def test_exec_sees_only_that_dynos_processes(up: Up) -> None:
    wait_for(lambda: up.states().get("web.1") == "up", 60, what="web.1 up")
    result = up.ctl("exec", "web.1", "--", "ps", "-eo", "pid,comm")
    assert result.returncode == 0, result.stderr
    commands = [line.split(None, 1)[1] for line in result.stdout.splitlines()[1:]]
    assert commands[0] == "tini"  # PID 1 of the dyno's own pid namespace
    assert "python3" in commands and "ps" in commands
    assert not {"dynoagent", "systemd", "init", "nsenter"} & set(commands), commands
    assert len(commands) <= 5, commands
    assert up.ctl("exec", "web.1", "--", "sh", "-c", "exit 3").returncode == 3


def test_run_gets_a_terminal_when_the_caller_has_one(up: Up) -> None:
    # `script` gives dynoctl a pseudo-terminal as stdin/stdout/stderr; the dyno gets it too.
    command = (f"{BIN / 'dynoctl'} --socket {up.socket} run -- python3 -c "
               "'import os, sys; print(\"tty\", os.isatty(0), os.isatty(1), "
               "os.environ.get(\"TERM\"))'")
    result = subprocess.run(["script", "-qec", command, "/dev/null"], capture_output=True,
                            text=True, timeout=60,
                            env={"TERM": "xterm-test", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "tty True True xterm-test" in result.stdout
    assert "Running `python3 -c" in result.stdout  # the banner goes to a terminal's stderr


def test_a_caller_that_goes_away_stops_its_one_off(up: Up) -> None:
    caller = subprocess.Popen([str(BIN / "dynoctl"), "--socket", str(up.socket), "run", "--",
                               "sleep 300"], stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        one_off = wait_for(lambda: [d for d in up.ps() if d["command"] == "sleep 300"
                                    and d["state"] == "up"], 30, what="one-off up")
        caller.send_signal(signal.SIGINT)
        assert caller.wait(timeout=10) == 130
    finally:
        caller.kill()
        caller.wait(timeout=10)
    name = one_off[0]["name"]
    wait_for(lambda: name not in {d["name"] for d in up.ps()}, 30, what=f"{name} removed")


def test_exec_into_an_unknown_dyno_is_one_clear_line(up: Up) -> None:
    result = up.ctl("exec", "web.9", "--", "true")
    assert result.returncode == 1
    assert result.stderr == "dynoctl: no dyno web.9 (not_found)\n"


def test_sigint_stops_everything_and_leaves_nothing(up: Up) -> None:
    wait_for(lambda: len(up.ps()) >= 2, 30, what="dynos listed")
    names = sorted(d["name"] for d in up.ps())
    assert up.proc is not None
    up.proc.send_signal(signal.SIGINT)
    code = up.proc.wait(timeout=STOP_DEADLINE_S)
    output = up.output()
    assert code == 0, output
    for name in names:
        assert f"{name:<9} | State changed from up to down" in output, (name, output)
    assert "SIGINT: stopping all dynos" in output
    assert not up.socket.exists()
    left = leftovers(up)
    assert not any(left.values()), left


# -- refusals: one clear line, non-zero, nothing started -----------------------------------

def refuse(host: TestHost, tmp: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    base = Path(tempfile.mkdtemp(prefix="dt", dir="/tmp"))
    try:
        config = base / "agent.toml"
        write_config(config, {"state_dir": str(base / "state"), "run_dir": str(base / "run"),
                              "cgroup_root": f"dynoagent-{unique('dt')}"})
        result = host.run(str(BIN / "dynoagent"), "up", *argv, "--config", str(config),
                          check=False, timeout_s=30)
        assert not (base / "run").exists() and not (base / "state").exists()
        return result
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_malformed_procfile(host: TestHost, tmp_path: Path) -> None:
    app = tmp_path / "bad"
    app.mkdir()
    (app / "Procfile").write_text("web: python3 web.py\nworker python3 worker.py\n")
    result = refuse(host, tmp_path, str(app))
    assert result.returncode == 1
    assert result.stderr == (f"dynoagent up: {app}/Procfile:2: malformed line "
                             "'worker python3 worker.py': expected 'type: command'\n")


def test_duplicate_type(host: TestHost, tmp_path: Path) -> None:
    app = tmp_path / "dup"
    app.mkdir()
    (app / "Procfile").write_text("web: a\nweb: b\n")
    result = refuse(host, tmp_path, str(app))
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert "Procfile:2: duplicate process type 'web' (first on line 1)" in result.stderr


def test_missing_directory(host: TestHost, tmp_path: Path) -> None:
    result = refuse(host, tmp_path, str(tmp_path / "nowhere"))
    assert result.returncode == 1
    assert result.stderr == f"dynoagent up: {tmp_path / 'nowhere'}: does not exist\n"


def test_taken_port(host: TestHost, tmp_path: Path) -> None:
    holder = host.popen([sys.executable, "-c",
                         "import socket, sys; s = socket.socket(); "
                         "s.bind(('127.0.0.1', 5071)); s.listen(); print('ready', flush=True); "
                         "sys.stdin.read()"], stdin=subprocess.PIPE)
    with holder:
        try:
            assert holder.stdout is not None and holder.stdout.readline() == "ready\n"
            result = refuse(host, tmp_path, str(HELLO), "--port", "5071", "--app",
                            unique("hello", 6))
        finally:
            holder.kill()
            holder.wait(timeout=10)
    assert result.returncode == 1
    assert result.stderr == ("dynoagent up: 127.0.0.1:5071 is already in use; pick another "
                             "port with --port\n")


# -- release failure, and the second Ctrl-C -----------------------------------------------

def app_dir(tmp_path: Path, procfile: str) -> Path:
    directory = tmp_path / "app"
    directory.mkdir()
    directory.chmod(0o755)
    (directory / "Procfile").write_text(procfile)
    return directory


@pytest.fixture
def private_base() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="dt", dir="/tmp"))
    yield base
    shutil.rmtree(base, ignore_errors=True)


def test_failed_release_stops_with_its_status(host: TestHost, tmp_path: Path,
                                              private_base: Path) -> None:
    directory = app_dir(tmp_path, "release: echo migrating; exit 3\nweb: sleep 300\n")
    up = Up(host, unique("rel", 6), private_base, "--port", "5072",
            directory=directory).start()
    try:
        assert up.proc is not None
        code = up.proc.wait(timeout=60)
    finally:
        up.stop()
    output = up.output()
    assert code == 3, output
    assert "release.1 | migrating" in output
    assert "release.1 failed with status 3; not starting the formation" in output
    assert "web.1" not in output
    left = leftovers(up)
    assert not any(left.values()), left


def test_second_sigint_forces(host: TestHost, tmp_path: Path, private_base: Path) -> None:
    # A worker that ignores SIGTERM would hold a graceful stop for the whole stop timeout.
    directory = app_dir(tmp_path, "worker: trap '' TERM; echo ready; "
                                  "while true; do sleep 0.2; done\n")
    up = Up(host, unique("frc", 6), private_base, "--port", "5073",
            directory=directory).start()
    try:
        wait_for(lambda: "worker.1  | ready" in up.output() or "worker.1 | ready" in
                 up.output(), 60, what="worker ready")
        assert up.proc is not None
        up.proc.send_signal(signal.SIGINT)
        wait_for(lambda: "Stopping all processes with SIGTERM" in up.output(), 10,
                 what="graceful stop begun")
        up.proc.send_signal(signal.SIGINT)
        code = up.proc.wait(timeout=15)
    finally:
        up.stop()
    output = up.output()
    assert code == 0, output
    assert "forcing: SIGKILL to every dyno" in output
    assert "State changed from up to down" in output
    # Killed at once: the 10 s stop timeout of the config never ran out.
    assert "Error R12" not in output
    left = leftovers(up)
    assert not any(left.values()), left
