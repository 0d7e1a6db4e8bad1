"""The systemd tier's host-side logic without booting anything: the image's cache key, the
qemu command line, and the upgrade package's repacking."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.vm import systemd_harness as sh

KERNEL = sh.Kernel(vmlinuz=Path("/boot/vmlinuz-6.1.0-9-amd64"),
                   initrd=Path("/boot/initrd.img-6.1.0-9-amd64"), release="6.1.0-9-amd64")

needs_dpkg = pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")


@needs_dpkg
def test_image_key_follows_every_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hook = tmp_path / "customize.sh"
    hook.write_text("echo one\n")
    monkeypatch.setattr(sh, "CUSTOMIZE_HOOK", hook)
    monkeypatch.setattr(sh, "_tool_version", lambda argv: f"{argv[0]}-1.0")
    base = sh.image_key(sh.image_inputs(KERNEL))
    assert base == sh.image_key(sh.image_inputs(KERNEL))
    hook.write_text("echo two\n")
    assert sh.image_key(sh.image_inputs(KERNEL)) != base
    hook.write_text("echo one\n")
    other_kernel = sh.Kernel(KERNEL.vmlinuz, KERNEL.initrd, "6.1.0-10-amd64")
    assert sh.image_key(sh.image_inputs(other_kernel)) != base
    assert sh.image_key(sh.image_inputs(KERNEL, (*sh.PACKAGES, "libyaml-0-2"))) != base
    # Order and repetition of the package's own dependencies do not matter.
    assert sh.image_key(sh.image_inputs(KERNEL, (*sh.PACKAGES, *sh.PACKAGES))) == base
    monkeypatch.setattr(sh, "_tool_version", lambda argv: f"{argv[0]}-2.0")
    assert sh.image_key(sh.image_inputs(KERNEL)) != base


def test_qemu_boots_the_overlay_tcg_pure_v2_without_network(tmp_path: Path) -> None:
    argv = sh.qemu_argv(KERNEL, tmp_path / "overlay.qcow2", tmp_path / "payload.img",
                        tmp_path / "console.log")
    assert argv[argv.index("-accel") + 1].startswith("tcg")
    assert "-enable-kvm" not in argv
    assert argv[argv.index("-nic") + 1] == "none"
    assert "-no-reboot" in argv
    drives = [argv[i + 1] for i, a in enumerate(argv) if a == "-drive"]
    # The cached image is never a drive itself: only the qcow2 overlay backed by it.
    assert drives[0] == f"file={tmp_path / 'overlay.qcow2'},if=virtio,format=qcow2"
    assert drives[1].startswith(f"file={tmp_path / 'payload.img'},")
    cmdline = argv[argv.index("-append") + 1].split()
    assert {"root=/dev/vda", "systemd.unified_cgroup_hierarchy=1", "cgroup_no_v1=all",
            "console=ttyS0"} <= set(cmdline)


def test_mmdebstrap_runs_the_hook_and_installs_systemd_as_init() -> None:
    argv = sh.mmdebstrap_argv(Path("/x/root"))
    include = next(a for a in argv if a.startswith("--include=")).split("=", 1)[1].split(",")
    assert {"systemd", "systemd-sysv", "python3"} <= set(include)
    assert any(str(sh.CUSTOMIZE_HOOK) in a for a in argv if a.startswith("--customize-hook="))
    assert argv[-4:] == ["/x/root", *sh.SOURCES]


@needs_dpkg
def test_upgrade_package_has_a_newer_version_and_the_same_files(tmp_path: Path) -> None:
    root = tmp_path / "pkg"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/tool").write_text("#!/bin/sh\n")
    (root / "DEBIAN/control").write_text(
        "Package: dynoagent\nVersion: 0.1.0-1\nArchitecture: amd64\n"
        "Maintainer: t <t@localhost>\nDescription: t\n")
    deb = tmp_path / "dynoagent_0.1.0-1_amd64.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-b", str(root), str(deb)], check=True,
                   stdout=subprocess.DEVNULL)
    out = tmp_path / "out"
    out.mkdir()
    upgraded = sh.repack_with_version(deb, out)
    new = sh.deb_version(upgraded)
    assert new == "0.1.0-1+vmupgrade1"
    assert upgraded.name == f"dynoagent_{new}_amd64.deb"
    assert subprocess.run(["dpkg", "--compare-versions", new, "gt", "0.1.0-1"]).returncode == 0
    listing = subprocess.run(["dpkg-deb", "-c", str(upgraded)], capture_output=True,
                             text=True, check=True).stdout
    assert "./usr/bin/tool" in listing
    assert not (out / "repack").exists()


def test_find_deb_takes_the_newest(tmp_path: Path) -> None:
    assert sh.find_deb(tmp_path) is None
    old = tmp_path / "dynoagent_0.1.0_amd64.deb"
    new = tmp_path / "dynoagent_0.2.0_amd64.deb"
    old.write_text("")
    new.write_text("")
    os.utime(old, (1, 1))
    assert sh.find_deb(tmp_path) == new


def test_the_packages_dependencies_go_into_the_image() -> None:
    text = "python3 (>= 3.11), python3 (<< 3.12), tini, libc6:any (>= 2.34), foo | bar"
    assert sh.parse_depends(text) == ("foo", "libc6", "python3", "tini")
    include = next(a for a in sh.mmdebstrap_argv(Path("/r"), ("tini", "systemd", "tini"))
                   if a.startswith("--include="))
    assert include == "--include=systemd,tini"
