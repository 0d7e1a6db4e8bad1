"""The dyno seccomp filter as data and as a program: the compiled classic BPF, run by a small
interpreter written here (not the compiler's own helpers), answers every syscall the way the
plan says, for x86_64 and for foreign ABIs."""

from __future__ import annotations

import dataclasses
import errno
import platform
import re
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.launcher import LaunchError, LaunchRequest, enter, launch, seccomp
from agent.launcher.errors import SeccompError

ARCH_X86_64 = 0xC000003E
ARCH_I386 = 0x40000003
ARCH_AARCH64 = 0xC00000B7
X32 = 0x40000000
ALLOW = 0x7FFF0000
EPERM = 0x00050000 | errno.EPERM
ENOSYS = 0x00050000 | errno.ENOSYS

# Independent of the module's table: x86_64 numbers of ordinary calls and the ones refused.
READ, WRITE, OPENAT, MMAP, FUTEX, EXECVE, EXECVEAT, EXIT_GROUP = 0, 1, 257, 9, 202, 59, 322, 231
FORK, VFORK, WAIT4, SOCKET, BIND, LISTEN, ACCEPT4 = 57, 58, 61, 41, 49, 50, 288
IOCTL, CLONE, PERSONALITY, UNSHARE, CLONE3, PTRACE, SECCOMP = 16, 56, 135, 272, 435, 101, 317
REFUSED_ALWAYS = {
    "setns": 308, "add_key": 248, "request_key": 249, "keyctl": 250, "io_uring_setup": 425,
    "io_uring_enter": 426, "io_uring_register": 427, "bpf": 321, "perf_event_open": 298,
    "userfaultfd": 323, "kexec_load": 246, "kexec_file_load": 320, "init_module": 175,
    "finit_module": 313, "delete_module": 176, "reboot": 169, "swapon": 167, "swapoff": 168,
    "iopl": 172, "ioperm": 173, "syslog": 103, "acct": 163, "quotactl": 179,
    "quotactl_fd": 443, "settimeofday": 164, "clock_settime": 227, "lookup_dcookie": 212,
    "vhangup": 153, "uselib": 134, "mount": 165, "umount2": 166, "pivot_root": 155,
    "chroot": 161, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433,
    "move_mount": 429, "open_tree": 428, "open_tree_attr": 467, "mount_setattr": 442,
    "open_by_handle_at": 304,
}
ARG_CHECKED = {IOCTL, CLONE, UNSHARE, PERSONALITY}

CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS, CLONE_NEWIPC = 0x20000, 0x2000000, 0x4000000, 0x8000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET, CLONE_NEWTIME = 0x10000000, 0x20000000, 0x40000000, 0x80
NAMESPACE_FLAGS = (CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWUSER,
                   CLONE_NEWPID, CLONE_NEWNET)
SIGCHLD = 17
# What glibc's pthread_create passes to clone.
PTHREAD_FLAGS = 0x3D0F00
FORK_FLAGS = 0x01200000 | SIGCHLD  # CLONE_CHILD_SETTID | CLONE_CHILD_CLEARTID


# -- a classic BPF interpreter, as the kernel runs a seccomp filter ----------------------------

class BpfFault(Exception):
    pass


def seccomp_data(nr: int, arch: int = ARCH_X86_64, args: tuple[int, ...] = ()) -> bytes:
    full = (*args, *(0,) * (6 - len(args)))
    return struct.pack("<iIQ6Q", nr if nr < 2**31 else nr - 2**32, arch, 0x401000,
                       *(a & 0xFFFFFFFFFFFFFFFF for a in full))


def run(program: bytes, data: bytes) -> int:
    return run_counted(program, data)[0]


def run_counted(program: bytes, data: bytes) -> tuple[int, int]:
    """Execute `program` over `data`; the subset seccomp allows, checked as the kernel does.
    Returns (the return value, how many instructions ran)."""
    insns = [struct.unpack_from("<HBBI", program, off) for off in range(0, len(program), 8)]
    if not insns or len(insns) > 4096 or len(program) % 8:
        raise BpfFault("bad length")
    acc, pc, steps = 0, 0, 0
    while True:
        if pc >= len(insns):
            raise BpfFault("ran off the end")
        steps += 1
        code, jt, jf, k = insns[pc]
        cls = code & 0x07
        if cls == 0x00:  # BPF_LD
            if code != 0x20:  # only W | ABS is valid on seccomp_data
                raise BpfFault(f"load {code:#x}")
            if k % 4 or k + 4 > len(data):
                raise BpfFault(f"load offset {k}")
            acc = struct.unpack_from("<I", data, k)[0]
            pc += 1
        elif cls == 0x05:  # BPF_JMP
            op, src = code & 0xF0, code & 0x08
            if src:
                raise BpfFault("X register jumps are not used")
            if op == 0x00:
                target = pc + 1 + k
                taken = True
            else:
                taken = {0x10: acc == k, 0x20: acc > k, 0x30: acc >= k,
                         0x40: bool(acc & k)}[op]
                target = pc + 1 + (jt if taken else jf)
            if target <= pc or target >= len(insns):
                raise BpfFault(f"jump from {pc} to {target}")
            pc = target
        elif code == 0x06:  # BPF_RET | BPF_K
            return int(k), steps
        else:
            raise BpfFault(f"opcode {code:#x} at {pc}")


