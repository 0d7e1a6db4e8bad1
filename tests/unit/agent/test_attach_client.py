"""dynoctl's half of the relay against a scripted agent on a socketpair: it sends stdin only
within the credit it was given, then EOF; writes stdout and stderr apart; turns Ctrl-C into
a signal frame; exits with the command's status; and an agent error is one clear line."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.api import attachwire as wire
from agent.api.attach import attach_path
from agent.cli import dynoctl as ctl

REPO = Path(__file__).resolve().parents[3]
# dynoctl's session on the inherited socket (fd 3), with our stdio as given.
CLIENT_PY = """\
import socket, sys
from agent.cli import dynoctl as ctl
sock = socket.socket(fileno=3)
try:
    code = ctl._Session(sock, False, False).run(lambda m: print("started", file=sys.stderr))
except ctl.CtlError as exc:
    print(f"dynoctl: {exc}", file=sys.stderr)
    code = 1
sys.exit(code)
"""


class Agent:
    """The test's end: frames in, frames out, with a deadline on every read."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.decoder = wire.FrameDecoder(wire.CALLER_KINDS)
        self.frames: list[tuple[bytes, bytes]] = []

    def send(self, frame: bytes) -> None:
        self.sock.sendall(frame)

    def until(self, count: int, timeout_s: float = 10) -> list[tuple[bytes, bytes]]:
        """Read until `count` frames have come in all; return them."""
        deadline = time.monotonic() + timeout_s
        while len(self.frames) < count:
            left = deadline - time.monotonic()
            assert left > 0, f"only {self.frames!r}"
            if select.select([self.sock], [], [], left)[0]:
                data = self.sock.recv(1 << 16)
                assert data, f"the client went away after {self.frames!r}"
                self.frames += self.decoder.feed(data)
        return self.frames

    def nothing_more(self, wait_s: float = 0.3) -> bool:
        return not select.select([self.sock], [], [], wait_s)[0]


@contextlib.contextmanager
def client(stdin: bytes) -> Iterator[tuple[Agent, subprocess.Popen[bytes]]]:
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen([sys.executable, "-c", CLIENT_PY], cwd=REPO, pass_fds=(3,),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE,
                            preexec_fn=lambda: os.dup2(theirs.fileno(), 3))
    theirs.close()
    try:
        assert proc.stdin is not None
        proc.stdin.write(stdin)
        proc.stdin.close()
        yield Agent(ours), proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(timeout=10)
        ours.close()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def test_stdin_goes_only_within_credit_then_eof_and_the_status_is_the_commands() -> None:
    with client(b"0123456789") as (agent, proc):
        agent.send(wire.control({"event": "started", "name": "web.1"}))
        assert agent.nothing_more(), "stdin sent without credit"
        agent.send(wire.credit(4))
        assert agent.until(1) == [(wire.STDIN, b"0123")]
        assert agent.nothing_more(), "stdin sent beyond the credit"
        agent.send(wire.credit(100))
        frames = agent.until(3)
        assert b"".join(p for k, p in frames if k == wire.STDIN) == b"0123456789"
        assert frames[-1] == (wire.STDIN_EOF, b"")
        agent.send(wire.encode(wire.STDOUT, b"\x00out\xff") + wire.encode(wire.STDERR, b"err")
                   + wire.control({"event": "exit", "status": 42}))
        assert proc.wait(timeout=10) == 42
        assert proc.stdout is not None and proc.stderr is not None
        assert proc.stdout.read() == b"\x00out\xff"
        assert proc.stderr.read() == b"started\nerr"


def test_ctrl_c_becomes_a_signal_frame() -> None:
    with client(b"") as (agent, proc):
        agent.send(wire.control({"event": "started"}) + wire.credit(10))
        assert agent.until(1) == [(wire.STDIN_EOF, b"")]
        proc.send_signal(signal.SIGINT)
        assert agent.until(2)[-1] == (wire.SIGNAL, b"INT")
        assert proc.poll() is None  # Ctrl-C is the command's, not dynoctl's
        agent.send(wire.control({"event": "exit", "status": 130}))
        assert proc.wait(timeout=10) == 130


@pytest.mark.parametrize(("answer", "line"), [
    (wire.control({"error": {"code": "not_found", "message": "no dyno web.9"}}),
     "dynoctl: no dyno web.9 (not_found)"),
    (b"", "dynoctl: dynoagent closed the connection before the command finished"),
    (b"?\x00\x00\x00\x00", "dynoctl: dynoagent sent a malformed attach frame"),
])
def test_a_failure_is_one_line_and_status_1(answer: bytes, line: str) -> None:
    with client(b"") as (agent, proc):
        if answer:
            agent.send(answer)
        agent.sock.shutdown(socket.SHUT_WR)
        assert proc.wait(timeout=10) == 1
        assert proc.stderr is not None
        err = proc.stderr.read().decode()
        assert err.startswith(line) and err.count("\n") == 1, err


# -- the way in: straight to the attach socket, and straight out -----------------------------

