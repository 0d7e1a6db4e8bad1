"""`dynoctl run` and `exec` relay the command's own pipes or pty: no fd of the caller ever
enters a dyno. Attacked from inside a real dyno (a sibling takes the command's fds with
pidfd_getfd and by reopening /proc/PID/fd/N), and used as people use it: an interactive TTY
session through a real pty, and binary-safe pipes with EOF."""

from __future__ import annotations

import array
import contextlib
import fcntl
import hashlib
import json
import os
import re
import select
import signal
import socket
import struct
import subprocess
import termios
import time
from collections.abc import Iterator
from typing import Any

import pytest

from agent.api import attachwire as wire
from tests.e2e.test_standalone import Up, running_up
from tests.support.agentproc import BIN
from tests.support.names import unique
from tests.support.testhost import TestHost
from tests.support.wait import wait_for

MIB = 1 << 20

# Runs in the dyno as a sibling of the exec'd command: takes the command's fds 0, 1, 2 (by
# pidfd_getfd, syscall 438, and by reopening /proc/PID/fd/N), reports what they are, keeps
# them, and once told "go" (the session is over by then) writes a marker into the kept
# stdout/stderr and reads what arrives on the kept stdin.
ATTACK_PY = r"""
import ctypes, json, os, select, sys
pid, marker = int(sys.argv[1]), sys.argv[2].encode()
libc = ctypes.CDLL(None, use_errno=True)
pidfd = os.pidfd_open(pid)
kept, report = {}, {}
for n in (0, 1, 2):
    got = {}
    fd = libc.syscall(438, pidfd, n, 0)
    if fd < 0:
        got["getfd_errno"] = ctypes.get_errno()
    else:
        st = os.fstat(fd)
        got["getfd"] = [st.st_dev, st.st_ino, st.st_rdev]
        kept.setdefault(n, []).append(fd)
    try:
        fd = os.open(f"/proc/{pid}/fd/{n}", (os.O_RDONLY if n == 0 else os.O_WRONLY)
                     | os.O_NOCTTY)
    except OSError as e:
        got["reopen_errno"] = e.errno
    else:
        st = os.fstat(fd)
        got["reopen"] = [st.st_dev, st.st_ino, st.st_rdev]
        kept.setdefault(n, []).append(fd)
    report[n] = got
print(json.dumps(report), flush=True)
sys.stdin.readline()
result = {"wrote": 0, "read": ""}
for n in (1, 2):
    for fd in kept.get(n, []):
        try:
            result["wrote"] += os.write(fd, marker + b"\n")
        except OSError as e:
            result.setdefault("write_errors", []).append(e.errno)
for fd in kept.get(0, []):
    os.set_blocking(fd, False)
    if select.select([fd], [], [], 2)[0]:
        try:
            result["read"] += os.read(fd, 4096).decode(errors="replace")
        except OSError as e:
            result.setdefault("read_errors", []).append(e.errno)
print(json.dumps(result), flush=True)
"""

# Runs as a one-off's command: a child (the victim) inherits the one-off's stdio; this
# process, its sibling in the dyno, takes the child's fds with pidfd_getfd and reports them.
RUN_ATTACK_PY = r"""
import ctypes, json, os, subprocess, sys
libc = ctypes.CDLL(None, use_errno=True)
victim = subprocess.Popen(["sleep", "1000"])
pidfd = os.pidfd_open(victim.pid)
report = {}
for n in (0, 1, 2):
    fd = libc.syscall(438, pidfd, n, 0)
    if fd < 0:
        report[n] = {"getfd_errno": ctypes.get_errno()}
    else:
        st = os.fstat(fd)
        report[n] = {"getfd": [st.st_dev, st.st_ino, st.st_rdev]}
victim.kill()
victim.wait()
sys.stderr.write("attack " + json.dumps(report) + "\n")
"""


