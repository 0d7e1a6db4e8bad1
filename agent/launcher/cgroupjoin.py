"""How a forked child joins a dyno's cgroups without the kernel's global migration lock.

Writing a pid to `cgroup.procs` takes `cgroup_threadgroup_rwsem` for writing; when nobody
took it in the last grace period, that waits for an RCU grace period: 6 to 10 ms per launch on
an idle host, the largest single step of a start. Two ways around it, both exact:

- cgroup v2 (the unified hierarchy, or the only one): the child is born in the group
  (clone3 with CLONE_INTO_CGROUP), so nothing migrates.
- cgroup v1: the single-threaded child writes "0" to `tasks`, which moves only the calling
  thread (the whole process, as it has one) and takes no global lock.

The requests keep naming `cgroup.procs` files (the holder protocol does not change); the
launcher reads from them which way each hierarchy is joined.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

_PROCS = "cgroup.procs"


@dataclass(frozen=True)
class JoinPlan:
    """`clone_into`: the cgroup v2 directory to clone the child into, with its cgroup.procs
    for a kernel without clone3; `writes`: files the child writes "0" into, in order."""

    clone_into: tuple[str, str] | None
    writes: tuple[str, ...]


def plan(procs_paths: tuple[str, ...]) -> JoinPlan:
    clone_into = None
    writes: list[str] = []
    for path in procs_paths:
        directory, name = os.path.split(path)
        if name != _PROCS:
            writes.append(path)
        elif os.path.exists(os.path.join(directory, "tasks")):
            writes.append(os.path.join(directory, "tasks"))
        elif clone_into is None:
            clone_into = (directory, path)
        else:
            writes.append(path)  # a second v2 hierarchy: cannot be cloned into as well
    return JoinPlan(clone_into, tuple(writes))


def join(paths: tuple[str, ...]) -> None:
    """In the child: write "0" (the writing task itself, whatever pid namespace it is in)."""
    for path in paths:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, b"0")
        finally:
            os.close(fd)
