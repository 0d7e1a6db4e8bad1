"""Fixtures for cgroups tests on the real kernel: a uniquely named root ("dt…") in every
hierarchy, whose groups are killed and removed in teardown even when the test failed."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator, Sequence

import pytest

from cgroups import CgroupError, DiscoveryError, Group, Layout, Tree, detect
from tests.support.names import unique


def _layout(root: str) -> Layout:
    try:
        # Not the agent's delegated subtree: tests get their own root at the top.
        return detect(root_name=root, use_delegation=False)
    except DiscoveryError as exc:
        pytest.skip(f"needs a cgroup2 mount (cgroup.kill/cgroup.events): {exc}")


def leftovers(layout: Layout) -> list[str]:
    """Directories of the test root still present in any hierarchy."""
    return [str(h.fs.path(layout.root)) for h in layout.hierarchies if h.fs.exists(layout.root)]


def teardown_tree(tree: Tree) -> None:
    """Kill everything under the root, remove every group and the root; raise if anything is
    left (the test then errors in teardown, which is what a leak should do)."""
    deadline = time.monotonic() + 10
    for rel in tree.list_groups():
        group = tree.group(rel)
        try:
            group.kill()
            while group.pids() and time.monotonic() < deadline:
                time.sleep(0.01)  # teardown only: the test's own waits use notifications
            group.remove(timeout_s=max(0.1, deadline - time.monotonic()))
        except CgroupError:
            continue
    tree.destroy()
    left = leftovers(tree.layout)
    assert not left, f"cgroups left behind: {left}"


@pytest.fixture
def tree() -> Iterator[Tree]:
    layout = _layout(unique("dt", 8))
    t = Tree(layout)
    t.ensure()
    try:
        yield t
    finally:
        teardown_tree(t)


def spawn(group: Group, argv: Sequence[str], **kwargs: object) -> subprocess.Popen[bytes]:
    """Start argv already inside `group`: the child writes "0" into every cgroup.procs
    before exec, exactly as the launcher does, so it never runs outside its limits."""
    paths = group.procs_paths()

    def enter() -> None:
        for path in paths:
            fd = os.open(path, os.O_WRONLY)
            try:
                os.write(fd, b"0")
            finally:
                os.close(fd)

    return subprocess.Popen(list(argv), preexec_fn=enter, **kwargs)  # type: ignore[call-overload, no-any-return]
