"""Launch latency: our launcher vs `runc run` and `crun run`, same command and isolation.

Each sample runs `tini -- /bin/true` in a busybox-static rootfs with pid, mount, uts, ipc and
cgroup namespaces, a cgroup with memory/pids/cpu limits created for that run and removed after
it, one pre-made network namespace (created once with `ip netns add` and REUSED by every run of
every runtime: making and wiring the netns is the netns library's cost, not the launcher's),
a read-only root, /app from a slug directory (ours: overlay with a tmpfs upper; runc/crun: a
read-only bind), /tmp tmpfs, uid 400001, no capabilities, RLIMIT_NOFILE 10000 and RLIMIT_CORE
0. Ours also writes and binds its own /etc/hosts, hostname and resolv.conf (runc/crun do not).
A sample ends when the container has exited and been reaped. Prints medians, p99 and ratios;
asserts nothing. Ours runs with the dyno seccomp filter (as in production) and, interleaved in
the same run, without it: the difference is what the filter costs a launch (goal <= 0.5 ms).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from agent.launcher import LaunchRequest, launch, seccomp
from agent.launcher import syscalls as sc
from tests.support.bench import launch_bench_skipped

RUNS = int(os.environ.get("BENCH_LAUNCH_RUNS", "100"))
WARMUP = 5
UID = 400001
HIERARCHIES = ("memory", "pids", "cpu", "unified")
LIMITS = (("memory", "memory.limit_in_bytes", "536870912"), ("pids", "pids.max", "256"),
          ("cpu", "cpu.shares", "1024"))


def _percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _build_rootfs(base: Path) -> Path:
    rootfs = base / "rootfs"
    for d in ("bin", "sbin", "app", "dev", "proc", "sys", "tmp", "etc"):
        (rootfs / d).mkdir(parents=True)
    shutil.copy("/bin/busybox", rootfs / "bin" / "busybox")
    for applet in ("sh", "true"):
        (rootfs / "bin" / applet).symlink_to("busybox")
    shutil.copy("/usr/bin/tini-static", rootfs / "sbin" / "tini")
    # Present, so our launcher pays for covering them in the busybox runs as well.
    for name in ("hosts", "hostname", "resolv.conf"):
        (rootfs / "etc" / name).write_text("")
    return rootfs


@contextlib.contextmanager
def _cgroup(name: str) -> Iterator[tuple[str, ...]]:
    made: list[Path] = []
    try:
        for hierarchy in HIERARCHIES:
            path = Path("/sys/fs/cgroup") / hierarchy / name
            path.mkdir()
            made.append(path)
        for hierarchy, knob, value in LIMITS:
            fd = os.open(f"/sys/fs/cgroup/{hierarchy}/{name}/{knob}", os.O_WRONLY)
            try:
                os.write(fd, value.encode())
            finally:
                os.close(fd)
        yield tuple(str(p / "cgroup.procs") for p in made)
    finally:
        for path in reversed(made):
            path.rmdir()


def _ours(rootfs: Path, slug: Path, work: Path, netns: str, stack: str,
          launch_only: list[float], phases: dict[str, list[float]] | None = None,
          idmap_slug: bool = True, own_etc: bool = True,
          seccomp_filter: bool = True) -> Callable[[int], None]:
    reaper = "/usr/bin/tini-static" if stack != "/" else "/usr/bin/tini"
    argv = ("/bin/true",)

    def one(i: int) -> None:
        dyno_dir = work / f"d{i}"
        dyno_dir.mkdir()
        with _cgroup(f"dtbo{secrets.token_hex(4)}") as procs:
            req = LaunchRequest(
                dyno_id=f"bench-{i}", hostname=f"bench-{i}", argv=argv,
                env=(("PATH", "/bin:/usr/bin"),), uid=UID, gid=UID, stack_dir=stack,
                slug_dir=str(slug), dyno_dir=str(dyno_dir), writable_limit_bytes=64 << 20,
                cgroup_procs=procs, netns_path=f"/run/netns/{netns}",
                hide_paths=(str(work),), reaper=reaper, idmap_slug=idmap_slug,
                own_etc=own_etc, seccomp=seccomp_filter)
            t0 = time.monotonic()
            result = launch(req, 0, 1, 2)
            _, status = os.waitpid(result.pid, 0)
            launch_only.append((time.monotonic() - t0) * 1000)
            if phases is not None and i >= 0:
                for phase, ms in result.timings_ms.items():
                    phases.setdefault(phase, []).append(ms)
            if status != 0:
                raise RuntimeError(f"dyno exited with {status}")
        dyno_dir.rmdir()

    return one


def _oci_bundle(base: Path, rootfs: Path, slug: Path, netns: str, runtime: str) -> Path:
    bundle = base / f"bundle-{runtime}"
    bundle.mkdir()
    subprocess.run([runtime, "spec"], cwd=bundle, check=True)
    config = json.loads((bundle / "config.json").read_text())
    config["root"] = {"path": str(rootfs), "readonly": True}
    proc = config["process"]
    proc.update(terminal=False, args=["/sbin/tini", "--", "/bin/true"], cwd="/app",
                user={"uid": UID, "gid": UID}, noNewPrivileges=True,
                env=["PATH=/bin:/usr/bin"], capabilities={k: [] for k in (
                    "bounding", "effective", "inheritable", "permitted", "ambient")})
    # The limits our launcher gives every dyno (Heroku's open-files figure, no core dumps).
    proc["rlimits"] = [{"type": "RLIMIT_NOFILE", "soft": 10000, "hard": 10000},
                       {"type": "RLIMIT_CORE", "soft": 0, "hard": 0}]
    # Same mounts as ours: no cgroupfs or mqueue inside, /app and /tmp added.
    config["mounts"] = [m for m in config["mounts"]
                        if m["destination"] not in ("/sys/fs/cgroup", "/dev/mqueue")]
    config["mounts"] += [
        {"destination": "/app", "type": "bind", "source": str(slug),
         "options": ["rbind", "ro", "nosuid", "nodev"]},
        {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "nodev", "size=65536k"]},
    ]
    linux = config["linux"]
    linux["namespaces"] = [{"type": t} for t in ("pid", "ipc", "uts", "mount", "cgroup")]
    linux["namespaces"].append({"type": "network", "path": f"/run/netns/{netns}"})
    linux["resources"].update(memory={"limit": 536870912}, pids={"limit": 256},
                              cpu={"shares": 1024})
    # An absolute cgroupsPath: the hybrid host's shell sits in a nested cgroup (MACHINE.md).
    linux["cgroupsPath"] = f"/dtb{runtime}{secrets.token_hex(3)}"
    (bundle / "config.json").write_text(json.dumps(config))
    return bundle


def _oci(runtime: list[str], bundle: Path, state: Path) -> Callable[[int], None]:
    # `run` deletes the container and its cgroup when it exits, so one name serves every run.
    name = f"dtb{secrets.token_hex(4)}"

    def one(i: int) -> None:
        subprocess.run([*runtime, "--root", str(state), "run", "--bundle", str(bundle), name],
                       check=True, stdin=subprocess.DEVNULL)
    return one


def _time_interleaved(contenders: dict[str, Callable[[int], None]],
                      runs: int) -> dict[str, list[float]]:
    """Round-robin: sample i of every contender runs back to back, so a load change on this
    shared machine hits all of them alike instead of skewing whichever ran during it."""
    for i in range(WARMUP):
        for one in contenders.values():
            one(-1 - i)
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for i in range(runs):
        for name, one in contenders.items():
            t0 = time.monotonic()
            one(i)
            samples[name].append((time.monotonic() - t0) * 1000)
    return samples


# crun refuses hybrid cgroups; it runs inside a private mount namespace with a tmpfs over the
# v2 tree (MACHINE.md). This runner lives there for the whole benchmark and runs one
# `crun run` per request line, answering with its duration, so crun pays no extra unshare.
_CRUN_RUNNER = r"""
import ctypes, subprocess, sys, time
libc = ctypes.CDLL(None, use_errno=True)
assert libc.mount(b"none", b"/sys/fs/cgroup/unified", b"tmpfs", 0, None) == 0
bundle, state = sys.argv[1], sys.argv[2]
for line in sys.stdin:
    t0 = time.monotonic()
    rc = subprocess.run(["crun", "--root", state, "run", "--bundle", bundle, "dtbcrun"],
                        stdin=subprocess.DEVNULL).returncode
    print(f"{rc} {(time.monotonic() - t0) * 1000}", flush=True)
