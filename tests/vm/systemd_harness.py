"""Host side of the systemd tier: a small Debian 12 root built by mmdebstrap (cached, keyed by
its inputs) booted under qemu (TCG) with systemd as PID 1 on pure cgroup v2 and Debian's stock
kernel; the package under test and tests/vm/systemd_guest/scenarios.py go in on a second disk,
whose results come back out. `python -m tests.vm.systemd_harness` runs it by hand."""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.vm.harness import (
    PROJECT_ROOT,
    QEMU_BINARY,
    VmCapabilityMissing,
    VmError,
    VmTimeout,
    _tail,
    find_kernel,
)

GUEST_DIR = Path(__file__).resolve().parent / "systemd_guest"
CUSTOMIZE_HOOK = GUEST_DIR / "customize.sh"
SCENARIOS = GUEST_DIR / "scenarios.py"
CACHE_ROOT = Path(os.environ.get("DYNOAGENT_VM_SYSTEMD_CACHE",
                                 "/var/cache/dynoagent-tests/vm-systemd"))
# Bumped whenever the way the inputs become an image changes outside customize.sh.
IMAGE_FORMAT = 1
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
SOURCES = (f"deb {MIRROR} {SUITE} main", f"deb {MIRROR} {SUITE}-updates main",
           f"deb http://deb.debian.org/debian-security {SUITE}-security main")
# What a platform team's host has that the agent's package needs, and no more: systemd as
# init (dbus for systemctl's and systemd-analyze's bus calls), the agent's runtime tools
# (iproute2, nftables, tini, util-linux's nsenter/unshare, procps), kmod so that the kernel
# can load netfilter, bridge and veth modules, Python for the package's bundled venv.
PACKAGES = ("dbus", "iproute2", "kmod", "nftables", "procps", "python3", "python3-venv",
            "systemd", "systemd-sysv", "tini", "util-linux")
DPKG_OPTIONS = ("path-exclude=/usr/share/man/*", "path-exclude=/usr/share/info/*",
                "path-exclude=/usr/share/doc/*", "path-include=/usr/share/doc/*/copyright",
                "path-exclude=/usr/share/locale/*")
HOOK_DIRS = ("/usr/share/mmdebstrap/hooks/maybe-merged-usr",)
SOURCE_DATE_EPOCH = "1686355200"
# Room for the agent's state, slugs, the journal and an upgrade, above the packages.
IMAGE_FREE_BYTES = 768 << 20
PAYLOAD_BYTES = 512 << 20
RESULT_DIR = "out"
RESULT_NAME = "result.json"
# The guest runs scenarios.py once per boot; it asks for a second boot (the reboot scenario)
# by writing `next_boot` into its result. More boots than this is a runaway.
MAX_BOOTS = 3
# Measured on this host under TCG: ≈ 35 s to multi-user; scenarios scale their own deadlines
# with the guest's measured speed, this bound is only the host's last resort.
BOOT_TIMEOUT_S = float(os.environ.get("DYNOAGENT_VM_SYSTEMD_TIMEOUT_S", "1500"))


class ImageBuildFailed(VmError):
    def __init__(self, step: str, log: Path) -> None:
        super().__init__(f"the systemd guest image failed at {step}; log: {log} ends with:\n"
                         f"{_tail(log)}")
        self.step = step
        self.log = log


@dataclass(frozen=True)
class Kernel:
    vmlinuz: Path
    initrd: Path
    release: str


@dataclass(frozen=True)
class Image:
    path: Path
    key: str
    built_s: float | None  # None: found in the cache


@dataclass
class BootRecord:
    wall_s: float
    returncode: int
    console_log: Path


@dataclass
class SystemdRunResult:
    work: Path
    image: Image
    boots: list[BootRecord]
    guest: dict[str, Any]
    files: dict[str, str] = field(default_factory=dict)

    def scenario(self, name: str) -> dict[str, Any] | None:
        for entry in self.guest.get("scenarios", []):
            if entry.get("name") == name:
                return dict(entry)
        return None


