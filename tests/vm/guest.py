"""Guest side of the VM tier: makes /sys/fs/cgroup a lone cgroup2 mount with controllers,
runs a tiny OOM probe, the privileged cgroup tests and optionally the benchmark, and writes
what it saw and how it went to `<share>/result.json` for the host to judge."""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tests.support.pace import SCALE_ENV, scale_for, spawn_cost_s

CGROUP_MOUNT = Path("/sys/fs/cgroup")
WANTED_CONTROLLERS = ("memory", "cpu", "pids")
RESULT_NAME = "result.json"
# pyproject's per-test timeout, scaled like the tests' own deadlines.
PYTEST_TEST_TIMEOUT_S = 120
PROBE_MEMORY_MAX_BYTES = 32 << 20
PROBE_HOG_BYTES = 256 << 20


class GuestError(Exception):
    """A guest set-up step failed; carries the file, the value written and the errno."""

    def __init__(self, message: str, path: Path | str, value: str = "",
                 err: int | None = None) -> None:
        detail = f"{message}: path={path}"
        if value:
            detail += f" value={value!r}"
        if err is not None:
            detail += f" errno={errno.errorcode.get(err, err)}"
        super().__init__(detail)
        self.path = str(path)
        self.value = value
        self.errno = err


@dataclass(frozen=True)
class Mount:
    mount_point: str
    fstype: str
    source: str
    super_options: str


@dataclass
class CgroupView:
    """What the guest saw of its cgroup set-up; `layout` is judged from the mounts alone."""

    layout: str
    mounts: list[Mount]
    controllers: list[str]
    subtree_control: list[str]
    fixups: list[str] = field(default_factory=list)


def _unescape_mountinfo(text: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as three octal digits (\040).
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def parse_mountinfo(text: str) -> list[Mount]:
    mounts = []
    for line in text.splitlines():
        if not line.strip():
            continue
        left, _, right = line.partition(" - ")
        fields = left.split()
        tail = right.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        mounts.append(Mount(mount_point=_unescape_mountinfo(fields[4]), fstype=tail[0],
                            source=tail[1], super_options=tail[2]))
    return mounts


def cgroup_mounts(mounts: list[Mount]) -> list[Mount]:
    return [m for m in mounts if m.fstype in ("cgroup", "cgroup2")]


def classify_layout(mounts: list[Mount], root: str = str(CGROUP_MOUNT)) -> str:
    """`v2` only when the sole cgroup mount is cgroup2 at `root`; else hybrid, v1 or none."""
    cg = cgroup_mounts(mounts)
    if not cg:
        return "none"
    v1 = [m for m in cg if m.fstype == "cgroup"]
    v2 = [m for m in cg if m.fstype == "cgroup2"]
    if not v1 and len(v2) == 1 and v2[0].mount_point == root:
        return "v2"
    if v1 and v2:
        return "hybrid"
    return "v1" if v1 else "v2-elsewhere"


def _read_words(path: Path) -> list[str]:
    try:
        return path.read_text().split()
    except OSError:
        return []


def _write(path: Path, value: str) -> None:
    # os.write on an unbuffered fd: a buffered write can swallow the kernel's EINVAL/EBUSY.
    try:
        fd = os.open(path, os.O_WRONLY)
    except OSError as exc:
        raise GuestError("cannot open cgroup file", path, value, exc.errno) from exc
    try:
        os.write(fd, value.encode())
    except OSError as exc:
        raise GuestError("kernel refused write", path, value, exc.errno) from exc
    finally:
        os.close(fd)


def _own_mounts() -> list[Mount]:
    return parse_mountinfo(Path("/proc/self/mountinfo").read_text())


def prepare_cgroup2() -> CgroupView:
    """Leave exactly one cgroup2 mount at /sys/fs/cgroup with the wanted controllers on."""
    fixups: list[str] = []
    if classify_layout(_own_mounts()) != "v2":
        # virtme-ng-init (1.4x) mounts cgroup2 alone at /sys/fs/cgroup, but the bash
        # fallback init and older releases mount nothing or a v1/hybrid layout (a tmpfs with
        # v1 hierarchies and `unified` inside). This is the guest's own mount namespace, so
        # tearing it down cannot affect the host. Deepest first, so the tmpfs goes last;
        # with cgroup_no_v1=all on the command line no v1 hierarchy can hold a controller.
        prefix = str(CGROUP_MOUNT)
        under = [m for m in _own_mounts()
                 if m.mount_point == prefix or m.mount_point.startswith(prefix + "/")]
        for m in sorted(under, key=lambda m: m.mount_point.count("/"), reverse=True):
            subprocess.run(["umount", "-l", m.mount_point], check=False)
            fixups.append(f"umount {m.fstype} {m.mount_point}")
        CGROUP_MOUNT.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "cgroup2", "cgroup2", str(CGROUP_MOUNT)],
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise GuestError(f"mount cgroup2 failed: {done.stderr.strip()}", CGROUP_MOUNT)
        fixups.append(f"mount cgroup2 {CGROUP_MOUNT}")

    available = _read_words(CGROUP_MOUNT / "cgroup.controllers")
    enabled = _read_words(CGROUP_MOUNT / "cgroup.subtree_control")
    for name in WANTED_CONTROLLERS:
        if name in enabled:
            continue
        if name not in available:
            # A controller still bound to a v1 hierarchy is absent from cgroup.controllers;
            # the harness boots with cgroup_no_v1=all so this means the kernel lacks it.
            raise GuestError("controller not available in cgroup2 root",
                             CGROUP_MOUNT / "cgroup.controllers", name, errno.ENOENT)
        # The root cgroup is exempt from the no-internal-processes rule, so this works
        # even though every guest process sits in the root.
        _write(CGROUP_MOUNT / "cgroup.subtree_control", f"+{name}")
        fixups.append(f"enable +{name}")

    return CgroupView(
        layout=classify_layout(cgroup_mounts(_own_mounts())),
        mounts=cgroup_mounts(_own_mounts()),
        controllers=_read_words(CGROUP_MOUNT / "cgroup.controllers"),
        subtree_control=_read_words(CGROUP_MOUNT / "cgroup.subtree_control"),
        fixups=fixups,
    )


