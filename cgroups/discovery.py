"""Discovery of the host's cgroup layout from /proc/<pid>/mountinfo and /proc/<pid>/cgroup.

Answers: the mode (v2 or hybrid), the hierarchies and their mounts, the controllers available,
and the root the agent works under (its systemd-delegated subtree, or a configured name).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from cgroups.errors import CgroupError, ControllerMissing, DiscoveryError
from cgroups.fs import CgroupFS, normalise
from cgroups.limits import Mode

DEFAULT_ROOT_NAME = "dynoagent"
# The leaf a delegated agent moves itself into: systemd's delegation rules (and v2's "no
# internal processes") want the delegated cgroup itself empty once it has children.
AGENT_LEAF = "agent.scope"
# The leaf the dyno holder sits in when the root is a scope of its own (systemd on pure v2,
# agent.daemon.dynoscope): like AGENT_LEAF, never a dyno's group.
HOLDER_LEAF = "holder"
# v1 controllers whose hierarchies hold a group on hybrid hosts: limits and stats.
DEFAULT_V1_CONTROLLERS = ("memory", "cpu", "cpuacct", "pids")
# xattrs systemd (>= 251) sets on a cgroup it delegated: trusted.* for the system manager,
# user.* for user managers.
DELEGATE_XATTRS = ("trusted.delegate", "user.delegate")


@dataclass(frozen=True)
class MountEntry:
    """One cgroup mount from mountinfo."""

    mount_point: str
    root: str
    version: int
    controllers: frozenset[str]
    name: str | None


@dataclass(frozen=True)
class Hierarchy:
    """One mounted hierarchy the library writes to."""

    name: str
    version: int
    controllers: frozenset[str]
    fs: CgroupFS
    mount_root: str


@dataclass(frozen=True)
class Layout:
    """The host's cgroup layout and the agent's root in it.

    `root` is relative to every hierarchy's mount. `unified` is the v2 tree: it holds the limits
    on v2 and tracks membership (cgroup.kill, cgroup.events, cgroup.freeze) on hybrid.
    """

    mode: Mode
    unified: Hierarchy
    v1: tuple[Hierarchy, ...]
    controllers: frozenset[str]
    root: str
    delegated: bool
    own_path: str | None

    @property
    def hierarchies(self) -> tuple[Hierarchy, ...]:
        """Every hierarchy a group lives in: limit hierarchies first, the unified tree last, so a
        process written in this order is under its limits before the tracking tree sees it."""
        return (*self.v1, self.unified)

    def hierarchy_for(self, controller: str) -> Hierarchy:
        if self.mode is Mode.V2:
            if controller in self.controllers:
                return self.unified
        else:
            for h in self.v1:
                if controller in h.controllers:
                    return h
        raise ControllerMissing(controller, path=str(self.unified.fs.mount))

    @property
    def agent_leaf(self) -> str | None:
        return f"{self.root}/{AGENT_LEAF}" if self.delegated else None


def parse_mountinfo(text: str) -> list[MountEntry]:
    """cgroup and cgroup2 mounts from mountinfo text, in file order."""
    entries = []
    for line in text.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        sep = fields.index("-")
        if len(fields) < sep + 4 or len(fields) < 5:
            raise DiscoveryError("malformed mountinfo line", value=line)
        fstype = fields[sep + 1]
        if fstype not in ("cgroup", "cgroup2"):
            continue
        root, mount_point = _unescape(fields[3]), _unescape(fields[4])
        if fstype == "cgroup2":
            entries.append(MountEntry(mount_point, root, 2, frozenset(), None))
            continue
        controllers: set[str] = set()
        name = None
        for opt in fields[sep + 3].split(","):
            if opt.startswith("name="):
                name = opt[len("name="):]
            elif opt not in _V1_NON_CONTROLLER_OPTIONS and "=" not in opt:
                controllers.add(opt)
        entries.append(MountEntry(mount_point, root, 1, frozenset(controllers), name))
    return entries


_V1_NON_CONTROLLER_OPTIONS = frozenset(
    {"rw", "ro", "noprefix", "xattr", "clone_children", "cpuset_v2_mode", "all", "none"})


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and len(field[i + 1:i + 4]) == 3 and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """Membership from /proc/<pid>/cgroup: "" -> unified path, controller or name=X -> v1 path."""
    paths: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        parts = line.split(":", 2)
        if len(parts) != 3:
            raise DiscoveryError("malformed /proc/<pid>/cgroup line", value=line)
        _, names, path = parts
        if not names:
            paths[""] = path
        for name in names.split(","):
            if name:
                paths[name] = path
    return paths


def relative_to_mount(path: str, mount_root: str) -> str | None:
    """A cgroup path as the kernel names it -> relative to a mount of `mount_root`, or None if
    the mount does not show it (e.g. a cgroup namespace or bind mount of a subtree)."""
    norm_root = "/" + normalise(mount_root)
    norm = "/" + normalise(path)
    if norm_root == "/":
        return normalise(norm)
    if norm == norm_root:
        return ""
    if norm.startswith(norm_root + "/"):
        return normalise(norm[len(norm_root):])
    return None


def is_delegated(directory: Path) -> bool:
    """Whether systemd delegated this cgroup to us: its delegate xattr, or (unprivileged) we own
    its cgroup.subtree_control — root can write any cgroup, so for root only the xattr counts."""
    for attr in DELEGATE_XATTRS:
        try:
            if os.getxattr(directory, attr).strip() in (b"1", b"true"):
                return True
        except OSError:
            continue
    euid = os.geteuid()
    if euid == 0:
        return False
    try:
        return os.stat(directory / "cgroup.subtree_control").st_uid == euid
    except OSError:
        return False


def detect(*, root_name: str = DEFAULT_ROOT_NAME, proc_root: Path = Path("/proc"),
           fs_root: Path = Path("/"), pid: str = "self", use_delegation: bool = True,
           v1_controllers: Iterable[str] = DEFAULT_V1_CONTROLLERS,
           fs_factory: Callable[[Path], CgroupFS] = CgroupFS,
           delegation_check: Callable[[Path], bool] = is_delegated,
           root: str | None = None) -> Layout:
    """Read the layout of the running host (or of a fake tree: mount points from mountinfo are
    taken relative to `fs_root`, proc files from `proc_root`).

    `root` (relative to the v2 mount) names the cgroup to work under instead of the own cgroup
    or `root_name`: a cgroup systemd delegated to the agent other than its own (the scope of
    agent.daemon.dynoscope); `delegated` is then judged on it, not on the own cgroup."""
    try:
        mountinfo = (proc_root / pid / "mountinfo").read_text()
        membership = (proc_root / pid / "cgroup").read_text()
    except OSError as exc:
        raise DiscoveryError(f"cannot read proc files: {exc.strerror}",
                             path=str(proc_root / pid), errno=exc.errno) from exc
    mounts = parse_mountinfo(mountinfo)
    own = parse_proc_cgroup(membership)

    def rebased(mount_point: str) -> Path:
        return fs_root / mount_point.lstrip("/")

    v2_mounts = [m for m in mounts if m.version == 2]
    if not v2_mounts:
        # Pure v1 hosts (no unified tree at all) have no cgroup.kill/events: unsupported.
        raise DiscoveryError("no cgroup2 mount: legacy cgroup v1-only hosts are not supported",
                             path=str(proc_root / pid / "mountinfo"))
    v2 = _prefer_full_view(v2_mounts)
    unified_fs = fs_factory(rebased(v2.mount_point))
    unified = Hierarchy("unified", 2, frozenset(), unified_fs, v2.root)

    v1_entries = [m for m in mounts if m.version == 1 and m.controllers]
    wanted = set(v1_controllers)
    own_unified = own.get("")
    own_rel = relative_to_mount(own_unified, v2.root) if own_unified is not None else None

    delegated = False
    if root is not None:
        root = normalise(root)
        delegated = bool(root) and delegation_check(unified_fs.path(root))
    else:
        if use_delegation and own_rel:
            # The root cgroup is never "delegated": it is the top of the host's own tree.
            delegated = delegation_check(unified_fs.path(own_rel))
        root = normalise(own_rel) if delegated and own_rel else normalise(root_name)
    if not root:
        raise DiscoveryError("the agent's root may not be the top of the hierarchy",
                             value=root_name)

    if not v1_entries:
        # Controllers our groups can get: those of the delegated cgroup, or (own root at the
        # top of the tree) those of the mount root.
        source = root if delegated else ""
        try:
            text = unified_fs.read(source, "cgroup.controllers")
        except CgroupError as exc:
            raise DiscoveryError("cannot read cgroup.controllers", path=exc.path,
                                 file="cgroup.controllers", errno=exc.errno) from exc
        controllers = frozenset(text.split())
        unified = Hierarchy("unified", 2, controllers, unified_fs, v2.root)
        return Layout(Mode.V2, unified, (), controllers, root, delegated, own_rel)

    hierarchies: list[Hierarchy] = []
    seen: set[frozenset[str]] = set()
    for entry in v1_entries:
        if entry.controllers in seen or not entry.controllers & wanted:
            continue
        candidates = [m for m in v1_entries if m.controllers == entry.controllers]
        chosen = _prefer_full_view(candidates)
        seen.add(entry.controllers)
        hierarchies.append(Hierarchy(",".join(sorted(chosen.controllers)), 1, chosen.controllers,
                                     fs_factory(rebased(chosen.mount_point)), chosen.root))
    available = frozenset().union(*(h.controllers for h in hierarchies))
    return Layout(Mode.HYBRID, unified, tuple(hierarchies), available, root, delegated, own_rel)


def _prefer_full_view(entries: list[MountEntry]) -> MountEntry:
    # The same hierarchy can be mounted several times (bind mounts); one showing the whole
    # hierarchy ("/") is the one whose paths match /proc/<pid>/cgroup most directly.
    for entry in entries:
        if entry.root == "/":
            return entry
    return entries[0]
