"""The dyno seccomp filter on the real kernel: a launched dyno and a command entered into one
try the calls the filter refuses (user namespaces, keyrings, io_uring, bpf, perf events,
userfaultfd, mount, ...) and are refused, while ordinary programs keep working. The same probe
without the filter gets the kernel's own answers, so these tests fail without it."""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any

from tests.privileged.launcher.harness import Dyno, Holder, run
from tests.support.wait import wait_for

PROBE = Path(__file__).with_name("seccomp_probe.py").read_text()
PROBE_COMMAND = "exec python3 /app/probe.py"

# What the filter answers (errno) to each attempt of the probe.
REFUSED = {
    "unshare_newuser": errno.EPERM, "clone_newuser": errno.EPERM,
    "clone3_newuser": errno.ENOSYS, "io_uring_setup": errno.EPERM,
    "io_uring_enter": errno.EPERM, "io_uring_register": errno.EPERM, "bpf": errno.EPERM,
    "perf_event_open": errno.EPERM, "add_key": errno.EPERM, "keyctl": errno.EPERM,
    "request_key": errno.EPERM, "userfaultfd": errno.EPERM, "mount_missing": errno.EPERM,
    "mount_tmp": errno.EPERM, "setns": errno.EPERM, "open_tree": errno.EPERM,
    "personality_no_aslr": errno.EPERM, "tiocsti": errno.EPERM,
}
# Refused by the kernel as well (no CAP_SYS_ADMIN), so not proof of the filter on its own.
ALSO_REFUSED_WITHOUT_FILTER = {"mount_tmp"}
ORDINARY = ["thread", "sub", "spawn=0", "ping"]


def _result(output: str) -> dict[str, Any]:
    lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, output
    result: dict[str, Any] = json.loads(lines[0][len("RESULT "):])
    return result


def _probe_dyno(make_dyno: Any, command: str = PROBE_COMMAND, **overrides: Any) -> Dyno:
    dyno: Dyno = make_dyno(command, slug_files={"Procfile": "web: true\n", "probe.py": PROBE},
                           **overrides)
    return dyno


def _assert_filtered(result: dict[str, Any]) -> None:
    assert result["seccomp"] == "2"
    got = {name: result[name] for name in REFUSED}
    assert got == REFUSED
    code, message = result["unshare_cli"]
    assert code != 0 and "Operation not permitted" in message, result["unshare_cli"]
    # Ordinary things still work: threads (glibc falls back from clone3 to clone), fork and
    # exec via subprocess, posix_spawn, a listening socket, ptrace inside the dyno.
    assert result["ordinary"] == ORDINARY
    assert result["ptrace_attach"] == 0
    assert result["personality_query"] == 0
    # The userfaultfd device (a way around the syscall) is not in a dyno's /dev.
    assert result["dev_userfaultfd"] is False


def _assert_unfiltered(result: dict[str, Any]) -> None:
    assert result["seccomp"] == "0"
    for name, refused in REFUSED.items():
        if name not in ALSO_REFUSED_WITHOUT_FILTER:
            assert result[name] != refused, (name, result[name])
    assert result["unshare_cli"][0] == 0
    assert result["ordinary"] == ORDINARY


def test_a_dyno_is_refused_what_the_filter_refuses(holder: Holder, make_dyno: Any) -> None:
    status, out = run(holder, _probe_dyno(make_dyno))
    assert status == 0, out
    _assert_filtered(_result(out))


def test_without_the_filter_the_probe_gets_the_kernels_answers(holder: Holder,
                                                              make_dyno: Any) -> None:
    """The control: proves each attempt above can tell the filter from the kernel."""
    status, out = run(holder, _probe_dyno(make_dyno, seccomp=False))
    assert status == 0, out
    _assert_unfiltered(_result(out))


def test_pid_1_of_a_dyno_runs_filtered(holder: Holder, make_dyno: Any) -> None:
    dyno = make_dyno("echo ready; exec sleep 60")
    started = holder.launch(dyno.req, dyno.out)
    assert "pid" in started, started
    pid1 = int(started["pid"])
    wait_for(lambda: "ready" in dyno.output(), 10, what="dyno ready")
    status = Path(f"/proc/{pid1}/status").read_text()
    assert "\nSeccomp:\t2\n" in status
    assert "\nNoNewPrivs:\t1\n" in status
    holder.call(op="kill", pid=pid1)
    holder.wait(pid1)


def _enter_probe(holder: Holder, make_dyno: Any, tmp_path: Path, **enter: Any) -> str:
    dyno = _probe_dyno(make_dyno, "echo ready; exec sleep 60")
    started = holder.launch(dyno.req, dyno.out)
    assert "pid" in started, started
    pid1 = int(started["pid"])
    wait_for(lambda: "ready" in dyno.output(), 10, what="dyno ready")
    out = tmp_path / "enter.txt"
    answer = holder.call(op="enter", pid=pid1, argv=["python3", "/app/probe.py"],
                         env={"PATH": "/usr/bin:/bin"}, uid=dyno.req["uid"],
                         gid=dyno.req["gid"], cwd="/app", stdout=str(out),
                         cgroup_procs=dyno.req["cgroup_procs"], **enter)
    assert "pid" in answer, answer
    assert holder.wait(answer["pid"]) == 0, out.read_text()
    holder.call(op="kill", pid=pid1)
    holder.wait(pid1)
    return out.read_text()


def test_an_entered_command_is_filtered_too(holder: Holder, make_dyno: Any,
                                            tmp_path: Path) -> None:
    _assert_filtered(_result(_enter_probe(holder, make_dyno, tmp_path)))


def test_an_entered_command_without_the_filter_is_not(holder: Holder, make_dyno: Any,
                                                      tmp_path: Path) -> None:
    """The control for enter: the filter comes from enter(), not from the dyno it joins."""
    _assert_unfiltered(_result(_enter_probe(holder, make_dyno, tmp_path, seccomp=False)))
