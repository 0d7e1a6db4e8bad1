"""cgroups: one library for cgroup v2 and hybrid (v1 controllers + v2 tracking) hosts.

    layout = detect(root_name="dynoagent")      # mode, hierarchies, controllers, root
    tree = Tree(layout); tree.ensure()           # the root in every hierarchy
    group = tree.create_group("app-x.slice/dyno-1.scope",
                              Limits(memory_high_bytes=..., memory_max_bytes=..., pids_max=256))
    group.procs_paths()   # cgroup.procs files a forked child writes "0" into before exec
    group.attach(pid); group.stats(); group.freeze(); group.thaw(); group.kill()
    group.counters()     # the OOM-kill count and memory peak alone: cheap, no stats flush
    async with group.watch() as w: await w.wait_for(EventKind.EMPTY, timeout_s=5)
    group.remove(timeout_s=5)                  # refuses while tasks remain, retries EBUSY
    await group.destroy(timeout_s=10)          # kill, await EMPTY, final stats, remove
    tree.list_groups(); tree.sweep_empty()     # adoption and leftovers after a restart

plan_writes(limits, mode, swap_accounting=...) is the pure limits -> writes mapping; CgroupFS
is the only class that touches cgroupfs; every failure is a CgroupError subclass carrying
path, file, value and errno. Knows nothing of dynos.
"""

from cgroups.discovery import (
    AGENT_LEAF,
    DEFAULT_ROOT_NAME,
    HOLDER_LEAF,
    Hierarchy,
    Layout,
    detect,
    parse_mountinfo,
    parse_proc_cgroup,
)
from cgroups.errors import (
    AlreadyExists,
    Busy,
    CgroupError,
    ControllerMissing,
    DiscoveryError,
    InvalidValue,
    NoSpace,
    NotEmpty,
    NotFound,
    NotSupported,
    PermissionDenied,
    Timeout,
)
from cgroups.fs import CgroupFS
from cgroups.group import Group, SampleFiles
from cgroups.limits import Limits, Mode, Write, plan_writes
from cgroups.listens import ListenWatch, ListenWatchUnavailable
from cgroups.notify import EventKind, GroupEvent, GroupWatch
from cgroups.stats import Pressure, Stats
from cgroups.tree import Tree

__all__ = [
    "AGENT_LEAF",
    "DEFAULT_ROOT_NAME",
    "HOLDER_LEAF",
    "AlreadyExists",
    "Busy",
    "CgroupError",
    "CgroupFS",
    "ControllerMissing",
    "DiscoveryError",
    "EventKind",
    "Group",
    "GroupEvent",
    "GroupWatch",
    "Hierarchy",
    "InvalidValue",
    "Layout",
    "Limits",
    "ListenWatch",
    "ListenWatchUnavailable",
    "Mode",
    "NoSpace",
    "NotEmpty",
    "NotFound",
    "NotSupported",
    "PermissionDenied",
    "Pressure",
    "SampleFiles",
    "Stats",
    "Timeout",
    "Tree",
    "Write",
    "detect",
    "parse_mountinfo",
    "parse_proc_cgroup",
    "plan_writes",
]
