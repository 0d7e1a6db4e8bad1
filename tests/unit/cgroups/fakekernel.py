"""A fake cgroupfs for unit tests: a temp-dir tree whose CgroupFS subclass acts like the kernel
(mkdir populates control files, cgroup.procs moves pids, rmdir refuses busy groups) and can be
told to fail any syscall with a chosen errno."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from cgroups.discovery import Layout, detect
from cgroups.fs import CgroupFS

HYBRID_MOUNTINFO = """\
22 1 0:21 / / rw,relatime - ext4 /dev/vda rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
HYBRID_PROC_CGROUP = """\
9:name=systemd:/
8:pids:/
6:freezer:/
4:memory:/process_api/abc
3:cpuset:/
2:cpuacct:/
1:cpu:/
0::/
"""
V2_MOUNTINFO = """\
22 1 0:21 / / rw,relatime - ext4 /dev/vda rw
25 20 0:23 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate
"""
V2_PROC_CGROUP = "0::/\n"
V2_ROOT_CONTROLLERS = "cpuset cpu io memory hugetlb pids rdma misc"

_V2_CORE = {
    "cgroup.procs": "", "cgroup.events": "populated 0\nfrozen 0\n", "cgroup.freeze": "0\n",
    "cgroup.kill": "", "cgroup.subtree_control": "", "cgroup.type": "domain\n",
    "cpu.stat": "usage_usec 0\nuser_usec 0\nsystem_usec 0\n",
    "cpu.pressure": "some avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"
                    "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n",
    "memory.pressure": "some avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"
                       "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n",
    "io.pressure": "some avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"
                   "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n",
}
_V2_BY_CONTROLLER = {
    "memory": {"memory.current": "0\n", "memory.peak": "0\n", "memory.high": "max\n",
               "memory.max": "max\n", "memory.swap.max": "max\n", "memory.swap.current": "0\n",
               "memory.oom.group": "0\n", "memory.stat": "anon 0\nfile 0\n",
               "memory.events": "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\noom_group_kill 0\n"},
    "cpu": {"cpu.weight": "100\n", "cpu.max": "max 100000\n"},
    "pids": {"pids.max": "max\n", "pids.current": "0\n"},
}
_V1_CORE = {"cgroup.procs": "", "tasks": "", "notify_on_release": "0\n",
            "cgroup.clone_children": "0\n"}
_V1_BY_CONTROLLER = {
    "memory": {"memory.limit_in_bytes": "9223372036854771712\n",
               "memory.memsw.limit_in_bytes": "9223372036854771712\n",
               "memory.soft_limit_in_bytes": "9223372036854771712\n",
               "memory.swappiness": "60\n", "memory.usage_in_bytes": "0\n",
               "memory.memsw.usage_in_bytes": "0\n", "memory.max_usage_in_bytes": "0\n",
               "memory.stat": "cache 0\nrss 0\ntotal_cache 0\ntotal_rss 0\n",
               "memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 0\n",
               "cgroup.event_control": ""},
    "cpu": {"cpu.shares": "1024\n", "cpu.cfs_period_us": "100000\n", "cpu.cfs_quota_us": "-1\n",
            "cpu.stat": "nr_periods 0\nnr_throttled 0\nthrottled_time 0\n"},
    "cpuacct": {"cpuacct.usage": "0\n"},
    "pids": {"pids.max": "max\n", "pids.current": "0\n"},
    "freezer": {"freezer.state": "THAWED\n"},
}


@dataclass
class Faults:
    """Errors to inject: (op, file-or-dir basename) -> list of errnos, consumed one per call."""

    planned: dict[tuple[str, str], list[int]] = field(default_factory=dict)

    def add(self, op: str, name: str, err: int, times: int = 1) -> None:
        self.planned.setdefault((op, name), []).extend([err] * times)

    def check(self, op: str, path: str) -> None:
        queue = self.planned.get((op, os.path.basename(path)))
        if queue:
            err = queue.pop(0)
            raise OSError(err, os.strerror(err), path)