def find_guest_kernel() -> Kernel:
    vmlinuz = find_kernel()
    release = vmlinuz.name.removeprefix("vmlinuz-")
    initrd = vmlinuz.parent / f"initrd.img-{release}"
    if not initrd.is_file():
        raise VmCapabilityMissing(f"{initrd} (update-initramfs -c -k {release})")
    return Kernel(vmlinuz=vmlinuz, initrd=initrd, release=release)


def check_capabilities() -> Kernel:
    """Raise VmCapabilityMissing for the first missing tool; the kernel to boot otherwise."""
    if os.geteuid() != 0:
        raise VmCapabilityMissing("root (mmdebstrap --mode=root, /boot/vmlinuz-* readable)")
    tools = {QEMU_BINARY: "qemu-system-x86", "qemu-img": "qemu-utils",
             "mmdebstrap": "mmdebstrap", "mkfs.ext4": "e2fsprogs", "debugfs": "e2fsprogs",
             "dpkg-deb": "dpkg"}
    for tool, package in tools.items():
        if shutil.which(tool) is None:
            raise VmCapabilityMissing(f"{tool} (apt-get install {package})")
    return find_guest_kernel()


def _tool_version(argv: Sequence[str]) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout.strip()


def image_inputs(kernel: Kernel, packages: Sequence[str] = PACKAGES) -> dict[str, Any]:
    """Everything the image depends on (the archive's contents aside), as JSON data."""
    return {"format": IMAGE_FORMAT, "suite": SUITE, "sources": list(SOURCES),
            "packages": sorted(set(packages)), "dpkg_options": list(DPKG_OPTIONS),
            "hook_dirs": list(HOOK_DIRS), "source_date_epoch": SOURCE_DATE_EPOCH,
            "customize_sha256": hashlib.sha256(CUSTOMIZE_HOOK.read_bytes()).hexdigest(),
            "mmdebstrap": _tool_version(["mmdebstrap", "--version"]),
            "architecture": _tool_version(["dpkg", "--print-architecture"]),
            "kernel_release": kernel.release}


