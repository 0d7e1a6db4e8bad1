"""The seccomp filter of every dyno process: which system calls a dyno is refused (a plan, as
data), the plan compiled to a classic BPF program (pure), and installing it in a launch child.

Refused is what a web app never needs and what widens the kernel surface a tenant reaches:
user namespaces (and with them mount, packet sockets, ...), keyrings, io_uring, BPF, perf
events, userfaultfd, modules, kexec, reboot, swap, the mount API, clocks. Everything else is
allowed: the capabilities a dyno lacks, its namespaces and its cgroup already bound the rest,
and a deny list keeps every ordinary program working; only syscalls newer than the reviewed
table get ENOSYS. Ideas from Docker's default profile; no libseccomp (its Python binding
exists for Debian's system Python only, and this program is small enough to test whole).
"""

from __future__ import annotations

import errno
import platform
import struct
import sys
from collections.abc import Mapping
from dataclasses import dataclass

from agent.launcher import syscalls as sc
from agent.launcher.errors import SeccompError

AUDIT_ARCH_X86_64 = 0xC000003E  # EM_X86_64 | __AUDIT_ARCH_64BIT | __AUDIT_ARCH_LE

# struct seccomp_data: int nr; __u32 arch; __u64 instruction_pointer; __u64 args[6];
# x86_64 is little-endian: the low 32 bits of args[i] sit at 16 + 8 * i.
OFFSET_NR = 0
OFFSET_ARCH = 4
OFFSET_ARGS = 16

SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000

# Classic BPF opcodes (linux/bpf_common.h): class | size | mode, class | op | source.
BPF_LD_W_ABS = 0x00 | 0x00 | 0x20
BPF_JEQ_K = 0x05 | 0x10 | 0x00
BPF_JGT_K = 0x05 | 0x20 | 0x00
BPF_JGE_K = 0x05 | 0x30 | 0x00
BPF_JA = 0x05 | 0x00
BPF_JSET_K = 0x05 | 0x40 | 0x00
BPF_RET_K = 0x06 | 0x00
BPF_MAXINSNS = 4096
_SOCK_FILTER = struct.Struct("<HBBI")  # __u16 code; __u8 jt; __u8 jf; __u32 k

# Namespace flags of clone(2) and unshare(2). CLONE_NEWTIME (0x80) exists for unshare only:
# in clone's flags that byte is the exit signal.
CLONE_NEWTIME = 0x00000080
CLONE_NAMESPACES = (sc.CLONE_NEWNS | sc.CLONE_NEWCGROUP | sc.CLONE_NEWUTS | sc.CLONE_NEWIPC |
                    sc.CLONE_NEWUSER | sc.CLONE_NEWPID | sc.CLONE_NEWNET)
# Pushes bytes into a terminal's input as if typed; still allowed without privilege where
# dev.tty.legacy_tiocsti=1 (this host). A dyno's own pty needs no such injection.
TIOCSTI = 0x5412
# personality(2) values a program may set (Docker's list): PER_LINUX, PER_LINUX32, UNAME26
# alone and with PER_LINUX32, and 0xffffffff, which only queries. Refused: flags such as
# ADDR_NO_RANDOMIZE and READ_IMPLIES_EXEC that weaken the process's own exploit defences.
PERSONALITY_ALLOWED = (0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF)

# x86_64 numbers (arch/x86/entry/syscalls/syscall_64.tbl) of the calls the plan names.
X86_64_SYSCALLS: Mapping[str, int] = {
    "ioctl": 16, "clone": 56, "syslog": 103, "uselib": 134, "personality": 135,
    "vhangup": 153, "pivot_root": 155, "chroot": 161, "acct": 163, "settimeofday": 164,
    "mount": 165, "umount2": 166, "swapon": 167, "swapoff": 168, "reboot": 169, "iopl": 172,
    "ioperm": 173, "init_module": 175, "delete_module": 176, "quotactl": 179,
    "lookup_dcookie": 212, "clock_settime": 227, "kexec_load": 246, "add_key": 248,
    "request_key": 249, "keyctl": 250, "unshare": 272, "perf_event_open": 298,
    "open_by_handle_at": 304, "setns": 308, "finit_module": 313, "kexec_file_load": 320,
    "bpf": 321, "userfaultfd": 323, "io_uring_setup": 425, "io_uring_enter": 426,
    "io_uring_register": 427, "open_tree": 428, "move_mount": 429, "fsopen": 430,
    "fsconfig": 431, "fsmount": 432, "fspick": 433, "clone3": 435, "mount_setattr": 442,
    "quotactl_fd": 443, "open_tree_attr": 467,
}
# The highest x86_64 syscall reviewed for this plan (file_setattr, Linux 6.17; 6.18 has no
# newer one). Later kernels' calls get ENOSYS, as on a kernel that predates them (glibc falls
# back), until someone reviews them and raises this.
X86_64_MAX_REVIEWED_NR = 469