class FakeKernelFS(CgroupFS):
    """CgroupFS over a plain directory that behaves like one cgroup hierarchy."""

    def __init__(self, mount: Path, version: int, controllers: Iterable[str], faults: Faults,
                 log: list[tuple[str, str, str]], without: set[str],
                 root_controllers: str = V2_ROOT_CONTROLLERS) -> None:
        super().__init__(mount)
        self.root_controllers = root_controllers
        self.version = version
        self.controllers = frozenset(controllers)
        self.faults = faults
        self.log = log
        self.without = without
        self.mount.mkdir(parents=True, exist_ok=True)
        if not (self.mount / "cgroup.procs").exists():
            self._populate(self.mount, root=True)

    # -- kernel behaviour ---------------------------------------------------------------------

    def _populate(self, directory: Path, root: bool = False) -> None:
        files: dict[str, str] = {}
        if self.version == 2:
            files.update({"cgroup.procs": "", "cgroup.subtree_control": ""})
            if root:
                files["cgroup.controllers"] = self.root_controllers + "\n"
            else:
                files.update(_V2_CORE)
                enabled = (directory.parent / "cgroup.subtree_control").read_text().split()
                files["cgroup.controllers"] = " ".join(enabled) + "\n"
                for controller in enabled:
                    files.update(_V2_BY_CONTROLLER.get(controller, {}))
        else:
            files.update(_V1_CORE)
            for controller in self.controllers:
                files.update(_V1_BY_CONTROLLER.get(controller, {}))
        for name, text in files.items():
            if name not in self.without:
                (directory / name).write_text(text)

    def _raw_mkdir(self, path: str) -> None:
        self.faults.check("mkdir", path)
        os.mkdir(path)
        self.log.append(("mkdir", path, ""))
        self._populate(Path(path))

    def _raw_rmdir(self, path: str) -> None:
        self.faults.check("rmdir", path)
        directory = Path(path)
        if not directory.exists():
            raise OSError(errno.ENOENT, "No such file or directory", path)
        if any(p.is_dir() for p in directory.iterdir()):
            raise OSError(errno.EBUSY, "Device or resource busy", path)
        procs = directory / "cgroup.procs"
        if procs.exists() and procs.read_text().split():
            raise OSError(errno.EBUSY, "Device or resource busy", path)
        for child in directory.iterdir():
            child.unlink()
        os.rmdir(path)
        self.log.append(("rmdir", path, ""))

    def _raw_read(self, path: str) -> bytes:
        self.faults.check("read", path)
        return super()._raw_read(path)

    def _raw_pread(self, fd: int, path: str) -> bytes:
        self.faults.check("read", path)
        if not os.path.exists(path):
            # The kernel's answer to a read of a removed group's file through an open fd.
            raise OSError(errno.ENODEV, "No such device", path)
        return super()._raw_pread(fd, path)

    def _raw_write(self, path: str, data: bytes) -> None:
        self.faults.check("write", path)
        value = data.decode()
        target = Path(path)
        if not target.exists():
            raise OSError(errno.ENOENT, "No such file or directory", path)
        self.log.append(("write", path, value))
        name = target.name
        if name == "cgroup.procs":
            self._move(target, value)
        elif name == "cgroup.subtree_control":
            self._subtree(target, value)
        elif name == "cgroup.freeze":
            target.write_text(value + "\n")
            events = target.parent / "cgroup.events"
            populated = "populated 1" in events.read_text()
            events.write_text(f"populated {int(populated)}\nfrozen {value.strip()}\n")
        elif name == "cgroup.kill":
            # The killed processes exit: they leave every hierarchy, not only this one.
            dead = set((target.parent / "cgroup.procs").read_text().split())
            world = self.mount if self.mount.name != "unified" else self.mount.parent
            for procs in world.rglob("cgroup.procs"):
                left = [p for p in procs.read_text().split() if p not in dead]
                procs.write_text("".join(f"{p}\n" for p in left))
            (target.parent / "cgroup.events").write_text("populated 0\nfrozen 0\n")
        elif name == "cgroup.event_control":
            with target.open("a") as f:
                f.write(value + "\n")
        else:
            target.write_text(value + "\n")

    def _move(self, target: Path, value: str) -> None:
        pid = value.strip()
        if not pid.isdigit():
            raise OSError(errno.EINVAL, "Invalid argument", str(target))
        for procs in self.mount.rglob("cgroup.procs"):
            pids = procs.read_text().split()
            if pid in pids:
                pids.remove(pid)
                procs.write_text("".join(f"{p}\n" for p in pids))
        pids = target.read_text().split()
        target.write_text("".join(f"{p}\n" for p in [*pids, pid]))
        events = target.parent / "cgroup.events"
        if events.exists():
            events.write_text("populated 1\nfrozen 0\n")

    def _subtree(self, target: Path, value: str) -> None:
        available = (target.parent / "cgroup.controllers").read_text().split()
        enabled = set(target.read_text().split())
        for token in value.split():
            if token[1:] not in available:
                raise OSError(errno.ENOENT, "No such file or directory", str(target))
            if token.startswith("+"):
                enabled.add(token[1:])
            else:
                enabled.discard(token[1:])
        target.write_text(" ".join(sorted(enabled)) + "\n")