def image_key(inputs: dict[str, Any]) -> str:
    canonical = json.dumps(inputs, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def mmdebstrap_argv(target: Path, packages: Sequence[str] = PACKAGES) -> list[str]:
    return ["mmdebstrap", "--mode=root", "--variant=essential", "--format=directory",
            f"--include={','.join(sorted(set(packages)))}",
            *(f"--dpkgopt={option}" for option in DPKG_OPTIONS),
            *(f"--hook-dir={hooks}" for hooks in HOOK_DIRS),
            f"--customize-hook=sh {CUSTOMIZE_HOOK} \"$1\"",
            SUITE, str(target), *SOURCES]


def _dir_bytes(root: Path) -> int:
    done = subprocess.run(["du", "-sb", "--apparent-size", str(root)], capture_output=True,
                          text=True, check=True)
    return int(done.stdout.split()[0])


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def ensure_image(kernel: Kernel, packages: Sequence[str] = PACKAGES, *,
                 log=sys.stderr) -> Image:  # type: ignore[no-untyped-def]
    """The cached ext4 root image for these inputs; built (≈ 1 min) when missing. Several
    concurrent runs build it once: the second waits on the lock and finds it."""
    inputs = image_inputs(kernel, packages)
    key = image_key(inputs)
    final = CACHE_ROOT / key
    image = final / "rootfs.img"
    if (final / ".complete").is_file():
        return Image(path=image, key=key, built_s=None)
    with _locked(CACHE_ROOT / ".lock"):
        if (final / ".complete").is_file():
            return Image(path=image, key=key, built_s=None)
        started = time.monotonic()
        work = Path(tempfile.mkdtemp(prefix=f".build-{key}-", dir=CACHE_ROOT))
        build_log = work / "build.log"
        try:
            root = work / "root"
            env = {**os.environ, "SOURCE_DATE_EPOCH": SOURCE_DATE_EPOCH, "LC_ALL": "C.UTF-8",
                   "DEBIAN_FRONTEND": "noninteractive",
                   "DYNOAGENT_VM_KERNEL_RELEASE": kernel.release}
            print(f"building the systemd guest image {key} (mmdebstrap, {SUITE}) ...",
                  file=log, flush=True)
            with build_log.open("wb") as out:
                done = subprocess.run(mmdebstrap_argv(root, packages), stdout=out,
                                      stderr=subprocess.STDOUT, env=env, check=False)
            if done.returncode != 0:
                raise ImageBuildFailed("mmdebstrap", build_log)
            size = _dir_bytes(root) + IMAGE_FREE_BYTES
            size -= size % (1 << 20)
            with build_log.open("ab") as out:
                done = subprocess.run(
                    ["mkfs.ext4", "-q", "-F", "-L", "dtroot", "-E", "root_owner=0:0",
                     "-d", str(root), str(work / "rootfs.img"), str(size // 1024) + "k"],
                    stdout=out, stderr=subprocess.STDOUT, check=False)
            if done.returncode != 0:
                raise ImageBuildFailed("mkfs.ext4 -d", build_log)
            shutil.rmtree(root)
            (work / "inputs.json").write_text(json.dumps(inputs, indent=2, sort_keys=True))
            (work / ".complete").write_text("")
            shutil.rmtree(final, ignore_errors=True)
            work.rename(final)
        except BaseException:
            # Keep the log of a failed build next to nothing else.
            if build_log.is_file():
                shutil.copy(build_log, CACHE_ROOT / f"failed-{key}.log")
            shutil.rmtree(work, ignore_errors=True)
            raise
        built_s = time.monotonic() - started
        print(f"built {image} in {built_s:.0f}s", file=log, flush=True)
        _prune(keep=final)
        return Image(path=image, key=key, built_s=built_s)


def _prune(keep: Path, kept_others: int = 1) -> None:
    """Remove all but the newest `kept_others` images besides `keep` (≈ 300 MB each): a
    package whose dependencies changed builds a new one. Called under the lock."""
    others = sorted((d for d in CACHE_ROOT.iterdir()
                     if d.is_dir() and d != keep and (d / ".complete").is_file()),
                    key=lambda d: (d / ".complete").stat().st_mtime, reverse=True)
    for old in others[kept_others:]:
        shutil.rmtree(old, ignore_errors=True)


def parse_depends(text: str) -> tuple[str, ...]:
    """Package names of a Depends field: the first of each alternative, without versions
    or architecture qualifiers."""
    names = []
    for clause in text.split(","):
        first = clause.split("|")[0].strip()
        name = re.split(r"[\s(:]", first, maxsplit=1)[0]
        if name:
            names.append(name)
    return tuple(sorted(set(names)))


def deb_depends(deb: Path) -> tuple[str, ...]:
    """What the package needs installed: the guest has no network, so its image carries
    these (and a change of them builds a new image)."""
    done = subprocess.run(["dpkg-deb", "-f", str(deb), "Pre-Depends", "Depends"],
                          capture_output=True, text=True, check=True)
    fields = re.sub(r"\n\s+", " ", done.stdout)
    return parse_depends(",".join(line.split(":", 1)[1] for line in fields.splitlines()
                                  if ":" in line))


def deb_version(deb: Path) -> str:
    return _tool_version(["dpkg-deb", "-f", str(deb), "Version"])


def bump_version(version: str) -> str:
    """A version dpkg orders after `version` (the upgrade scenario's package)."""
    return f"{version}+vmupgrade1"


def repack_with_version(deb: Path, out_dir: Path) -> Path:
    """The same package with a bumped version in its control file: what an upgrade installs."""
    unpacked = out_dir / "repack"
    subprocess.run(["dpkg-deb", "-R", str(deb), str(unpacked)], check=True)
    control = unpacked / "DEBIAN" / "control"
    old = deb_version(deb)
    new = bump_version(old)
    text = re.sub(r"(?m)^Version: .*$", f"Version: {new}", control.read_text())
    control.write_text(text)
    package = _tool_version(["dpkg-deb", "-f", str(deb), "Package"])
    arch = _tool_version(["dpkg-deb", "-f", str(deb), "Architecture"])
    upgraded = out_dir / f"{package}_{new}_{arch}.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "-b", str(unpacked),
                    str(upgraded)], check=True, stdout=subprocess.DEVNULL)
    shutil.rmtree(unpacked)
    return upgraded


def find_deb(dist: Path = PROJECT_ROOT / "dist") -> Path | None:
    """The newest dist/dynoagent_*.deb that `make deb` left, if any."""
    debs = sorted(dist.glob("dynoagent_*.deb"), key=lambda p: p.stat().st_mtime)
    return debs[-1] if debs else None


def make_payload(work: Path, deb: Path, upgrade_deb: Path, config: dict[str, Any]) -> Path:
    """The second disk: the packages, the scenario script and its parameters, and an empty
    out/ for the results (ext4, made with mkfs.ext4 -d: no loop mount)."""
    tree = work / "payload"
    (tree / RESULT_DIR).mkdir(parents=True)
    shutil.copy(deb, tree / "install.deb")
    shutil.copy(upgrade_deb, tree / "upgrade.deb")
    shutil.copy(SCENARIOS, tree / "scenarios.py")
    (tree / "config.json").write_text(json.dumps(config, indent=2))
    image = work / "payload.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "dtpayload", "-E", "root_owner=0:0",
                    "-d", str(tree), str(image), str(PAYLOAD_BYTES // 1024) + "k"],
                   check=True, stdout=subprocess.DEVNULL)
    shutil.rmtree(tree)
    return image


def read_payload(payload: Path, dest: Path) -> None:
    """Copy out/ of the payload disk to `dest` with debugfs (no mount needed)."""
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(["debugfs", "-R", f"rdump /{RESULT_DIR} {dest}", str(payload)],
                   check=True, capture_output=True)


def kernel_cmdline() -> str:
    return " ".join([
        "root=/dev/vda", "rw", "rootfstype=ext4", "console=ttyS0",
        # Pure cgroup v2: systemd mounts cgroup2 alone and no v1 hierarchy claims a
        # controller (bookworm's systemd 252 defaults to unified; said anyway).
        "systemd.unified_cgroup_hierarchy=1", "cgroup_no_v1=all",
        "panic=-1", "net.ifnames=0", "loglevel=4", "systemd.show_status=1",
        # The host bounds the run; a guest that cannot power off must not hang on a prompt.
        "systemd.crash_reboot=1",
    ])


def qemu_argv(kernel: Kernel, overlay: Path, payload: Path, console_log: Path, *,
              cpus: int = 2, memory_mb: int = 2048) -> list[str]:
    return [
        QEMU_BINARY, "-machine", "pc",
        # KVM on these machines cannot boot stock kernels: software emulation, one host
        # thread per guest CPU.
        "-accel", "tcg,thread=multi", "-cpu", "max", "-smp", str(cpus), "-m", str(memory_mb),
        "-kernel", str(kernel.vmlinuz), "-initrd", str(kernel.initrd),
        "-append", kernel_cmdline(),
        # The cached image is only ever the backing file of this run's qcow2 overlay.
        "-drive", f"file={overlay},if=virtio,format=qcow2",
        "-drive", f"file={payload},if=virtio,format=raw",
        "-device", "virtio-rng-pci",
        # No NIC at all: the guest can send no traffic.
        "-nic", "none",
        "-display", "none", "-monitor", "none", "-serial", f"file:{console_log}",
        # A reboot ends qemu: the host decides whether to boot the same overlay again.
        "-no-reboot",
    ]


def boot(kernel: Kernel, overlay: Path, payload: Path, console_log: Path,
         timeout_s: float) -> BootRecord:
    started = time.monotonic()
    proc = subprocess.Popen(qemu_argv(kernel, overlay, payload, console_log),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        # Our own qemu, by its pid; it has no children.
        proc.kill()
        proc.communicate()
        raise VmTimeout(timeout_s, console_log) from None
    if proc.returncode != 0:
        raise VmError(f"qemu exited with {proc.returncode}: {stderr.decode(errors='replace')}")
    return BootRecord(wall_s=time.monotonic() - started, returncode=proc.returncode,
                      console_log=console_log)


def run_systemd_host(deb: Path, *, work: Path, guest_config: dict[str, Any] | None = None,
                     log=sys.stderr) -> SystemdRunResult:  # type: ignore[no-untyped-def]
    """Build or find the image, boot it (twice: the reboot scenario) with `deb` on the
    payload disk, and return what the guest reported."""
    kernel = check_capabilities()
    image = ensure_image(kernel, (*PACKAGES, *deb_depends(deb)), log=log)
    upgrade = repack_with_version(deb, work)
    config = {"deb_version": deb_version(deb), "upgrade_version": deb_version(upgrade),
              **(guest_config or {})}
    payload = make_payload(work, deb, upgrade, config)
    overlay = work / "overlay.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b",
                    str(image.path), str(overlay)], check=True)
    boots: list[BootRecord] = []
    guest: dict[str, Any] = {}
    out = work / "results"
    for n in range(1, MAX_BOOTS + 1):
        print(f"boot {n} ...", file=log, flush=True)
        boots.append(boot(kernel, overlay, payload, work / f"console-{n}.log", BOOT_TIMEOUT_S))
        shutil.rmtree(out, ignore_errors=True)
        read_payload(payload, out)
        result_path = out / RESULT_DIR / RESULT_NAME
        if not result_path.is_file():
            raise VmError(f"boot {n}: the guest wrote no {RESULT_NAME}; console "
                          f"{boots[-1].console_log} ends with:\n{_tail(boots[-1].console_log)}")
        guest = json.loads(result_path.read_text())
        if guest.get("boot") != n:
            raise VmError(f"boot {n}: the guest's result is from boot {guest.get('boot')}; "
                          f"console ends with:\n{_tail(boots[-1].console_log)}")
        if not guest.get("next_boot"):
            break
    files = {p.name: _tail(p, 400_000) for p in sorted((out / RESULT_DIR).glob("*"))
             if p.is_file() and p.name != RESULT_NAME}
    return SystemdRunResult(work=work, image=image, boots=boots, guest=guest, files=files)


