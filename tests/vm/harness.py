"""Host side of the VM tier: boots Debian's stock kernel under qemu (TCG) with virtme-ng,
the host filesystem over 9p and no network, runs tests/vm/guest.py inside, and reads back
the guest's result. `python -m tests.vm.harness` runs it by hand."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tests.support.pace import spawn_cost_s
from tests.vm.guest import RESULT_NAME

PROJECT_ROOT = Path(__file__).resolve().parents[2]
KERNEL_ENV = "DYNOAGENT_VM_KERNEL"
QEMU_BINARY = "qemu-system-x86_64"
CGROUP_TESTS = "tests/privileged/cgroups"
# Measured here: ≈ 20 s to boot under TCG; the rest is the payload's own timeouts.
BOOT_ALLOWANCE_S = 180.0


class VmError(Exception):
    """The VM tier could not produce a verdict."""


class VmCapabilityMissing(VmError):
    """Something the VM tier needs is not installed; `what` names it."""

    def __init__(self, what: str) -> None:
        super().__init__(f"VM tier needs {what}")
        self.what = what


class VmTimeout(VmError):
    def __init__(self, timeout_s: float, console_log: Path) -> None:
        super().__init__(f"VM did not finish within {timeout_s:.0f}s; console: {console_log}")
        self.timeout_s = timeout_s
        self.console_log = console_log


class VmNoResult(VmError):
    """The VM exited without the guest writing its result (boot or guest script failed)."""

    def __init__(self, returncode: int, console_log: Path, console_tail: str) -> None:
        super().__init__(f"VM exited with status {returncode} and no {RESULT_NAME}; "
                         f"console {console_log} ends with:\n{console_tail}")
        self.returncode = returncode
        self.console_log = console_log


@dataclass(frozen=True)
class JunitCounts:
    tests: int
    failures: int
    errors: int
    skipped: int

    @property
    def passed(self) -> int:
        return self.tests - self.failures - self.errors - self.skipped


@dataclass(frozen=True)
class VmPlan:
    """What to boot and what to run inside."""

    kernel: Path
    pytest_paths: tuple[str, ...] = (CGROUP_TESTS,)
    pytest_args: tuple[str, ...] = ("-v",)
    bench: tuple[str, ...] = ()
    pytest_timeout_s: float = 600.0
    bench_timeout_s: float = 600.0
    cpus: int = 2
    memory: str = "2G"
    # Give the guest a hybrid-looking /sys/fs/cgroup first, to test the fix-up path.
    simulate_hybrid: bool = False
    # The host's cost of starting a process (tests.support.pace): the guest scales its tests'
    # deadlines by how much slower it is. None: no scaling.
    host_spawn_s: float | None = None

    @property
    def timeout_s(self) -> float:
        payload = self.pytest_timeout_s if self.pytest_paths else 0.0
        payload += self.bench_timeout_s if self.bench else 0.0
        return BOOT_ALLOWANCE_S + payload


@dataclass
class VmResult:
    """Everything the host knows after a run: the guest's report and the files it left."""

    share: Path
    wall_s: float
    returncode: int
    guest: dict[str, Any]
    junit: JunitCounts | None
    logs: dict[str, str] = field(default_factory=dict)


def _release_of(kernel: Path) -> str:
    return kernel.name.removeprefix("vmlinuz-")


