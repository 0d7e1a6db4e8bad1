"""dynoctl's half of the relay against a scripted agent on a socketpair: it sends stdin only
within the credit it was given, then EOF; writes stdout and stderr apart; turns Ctrl-C into
a signal frame; exits with the command's status; and an agent error is one clear line."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.api import attachwire as wire

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