"""


class _CrunRunner:
    def __init__(self, bundle: Path, state: Path) -> None:
        self.proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", sys.executable, "-c",
             _CRUN_RUNNER, str(bundle), str(state)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.last_ms = 0.0

    def one(self, i: int) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        rc, ms = self.proc.stdout.readline().split()
        if rc != "0":
            raise RuntimeError(f"crun run failed with {rc}")
        self.last_ms = float(ms)

    def close(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
        self.proc.stdout.close()


def _line(name: str, samples: list[float], ref: float | None) -> str:
    med = statistics.median(samples)
    ratio = f"{med / ref:6.2f}x runc" if ref else "      -    "
    return (f"{name:<34} median {med:7.2f} ms   p99 {_percentile(samples, 0.99):7.2f} ms   "
            f"{ratio}   (n={len(samples)})")


def _seccomp_cost(results: dict[str, list[float]], filtered: dict[str, list[float]],
                  unfiltered: dict[str, list[float]]) -> None:
    """What the dyno seccomp filter adds to a launch: built once per holder (timed here on
    its own), installed by every launch child in its `user` phase, right before exec."""
    t0 = time.perf_counter()
    seccomp.compile_plan(seccomp.DYNO_PLAN)
    compile_ms = (time.perf_counter() - t0) * 1000
    total = (statistics.median(results["ours (busybox stack)"])
             - statistics.median(results["ours (busybox, no seccomp filter)"]))
    launch_wait = (statistics.median(results["ours: launch+wait only"])
                   - statistics.median(results["ours, no seccomp: launch+wait only"]))
    user = statistics.median(filtered["user"]) - statistics.median(unfiltered["user"])
    print(f"seccomp filter cost per launch (median with - without, same run): "
          f"whole sample {total:+.3f} ms, launch+wait {launch_wait:+.3f} ms, "
          f"child's user phase (where it is installed) {user:+.3f} ms; "
          f"compiling it, once per holder: {compile_ms:.3f} ms; goal <= 0.5 ms: "
          f"{'met' if max(launch_wait, user) <= 0.5 else 'NOT met'}")


def main() -> None:
    if launch_bench_skipped():
        return
    # The launcher's caller contract: single-threaded and a child subreaper.
    sc.prctl(sc.PR_SET_CHILD_SUBREAPER, 1)
    netns = f"dtb{secrets.token_hex(3)}"
    load_before = f"{os.getloadavg()[0]:.2f}"
    with tempfile.TemporaryDirectory(prefix="dtbench") as tmp, contextlib.ExitStack() as stack:
        base = Path(tmp)
        rootfs = _build_rootfs(base)
        slug = base / "slug"
        slug.mkdir()
        (slug / "Procfile").write_text("web: true\n")
        subprocess.run(["ip", "netns", "add", netns], check=True)
        stack.callback(subprocess.run, ["ip", "netns", "delete", netns], check=False)
        subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True)
        work = base / "dynos"
        work.mkdir()

        launch_only: list[float] = []
        launch_only_unfiltered: list[float] = []
        phases: dict[str, list[float]] = {}
        phases_unfiltered: dict[str, list[float]] = {}
        contenders: dict[str, Callable[[int], None]] = {
            "ours (busybox stack)": _ours(rootfs, slug, work, netns, str(rootfs), launch_only,
                                          phases),
            "ours (busybox, no seccomp filter)": _ours(rootfs, slug, work, netns, str(rootfs),
                                                       launch_only_unfiltered,
                                                       phases_unfiltered, seccomp_filter=False),
            "ours (busybox, slug not idmapped)": _ours(rootfs, slug, work, netns, str(rootfs),
                                                       [], idmap_slug=False),
            "ours (busybox, no own /etc files)": _ours(rootfs, slug, work, netns, str(rootfs),
                                                       [], own_etc=False),
            "ours (host stack, overlay root)": _ours(rootfs, slug, work, netns, "/", []),
            "runc run": _oci(["runc"], _oci_bundle(base, rootfs, slug, netns, "runc"),
                             base / "runc-state"),
        }
        crun: _CrunRunner | None = None
        if shutil.which("crun") and shutil.which("unshare"):
            crun = _CrunRunner(_oci_bundle(base, rootfs, slug, netns, "crun"),
                               base / "crun-state")
            stack.callback(crun.close)
            crun_inner: list[float] = []

            def crun_one(i: int, runner: _CrunRunner = crun) -> None:
                runner.one(i)
                if i >= 0:
                    crun_inner.append(runner.last_ms)

            contenders["crun run (private mnt ns)"] = crun_one
        results = _time_interleaved(contenders, RUNS)
        results["ours: launch+wait only"] = launch_only[WARMUP:]
        results["ours, no seccomp: launch+wait only"] = launch_only_unfiltered[WARMUP:]
        if crun is not None:
            results["crun run, timed inside its ns"] = crun_inner

    runc_median = statistics.median(results["runc run"])
    print(f"launch of `tini -- /bin/true`, {RUNS} runs each after {WARMUP} warm-up runs, "
          "interleaved; cgroup create+limits+remove included unless noted; netns reused; "
          f"load average before/after: {load_before} / {os.getloadavg()[0]:.2f}")
    for name, samples in results.items():
        print(_line(name, samples, runc_median))
    print("ours, median per phase (ms): " + "  ".join(
        f"{phase}={statistics.median(ms):.2f}" for phase, ms in phases.items()))
    _seccomp_cost(results, phases, phases_unfiltered)
    ours = statistics.median(results["ours (busybox stack)"])
    print(f"goal ours <= 0.5x runc median: {ours / runc_median:.2f}x "
          f"({'met' if ours <= 0.5 * runc_median else 'NOT met'})")
    if "crun run (private mnt ns)" in results:
        crun_median = statistics.median(results["crun run (private mnt ns)"])
        print(f"goal ours <= 1.0x crun median: {ours / crun_median:.2f}x "
              f"({'met' if ours <= crun_median else 'NOT met'})")


if __name__ == "__main__":
    main()