@dataclass(frozen=True)
class Always:
    """Refuse every call."""


@dataclass(frozen=True)
class AnyBitSet:
    """Refuse when argument `arg` has any bit of `mask` set."""

    arg: int
    mask: int


@dataclass(frozen=True)
class Equals:
    """Refuse when argument `arg` equals `value`."""

    arg: int
    value: int


@dataclass(frozen=True)
class NoneOf:
    """Refuse unless argument `arg` is one of `allowed`."""

    arg: int
    allowed: tuple[int, ...]


# Conditions read the LOW 32 BITS of an argument only. That is all the kernel reads of the
# arguments we check: clone takes lower_32_bits(flags), unshare refuses any higher bit with
# EINVAL, ioctl's cmd and personality's persona are 32-bit. Reading one word keeps the
# program short and leaves no high-word trick to a caller.
Condition = Always | AnyBitSet | Equals | NoneOf
ALWAYS = Always()


@dataclass(frozen=True)
class Refusal:
    syscall: str
    errno: int
    when: Condition = ALWAYS


@dataclass(frozen=True)
class Plan:
    """What the filter refuses, for one architecture. Calls of any other architecture (i386
    via int 0x80), of the x32 ABI and above `max_reviewed_nr` get `unknown_errno`."""

    arch: int
    numbers: Mapping[str, int]
    max_reviewed_nr: int
    refusals: tuple[Refusal, ...]
    unknown_errno: int = errno.ENOSYS
    # Syscall -1 is how a tracer skips a call; an errno here would overwrite the return value
    # the tracer set (the filter runs again after the tracer), so it is always allowed.
    allow_skipped: bool = True


def _refuse(errno_: int, *names: str) -> tuple[Refusal, ...]:
    return tuple(Refusal(name, errno_) for name in names)


DYNO_PLAN = Plan(
    arch=AUDIT_ARCH_X86_64,
    numbers=X86_64_SYSCALLS,
    max_reviewed_nr=X86_64_MAX_REVIEWED_NR,
    refusals=(
        # Refused depending on an argument. Only these calls (and the refused ones) miss the
        # kernel's per-syscall cache of "always allowed" (Linux 5.11+) and run the filter.
        Refusal("ioctl", errno.EPERM, Equals(1, TIOCSTI)),
        # Without capabilities only a user namespace can be made, and inside it every other
        # kind; the other flags are refused too so the answer is always the same EPERM.
        Refusal("clone", errno.EPERM, AnyBitSet(0, CLONE_NAMESPACES)),
        Refusal("unshare", errno.EPERM, AnyBitSet(0, CLONE_NAMESPACES | CLONE_NEWTIME)),
        Refusal("personality", errno.EPERM, NoneOf(0, PERSONALITY_ALLOWED)),
        # clone3 passes its flags in memory that BPF cannot read: "no such call" makes glibc
        # (2.34+: pthread_create, posix_spawn) fall back to clone, which we can check.
        Refusal("clone3", errno.ENOSYS),
        *_refuse(errno.EPERM,
                 # namespaces: joining one (creating is clone/unshare above)
                 "setns",
                 # kernel keyrings: shared by uid across the host, not namespaced
                 "add_key", "keyctl", "request_key",
                 # large attack surfaces a web app never uses
                 "io_uring_setup", "io_uring_enter", "io_uring_register", "bpf",
                 "perf_event_open", "userfaultfd",
                 # the kernel itself, the machine, its devices and clocks
                 "kexec_load", "kexec_file_load", "init_module", "finit_module",
                 "delete_module", "reboot", "swapon", "swapoff", "iopl", "ioperm", "syslog",
                 "acct", "quotactl", "quotactl_fd", "settimeofday", "clock_settime",
                 "lookup_dcookie", "vhangup", "uselib",
                 # file systems and the mount API (old and new)
                 "mount", "umount2", "pivot_root", "chroot", "fsopen", "fsconfig", "fsmount",
                 "fspick", "move_mount", "open_tree", "open_tree_attr", "mount_setattr",
                 # file handles: open_by_handle_at reaches files outside the root ("shocker")
                 "open_by_handle_at"),
    ),
)


