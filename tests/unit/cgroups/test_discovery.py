"""Discovery from mountinfo and /proc/<pid>/cgroup: parsers, modes, delegation, failures."""

from __future__ import annotations

from pathlib import Path

import pytest

from cgroups.discovery import (
    Layout,
    detect,
    parse_mountinfo,
    parse_proc_cgroup,
    relative_to_mount,
)
from cgroups.errors import ControllerMissing, DiscoveryError
from cgroups.limits import Mode
from tests.unit.cgroups.fakekernel import HYBRID_MOUNTINFO, FakeHost


def test_parse_hybrid_mountinfo() -> None:
    mounts = parse_mountinfo(HYBRID_MOUNTINFO)
    by_point = {m.mount_point: m for m in mounts}
    assert "/" not in by_point  # ext4 and tmpfs are not cgroup mounts
    assert by_point["/sys/fs/cgroup/memory"].controllers == {"memory"}
    assert by_point["/sys/fs/cgroup/memory"].version == 1
    assert by_point["/sys/fs/cgroup/systemd"].controllers == frozenset()
    assert by_point["/sys/fs/cgroup/systemd"].name == "systemd"
    assert by_point["/sys/fs/cgroup/unified"].version == 2


def test_parse_comounted_and_escaped_and_optional_fields() -> None:
    text = ("30 25 0:26 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid shared:11 master:3 - cgroup cgroup "
            "rw,cpu,cpuacct\n"
            "31 25 0:27 /sub /mnt/my\\040cg rw - cgroup2 cgroup2 rw,nsdelegate\n")
    first, second = parse_mountinfo(text)
    assert first.controllers == {"cpu", "cpuacct"}
    assert first.mount_point == "/sys/fs/cgroup/cpu,cpuacct"
    assert second.mount_point == "/mnt/my cg"
    assert second.root == "/sub"


def test_parse_mountinfo_rejects_truncated_line() -> None:
    with pytest.raises(DiscoveryError):
        parse_mountinfo("41 31 0:38 / - cgroup2\n")


def test_parse_proc_cgroup() -> None:
    paths = parse_proc_cgroup("12:cpu,cpuacct:/a\n1:name=systemd:/b\n0::/system.slice/x.service\n")
    assert paths == {"cpu": "/a", "cpuacct": "/a", "name=systemd": "/b",
                     "": "/system.slice/x.service"}
    with pytest.raises(DiscoveryError):
        parse_proc_cgroup("garbage\n")


@pytest.mark.parametrize(("path", "root", "expected"), [
    ("/a/b", "/", "a/b"), ("/", "/", ""), ("/a/b", "/a", "b"), ("/a", "/a", ""),
    ("/ab", "/a", None), ("/x", "/a", None)])
def test_relative_to_mount(path: str, root: str, expected: str | None) -> None:
    assert relative_to_mount(path, root) == expected


def test_detect_hybrid(hybrid_host: FakeHost) -> None:
    layout = hybrid_host.layout(root_name="dt-x")
    assert layout.mode is Mode.HYBRID
    assert layout.root == "dt-x"
    assert not layout.delegated
    names = [h.name for h in layout.hierarchies]
    assert names[-1] == "unified"  # tracking tree last
    assert set(names[:-1]) == {"cpu", "cpuacct", "memory", "pids"}  # not cpuset/freezer/systemd
    assert layout.controllers == {"cpu", "cpuacct", "memory", "pids"}
    assert layout.hierarchy_for("memory").fs.mount == hybrid_host.cg("memory")
    with pytest.raises(ControllerMissing) as info:
        layout.hierarchy_for("io")
    assert info.value.controller == "io"


def test_detect_v2(v2_host: FakeHost) -> None:
    layout = v2_host.layout()
    assert layout.mode is Mode.V2
    assert layout.v1 == ()
    assert layout.root == "dt-unit"
    assert {"memory", "cpu", "pids", "io"} <= layout.controllers
    assert layout.hierarchy_for("pids") is layout.unified
    assert layout.unified.fs.mount == v2_host.cg("unified")


def test_detect_default_root_name(v2_host: FakeHost) -> None:
    layout = detect(proc_root=v2_host.base / "proc", fs_root=v2_host.base,
                    fs_factory=v2_host.factory)
    assert layout.root == "dynoagent"