def summary(result: SystemdRunResult) -> str:
    g = result.guest
    built = result.image.built_s
    lines = [f"work: {result.work}",
             f"image: {result.image.path} "
             f"({'cached' if built is None else f'built in {built:.0f}s'})",
             "boots: " + ", ".join(f"{b.wall_s:.0f}s" for b in result.boots),
             f"guest: kernel {g.get('kernel')} slowness x{g.get('slowness')} "
             f"cgroup {g.get('cgroup_layout')} systemd {g.get('systemd_version')}",
             f"security exposure: {g.get('security_exposure')}",
             f"error: {g.get('error')}"]
    for entry in g.get("scenarios", []):
        mark = "PASS" if entry.get("ok") else "FAIL"
        lines.append(f"  {mark} {entry.get('name')} ({entry.get('seconds', 0):.1f}s): "
                     f"{str(entry.get('detail'))[:600]}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the systemd-host scenarios in a VM.")
    parser.add_argument("--deb", type=Path, help="package to test (default: newest dist/*.deb)")
    parser.add_argument("--image-only", action="store_true", help="only build/find the image")
    parser.add_argument("--keep", action="store_true", help="keep the work dir")
    parser.add_argument("--unit-dropin", metavar="TEXT",
                        help="a drop-in for dynoagent.service, installed before the start "
                             "(to try a change to the unit without rebuilding the package)")
    args = parser.parse_args(argv)
    if args.image_only:
        print(ensure_image(check_capabilities()))
        return 0
    deb = args.deb or find_deb()
    if deb is None:
        print("no dist/dynoagent_*.deb: run `make deb` or give --deb", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="dtvmsd-"))
    try:
        guest_config = {"unit_dropin": args.unit_dropin} if args.unit_dropin else None
        result = run_systemd_host(deb, work=work, guest_config=guest_config)
    except VmError as exc:
        print(exc, file=sys.stderr)
        return 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(summary(result))
    ok = result.guest.get("error") is None and all(
        e.get("ok") for e in result.guest.get("scenarios", []))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