@pytest.fixture(scope="module")
def up(host: TestHost) -> Iterator[Up]:
    with running_up(host, unique("relay", 6)) as running:
        wait_for(lambda: running.states().get("web.1") == "up", 60, what="web.1 up")
        yield running


def _ctl(up: Up, *args: str) -> list[str]:
    return [str(BIN / "dynoctl"), "--socket", str(up.socket), *args]


def _identity(fd: int) -> list[int]:
    st = os.fstat(fd)
    return [st.st_dev, st.st_ino, st.st_rdev]


def _read_until(fd: int, pattern: bytes, timeout_s: float = 30) -> bytes:
    """Bytes from `fd` until `pattern` (a regex) matches them."""
    data = b""
    deadline = time.monotonic() + timeout_s
    while not re.search(pattern, data):
        left = deadline - time.monotonic()
        assert left > 0, f"{pattern!r} not seen in {data!r}"
        if select.select([fd], [], [], left)[0]:
            chunk = os.read(fd, 65536)
            assert chunk, f"EOF before {pattern!r}; got {data!r}"
            data += chunk
    return data


def _drain(fd: int) -> bytes:
    """What `fd` holds now, without waiting."""
    os.set_blocking(fd, False)
    data = b""
    with contextlib.suppress(BlockingIOError, OSError):
        while chunk := os.read(fd, 65536):
            data += chunk
    return data


def _reap(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    proc.wait(timeout=10)


@contextlib.contextmanager
def _caller_stdio(kind: str) -> Iterator[tuple[tuple[int, int, int], tuple[int, int, int]]]:
    """The caller's stdio as a test makes it: (what dynoctl gets as 0, 1, 2; the test's own
    ends: write to its stdin, read its stdout, read its stderr)."""
    if kind == "pipes":
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        fds = [in_r, in_w, out_r, out_w, err_r, err_w]
        given, ours = (in_r, out_w, err_w), (in_w, out_r, err_r)
    else:  # an operator's terminal: one pty for all three
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
        fds = [master, slave]
        given, ours = (slave, slave, slave), (master, master, master)
    try:
        yield given, ours
    finally:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)