def simulate_hybrid() -> None:
    """Rebuild the guest's /sys/fs/cgroup the way a hybrid host has it (tmpfs, a named v1
    hierarchy, cgroup2 at `unified`), so that the fix-up in prepare_cgroup2 gets exercised.
    A named hierarchy carries no controller, so cgroup_no_v1=all does not refuse it."""
    subprocess.run(["umount", "-l", str(CGROUP_MOUNT)], check=True)
    steps = [
        ["mount", "-t", "tmpfs", "-o", "mode=755", "tmpfs", str(CGROUP_MOUNT)],
        ["mkdir", str(CGROUP_MOUNT / "unified"), str(CGROUP_MOUNT / "dtvm")],
        ["mount", "-t", "cgroup2", "cgroup2", str(CGROUP_MOUNT / "unified")],
        ["mount", "-t", "cgroup", "-o", "none,name=dtvm", "cgroup", str(CGROUP_MOUNT / "dtvm")],
    ]
    for argv in steps:
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise GuestError(f"{' '.join(argv)} failed: {done.stderr.strip()}", argv[-1])


def _memory_events(group: Path) -> dict[str, int]:
    events: dict[str, int] = {}
    for line in (group / "memory.events").read_text().splitlines():
        key, _, value = line.partition(" ")
        events[key] = int(value)
    return events


def _remove_group(group: Path, timeout_s: float) -> None:
    # rmdir can answer EBUSY for a moment after the last task was reaped, until the
    # kernel has finished taking the css offline.
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            group.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() >= deadline:
                raise GuestError("cannot remove probe cgroup", group, err=exc.errno) from exc
            time.sleep(0.02)


