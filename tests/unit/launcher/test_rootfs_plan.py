"""plan_rootfs() is pure: these tests pin the shape of a dyno's filesystem without root."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from agent.launcher import rootfs
from agent.launcher import syscalls as sc
from agent.launcher.rootfs import Mask, Mkdir, Mount, PivotRoot, ReadOnly


def _plan(**kw: object) -> list[rootfs.Op]:
    args: dict[str, object] = dict(stack_dir="/stacks/heroku-24", slug_dir="/slugs/abc",
                                   dyno_dir="/run/dynoagent/dynos/d1",
                                   writable_limit_bytes=1 << 26, uid=400007, gid=400008,
                                   hide_paths=("/var/lib/dynoagent", "/run/dynoagent"))
    args.update(kw)
    return rootfs.plan_rootfs(**args)  # type: ignore[arg-type]


def _split(plan: list[rootfs.Op]) -> tuple[list[rootfs.Op], list[rootfs.Op]]:
    pivots = [i for i, op in enumerate(plan) if isinstance(op, PivotRoot)]
    assert len(pivots) == 1
    return plan[:pivots[0]], plan[pivots[0] + 1:]


def test_first_op_is_the_size_limited_scratch_tmpfs() -> None:
    first = _plan()[0]
    assert first == Mount("tmpfs", "/run/dynoagent/dynos/d1", "tmpfs",
                          sc.MS_NOSUID | sc.MS_NODEV, f"size={1 << 26},mode=0755")


def test_before_pivot_nothing_is_mounted_or_made_outside_the_dyno_dir() -> None:
    before, _ = _split(_plan(etc_files={"hosts": "x\n"}))
    assert any(isinstance(op, rootfs.BindFile) for op in before)
    for op in before:
        target = (op.target if isinstance(op, Mount | rootfs.IdmappedBind)
                  else op.root if isinstance(op, rootfs.BindFile)
                  else getattr(op, "path", None))
        assert target is not None
        assert target == "/run/dynoagent/dynos/d1" or target.startswith(
            "/run/dynoagent/dynos/d1/"), op


def test_complete_stack_is_bind_mounted_read_only() -> None:
    before, _ = _split(_plan())
    root = "/run/dynoagent/dynos/d1/root"
    binds = [op for op in before if isinstance(op, Mount) and op.target == root]
    assert binds[0] == Mount("/stacks/heroku-24", root, None, sc.MS_BIND)
    assert binds[1].flags & (sc.MS_REMOUNT | sc.MS_RDONLY | sc.MS_BIND) == (
        sc.MS_REMOUNT | sc.MS_RDONLY | sc.MS_BIND)
    assert binds[1].flags & sc.MS_REC == 0  # host submounts never come along


def test_incomplete_stack_gets_a_read_only_overlay_with_a_skeleton() -> None:
    before, _ = _split(_plan(stack_dir="/", stack_complete=False))
    root = [op for op in before if isinstance(op, Mount)
            and op.target == "/run/dynoagent/dynos/d1/root"]
    assert len(root) == 1 and root[0].fstype == "overlay"
    assert root[0].flags & sc.MS_RDONLY
    assert root[0].data == "lowerdir=/run/dynoagent/dynos/d1/skel:/"
    assert "upperdir" not in (root[0].data or "")
    skel = {op.path for op in before if isinstance(op, Mkdir)}
    assert {f"/run/dynoagent/dynos/d1/skel/{m}" for m in rootfs.MOUNT_POINTS} <= skel


def test_app_is_an_overlay_on_the_idmapped_slug_with_an_upper_owned_by_the_dyno_user() -> None:
    plan = _plan()
    idmapped = [op for op in plan if isinstance(op, rootfs.IdmappedBind)]
    assert idmapped == [rootfs.IdmappedBind("/slugs/abc", "/run/dynoagent/dynos/d1/slug",
                                            400007, 400008)]
    app = next(op for op in plan if isinstance(op, Mount)
               and op.target == "/run/dynoagent/dynos/d1/root/app")
    assert plan.index(idmapped[0]) < plan.index(app)
    assert app.fstype == "overlay"
    d1 = "/run/dynoagent/dynos/d1"
    assert app.data == f"lowerdir={d1}/slug,upperdir={d1}/app-upper,workdir={d1}/app-work"
    plain = next(op for op in _plan(idmap_slug=False) if isinstance(op, Mount)
                 and op.target == "/run/dynoagent/dynos/d1/root/app")
    assert plain.data is not None and plain.data.startswith("lowerdir=/slugs/abc,")
    upper = next(op for op in plan if isinstance(op, Mkdir) and op.path.endswith("app-upper"))
    assert (upper.uid, upper.gid) == (400007, 400008)
    tmp = next(op for op in plan if isinstance(op, Mkdir) and op.path.endswith("/d1/tmp"))
    assert tmp.mode == 0o1777


def test_proc_and_sys_are_fresh_and_sys_is_read_only() -> None:
    before, _ = _split(_plan())
    fstypes = {op.fstype: op for op in before if isinstance(op, Mount) and op.fstype}
    assert fstypes["proc"].target.endswith("/root/proc")
    assert fstypes["sysfs"].flags & sc.MS_RDONLY
    assert fstypes["devpts"].data is not None and "newinstance" in fstypes["devpts"].data


def test_masks_and_hidden_paths_resolve_inside_the_new_root() -> None:
    _, after = _split(_plan())
    masked = {op.path for op in after if isinstance(op, Mask)}
    read_only = {op.path for op in after if isinstance(op, ReadOnly)}
    assert {"/proc/kcore", "/proc/keys", "/proc/timer_list", "/sys/firmware"} <= masked
    assert {"/var/lib/dynoagent", "/run/dynoagent"} <= masked
    assert {"/proc/sys", "/proc/sysrq-trigger"} <= read_only
    assert all(not isinstance(op, Mount) for op in after)


def test_etc_files_are_written_to_scratch_and_bound_inside_the_root_before_pivot() -> None:
    files = {"hosts": "127.0.0.1\tlocalhost\n", "hostname": "web-1\n"}
    plan = _plan(etc_files=files)
    before, _ = _split(plan)
    d1 = "/run/dynoagent/dynos/d1"
    writes = [op for op in before if isinstance(op, rootfs.WriteFile)]
    binds = [op for op in before if isinstance(op, rootfs.BindFile)]
    assert writes == [rootfs.WriteFile(f"{d1}/etc/hosts", files["hosts"]),
                      rootfs.WriteFile(f"{d1}/etc/hostname", files["hostname"])]
    assert binds == [rootfs.BindFile(f"{d1}/etc/hosts", f"{d1}/root", "/etc/hosts"),
                     rootfs.BindFile(f"{d1}/etc/hostname", f"{d1}/root", "/etc/hostname")]
    for write, bind in zip(writes, binds, strict=True):
        assert plan.index(write) < plan.index(bind)
    # After the stack's root exists, so the target is the stack's file.
    root_mount = max(i for i, op in enumerate(plan)
                     if isinstance(op, Mount) and op.target == f"{d1}/root")
    assert all(plan.index(b) > root_mount for b in binds)
    assert not any(isinstance(op, rootfs.WriteFile | rootfs.BindFile) for op in _plan())


def test_write_file_is_exclusive_and_keeps_its_mode(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        rootfs.apply([rootfs.WriteFile(str(tmp_path / "hosts"), "a\n")])
    finally:
        os.umask(old)
    assert (tmp_path / "hosts").read_text() == "a\n"
    assert (tmp_path / "hosts").stat().st_mode & 0o777 == 0o644
    with pytest.raises(rootfs.RootfsError) as info:
        rootfs.apply([rootfs.WriteFile(str(tmp_path / "hosts"), "b\n")])
    assert info.value.errno == errno.EEXIST


def test_minimal_dev_has_exactly_the_oci_devices() -> None:
    nodes = {(op.path.rsplit("/", 1)[1], op.major, op.minor) for op in _plan()
             if isinstance(op, rootfs.Mknod)}
    assert nodes == {("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8),
                     ("urandom", 1, 9), ("tty", 5, 0)}


def test_stack_has_mount_points(tmp_path: Path) -> None:
    assert not rootfs.stack_has_mount_points(str(tmp_path))
    for name in rootfs.MOUNT_POINTS:
        (tmp_path / name).mkdir()
    assert rootfs.stack_has_mount_points(str(tmp_path))
    (tmp_path / "app").rmdir()
    (tmp_path / "app").symlink_to("tmp")  # a symlinked mount point could lead anywhere
    assert not rootfs.stack_has_mount_points(str(tmp_path))


def test_apply_makes_dirs_and_links_and_names_the_failing_op(tmp_path: Path) -> None:
    rootfs.apply([Mkdir(str(tmp_path / "t"), 0o1777), rootfs.Symlink("t", str(tmp_path / "l"))])
    assert oct((tmp_path / "t").stat().st_mode & 0o7777) == oct(0o1777)
    assert os.readlink(tmp_path / "l") == "t"
    with pytest.raises(rootfs.RootfsError) as info:
        rootfs.apply([Mkdir(str(tmp_path / "t"))])
    assert info.value.errno == errno.EEXIST
    assert "Mkdir" in str(info.value)


def test_masking_a_missing_path_is_a_no_op(tmp_path: Path) -> None:
    rootfs.apply([Mask(str(tmp_path / "absent")), ReadOnly(str(tmp_path / "absent"))])


def test_an_idmapped_bind_without_a_user_namespace_is_refused(tmp_path: Path) -> None:
    with pytest.raises(rootfs.RootfsError) as info:
        rootfs.apply([rootfs.IdmappedBind(str(tmp_path), str(tmp_path), 400001, 400001)])
    assert "user namespace" in str(info.value)


def test_a_build_dyno_gets_its_host_dir_read_write_at_app_and_binds_under_tmp() -> None:
    d1 = "/run/dynoagent/dynos/d1"
    plan = _plan(app_dir="/run/dynoagent/builds/b1/app",
                 binds=(("/run/dynoagent/builds/b1/build", "build", False),
                        ("/var/lib/dynoagent/build-cache/a", "cache", True)))
    assert not any(isinstance(op, rootfs.IdmappedBind) for op in plan)
    app = [op for op in plan if isinstance(op, Mount) and op.target == f"{d1}/root/app"]
    assert app[0] == Mount("/run/dynoagent/builds/b1/app", f"{d1}/root/app", None, sc.MS_BIND)
    assert app[1].flags & (sc.MS_REMOUNT | sc.MS_NOSUID | sc.MS_NODEV) == (
        sc.MS_REMOUNT | sc.MS_NOSUID | sc.MS_NODEV)
    assert not app[1].flags & sc.MS_RDONLY and len(app) == 2  # no overlay over it
    build = [op for op in plan if isinstance(op, Mount) and op.target == f"{d1}/tmp/build"]
    cache = [op for op in plan if isinstance(op, Mount) and op.target == f"{d1}/tmp/cache"]
    assert build[0].source == "/run/dynoagent/builds/b1/build" and build[1].flags & sc.MS_RDONLY
    assert cache[0].source == "/var/lib/dynoagent/build-cache/a"
    assert not cache[1].flags & sc.MS_RDONLY and cache[1].flags & sc.MS_NOSUID
    # /tmp carries the binds along into the new root.
    tmp = next(op for op in plan if isinstance(op, Mount) and op.target == f"{d1}/root/tmp")
    assert tmp.flags & sc.MS_REC and plan.index(cache[1]) < plan.index(tmp)