def _scripted_attach_agent(path: Path, status: int) -> threading.Thread:
    """An attach socket at `path` that takes one request, says started and writes `out\\n`,
    then that the command exited with `status`; the requests it got are in `served`."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    listener.settimeout(10)

    def serve() -> None:
        with listener, contextlib.suppress(OSError):  # a client that never came: it fails
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(10)
                data = b""
                while b"\n" not in data and (chunk := conn.recv(65536)):
                    data += chunk
                served.append(json.loads(data.partition(b"\n")[0]))
                conn.sendall(wire.control({"event": "started", "name": "run.1234",
                                           "app": "shop", "size": "standard-1x"})
                             + wire.encode(wire.STDOUT, b"out\n")
                             + wire.control({"event": "exit", "status": status}))
                with contextlib.suppress(OSError):
                    while conn.recv(65536):  # until the client has gone
                        pass

    served: list[dict[str, object]] = []
    thread = threading.Thread(target=serve, daemon=True)
    thread.served = served  # type: ignore[attr-defined]
    thread.start()
    return thread


def test_the_attach_path_is_the_agents(tmp_path: Path) -> None:
    for name in ("/run/dynoagent/dynoagent.sock", "api.sock", "a/b.c.sock", "/x", "/a/x.",
                 ".sock", "rel/api", "..sock", "/a/..b.", "a//b.sock", "/x.sock", "/.d/x.y.",
                 "./a.sock"):
        # The same file (pathlib drops doubled slashes and `.` parts).
        assert Path(ctl.attach_path_of(name)) == attach_path(Path(name)), name


def test_run_needs_no_request_to_the_operator_api(tmp_path: Path) -> None:
    """Nothing listens on the operator socket: `run` goes straight to the attach socket
    next to it, and imports neither http.client, nor argparse for its usual options, nor
    what agent.sizes brings (dataclasses, typing) to spell the size, nor json (and re), nor
    the enums of socket and signal, nor contextlib, nor os. Started as its launcher starts
    it: without the site module, which would import os itself."""
    agent = _scripted_attach_agent(tmp_path / "api.attach.sock", 7)
    probe = (f"import sys\nsys.path.insert(0, {str(REPO)!r})\nfrom agent.cli import dynoctl\n"
             f"code = dynoctl.main(['--socket', {str(tmp_path / 'api.sock')!r}, 'run', '--',"
             " 'true'])\n"
             "print(sorted({'http.client', 'agent.sizes', 'dataclasses', 'typing', 'argparse',"
             " 'json', 're', 'socket', 'signal', 'contextlib', 'enum', 'os', 'posixpath'}"
             " & set(sys.modules)), file=sys.stderr)\nsys.exit(code)\n")
    done = subprocess.run([sys.executable, "-IS", "-c", probe], cwd=REPO, capture_output=True,
                          stdin=subprocess.DEVNULL, timeout=30, check=False)
    agent.join(10)
    assert (done.returncode, done.stdout, done.stderr) == (7, b"out\n", b"[]\n")
    assert agent.served[0]["op"] == "run"  # type: ignore[attr-defined]
    assert agent.served[0]["command"] == "true"  # type: ignore[attr-defined]


@pytest.mark.parametrize(("argv", "status", "out"), [
    (["run", "--", "true"], 3, b"out\n"),
    # What it printed (to a pipe: buffered) after the session is flushed first.
    (["run", "--detached", "--", "true"], 0,
     b"Running `true` on shop... up, run.1234 (Standard-1X)\n"
     b"Run dynoctl logs -t -d run.1234 to view the output.\n"),
])
def test_the_command_exits_without_the_interpreters_teardown(
        tmp_path: Path, argv: list[str], status: int, out: bytes) -> None:
    """dynoctl as its own process leaves with the command's status as soon as it has it:
    its output is flushed, but nothing of the interpreter's teardown (an atexit handler
    here) runs."""
    agent = _scripted_attach_agent(tmp_path / "api.attach.sock", 3)
    probe = ("import atexit, sys\nfrom agent.cli import dynoctl\n"
             "atexit.register(print, 'torn down', file=sys.stderr)\n"
             f"sys.argv = ['dynoctl', '--socket', {str(tmp_path / 'api.sock')!r}, *{argv!r}]\n"
             "sys.exit(dynoctl.main())\n")
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True,
                          stdin=subprocess.DEVNULL, timeout=30, check=False)
    agent.join(10)
    assert (done.returncode, done.stdout, done.stderr) == (status, out, b"")


@pytest.mark.parametrize("argv", [
    ["run", "--", "true"],
    ["--socket", "/x/api.sock", "run", "--app", "bench", "--", "true"],
    ["run", "-d", "-s", "performance-m", "-a", "shop", "--", "sh", "-c", "exit 7"],
    ["run", "--detached", "--size", "eco", "--", "--", "x"],
    ["--socket", "", "run", "-a", "", "--", "echo a b"],
])
def test_the_quick_reading_of_run_is_argparses(argv: list[str]) -> None:
    quick = ctl._quick_run_args(argv)
    assert quick is not None
    assert vars(quick) == vars(ctl._parser().parse_args(argv))


@pytest.mark.parametrize("argv", [
    [], ["ps"], ["--help"], ["run"], ["run", "--"], ["run", "true"], ["run", "-h", "--", "x"],
    ["--socket=/x", "run", "--", "x"], ["--socket", "-x", "run", "--", "x"],
    ["run", "-a", "x", "-a", "y", "--", "true"], ["run", "-a", "-x", "--", "true"],
    ["run", "-e", "A=1", "--", "true"], ["run", "--det", "--", "true"],
    ["run", "-dx", "--", "true"], ["run", "--app=x", "--", "true"], ["exec", "web.1", "--", "x"],
    ["run", "-a"],
])
def test_anything_else_is_left_to_argparse(argv: list[str]) -> None:
    assert ctl._quick_run_args(argv) is None