# -- compiling ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Insn:
    """One struct sock_filter; jt/jf are forward offsets from the next instruction."""

    code: int
    k: int = 0
    jt: int = 0
    jf: int = 0


def _ld(offset: int) -> Insn:
    return Insn(BPF_LD_W_ABS, offset)


def _ret(value: int) -> Insn:
    return Insn(BPF_RET_K, value)


def _errno(value: int) -> Insn:
    return _ret(SECCOMP_RET_ERRNO | value)


def _arg_low(arg: int) -> int:
    return OFFSET_ARGS + 8 * arg


def _body(refusal: Refusal) -> list[Insn]:
    """What runs once the syscall number matched. Always ends in a return: it may overwrite
    the accumulator, which the following number comparisons need."""
    refuse = _errno(refusal.errno)
    allow = _ret(SECCOMP_RET_ALLOW)
    when = refusal.when
    if isinstance(when, Always):
        return [refuse]
    if isinstance(when, AnyBitSet):
        return [_ld(_arg_low(when.arg)), Insn(BPF_JSET_K, when.mask, 0, 1), refuse, allow]
    if isinstance(when, Equals):
        return [_ld(_arg_low(when.arg)), Insn(BPF_JEQ_K, when.value, 0, 1), refuse, allow]
    n = len(when.allowed)
    # Value i sits at body[1 + i]; `allow` at body[2 + n]: jump n - i ahead on a match.
    return [_ld(_arg_low(when.arg)),
            *(Insn(BPF_JEQ_K, value, n - i, 0) for i, value in enumerate(when.allowed)),
            refuse, allow]


def _check_plan(plan: Plan) -> None:
    seen: set[str] = set()
    for refusal in plan.refusals:
        name = refusal.syscall
        if name in seen:
            raise SeccompError(f"seccomp plan: {name} refused twice")
        seen.add(name)
        nr = plan.numbers.get(name)
        if nr is None:
            raise SeccompError(f"seccomp plan: no syscall number for {name}")
        if not 0 <= nr <= plan.max_reviewed_nr:
            raise SeccompError(f"seccomp plan: {name}={nr} beyond the reviewed table")
        if not 0 < refusal.errno <= 4095:
            raise SeccompError(f"seccomp plan: {name}: errno {refusal.errno} out of range")
        when = refusal.when
        args: list[int] = [] if isinstance(when, Always) else [when.arg]
        values: list[int] = []
        if isinstance(when, AnyBitSet):
            values = [when.mask]
        elif isinstance(when, Equals):
            values = [when.value]
        elif isinstance(when, NoneOf):
            values = list(when.allowed)
            if not values:
                raise SeccompError(f"seccomp plan: {name}: NoneOf() needs a value")
        if any(not 0 <= a <= 5 for a in args):
            raise SeccompError(f"seccomp plan: {name}: syscalls have arguments 0..5")
        if any(not 0 <= v <= 0xFFFFFFFF for v in values):
            raise SeccompError(f"seccomp plan: {name}: only 32-bit values can be compared")


# Up to this many refusals are compared one after the other; more are split in two halves.
_LEAF_SIZE = 4