PROGRAM = seccomp.compile_plan(seccomp.DYNO_PLAN)


def answer(nr: int, *args: int, arch: int = ARCH_X86_64) -> int:
    return run(PROGRAM, seccomp_data(nr, arch, args))


# -- the program ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "nr"), sorted(REFUSED_ALWAYS.items()))
def test_every_refused_call_gets_eperm_whatever_its_arguments(name: str, nr: int) -> None:
    assert answer(nr) == EPERM, name
    assert answer(nr, 1, 2, 3, 4, 5, 6) == EPERM, name
    assert answer(nr, *(2**64 - 1,) * 6) == EPERM, name


def test_clone3_gets_enosys_so_glibc_falls_back_to_clone() -> None:
    assert answer(CLONE3) == ENOSYS
    assert answer(CLONE3, 0x7FFC0000, 88) == ENOSYS


@pytest.mark.parametrize("nr", [READ, WRITE, OPENAT, MMAP, FUTEX, EXECVE, EXECVEAT, EXIT_GROUP,
                                FORK, VFORK, WAIT4, SOCKET, BIND, LISTEN, ACCEPT4, PTRACE,
                                SECCOMP, 303, 457, 458, 469])
def test_ordinary_calls_are_allowed(nr: int) -> None:
    assert answer(nr) == ALLOW
    assert answer(nr, 3, 0x7FFC0000, 4096) == ALLOW


def test_every_other_reviewed_call_is_allowed_whatever_its_arguments() -> None:
    listed = set(REFUSED_ALWAYS.values()) | ARG_CHECKED | {CLONE3}
    for nr in range(0, 470):
        if nr not in listed:
            assert answer(nr) == ALLOW, nr
            assert answer(nr, *(2**64 - 1,) * 6) == ALLOW, nr


def test_clone_without_new_namespaces_is_allowed() -> None:
    assert answer(CLONE, PTHREAD_FLAGS) == ALLOW
    assert answer(CLONE, FORK_FLAGS) == ALLOW
    assert answer(CLONE, 0x4111) == ALLOW  # CLONE_VM | CLONE_VFORK | SIGCHLD (posix_spawn)
    # The exit signal byte shares its bits with CLONE_NEWTIME in unshare: not a namespace.
    assert answer(CLONE, SIGCHLD | 0x80) == ALLOW
    # The kernel takes only the low 32 bits of clone's flags.
    assert answer(CLONE, (1 << 40) | SIGCHLD) == ALLOW


@pytest.mark.parametrize("flag", NAMESPACE_FLAGS)
def test_clone_with_a_new_namespace_is_refused(flag: int) -> None:
    assert answer(CLONE, flag | SIGCHLD) == EPERM
    assert answer(CLONE, flag | FORK_FLAGS) == EPERM
    assert answer(CLONE, flag | PTHREAD_FLAGS | (0xFFFF << 32)) == EPERM


@pytest.mark.parametrize("flag", (*NAMESPACE_FLAGS, CLONE_NEWTIME))
def test_unshare_of_a_namespace_is_refused(flag: int) -> None:
    assert answer(UNSHARE, flag) == EPERM
    assert answer(UNSHARE, flag | 0x600) == EPERM  # with CLONE_FS | CLONE_FILES


def test_unshare_of_fs_and_files_is_allowed() -> None:
    assert answer(UNSHARE, 0x200) == ALLOW  # CLONE_FS
    assert answer(UNSHARE, 0x400) == ALLOW  # CLONE_FILES
    assert answer(UNSHARE, 0x40000) == ALLOW  # CLONE_SYSVSEM


def test_personality_may_be_queried_and_set_to_linux_only() -> None:
    for persona in (0, 8, 0x20000, 0x20008, 0xFFFFFFFF):
        assert answer(PERSONALITY, persona) == ALLOW, hex(persona)
    for persona in (0x0040000, 0x0400000, 0x0040008, 0x1, 0x0200000):
        # ADDR_NO_RANDOMIZE, READ_IMPLIES_EXEC, ..., other execution domains
        assert answer(PERSONALITY, persona) == EPERM, hex(persona)