def probe_oom(timeout_s: float = 60.0) -> dict[str, Any]:
    """A hog in a group with memory.max=32M must die by SIGKILL and count in oom_kill."""
    group = CGROUP_MOUNT / f"dtvmprobe{os.getpid()}"
    group.mkdir()
    try:
        _write(group / "memory.max", str(PROBE_MEMORY_MAX_BYTES))
        # Without this a guest with swap would page the hog out instead of OOM-killing it.
        if (group / "memory.swap.max").exists():
            _write(group / "memory.swap.max", "0")
        hog = f"b = b'x' * {PROBE_HOG_BYTES}; print(len(b))"
        # The shell moves itself into the group and then execs, so the hog never runs
        # outside the limit.
        proc = subprocess.run(
            ["/bin/sh", "-c", 'echo 0 > "$0/cgroup.procs" && exec "$@"', str(group),
             sys.executable, "-c", hog],
            capture_output=True, text=True, timeout=timeout_s, check=False)
        events = _memory_events(group)
        exit_signal = -proc.returncode if proc.returncode < 0 else None
        return {
            "ok": exit_signal == signal.SIGKILL and events.get("oom_kill", 0) >= 1,
            "exit_signal": exit_signal,
            "returncode": proc.returncode,
            "memory_max": int((group / "memory.max").read_text()),
            "memory_events": events,
            "stderr_tail": proc.stderr[-400:],
        }
    finally:
        with contextlib.suppress(OSError):
            _write(group / "cgroup.kill", "1")
        _remove_group(group, timeout_s=5.0)


def _run_logged(argv: list[str], log: Path, timeout_s: float,
                env: dict[str, str]) -> dict[str, Any]:
    started = time.monotonic()
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            code: int | None = proc.wait(timeout=timeout_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            # The whole session: pytest may have children of its own stuck in a test.
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code, timed_out = None, True
    return {"argv": argv, "exit_code": code, "timed_out": timed_out,
            "duration_s": round(time.monotonic() - started, 2), "log": log.name}


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    # The project tree is shared read-only from the host; nothing should try to write there.
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.setdefault("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
    return env


def _uptime_s() -> float:
    return float(Path("/proc/uptime").read_text().split()[0])


def _write_result(share: Path, result: dict[str, Any]) -> None:
    tmp = share / f".{RESULT_NAME}.tmp"
    tmp.write_text(json.dumps(result, indent=2, sort_keys=True))
    tmp.rename(share / RESULT_NAME)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--share", type=Path, required=True)
    parser.add_argument("--pytest-path", action="append", default=[])
    parser.add_argument("--pytest-arg", action="append", default=[])
    parser.add_argument("--pytest-timeout-s", type=float, default=600.0)
    parser.add_argument("--bench", action="append", default=[])
    parser.add_argument("--bench-timeout-s", type=float, default=600.0)
    parser.add_argument("--simulate-hybrid", action="store_true")
    parser.add_argument("--host-spawn-s", type=float, default=None)
    args = parser.parse_args(argv)

    share: Path = args.share
    result: dict[str, Any] = {
        "guest_uptime_at_start_s": _uptime_s(),
        "kernel": platform.release(),
        "python": sys.executable,
        "python_prefix": sys.prefix,
        "net_interfaces": sorted(os.listdir("/sys/class/net")),
        "cgroup": None, "probe": None, "pytest": None, "bench": None, "error": None,
    }
    try:
        if args.simulate_hybrid:
            simulate_hybrid()
            result["layout_before"] = classify_layout(_own_mounts())
        view = prepare_cgroup2()
        result["cgroup"] = asdict(view)
        result["probe"] = probe_oom()
        env = _child_env()
        scale = 1.0
        if args.host_spawn_s is not None:
            # Deadlines scale with how much slower than the host this guest runs now.
            guest_spawn_s = spawn_cost_s()
            scale = scale_for(args.host_spawn_s, guest_spawn_s)
            env[SCALE_ENV] = f"{scale:.2f}"
            result["pace"] = {"host_spawn_s": args.host_spawn_s,
                              "guest_spawn_s": guest_spawn_s, "time_scale": scale}
        if args.pytest_path:
            per_test_s = int(PYTEST_TEST_TIMEOUT_S * scale)
            result["pytest"] = _run_logged(
                [sys.executable, "-m", "pytest", *args.pytest_path, "-p", "no:cacheprovider",
                 f"--junitxml={share / 'junit.xml'}", f"--timeout={per_test_s}",
                 *args.pytest_arg],
                share / "pytest.log", args.pytest_timeout_s, env)
        if args.bench:
            result["bench"] = _run_logged(
                [sys.executable, "-m", "tests.bench", *args.bench],
                share / "bench.log", args.bench_timeout_s, env)
    except Exception as exc:  # task root: whatever broke must reach the host as data
        result["error"] = f"{type(exc).__name__}: {exc}"
    result["guest_uptime_at_end_s"] = _uptime_s()
    _write_result(share, result)
    return 0 if result["error"] is None else 1


if __name__ == "__main__":
    sys.exit(main())
