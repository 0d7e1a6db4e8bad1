"""Run INSIDE a dyno (copied into its slug) by tests/privileged/launcher/test_seccomp.py: tries
each call the dyno filter refuses, and ordinary things a web app does, and prints one line
`RESULT {json}`: for each attempt the errno it got (0 = it worked).

Each attempt is one whose answer WITHOUT the filter differs from the filter's (a success, or
another errno such as EBADF for a bad fd), so the test can tell that the filter answered;
`mount_tmp` is the exception: the dyno lacks CAP_SYS_ADMIN, so the kernel refuses it as well.
Nothing is left on the host even unfiltered: keys go to the process keyring, which dies with
us, and every fd or child an attempt makes is closed or reaped.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Callable

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long

CLONE_NEWUSER = 0x10000000
AT_FDCWD = -100
KEY_SPEC_PROCESS_KEYRING = -2
KEYCTL_GET_KEYRING_ID = 0
TIOCSTI = 0x5412
ADDR_NO_RANDOMIZE = 0x0040000
PTRACE_ATTACH, PTRACE_DETACH = 16, 17

results: dict[str, object] = {}


def syscall(nr: int, *args: object) -> tuple[int, int]:
    ctypes.set_errno(0)
    result = int(libc.syscall(nr, *args))
    return result, (ctypes.get_errno() if result == -1 else 0)


def attempt(name: str, nr: int, *args: object, returns_fd: bool = True) -> None:
    result, err = syscall(nr, *args)
    if err == 0 and returns_fd and result > 2:
        os.close(result)
    results[name] = err


def in_child(name: str, body: Callable[[], int]) -> None:
    """Run `body()` (returns an errno) in a forked child: some attempts change the caller."""
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            code = body()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    results[name] = os.waitstatus_to_exitcode(status)


def raw_clone_newuser() -> None:
    # clone(CLONE_NEWUSER | SIGCHLD) with no new stack: like fork, the child returns here.
    result, err = syscall(56, ctypes.c_ulong(CLONE_NEWUSER | signal.SIGCHLD), None, None,
                          None, None)
    if result == 0:
        os._exit(0)
    if result > 0:
        os.waitpid(result, 0)
    results["clone_newuser"] = err


def clone3_newuser() -> None:
    # struct clone_args: flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size,
    # tls, set_tid, set_tid_size, cgroup (11 x u64).
    args = ctypes.create_string_buffer(struct.pack("<11Q", CLONE_NEWUSER, 0, 0, 0,
                                                   signal.SIGCHLD, 0, 0, 0, 0, 0, 0), 88)
    result, err = syscall(435, args, ctypes.c_size_t(88))
    if result == 0:
        os._exit(0)
    if result > 0:
        os.waitpid(result, 0)
    results["clone3_newuser"] = err


def unshare_newuser() -> int:
    return syscall(272, ctypes.c_int(CLONE_NEWUSER))[1]


def tiocsti_on_own_terminal() -> int:
    # TIOCSTI works without privilege on a process's controlling terminal (legacy_tiocsti):
    # a new session and a pty of the dyno's own devpts make one.
    # Closing the master hangs up the terminal this child controls: SIGHUP must not end it.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    master, slave = os.openpty()
    os.setsid()
    fd = os.open(os.ttyname(slave), os.O_RDWR)
    try:
        fcntl.ioctl(fd, TIOCSTI, b"x")
    except OSError as e:
        return e.errno or 98
    finally:
        os.close(fd)
        os.close(slave)
        os.close(master)
    return 0


def ordinary() -> None:
    got: list[str] = []
    thread = threading.Thread(target=lambda: got.append("thread"))
    thread.start()
    thread.join()
    out = subprocess.run(["sh", "-c", "echo sub"], capture_output=True, text=True, check=True)
    got.append(out.stdout.strip())
    pid = os.posix_spawn("/bin/true", ["true"], dict(os.environ))
    _, status = os.waitpid(pid, 0)
    got.append(f"spawn={os.waitstatus_to_exitcode(status)}")
    # The launcher test's dyno has a netns of its own with loopback down: listen on TCP,
    # talk over a Unix socket.
    with socket.socket() as tcp:
        tcp.bind(("0.0.0.0", 0))
        tcp.listen()
    with socket.socket(socket.AF_UNIX) as server:
        server.bind("/tmp/probe.sock")
        server.listen()
        with socket.socket(socket.AF_UNIX) as client:
            client.connect("/tmp/probe.sock")
            conn, _ = server.accept()
            with conn:
                client.sendall(b"ping")
                got.append(conn.recv(4).decode())
    os.unlink("/tmp/probe.sock")
    results["ordinary"] = got
    # ptrace stays usable inside the dyno (its pid namespace bounds it): attach to a child.
    child = os.fork()
    if child == 0:
        signal.pause()
        os._exit(0)
    err = syscall(101, PTRACE_ATTACH, child, None, None)[1]
    if err == 0:
        os.waitpid(child, 0)  # the attach stop
        syscall(101, PTRACE_DETACH, child, None, None)
    os.kill(child, signal.SIGKILL)
    os.waitpid(child, 0)
    results["ptrace_attach"] = err
    results["personality_query"] = syscall(135, ctypes.c_ulong(0xFFFFFFFF))[1]


def main() -> None:
    with open("/proc/self/status") as f:
        status = dict(line.split(":", 1) for line in f.read().splitlines() if ":" in line)
    results["seccomp"] = status["Seccomp"].strip()
    results["dev_userfaultfd"] = os.path.exists("/dev/userfaultfd")
    cli = subprocess.run(["unshare", "-U", "true"], capture_output=True, text=True)
    results["unshare_cli"] = [cli.returncode, cli.stderr.strip()]
    in_child("unshare_newuser", unshare_newuser)
    raw_clone_newuser()
    clone3_newuser()
    attempt("io_uring_setup", 425, 1, ctypes.create_string_buffer(120))
    attempt("io_uring_enter", 426, -1, 0, 0, 0, None, 0)
    attempt("io_uring_register", 427, -1, 0, None, 0)
    attempt("bpf", 321, 0, None, 0)  # BPF_MAP_CREATE, empty attr: EINVAL from the kernel
    perf_attr = bytearray(128)
    # PERF_TYPE_SOFTWARE, size, PERF_COUNT_SW_TASK_CLOCK; exclude_kernel | exclude_hv
    struct.pack_into("<IIQ", perf_attr, 0, 1, 128, 1)
    struct.pack_into("<Q", perf_attr, 40, 0x60)
    attempt("perf_event_open", 298, ctypes.create_string_buffer(bytes(perf_attr), 128), 0, -1,
            -1, 0)
    attempt("add_key", 248, b"user", b"dt-probe", b"s3cret", 6, KEY_SPEC_PROCESS_KEYRING,
            returns_fd=False)
    attempt("keyctl", 250, KEYCTL_GET_KEYRING_ID, KEY_SPEC_PROCESS_KEYRING, 0,
            returns_fd=False)
    attempt("request_key", 249, b"user", b"dt-probe-absent", None, 0, returns_fd=False)
    attempt("userfaultfd", 323, 1 | os.O_CLOEXEC)  # UFFD_USER_MODE_ONLY: no privilege needed
    attempt("mount_missing", 165, b"none", b"/dt-no-such-dir", b"tmpfs", 0, None)
    attempt("mount_tmp", 165, b"none", b"/tmp", b"tmpfs", 0, None)
    attempt("setns", 308, -1, 0)
    attempt("open_tree", 428, AT_FDCWD, b"/tmp", 0)
    persona = syscall(135, ctypes.c_ulong(ADDR_NO_RANDOMIZE))
    results["personality_no_aslr"] = persona[1]
    if persona[1] == 0:
        syscall(135, ctypes.c_ulong(persona[0]))
    in_child("tiocsti", tiocsti_on_own_terminal)
    ordinary()
    print("RESULT " + json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
    sys.exit(0)