def _attacker(up: Up, victim_pid: int, marker: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(_ctl(up, "exec", "web.1", "--", "python3", "-c", ATTACK_PY,
                                 str(victim_pid), marker),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)


def _line(proc: subprocess.Popen[bytes], timeout_s: float = 30) -> dict[str, Any]:
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    data = _read_until(fd, rb"\n", timeout_s)
    result: dict[str, Any] = json.loads(data.splitlines()[-1])
    return result


# -- the attack --------------------------------------------------------------------------------

@pytest.mark.parametrize("caller", ["pipes", "pty"])
def test_a_sibling_in_the_dyno_gets_nothing_of_an_exec_callers_stdio(up: Up,
                                                                     caller: str) -> None:
    marker = unique("MARK", 10)
    with _caller_stdio(caller) as (given, ours):
        callers = {_tuple(_identity(fd)) for fd in given}
        victim = subprocess.Popen(
            _ctl(up, "exec", "web.1", "--", "sh", "-c", "echo pid=$$; exec sleep 1000"),
            stdin=given[0], stdout=given[1], stderr=given[2], start_new_session=True)
        attacker: subprocess.Popen[bytes] | None = None
        try:
            found = re.search(rb"pid=(\d+)", _read_until(ours[1], rb"pid=\d+\s"))
            assert found is not None
            pid = int(found[1])
            attacker = _attacker(up, pid, marker)
            report = _line(attacker)
            # It did get fds (the attack itself works in the dyno) ...
            got = [tuple(v) for r in report.values() for k, v in r.items()
                   if k in ("getfd", "reopen")]
            assert got, report
            # ... but none of them is one of the caller's.
            assert not callers & set(got), (callers, report)
            # The session ends (the operator's dynoctl goes away)...
            _reap(victim)
            wait_for(lambda: not _pids_of(up, "sleep 1000"), 10, what="the command gone")
            # ... and the operator types the next line into their own terminal or pipe.
            os.write(ours[0], b"secret typed later\n")
            assert attacker.stdin is not None
            attacker.stdin.write(b"go\n")
            attacker.stdin.flush()
            result = _line(attacker)
            # What it kept leads nowhere now: writes fail, reads find nothing.
            assert result["wrote"] == 0 and "secret" not in result["read"], result
            seen = _drain(ours[1]) + (_drain(ours[2]) if ours[2] != ours[1] else b"")
            assert marker.encode() not in seen, (result, seen)
        finally:
            _reap(victim)
            if attacker is not None:
                _reap(attacker)
                if attacker.stdin is not None:
                    attacker.stdin.close()
                if attacker.stdout is not None:
                    attacker.stdout.close()


def _tuple(values: list[int]) -> tuple[int, ...]:
    return tuple(values)


def _pids_of(up: Up, args: str) -> list[str]:
    result = up.ctl("exec", "web.1", "--", "ps", "-eo", "args")
    return [line for line in result.stdout.splitlines() if line.startswith(args)]


def test_a_sibling_in_a_one_off_gets_nothing_of_the_run_callers_stdio(up: Up) -> None:
    with _caller_stdio("pipes") as (given, ours):
        callers = {_tuple(_identity(fd)) for fd in given}
        os.close(ours[0])  # stdin at EOF: the command does not read it
        caller = subprocess.Popen(_ctl(up, "run", "--", "python3", "-c", RUN_ATTACK_PY),
                                  stdin=given[0], stdout=given[1], stderr=given[2])
        try:
            assert caller.wait(timeout=60) == 0
        finally:
            _reap(caller)
        err = _drain(ours[2]).decode()
    report = json.loads(err.split("attack ", 1)[1].splitlines()[0])
    got = {tuple(r["getfd"]) for r in report.values() if "getfd" in r}
    assert len(got) == 3, report  # the sibling took all three ...
    assert not callers & got, (callers, report)  # ... and none is the caller's


# -- a TTY session through a real pty ---------------------------------------------------------

class PtyCaller:
    """dynoctl on a pty the test holds the master of, as an operator's terminal."""

    def __init__(self, argv: list[str], rows: int = 24, cols: int = 80) -> None:
        self.master, self.slave = os.openpty()
        self.resize(rows, cols)
        self.proc = subprocess.Popen(argv, stdin=self.slave, stdout=self.slave,
                                     stderr=self.slave, start_new_session=True)
        self.seen = b""

    def resize(self, rows: int, cols: int) -> None:
        fcntl.ioctl(self.slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def type(self, data: bytes) -> None:
        os.write(self.master, data)

    def expect(self, pattern: bytes, timeout_s: float = 30) -> re.Match[bytes]:
        """Wait for `pattern` in the output after what earlier expects consumed."""
        deadline = time.monotonic() + timeout_s
        while True:
            found = re.search(pattern, self.seen)
            if found:
                self.seen = self.seen[found.end():]
                return found
            left = deadline - time.monotonic()
            assert left > 0, f"{pattern!r} not seen in {self.seen[-2000:]!r}"
            if select.select([self.master], [], [], min(left, 0.5))[0]:
                try:
                    chunk = os.read(self.master, 65536)
                except OSError:
                    chunk = b""
                assert chunk, f"terminal closed before {pattern!r}: {self.seen[-2000:]!r}"
                self.seen += chunk

    def wait(self, timeout_s: float = 30) -> int:
        deadline = time.monotonic() + timeout_s
        while self.proc.poll() is None:
            assert time.monotonic() < deadline, "dynoctl did not end"
            # Keep reading: a full pty would block dynoctl's last writes.
            if select.select([self.master], [], [], 0.1)[0]:
                with contextlib.suppress(OSError):
                    self.seen += os.read(self.master, 65536)
        return self.proc.returncode

    def close(self) -> None:
        _reap(self.proc)
        os.close(self.master)
        os.close(self.slave)


@contextlib.contextmanager
def pty_caller(argv: list[str]) -> Iterator[PtyCaller]:
    caller = PtyCaller(argv)
    try:
        yield caller
    finally:
        caller.close()


def test_exec_bash_is_an_interactive_terminal_session(up: Up) -> None:
    with pty_caller(_ctl(up, "exec", "web.1", "--", "bash", "--norc", "--noprofile")) as term:
        term.expect(rb"Entering web\.1")
        term.type(b"echo $((6 * 7))X\r")
        term.expect(rb"42X")
        # Its terminal is a pty of the dyno's own devpts, present inside the dyno.
        term.type(b"t=$(tty); test -c \"$t\" && echo \"IN-DYNO:$t:$(stat -c %U \"$t\")\"\r")
        found = term.expect(rb"IN-DYNO:(/dev/pts/\d+):(\S+)")
        assert found[2] != b"root"  # the dyno user's own terminal
        # Ctrl-C travels as a byte; the dyno's line discipline makes it SIGINT for the
        # foreground job, and the shell goes on.
        term.type(b"sleep 100; echo not-interrupted\r")
        wait_for(lambda: _pids_of(up, "sleep 100"), 15, what="sleep 100 running")
        began = time.monotonic()
        term.type(b"\x03")
        term.type(b"echo status=$?\r")
        term.expect(rb"status=130")
        assert time.monotonic() - began < 30
        assert b"not-interrupted" not in term.seen
        # The window size follows the terminal: resize, SIGWINCH to dynoctl.
        term.resize(33, 111)
        term.proc.send_signal(signal.SIGWINCH)

        deadline = time.monotonic() + 30
        while True:
            term.type(b"echo S=$(stty size)=\r")
            if term.expect(rb"S=(\d+ \d+)=")[1] == b"33 111":
                break
            assert time.monotonic() < deadline, "the new window size never arrived"
        # A job in a process group of its own (job control) ends with the session too.
        term.type(b"sleep 275 &\r")
        wait_for(lambda: _pids_of(up, "sleep 275"), 15, what="the background job running")
        term.type(b"exit 7\r")
        assert term.wait() == 7
        assert _cooked(term.slave)  # the caller's terminal is as it was
    wait_for(lambda: not _pids_of(up, "sleep 275"), 10, what="the background job gone")


def test_run_with_a_terminal_gets_ctrl_c_through_its_pty(up: Up) -> None:
    script = ("trap 'echo caught-int; exit 5' INT; echo ready-$(tty | cut -c1-9); "
              "while :; do sleep 0.1; done")
    with pty_caller(_ctl(up, "run", "--", "sh", "-c", script)) as term:
        term.expect(rb"ready-/dev/pts/")
        term.type(b"\x03")  # tini made the command the pty's foreground process group
        term.expect(rb"caught-int")
        assert term.wait() == 5


def test_ctrl_backslash_leaves_a_terminal_session(up: Up) -> None:
    with pty_caller(_ctl(up, "exec", "web.1", "--", "sh", "-c",
                         "echo ready; exec sleep 273")) as term:
        term.expect(rb"ready")
        assert not _cooked(term.slave)  # raw while the session runs
        term.type(b"\x1c")
        assert term.wait() == 128 + signal.SIGQUIT
        assert _cooked(term.slave)
    wait_for(lambda: not _pids_of(up, "sleep 273"), 10, what="the session's command gone")


def test_sigterm_to_dynoctl_restores_the_terminal_and_ends_the_session(up: Up) -> None:
    with pty_caller(_ctl(up, "exec", "web.1", "--", "sh", "-c",
                         "echo ready; exec sleep 274")) as term:
        term.expect(rb"ready")
        term.proc.send_signal(signal.SIGTERM)
        assert term.wait() == 128 + signal.SIGTERM
        assert _cooked(term.slave)
    wait_for(lambda: not _pids_of(up, "sleep 274"), 10, what="the session's command gone")


def _cooked(fd: int) -> bool:
    lflag = termios.tcgetattr(fd)[3]
    return bool(lflag & termios.ICANON and lflag & termios.ECHO and lflag & termios.ISIG)


# -- pipes -------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["run", "exec"])
def test_pipes_pass_a_mebibyte_of_random_bytes_unchanged_with_eof(up: Up, where: str) -> None:
    data = os.urandom(MIB)
    head = ["run", "--"] if where == "run" else ["exec", "web.1", "--"]
    result = subprocess.run(_ctl(up, *head, "cat"), input=data, capture_output=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert hashlib.sha256(result.stdout).hexdigest() == hashlib.sha256(data).hexdigest()
    counted = subprocess.run(_ctl(up, *head, "wc", "-c"), input=data, capture_output=True,
                             timeout=120)
    assert counted.returncode == 0 and counted.stdout.split() == [str(MIB).encode()]


@pytest.mark.parametrize("where", ["run", "exec"])
def test_stdout_and_stderr_stay_apart(up: Up, where: str) -> None:
    head = ["run", "--"] if where == "run" else ["exec", "web.1", "--"]
    result = subprocess.run(_ctl(up, *head, "sh", "-c", "echo out; echo err >&2; exit 4"),
                            stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    assert result.returncode == 4
    assert result.stdout == b"out\n" and result.stderr == b"err\n"


def test_echo_into_run_cat(up: Up) -> None:
    result = subprocess.run(["sh", "-c", f"echo x | {' '.join(_ctl(up, 'run', '--', 'cat'))}"],
                            capture_output=True, timeout=60)
    assert result.returncode == 0 and result.stdout == b"x\n", result.stderr


# -- the request -------------------------------------------------------------------------------

def _attach_path(up: Up) -> str:
    result = up.ctl("info", "--json")
    path: str = json.loads(result.stdout)["attach_socket"]
    return path


@pytest.mark.parametrize("version", [None, 2])
def test_fds_sent_to_the_attach_socket_are_refused_and_never_used(up: Up,
                                                                  version: int | None) -> None:
    """What an older dynoctl did (its stdio with the request): refused, nothing started,
    the fds closed by the agent."""
    request: dict[str, Any] = {"op": "exec", "dyno": "web.1", "argv": ["sh", "-c", "echo LEAK"]}
    if version is not None:
        request["v"] = version
    r, w = os.pipe()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(30)
        sock.connect(_attach_path(up))
        sock.sendmsg([(json.dumps(request) + "\n").encode()],
                       [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r, w, w]))])
        os.close(w)
        w = -1
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    finally:
        sock.close()
        if w >= 0:
            os.close(w)
    try:
        if version is None:
            message = json.loads(answer)  # one JSON line an older client can read
        else:
            [(kind, payload)] = wire.FrameDecoder(wire.AGENT_KINDS).feed(answer)
            assert kind == wire.CONTROL
            message = wire.parse_control(payload)
        assert message["error"]["code"] == "bad_request"
        assert "file descriptors" in message["error"]["message"]
        # Every copy of the pipe's write end is gone (ours and the agent's): EOF, no LEAK.
        assert os.read(r, 100) == b""
    finally:
        os.close(r)


def test_a_request_of_the_old_protocol_without_fds_is_refused(up: Up) -> None:
    # A one-off of an earlier test may still be listed while the agent removes it, after
    # its dynoctl has left: only a new one would be this request's.
    before = {d["id"] for d in up.ps()}
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(30)
        sock.connect(_attach_path(up))
        sock.sendall(b'{"op": "run", "command": "echo hi"}\n')
        answer = sock.makefile("rb").readline()
    finally:
        sock.close()
    error = json.loads(answer)["error"]
    assert error["code"] == "bad_request" and "update dynoctl" in error["message"]
    assert not [d for d in up.ps() if d["name"].startswith("run.") and d["id"] not in before]