@dataclass
class FakeHost:
    """A fake host: proc files, mounted hierarchies, fault plan and a log of every syscall."""

    base: Path
    mode: str
    faults: Faults = field(default_factory=Faults)
    log: list[tuple[str, str, str]] = field(default_factory=list)
    without: set[str] = field(default_factory=set)
    filesystems: dict[str, FakeKernelFS] = field(default_factory=dict)

    def __post_init__(self) -> None:
        proc = self.base / "proc" / "self"
        proc.mkdir(parents=True, exist_ok=True)
        hybrid = self.mode == "hybrid"
        (proc / "mountinfo").write_text(HYBRID_MOUNTINFO if hybrid else V2_MOUNTINFO)
        (proc / "cgroup").write_text(HYBRID_PROC_CGROUP if hybrid else V2_PROC_CGROUP)

    def factory(self, mount: Path) -> CgroupFS:
        name = mount.name
        if self.mode == "v2":
            fs = FakeKernelFS(mount, 2, (), self.faults, self.log, self.without)
        elif name == "unified":
            # Hybrid: every controller is bound to v1, the unified tree only tracks.
            fs = FakeKernelFS(mount, 2, (), self.faults, self.log, self.without, "")
        else:
            fs = FakeKernelFS(mount, 1, name.split(","), self.faults, self.log, self.without)
        self.filesystems[str(mount)] = fs
        return fs

    def layout(self, root_name: str = "dt-unit", **kwargs: object) -> Layout:
        return detect(root_name=root_name, proc_root=self.base / "proc", fs_root=self.base,
                      fs_factory=self.factory, **kwargs)  # type: ignore[arg-type]

    def cg(self, hierarchy: str, rel: str = "") -> Path:
        """Directory of a group in a hierarchy ("unified", "memory", ... ; v2: "unified")."""
        top = self.base / "sys/fs/cgroup"
        if self.mode == "hybrid":
            top = top / hierarchy
        return top / rel if rel else top

    def set(self, hierarchy: str, rel: str, file: str, text: str) -> None:
        """What the kernel would change by itself (counters, populated)."""
        (self.cg(hierarchy, rel) / file).write_text(text)

    def writes(self) -> list[tuple[str, str]]:
        """(path relative to the cgroup mount base, value) of every write, in order."""
        top = str(self.base / "sys/fs/cgroup") + "/"
        return [(p.replace(top, ""), v) for op, p, v in self.log if op == "write"]