def _version_key(release: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", release))


def find_kernel(boot: Path = Path("/boot"), modules: Path = Path("/lib/modules")) -> Path:
    """The newest /boot/vmlinuz-* whose modules are installed (Debian's kernel is modular:
    virtme-ng builds its initramfs from /lib/modules/<release>)."""
    override = os.environ.get(KERNEL_ENV)
    if override:
        path = Path(override)
        if not path.is_file():
            raise VmCapabilityMissing(f"the kernel image {path} (from ${KERNEL_ENV})")
        return path
    found = [k for k in boot.glob("vmlinuz-*")
             if (modules / _release_of(k) / "modules.dep").is_file()]
    if not found:
        raise VmCapabilityMissing(
            f"a kernel image in {boot} with modules in {modules} (apt-get install "
            "linux-image-amd64, or `make setup-vm`)")
    return max(found, key=lambda k: _version_key(_release_of(k)))


def venv_bin() -> Path:
    return Path(sys.prefix) / "bin"


def check_capabilities() -> None:
    """Raise VmCapabilityMissing for the first thing the tier cannot run without.
    No /dev/kvm is fine: the guest runs under TCG on purpose."""
    if os.geteuid() != 0:
        raise VmCapabilityMissing("root (Debian's /boot/vmlinuz-* is readable by root only)")
    if shutil.which(QEMU_BINARY) is None:
        raise VmCapabilityMissing(f"{QEMU_BINARY} (apt-get install qemu-system-x86)")
    for tool in ("vng", "virtme-run"):
        if not (venv_bin() / tool).is_file():
            raise VmCapabilityMissing(f"{tool} in {venv_bin()} (pip install virtme-ng)")
    find_kernel()


def vng_argv(plan: VmPlan, share: Path) -> list[str]:
    guest_argv = [sys.executable, "-m", "tests.vm.guest", "--share", str(share),
                  "--pytest-timeout-s", str(plan.pytest_timeout_s),
                  "--bench-timeout-s", str(plan.bench_timeout_s)]
    for path in plan.pytest_paths:
        guest_argv += ["--pytest-path", path]
    for arg in plan.pytest_args:
        guest_argv.append(f"--pytest-arg={arg}")
    for name in plan.bench:
        guest_argv += ["--bench", name]
    if plan.simulate_hybrid:
        guest_argv.append("--simulate-hybrid")
    if plan.host_spawn_s is not None:
        guest_argv += ["--host-spawn-s", f"{plan.host_spawn_s:.6f}"]
    return [
        str(venv_bin() / "vng"),
        "--run", str(plan.kernel),
        # KVM on these machines cannot boot stock kernels; TCG is slow but exact.
        "--disable-kvm",
        # virtiofs needs virtiofsd on the host; 9p is built into qemu.
        "--force-9p",
        "--cpus", str(plan.cpus),
        "--memory", plan.memory,
        # The only writable host path: the guest's report lands here.
        "--rwdir", str(share),
        # The project is visible read-only; an overlay lets pytest and hypothesis scribble
        # (caches, .pyc) without touching the host tree.
        "--overlay-rwdir", str(PROJECT_ROOT),
        "--cwd", str(PROJECT_ROOT),
        # No v1 hierarchy may claim a controller: the guest must be pure v2.
        "--append", "cgroup_no_v1=all",
        # No --network: the guest gets no NIC at all (only lo), so it cannot send traffic.
        "--exec", " ".join(_shell_quote(a) for a in guest_argv),
    ]


def _shell_quote(arg: str) -> str:
    if re.fullmatch(r"[A-Za-z0-9_./=:,+-]+", arg):
        return arg
    return "'" + arg.replace("'", "'\\''") + "'"


def parse_junit(path: Path) -> JunitCounts | None:
    if not path.is_file():
        return None
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = [0, 0, 0, 0]
    for suite in suites:
        for i, key in enumerate(("tests", "failures", "errors", "skipped")):
            total[i] += int(suite.get(key, "0"))
    return JunitCounts(*total)


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return ""


def run_vm(plan: VmPlan, share: Path | None = None) -> VmResult:
    """Boot, run the guest script, wait (bounded), and read its report back."""
    check_capabilities()
    if plan.host_spawn_s is None:
        plan = replace(plan, host_spawn_s=spawn_cost_s())
    share = share or Path(tempfile.mkdtemp(prefix="dtvm-"))
    console_log = share / "console.log"
    env = dict(os.environ)
    # vng finds virtme-run and friends through PATH.
    env["PATH"] = f"{venv_bin()}:{env.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"
    started = time.monotonic()
    with console_log.open("wb") as console:
        proc = subprocess.Popen(vng_argv(plan, share), cwd=PROJECT_ROOT, env=env,
                                stdin=subprocess.DEVNULL, stdout=console,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            returncode = proc.wait(timeout=plan.timeout_s)
        except subprocess.TimeoutExpired:
            # Own session: this reaches vng, qemu and nothing else.
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise VmTimeout(plan.timeout_s, console_log) from None
    wall_s = time.monotonic() - started
    result_path = share / RESULT_NAME
    if not result_path.is_file():
        raise VmNoResult(returncode, console_log, _tail(console_log))
    guest: dict[str, Any] = json.loads(result_path.read_text())
    logs = {name: _tail(share / name, 200_000)
            for name in ("pytest.log", "bench.log", "console.log") if (share / name).is_file()}
    return VmResult(share=share, wall_s=wall_s, returncode=returncode, guest=guest,
                    junit=parse_junit(share / "junit.xml"), logs=logs)


def summary(result: VmResult) -> str:
    g = result.guest
    cg = g.get("cgroup") or {}
    lines = [
        f"share: {result.share}",
        f"wall: {result.wall_s:.1f}s (guest booted in {g.get('guest_uptime_at_start_s')}s, "
        f"guest script ended at uptime {g.get('guest_uptime_at_end_s')}s)",
        f"kernel: {g.get('kernel')}  python: {g.get('python')}  nics: {g.get('net_interfaces')}",
        f"cgroup layout: {cg.get('layout')}  controllers: {cg.get('controllers')}  "
        f"subtree_control: {cg.get('subtree_control')}  fixups: {cg.get('fixups')}",
        f"probe: {g.get('probe')}",
        f"pytest: {g.get('pytest')}  junit: {result.junit}",
        f"bench: {g.get('bench')}",
        f"error: {g.get('error')}",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the cgroup tests in a pure v2 VM.")
    parser.add_argument("paths", nargs="*", default=[CGROUP_TESTS],
                        help="pytest paths inside the guest (default: %(default)s)")
    parser.add_argument("--no-pytest", action="store_true", help="only the built-in probe")
    parser.add_argument("--bench", action="append", default=[], help="benchmark name(s)")
    parser.add_argument("--pytest-timeout-s", type=float, default=600.0)
    parser.add_argument("--simulate-hybrid", action="store_true",
                        help="start the guest from a hybrid-looking /sys/fs/cgroup")
    parser.add_argument("--keep", action="store_true", help="keep the share dir (logs)")
    args = parser.parse_args(argv)
    share = Path(tempfile.mkdtemp(prefix="dtvm-"))
    try:
        plan = VmPlan(kernel=find_kernel(),
                      pytest_paths=() if args.no_pytest else tuple(args.paths),
                      bench=tuple(args.bench), pytest_timeout_s=args.pytest_timeout_s,
                      simulate_hybrid=args.simulate_hybrid)
        result = run_vm(plan, share=share)
    except VmError as exc:
        print(exc, file=sys.stderr)
        return 1
    finally:
        # Every run owns exactly its own share dir; removing it here means nobody has a
        # reason to sweep /tmp/dtvm-* (which would break a concurrent run's 9p export).
        if not args.keep:
            shutil.rmtree(share, ignore_errors=True)
    for name in ("pytest.log", "bench.log"):
        if name in result.logs:
            print(f"===== guest {name}\n{result.logs[name]}")
    print(summary(result))
    ok = result.guest.get("error") is None and bool((result.guest.get("probe") or {}).get("ok"))
    if plan.pytest_paths:
        ok = ok and (result.guest.get("pytest") or {}).get("exit_code") == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