def test_detect_v2_missing_controllers(v2_host: FakeHost) -> None:
    v2_host.layout()  # creates the fake mount
    (v2_host.cg("unified") / "cgroup.controllers").write_text("cpu\n")
    layout = v2_host.layout()
    with pytest.raises(ControllerMissing):
        layout.hierarchy_for("memory")


def _delegated_v2(host: FakeHost) -> Layout:
    (host.base / "proc/self/cgroup").write_text("0::/system.slice/dynoagent.service\n")
    service = host.cg("unified", "system.slice/dynoagent.service")
    service.mkdir(parents=True)
    (service / "cgroup.controllers").write_text("memory pids\n")
    (service / "cgroup.subtree_control").write_text("")
    (service / "cgroup.procs").write_text("1234\n")
    return host.layout(delegation_check=lambda path: path == service)


def test_detect_delegated_root_is_own_cgroup(v2_host: FakeHost) -> None:
    v2_host.layout()
    layout = _delegated_v2(v2_host)
    assert layout.delegated
    assert layout.root == "system.slice/dynoagent.service"
    assert layout.own_path == "system.slice/dynoagent.service"
    assert layout.agent_leaf == "system.slice/dynoagent.service/agent.scope"
    assert layout.controllers == {"memory", "pids"}  # what was delegated, not the host's


def test_detect_delegation_can_be_disabled(v2_host: FakeHost) -> None:
    v2_host.layout()
    (v2_host.base / "proc/self/cgroup").write_text("0::/system.slice/dynoagent.service\n")
    layout = v2_host.layout(use_delegation=False, delegation_check=lambda path: True)
    assert not layout.delegated
    assert layout.root == "dt-unit"


def test_detect_root_cgroup_is_never_delegated(v2_host: FakeHost) -> None:
    layout = v2_host.layout(delegation_check=lambda path: True)
    assert not layout.delegated


def test_detect_without_cgroup2_is_refused(tmp_path: Path) -> None:
    (tmp_path / "proc/self").mkdir(parents=True)
    (tmp_path / "proc/self/mountinfo").write_text(
        "35 31 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n")
    (tmp_path / "proc/self/cgroup").write_text("4:memory:/\n")
    with pytest.raises(DiscoveryError, match="legacy"):
        detect(proc_root=tmp_path / "proc", fs_root=tmp_path)


def test_detect_missing_proc_files(tmp_path: Path) -> None:
    with pytest.raises(DiscoveryError) as info:
        detect(proc_root=tmp_path / "nope", fs_root=tmp_path)
    assert info.value.errno is not None


def test_detect_refuses_empty_root_name(v2_host: FakeHost) -> None:
    with pytest.raises(DiscoveryError):
        v2_host.layout(root_name="/")


def test_detect_real_host_reports_a_mode() -> None:
    # Read-only: parsing this machine's own proc files must give a coherent answer.
    if not Path("/proc/self/mountinfo").exists():
        pytest.skip("needs /proc")
    try:
        layout = detect(root_name="dt-probe")
    except DiscoveryError as exc:
        pytest.skip(f"host has no usable cgroup2 mount: {exc}")
    assert layout.mode in (Mode.V2, Mode.HYBRID)
    assert layout.unified.fs.exists("", "cgroup.procs")


def test_detect_root_override_judges_delegation_on_it(v2_host: FakeHost) -> None:
    # systemd mode (agent.daemon.dynoscope): the agent stays in its service's cgroup, its root
    # is the scope beside it, and only the scope is judged delegated.
    v2_host.layout()
    (v2_host.base / "proc/self/cgroup").write_text("0::/system.slice/dynoagent.service\n")
    scope = v2_host.cg("unified", "system.slice/dynoagent-dynos.scope")
    scope.mkdir(parents=True)
    (scope / "cgroup.controllers").write_text("cpu memory pids\n")
    layout = v2_host.layout(root="/system.slice/dynoagent-dynos.scope",
                            delegation_check=lambda path: path == scope)
    assert layout.root == "system.slice/dynoagent-dynos.scope"
    assert layout.delegated
    assert layout.own_path == "system.slice/dynoagent.service"
    assert layout.controllers == {"cpu", "memory", "pids"}  # the scope's
    plain = v2_host.layout(root="system.slice/dynoagent-dynos.scope",
                           delegation_check=lambda path: False)
    assert plain.root == "system.slice/dynoagent-dynos.scope" and not plain.delegated
