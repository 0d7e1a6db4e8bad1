"""The agent's root in every hierarchy: set-up, group creation (undone on failure), adoption
listing and sweeping of empty leftovers."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

from cgroups.discovery import AGENT_LEAF, HOLDER_LEAF, Hierarchy, Layout
from cgroups.errors import AlreadyExists, Busy, CgroupError, NotEmpty, NotFound
from cgroups.fs import normalise
from cgroups.group import Group
from cgroups.limits import Limits, Mode, controllers_needed

# Controllers a v2 root hands down to its groups (io is not part of the limits spec).
V2_CONTROLLERS = ("memory", "cpu", "pids")
# Leaves of the agent's own processes, never listed as groups nor swept.
RESERVED_LEAVES = frozenset({AGENT_LEAF, HOLDER_LEAF})


class Tree:
    """Groups under `layout.root`. Relative names given to its methods are below the root."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.root = layout.root

    def __repr__(self) -> str:
        return f"Tree({self.root!r}, mode={self.layout.mode.value})"

    def full(self, rel: str) -> str:
        sub = normalise(rel)
        return f"{self.root}/{sub}" if sub else self.root

    # -- set-up -------------------------------------------------------------------------------

    def ensure(self) -> None:
        """Create the root in every hierarchy and, on v2, enable the controllers on the way down.

        A delegated agent must call enter_agent_leaf() first: v2 refuses to enable controllers
        in a cgroup that still has processes of its own ("no internal processes").
        """
        if self.layout.delegated:
            # systemd made the delegated cgroup and its ancestors are not ours to write. On
            # hybrid the unit may lack a directory in a v1 hierarchy it has no controller
            # enabled in; the same path is made there so limits land at one relative path.
            if self.layout.mode is Mode.V2:
                self._enable_controllers(self.layout.unified, self.root)
                return
            for h in self.layout.v1:
                self._makedirs(h, self.root)
            return
        for h in self.layout.hierarchies:
            path = ""
            for part in self.root.split("/"):
                if h.version == 2 and self.layout.mode is Mode.V2:
                    self._enable_controllers(h, path)
                path = f"{path}/{part}" if path else part
                self._mkdir_tolerant(h, path)
        if self.layout.mode is Mode.V2:
            self._enable_controllers(self.layout.unified, self.root)

    def enter_agent_leaf(self, pid: int | None = None) -> Group:
        """Move the agent (default: this process) into its leaf of a delegated root."""
        leaf = Group(self.layout, f"{self.root}/{AGENT_LEAF}")
        for h in self.layout.hierarchies:
            self._makedirs(h, leaf.rel)
        leaf.attach(os.getpid() if pid is None else pid)
        return leaf

    def enter_holder_leaf(self, pid: int) -> Group:
        """Move the dyno holder into its leaf of the root (a scope of its own under systemd),
        so that the root can hand controllers down to the dynos' groups."""
        leaf = Group(self.layout, f"{self.root}/{HOLDER_LEAF}")
        for h in self.layout.hierarchies:
            self._makedirs(h, leaf.rel)
        leaf.attach(pid)
        return leaf

    def _enable_controllers(self, h: Hierarchy, rel: str) -> None:
        wanted = [c for c in V2_CONTROLLERS if c in self.layout.controllers]
        enabled = set(h.fs.read(rel, "cgroup.subtree_control").split())
        missing = [c for c in wanted if c not in enabled]
        if missing:
            h.fs.write(rel, "cgroup.subtree_control", " ".join(f"+{c}" for c in missing))

    @classmethod
    def _makedirs(cls, h: Hierarchy, rel: str) -> None:
        path = ""
        for part in rel.split("/"):
            path = f"{path}/{part}" if path else part
            cls._mkdir_tolerant(h, path)

    @staticmethod
    def _mkdir_tolerant(h: Hierarchy, rel: str) -> bool:
        """mkdir; False if it was already there (another creator may have raced us)."""
        try:
            h.fs.mkdir(rel)
        except AlreadyExists:
            return False
        return True

    # -- groups -------------------------------------------------------------------------------

    def group(self, rel: str) -> Group:
        return Group(self.layout, self.full(rel))

    def create_group(self, rel: str, limits: Limits) -> Group:
        """Create `rel` (e.g. "app-x.slice/dyno-1.scope") in every hierarchy with `limits` in
        force. Whatever this call made is removed again if any step fails; AlreadyExists if the
        group is there already (adopt it instead)."""
        sub = normalise(rel)
        if not sub:
            raise CgroupError("a group needs a name below the root", path=self.root, value=rel)
        for controller in controllers_needed(limits):
            self.layout.hierarchy_for(controller)  # ControllerMissing before touching anything
        if not self.layout.unified.fs.exists(self.root):
            raise NotFound("the root does not exist (Tree.ensure() not called?)",
                           path=str(self.layout.unified.fs.path(self.root)))
        group = Group(self.layout, self.full(sub))
        with contextlib.ExitStack() as undo:
            parts = sub.split("/")
            parent = self.root
            for part in parts[:-1]:
                parent = f"{parent}/{part}"
                for h in self.layout.hierarchies:
                    if self._mkdir_tolerant(h, parent):
                        undo.callback(_rmdir_if_unused, h, parent)
                    if self.layout.mode is Mode.V2:
                        self._enable_controllers(h, parent)
            for h in self.layout.hierarchies:
                h.fs.mkdir(group.rel)
                undo.callback(_rmdir_if_unused, h, group.rel)
            group.apply(limits)
            undo.pop_all()
        return group

    def list_groups(self, suffix: str = "") -> list[str]:
        """Leaf groups below the root in any hierarchy (relative to the root), for adoption by
        a restarted agent; the agent's and the holder's own leaves are not listed. An emptied
        parent is a leaf too: `suffix` (e.g. ".scope") keeps only the names the caller gives
        its groups."""
        leaves: set[str] = set()
        for h in self.layout.hierarchies:
            leaves.update(self._leaves(h, self.root))
        leaves -= RESERVED_LEAVES
        return sorted(leaf for leaf in leaves if leaf.endswith(suffix))

    def _leaves(self, h: Hierarchy, rel: str) -> list[str]:
        try:
            children = h.fs.children(rel)
        except NotFound:
            return []
        if not children:
            return [] if rel == self.root else [rel[len(self.root) + 1:]]
        out = []
        for child in children:
            out.extend(self._leaves(h, f"{rel}/{child}"))
        return out

    def sweep_empty(self, keep: Callable[[str], bool] = lambda rel: False) -> list[str]:
        """Remove every group below the root that has no processes and no children, deepest
        first, in every hierarchy; returns what went (relative to the root). Meant for start-up,
        before any group is being created: a group created but not yet attached looks empty.
        `keep` spares groups the caller still wants."""
        removed: set[str] = set()
        for h in self.layout.hierarchies:
            removed.update(self._sweep(h, self.root, keep))
        return sorted(removed)

    def _sweep(self, h: Hierarchy, rel: str, keep: Callable[[str], bool]) -> list[str]:
        try:
            children = h.fs.children(rel)
        except NotFound:
            return []
        removed = []
        for child in children:
            removed.extend(self._sweep(h, f"{rel}/{child}", keep))
        if rel == self.root:
            return removed
        sub = rel[len(self.root) + 1:]
        if sub in RESERVED_LEAVES or keep(sub):
            return removed
        try:
            if h.fs.children(rel) or h.fs.procs(rel):
                return removed
            h.fs.rmdir(rel)
        except (NotFound, Busy):
            return removed
        removed.append(sub)
        return removed

    def destroy(self) -> None:
        """Remove the whole root (tests, uninstall): sweep, then the root itself. NotEmpty if
        a group still has processes."""
        self.sweep_empty()
        left = self.list_groups()
        if left:
            raise NotEmpty(f"groups remain: {', '.join(left[:5])}", path=self.root)
        if self.layout.delegated:
            return  # the delegated cgroup belongs to systemd; never remove it
        for h in self.layout.hierarchies:
            path = self.root
            while path:
                try:
                    h.fs.rmdir(path)
                except NotFound:
                    pass
                except Busy:
                    break
                path = path.rsplit("/", 1)[0] if "/" in path else ""


def _rmdir_if_unused(h: Hierarchy, rel: str) -> None:
    # Undo of a half-made create: a parent another creator has meanwhile put a group into is
    # theirs to keep (EBUSY), and the original error is what the caller must see.
    with contextlib.suppress(CgroupError):
        h.fs.rmdir(rel)
