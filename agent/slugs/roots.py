"""Where a local slug (`release.slug.path`) may come from: under one of the config's
`slug_roots`, and never reaching the agent's own files (records, stacks, slug cache,
run_dir, sockets) or those every agent on a host keeps in the default places.

The launcher mounts a slug read-only at /app with its owner's files shown as the dyno's
own, so a slug path is a window onto the host: this is the one place that decides which.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

from agent.config import HOST_WIDE_PATHS, Config
from agent.errors import excerpt

# How much of a refused path its error quotes: enough to recognise it, escaped.
PATH_CHARS = 200


class SlugPathRefused(ValueError):
    """A slug path may not be used; the message says why, naming the path it resolved to."""


@dataclass(frozen=True)
class SlugRoots:
    """The roots a slug path must lie under, and what it may neither contain nor lie in.

    Paths are kept as configured and resolved at every check: a root or a protected
    directory may be created (or replaced by a symlink) after the agent started.
    """

    roots: tuple[str, ...]
    # (path, what it is) pairs for messages.
    protected: tuple[tuple[str, str], ...]

    @classmethod
    def from_config(cls, config: Config, extra_roots: Iterable[str] = ()) -> SlugRoots:
        state = str(config.state_dir)
        protected = [
            (state, "the agent's state_dir (records, stacks, slug cache)"),
            (os.path.join(state, "slugs", "slugs"), "the slug cache"),
            (os.path.join(state, "slugs", "tmp"), "the slug cache"),
            (str(config.run_dir), "the agent's run_dir"),
            # The attach socket lies beside it: whatever contains the one contains both.
            (str(config.socket_path), "the operator socket"),
        ]
        for key in ("coordinator_token_file", "coordinator_client_key_file"):
            secret = getattr(config, key)
            if secret is not None:
                protected.append((str(secret), f"the {key}"))
        protected += [(str(path), "a directory dynoagents keep their state in")
                      for path in HOST_WIDE_PATHS]
        return cls(roots=tuple(str(r) for r in (*config.effective_slug_roots, *extra_roots)),
                   protected=tuple(protected))

    def resolve(self, path: str) -> str:
        """`path` with every symlink resolved, after checking it; raises SlugPathRefused.

        A path that does not exist (yet) is resolved as far as it exists; the dyno's start
        reports it missing, and resolves and checks it again then.
        """
        real = real_path(path)
        roots = [real_path(root) for root in self.roots]
        protected = [(real_path(where), where, what) for where, what in self.protected]
        for target, where, what in protected:
            if _within(target, real):
                raise SlugPathRefused(f"{_shown(path)} would show {what} ({where}) "
                                      "to the dyno")
        if not any(_within(real, root) for root in roots):
            listed = ", ".join(self.roots) or "none"
            resolved = "" if real == path else f" (it resolves to {_shown(real)})"
            raise SlugPathRefused(f"{_shown(path)}{resolved} is not under any of "
                                  f"the agent's "
                                  f"slug_roots ({listed})")
        for target, where, what in protected:
            # Inside a protected directory only below a slug root put there on purpose (the
            # default <state_dir>/slugs); never in the rest of it.
            if _within(real, target) and not any(
                    _within(real, root) and _within(root, target) and root != target
                    for root in roots):
                raise SlugPathRefused(f"{_shown(path)} lies inside {what} ({where})")
        return real


def real_path(path: str) -> str:
    """`os.path.realpath(path)`, resolved by the kernel in one go where the path exists: an
    O_PATH open follows every symlink and `..` as any later open would, and /proc names
    where it ended. realpath itself, a Python loop of one lstat per component, cost a start
    about 0.5 ms for the dozen paths of a check. A path that does not exist (or a kernel
    answer that is no plain path) is left to realpath, which resolves it as far as it
    exists."""
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except (OSError, ValueError):
        return os.path.realpath(path)
    try:
        where = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        where = ""
    finally:
        os.close(fd)
    return where if where.startswith("/") and not where.endswith(" (deleted)") \
        else os.path.realpath(path)


def _shown(path: str) -> str:
    """A path as its error quotes it: as is when short and printable, else escaped and cut."""
    return path if len(path) <= PATH_CHARS and path.isprintable() else excerpt(path, PATH_CHARS)


def _within(path: str, directory: str) -> bool:
    """`path` is `directory` or below it (both absolute and resolved)."""
    return path == directory or path.startswith(directory.rstrip("/") + "/")