def _search(refusals: list[Refusal], numbers: Mapping[str, int]) -> list[Insn]:
    """A binary search over the refused syscall numbers (sorted), every path ending in a
    return. A few comparisons per syscall instead of one per refusal: this matters when the
    filter is installed, as the kernel then runs it for every syscall number to fill its
    cache (~1.5 us per refusal in a linear list, measured on 6.18), and for the calls that
    are checked on every use."""
    if len(refusals) <= _LEAF_SIZE:
        leaf: list[Insn] = []
        for refusal in refusals:
            body = _body(refusal)
            leaf.append(Insn(BPF_JEQ_K, numbers[refusal.syscall], 0, len(body)))
            leaf += body
        return [*leaf, _ret(SECCOMP_RET_ALLOW)]
    middle = len(refusals) // 2
    low = _search(refusals[:middle], numbers)
    high = _search(refusals[middle:], numbers)
    pivot = numbers[refusals[middle].syscall]
    if len(low) <= 255:
        return [Insn(BPF_JGE_K, pivot, len(low), 0), *low, *high]
    # A conditional jump reaches 255 ahead at most; an unconditional one (32-bit offset) any.
    return [Insn(BPF_JGE_K, pivot, 1, 0), Insn(BPF_JA, len(high)), *high, *low]


def plan_instructions(plan: Plan) -> list[Insn]:
    """The plan as classic BPF over struct seccomp_data. Pure; raises SeccompError."""
    _check_plan(plan)
    unknown = _errno(plan.unknown_errno)
    program = [
        _ld(OFFSET_ARCH),
        # Numbers mean other calls on other ABIs (i386 keyctl is 288): refuse those outright.
        Insn(BPF_JEQ_K, plan.arch, 1, 0),
        unknown,
        _ld(OFFSET_NR),
    ]
    if plan.allow_skipped:
        program += [Insn(BPF_JEQ_K, 0xFFFFFFFF, 0, 1), _ret(SECCOMP_RET_ALLOW)]
    # x32 calls carry bit 30 in their number, so this also refuses the x32 ABI.
    program += [Insn(BPF_JGT_K, plan.max_reviewed_nr, 0, 1), unknown]
    by_number = sorted(plan.refusals, key=lambda r: plan.numbers[r.syscall])
    program += _search(by_number, plan.numbers)
    if len(program) > BPF_MAXINSNS:
        raise SeccompError(f"seccomp plan: {len(program)} instructions, the kernel takes "
                           f"{BPF_MAXINSNS}")
    return program


def encode(program: list[Insn]) -> bytes:
    """struct sock_filter[] as the kernel reads it."""
    for insn in program:
        if not (0 <= insn.jt <= 255 and 0 <= insn.jf <= 255):
            raise SeccompError(f"seccomp plan: jump out of range in {insn}")
    return b"".join(_SOCK_FILTER.pack(i.code, i.jt, i.jf, i.k) for i in program)


def compile_plan(plan: Plan) -> bytes:
    return encode(plan_instructions(plan))


# -- installing ---------------------------------------------------------------------------

_compiled: sc.BpfProgram | None = None


def check_host() -> None:
    """The plan knows x86_64 numbers only, and a filter checks the caller's ABI: refuse to
    build it anywhere else, rather than install one that refuses everything."""
    machine = platform.machine()
    if machine != "x86_64" or sys.maxsize < 2**63 - 1:
        raise SeccompError(f"seccomp: the dyno filter supports 64-bit x86_64 hosts only, "
                           f"not {machine} ({sys.maxsize.bit_length() + 1}-bit Python)")


def dyno_filter() -> sc.BpfProgram:
    """The dyno filter, compiled on the first call and kept: the holder launches many dynos
    and each launch child only installs it. Raises SeccompError on an unsupported host."""
    global _compiled
    if _compiled is None:
        check_host()
        _compiled = sc.BpfProgram(compile_plan(DYNO_PLAN))
    return _compiled


def install(program: sc.BpfProgram) -> None:
    """Confine the calling (single-threaded) process and everything it execs or forks, for
    good. Call after no_new_privs is set and right before execve."""
    sc.seccomp_set_filter(program)


# -- reporting ----------------------------------------------------------------------------


def parse_status_mode(status: str) -> int | None:
    """The `Seccomp:` field of /proc/PID/status: 0 none, 1 strict, 2 filter."""
    for line in status.splitlines():
        if line.startswith("Seccomp:"):
            value = line.split(":", 1)[1].strip()
            return int(value) if value.isdigit() else None
    return None


def process_mode(pid: int) -> int | None:
    """Seccomp mode of `pid`, None when it is gone. The caller must check the pid still
    names the same process afterwards (pid + start time)."""
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8", errors="replace") as f:
            return parse_status_mode(f.read())
    except OSError:
        return None
