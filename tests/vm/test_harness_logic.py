"""The VM harness's own logic, without booting anything: mount layout judgement, kernel
choice, the qemu command line and junit counting."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.vm.guest import classify_layout, parse_mountinfo
from tests.vm.harness import (
    VmCapabilityMissing,
    VmPlan,
    find_kernel,
    parse_junit,
    vng_argv,
)

PURE_V2 = """\
22 1 0:20 / /proc rw - proc proc rw
30 23 0:24 / /sys/fs/cgroup rw,relatime - cgroup2 cgroup2 rw
"""

HYBRID = """\
25 24 0:22 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
26 25 0:23 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw,nsdelegate
27 25 0:24 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
28 25 0:25 / /sys/fs/cgroup/my\\040dir rw - cgroup cgroup rw,pids
"""


def test_layouts_are_told_apart() -> None:
    assert classify_layout(parse_mountinfo(PURE_V2)) == "v2"
    assert classify_layout(parse_mountinfo(HYBRID)) == "hybrid"
    assert classify_layout(parse_mountinfo(HYBRID.replace("cgroup2 cgroup2", "x x"))) == "v1"
    assert classify_layout(parse_mountinfo("22 1 0:20 / /proc rw - proc proc rw\n")) == "none"
    moved = PURE_V2.replace("/sys/fs/cgroup ", "/mnt/cg ")
    assert classify_layout(parse_mountinfo(moved)) == "v2-elsewhere"


def test_mountinfo_octal_escapes_are_decoded() -> None:
    points = [m.mount_point for m in parse_mountinfo(HYBRID)]
    assert "/sys/fs/cgroup/my dir" in points


def test_this_host_is_not_pure_v2() -> None:
    # MACHINE.md: the development hosts are hybrid; the VM tier exists because of that.
    # If this fails the host changed, and the guest-side judgement must be re-checked.
    layout = classify_layout(parse_mountinfo(Path("/proc/self/mountinfo").read_text()))
    assert layout == "hybrid"


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("")
    return path


def test_kernel_choice_wants_modules_and_takes_the_newest(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DYNOAGENT_VM_KERNEL", raising=False)
    boot, mods = tmp_path / "boot", tmp_path / "modules"
    with pytest.raises(VmCapabilityMissing, match="kernel image"):
        find_kernel(boot, mods)
    _touch(boot / "vmlinuz-6.1.0-9-amd64")
    _touch(boot / "vmlinuz-6.1.0-56-amd64")
    _touch(boot / "vmlinuz-6.12.0-1-amd64")  # no modules installed: unusable
    _touch(mods / "6.1.0-9-amd64" / "modules.dep")
    _touch(mods / "6.1.0-56-amd64" / "modules.dep")
    assert find_kernel(boot, mods).name == "vmlinuz-6.1.0-56-amd64"
    monkeypatch.setenv("DYNOAGENT_VM_KERNEL", str(tmp_path / "nope"))
    with pytest.raises(VmCapabilityMissing, match="DYNOAGENT_VM_KERNEL"):
        find_kernel(boot, mods)


def test_qemu_command_is_tcg_9p_without_network(tmp_path: Path) -> None:
    plan = VmPlan(kernel=Path("/boot/vmlinuz-x"), bench=("cgroups",))
    argv = vng_argv(plan, tmp_path)
    assert "--disable-kvm" in argv and "--force-9p" in argv
    assert not any(a.startswith(("--network", "-n")) for a in argv)
    assert argv[argv.index("--rwdir") + 1] == str(tmp_path)
    assert argv[argv.index("--append") + 1] == "cgroup_no_v1=all"
    guest = argv[argv.index("--exec") + 1]
    assert guest.startswith(f"{sys.executable} -m tests.vm.guest ")
    assert "--pytest-path tests/privileged/cgroups" in guest
    assert "--bench cgroups" in guest
    assert plan.timeout_s > plan.pytest_timeout_s + plan.bench_timeout_s


def test_junit_counts(tmp_path: Path) -> None:
    assert parse_junit(tmp_path / "missing.xml") is None
    path = tmp_path / "j.xml"
    path.write_text('<testsuites><testsuite name="pytest" tests="7" failures="1" errors="0" '
                    'skipped="2"/></testsuites>')
    counts = parse_junit(path)
    assert counts is not None
    assert (counts.tests, counts.failures, counts.skipped, counts.passed) == (7, 1, 2, 4)