def test_ioctl_refuses_only_tiocsti() -> None:
    assert answer(IOCTL, 0, 0x5412) == EPERM
    assert answer(IOCTL, 7, 0x5412 | (1 << 32)) == EPERM  # the kernel's cmd is 32-bit
    for cmd in (0x5401, 0x541B, 0x5413, 0x540E, 0x5421):  # TCGETS FIONREAD TIOCGWINSZ ...
        assert answer(IOCTL, 0, cmd) == ALLOW, hex(cmd)


@pytest.mark.parametrize("arch", [ARCH_I386, ARCH_AARCH64, 0])
def test_other_architectures_get_enosys(arch: int) -> None:
    # i386 numbers through int 0x80: 288 is i386 keyctl, 0 restart_syscall, 3 read.
    for nr in (0, 3, 288, 286):
        assert answer(nr, arch=arch) == ENOSYS


def test_the_x32_abi_gets_enosys() -> None:
    for nr in (READ, WRITE, 248, 250, 512, 547):
        assert answer(X32 | nr) == ENOSYS, nr


def test_calls_newer_than_the_review_get_enosys_and_skipped_calls_pass() -> None:
    assert answer(470) == ENOSYS  # listns, Linux 6.19
    assert answer(1000) == ENOSYS
    assert answer(0x7FFFFFFF) == ENOSYS
    # nr -1: a tracer skipped the call and set its result; an errno would overwrite that.
    assert answer(0xFFFFFFFF) == ALLOW


def test_the_program_is_well_formed() -> None:
    insns = [struct.unpack_from("<HBBI", PROGRAM, off) for off in range(0, len(PROGRAM), 8)]
    assert 0 < len(insns) <= 200
    assert insns[-1][0] == 0x06
    # The first thing checked is the ABI, before any syscall number is looked at.
    assert insns[0] == (0x20, 0, 0, 4)
    assert insns[1][0] == 0x15 and insns[1][3] == ARCH_X86_64


def test_any_syscall_runs_a_handful_of_instructions() -> None:
    """A search, not a list: the kernel runs the filter for every syscall number when it is
    installed (to cache the always-allowed ones), so its length is paid at every launch."""
    worst = max(run_counted(PROGRAM, seccomp_data(nr, args=(1 << 40,) * 6))[1]
                for nr in range(0, 470))
    assert worst <= 20, worst


def test_a_large_plan_reaches_far_branches_with_unconditional_jumps() -> None:
    numbers = {f"call{i}": i for i in range(120)}
    values = tuple(range(100, 112))
    plan = dataclasses.replace(seccomp.DYNO_PLAN, numbers=numbers, refusals=tuple(
        seccomp.Refusal(f"call{i}", 1 + i % 100, seccomp.NoneOf(0, values)) for i in range(120)))
    program = seccomp.compile_plan(plan)
    assert any(code == 0x05 for code, *_ in struct.iter_unpack("<HBBI", program))  # BPF_JA
    for nr in range(0, 470):
        want_refused = 0x00050000 | (1 + nr % 100) if nr < 120 else ALLOW
        assert run(program, seccomp_data(nr, args=(7,))) == want_refused, nr
        assert run(program, seccomp_data(nr, args=(105,))) == ALLOW, nr


def test_arguments_are_only_read_for_the_calls_that_need_them() -> None:
    """The kernel caches "always allowed" per syscall (5.11+) only for calls whose filter path
    reads no argument: everything but ioctl, clone, unshare and personality."""
    insns = [struct.unpack_from("<HBBI", PROGRAM, off) for off in range(0, len(PROGRAM), 8)]
    arg_loads = [k for code, _, _, k in insns if code == 0x20 and k >= 16]
    assert len(arg_loads) == len(ARG_CHECKED)
    assert sorted(arg_loads) == [16, 16, 16, 24]  # clone/unshare/personality arg 0, ioctl arg 1


# -- the plan ------------------------------------------------------------------------------------

def _header_numbers() -> Iterator[tuple[str, int]]:
    header = Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h")
    if not header.exists():
        return
    for match in re.finditer(r"#define __NR_(\w+) (\d+)", header.read_text()):
        yield match.group(1), int(match.group(2))


def test_the_table_matches_this_test_and_the_system_headers() -> None:
    ours = dict(seccomp.X86_64_SYSCALLS)
    expected = {**REFUSED_ALWAYS, "ioctl": IOCTL, "clone": CLONE, "unshare": UNSHARE,
                "personality": PERSONALITY, "clone3": CLONE3}
    assert ours == expected
    from_headers = dict(_header_numbers())
    for name, nr in ours.items():
        if name in from_headers:  # the headers may predate the newest calls
            assert from_headers[name] == nr, name


