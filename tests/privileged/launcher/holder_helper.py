"""A minimal single-threaded subreaper that launches dynos for the tests (a stand-in for the
real holder): JSON requests on stdin, one JSON answer per line on stdout."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))))

from agent.launcher import LaunchError, LaunchRequest, enter, launch
from agent.launcher import syscalls as sc


def _open_out(path: str) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)


def _stdio(cmd: dict[str, Any]) -> tuple[int, int, int]:
    return (os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC), _open_out(cmd["stdout"]),
            _open_out(cmd.get("stderr", cmd["stdout"])))


def _handle(cmd: dict[str, Any]) -> dict[str, Any]:
    op = cmd["op"]
    if op == "launch":
        fields = dict(cmd["req"])
        for key in ("argv", "cgroup_procs", "hide_paths"):
            if key in fields:
                fields[key] = tuple(fields[key])
        fields["env"] = tuple((k, v) for k, v in fields["env"])
        fds = _stdio(cmd)
        try:
            result = launch(LaunchRequest(**fields), *fds, timeout_s=cmd.get("timeout_s", 10.0))
        finally:
            for fd in fds:
                os.close(fd)
        return {"pid": result.pid, "start_time": result.start_time,
                "timings": dict(result.timings_ms)}
    if op == "enter":
        fds = _stdio(cmd)
        try:
            pid = enter(cmd["pid"], cmd["argv"], cmd["env"], cmd["uid"], cmd["gid"], cmd["cwd"],
                        *fds, tuple(cmd["cgroup_procs"]), seccomp=cmd.get("seccomp", True))
        finally:
            for fd in fds:
                os.close(fd)
        return {"pid": pid}
    if op == "wait":
        deadline = time.monotonic() + cmd.get("timeout_s", 30)
        while True:
            pid, status = os.waitpid(cmd["pid"], os.WNOHANG)
            if pid:
                return {"status": os.waitstatus_to_exitcode(status)}
            if time.monotonic() > deadline:
                return {"timeout": True}
            time.sleep(0.005)
    if op == "kill":
        try:
            os.kill(cmd["pid"], cmd.get("sig", signal.SIGKILL))
        except ProcessLookupError:
            return {"gone": True}
        return {}
    if op == "info":
        return {"pid": os.getpid()}
    raise ValueError(f"unknown op {op!r}")


def main() -> None:
    sc.prctl(sc.PR_SET_CHILD_SUBREAPER, 1)
    # Like a real holder: guarded against the OOM killer and with a strict umask, neither of
    # which a dyno may inherit.
    # Lowering needs CAP_SYS_RESOURCE, which some machines' bounding set lacks.
    with contextlib.suppress(PermissionError), open("/proc/self/oom_score_adj", "w") as f:
        f.write("-500")
    os.umask(0o077)
    for line in sys.stdin:
        try:
            answer = _handle(json.loads(line))
        except LaunchError as e:
            answer = {"error": {"phase": e.phase, "errno": e.errno, "message": e.message,
                                "path": e.path}}
        except Exception as e:
            answer = {"error": {"phase": "helper", "errno": 0, "message": repr(e), "path": None}}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
