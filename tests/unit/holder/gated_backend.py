"""A holder whose backend launches in steps, with gates a test opens: `python -m
tests.unit.holder.gated_backend` takes agent.holder's arguments (its --backend is ignored).

Launch params: argv, env as the plain backend, and
- gate: a FIFO the child reads one byte from before it execs (its setup, held up);
- resume: a FIFO the holder's steps wait on once the child has exec'd, before the launch
  ends (so the test decides what the holder sees first: the report or the exit);
- timeout_s: the launch's deadline (default 10);
- refork: a first child that dies at once is waited for in a step of its own, and the
  command forked after it (as the launcher does when the kernel kills a child at birth);
- unseen: with refork, the first child lives 50 ms (so a step waits on it) and the command's
  report is read whole in the step that forks it (it exec'd before its first read): no
  step names the command's child.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import Mapping
from typing import Any

from agent.holder import __main__ as holder_main
from agent.holder.backend import LaunchOutcome, PlainBackend, TtySize
from agent.holder.errors import LaunchFailed
from agent.launcher.launch import proc_start_time
from agent.launcher.report import Steps, Wait


class GatedBackend(PlainBackend):
    name = "gated"

    def launch_steps(self, params: Mapping[str, Any], stdin_fd: int, stdout_fd: int,
                     stderr_fd: int, tty: TtySize | None = None) -> Steps[LaunchOutcome]:
        argv = [str(a) for a in params["argv"]]
        env = {str(k): str(v) for k, v in params.get("env", [])}
        gate = params.get("gate")
        deadline = time.monotonic() + float(params.get("timeout_s", 10))
        unseen = bool(params.get("unseen"))
        if params.get("refork"):
            yield from _born_dead(deadline, 0.05 if unseen else 0.0)
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:
            try:
                os.close(read_fd)
                for target, fd in enumerate((stdin_fd, stdout_fd, stderr_fd)):
                    os.dup2(fd, target)
                if gate is not None:
                    with open(gate, "rb") as f:
                        f.read(1)
                os.execvpe(argv[0], argv, env)
            finally:
                os._exit(127)
        os.close(write_fd)
        pidfd = os.pidfd_open(pid)
        start_time = proc_start_time(pid)
        try:
            if unseen:
                while os.read(read_fd, 4096):  # blocking: until the exec closes it
                    pass
            os.set_blocking(read_fd, False)
            yield from _until_eof(read_fd, deadline, pid)
            resume = params.get("resume")
            if resume is not None:
                fd = os.open(str(resume), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
                try:
                    # Readable once the test writes (a FIFO with no writer yet reads EOF,
                    # so wait for the byte itself).
                    while not _one_byte(fd):
                        if time.monotonic() >= deadline:
                            raise LaunchFailed("resume gate never opened")
                        yield Wait(fd, min(deadline, time.monotonic() + 0.05), pid)
                finally:
                    os.close(fd)
        except BaseException:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            raise
        finally:
            os.close(pidfd)
            os.close(read_fd)
        return LaunchOutcome(pid, start_time, {"gated": 0.0})


def _born_dead(deadline: float, lives_s: float) -> Steps[None]:
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        time.sleep(lives_s)
        os._exit(0)
    os.close(write_fd)
    try:
        os.set_blocking(read_fd, False)
        yield from _until_eof(read_fd, deadline, pid)
    finally:
        os.close(read_fd)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def _until_eof(fd: int, deadline: float, pid: int) -> Steps[None]:
    while True:
        try:
            if not os.read(fd, 4096):
                return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise LaunchFailed(f"timeout: child {pid} did not exec in time") from None
            yield Wait(fd, deadline, pid)


def _one_byte(fd: int) -> bool:
    try:
        return bool(os.read(fd, 1))
    except BlockingIOError:
        return False


def main() -> int:
    holder_main.PlainBackend = GatedBackend  # type: ignore[misc]
    return holder_main.main([*sys.argv[1:], "--backend", "plain"])


if __name__ == "__main__":
    sys.exit(main())