def test_the_plan_refuses_what_the_issue_lists() -> None:
    refused = {r.syscall: r for r in seccomp.DYNO_PLAN.refusals}
    for name in ("add_key", "keyctl", "request_key", "io_uring_setup", "bpf",
                 "perf_event_open", "userfaultfd", "mount", "unshare", "clone", "setns"):
        assert refused[name].errno == errno.EPERM, name
    assert refused["clone3"].errno == errno.ENOSYS


def _plan(*refusals: seccomp.Refusal) -> seccomp.Plan:
    return dataclasses.replace(seccomp.DYNO_PLAN, refusals=refusals)


@pytest.mark.parametrize(("refusals", "message"), [
    ((seccomp.Refusal("no_such_call", errno.EPERM),), "no syscall number"),
    ((seccomp.Refusal("bpf", errno.EPERM), seccomp.Refusal("bpf", errno.EACCES)), "twice"),
    ((seccomp.Refusal("bpf", 0),), "errno"),
    ((seccomp.Refusal("bpf", 5000),), "errno"),
    ((seccomp.Refusal("clone", errno.EPERM, seccomp.AnyBitSet(6, 1)),), "arguments 0..5"),
    ((seccomp.Refusal("ioctl", errno.EPERM, seccomp.Equals(1, 1 << 32)),), "32-bit"),
    ((seccomp.Refusal("personality", errno.EPERM, seccomp.NoneOf(0, ())),), "needs a value"),
])
def test_a_bad_plan_is_refused_with_a_reason(refusals: tuple[seccomp.Refusal, ...],
                                             message: str) -> None:
    with pytest.raises(SeccompError, match=message):
        seccomp.compile_plan(_plan(*refusals))


def test_a_plan_too_long_for_the_kernel_is_refused() -> None:
    numbers = {f"call{i}": i for i in range(300)}
    many = tuple(seccomp.Refusal(f"call{i}", errno.EPERM,
                                 seccomp.NoneOf(0, tuple(range(12)))) for i in range(300))
    plan = dataclasses.replace(seccomp.DYNO_PLAN, numbers=numbers, refusals=many)
    with pytest.raises(SeccompError, match="4096"):
        seccomp.compile_plan(plan)


def test_a_custom_plan_compiles_to_what_it_says() -> None:
    plan = _plan(seccomp.Refusal("bpf", errno.EACCES),
                 seccomp.Refusal("personality", errno.EINVAL, seccomp.NoneOf(0, (0, 8))))
    program = seccomp.compile_plan(plan)
    assert run(program, seccomp_data(321)) == 0x00050000 | errno.EACCES
    assert run(program, seccomp_data(135, args=(8,))) == ALLOW
    assert run(program, seccomp_data(135, args=(9,))) == 0x00050000 | errno.EINVAL
    assert run(program, seccomp_data(248)) == ALLOW  # add_key is not in this plan


# -- building once, installing, reporting ---------------------------------------------------------

def test_the_filter_is_built_once_per_process() -> None:
    first = seccomp.dyno_filter()
    assert seccomp.dyno_filter() is first
    assert first.code == PROGRAM


def test_an_unsupported_host_gets_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(seccomp, "_compiled", None)
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    with pytest.raises(SeccompError, match="x86_64 hosts only, not aarch64"):
        seccomp.dyno_filter()
    assert seccomp._compiled is None
    # Launch and enter refuse before anything is made (no fork, no fd, no mount).
    request = LaunchRequest(
        dyno_id="abc-1", hostname="web-1", argv=("true",), env=(), uid=400001, gid=400001,
        stack_dir="/", slug_dir="/nonexistent/slug", dyno_dir="/nonexistent/dyno",
        writable_limit_bytes=1 << 20, cgroup_procs=(), netns_path=None)
    with pytest.raises(LaunchError) as info:
        launch(request, 0, 1, 2)
    assert (info.value.phase, info.value.errno) == ("seccomp", 0)
    assert "aarch64" in info.value.message
    with pytest.raises(LaunchError) as info:
        enter(1, ["true"], {}, 400001, 400001, "/", 0, 1, 2, ())
    assert info.value.phase == "seccomp"


def test_seccomp_mode_is_read_from_proc_status() -> None:
    status = "Name:\tsh\nNoNewPrivs:\t1\nSeccomp:\t2\nSeccomp_filters:\t1\n"
    assert seccomp.parse_status_mode(status) == 2
    assert seccomp.parse_status_mode("Name:\tsh\n") is None
    assert seccomp.parse_status_mode("Seccomp:\tx\n") is None
    assert seccomp.process_mode(2**22 + 7) is None  # above pid_max: no such process
