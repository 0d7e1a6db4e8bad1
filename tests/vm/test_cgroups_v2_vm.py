"""The cgroup privileged tests, run again inside a VM whose kernel is pure cgroup v2.

One VM boot per module: the guest reports what cgroup layout it saw, a built-in OOM probe,
and the inner pytest run; each test below judges one part of that report."""

from __future__ import annotations

import contextlib
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.vm.harness import (
    VmCapabilityMissing,
    VmPlan,
    VmResult,
    check_capabilities,
    find_kernel,
    run_vm,
    summary,
)

PLAN_TIMEOUT_S = VmPlan(kernel=Path("/dev/null")).timeout_s
# The VM boot happens in the first test's setup, which pytest-timeout counts against it.
pytestmark = pytest.mark.timeout(PLAN_TIMEOUT_S + 60)


@contextlib.contextmanager
def _share_dir() -> Iterator[Path]:
    # Not tmp_path: pytest prunes old basetemp dirs of *any* concurrent session, and this
    # directory must outlive a multi-minute VM run that writes into it over 9p.
    share = Path(tempfile.mkdtemp(prefix="dtvm-"))
    try:
        yield share
    finally:
        shutil.rmtree(share, ignore_errors=True)


@pytest.fixture(scope="module")
def vm_run() -> Iterator[VmResult]:
    try:
        check_capabilities()
    except VmCapabilityMissing as exc:
        pytest.skip(f"VM tier: missing {exc.what}")
    with _share_dir() as share:
        result = run_vm(VmPlan(kernel=find_kernel()), share=share)
        print(summary(result))
        yield result


def _explain(result: VmResult) -> str:
    return summary(result) + "\n--- guest pytest.log (tail)\n" + \
        result.logs.get("pytest.log", "(none)")[-6000:]


def test_guest_script_completed(vm_run: VmResult) -> None:
    assert vm_run.guest["error"] is None, _explain(vm_run)


def test_guest_is_pure_cgroup_v2_with_controllers(vm_run: VmResult) -> None:
    cg = vm_run.guest["cgroup"]
    assert cg is not None, _explain(vm_run)
    mounts = [(m["fstype"], m["mount_point"]) for m in cg["mounts"]]
    assert mounts == [("cgroup2", "/sys/fs/cgroup")], mounts
    assert cg["layout"] == "v2"
    for name in ("memory", "cpu", "pids"):
        assert name in cg["controllers"], cg
        assert name in cg["subtree_control"], cg


def test_guest_runs_the_venv_interpreter_without_network(vm_run: VmResult) -> None:
    assert vm_run.guest["python"] == sys.executable
    assert vm_run.guest["python_prefix"] == sys.prefix
    assert vm_run.guest["net_interfaces"] == ["lo"]


def test_memory_max_oom_kills_a_hog_in_the_guest(vm_run: VmResult) -> None:
    probe = vm_run.guest["probe"]
    assert probe is not None, _explain(vm_run)
    assert probe["memory_max"] == 32 << 20
    assert probe["exit_signal"] == 9, probe
    assert probe["memory_events"]["oom_kill"] >= 1, probe


def test_cgroup_privileged_tests_pass_in_the_guest(vm_run: VmResult) -> None:
    run = vm_run.guest["pytest"]
    assert run is not None, _explain(vm_run)
    assert not run["timed_out"], _explain(vm_run)
    assert vm_run.junit is not None, _explain(vm_run)
    assert vm_run.junit.failures == 0 and vm_run.junit.errors == 0, _explain(vm_run)
    assert vm_run.junit.passed > 0, _explain(vm_run)
    assert run["exit_code"] == 0, _explain(vm_run)


def test_guest_turns_a_hybrid_layout_into_pure_v2() -> None:
    """A second boot whose guest starts from a hybrid-looking /sys/fs/cgroup: the guest
    script must tear it down, mount cgroup2 alone and still enforce memory.max."""
    try:
        check_capabilities()
    except VmCapabilityMissing as exc:
        pytest.skip(f"VM tier: missing {exc.what}")
    with _share_dir() as share:
        result = run_vm(VmPlan(kernel=find_kernel(), pytest_paths=(), simulate_hybrid=True),
                        share=share)
    guest = result.guest
    assert guest["error"] is None, summary(result)
    assert guest["layout_before"] == "hybrid", summary(result)
    cg = guest["cgroup"]
    assert [(m["fstype"], m["mount_point"]) for m in cg["mounts"]] == [
        ("cgroup2", "/sys/fs/cgroup")], summary(result)
    assert "mount cgroup2 /sys/fs/cgroup" in cg["fixups"]
    assert {"memory", "cpu", "pids"} <= set(cg["subtree_control"])
    assert guest["probe"]["ok"], summary(result)
    assert guest["pytest"] is None
