"""The stacks directory, `<state_dir>/stacks`: one root per stack (`NAME/`), its metadata beside it
(`.NAME.json`), a lock for builders and removers, and which of the agent's dynos use a stack.

Names starting with a dot are never stack names (spec.STACK), so the metadata, the lock and a
build's temporary directories cannot collide with a stack.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from agent.spec import STACK

LOCK_NAME = ".lock"
# Prefixes of what a build or a removal leaves while it runs (see sweep()).
TMP_MARK = ".tmp-"
OLD_MARK = ".old-"


@dataclass(frozen=True)
class StackInfo:
    """A stack's metadata: the inputs it was built from (and their key), what it contains
    (`name=version` of every package, a hash of every file's path, type, mode, owner and
    content) and its size."""

    name: str
    key: str
    inputs: dict[str, Any]
    packages: list[str] = field(default_factory=list)
    content_sha256: str = ""
    size_bytes: int = 0
    files: int = 0
    python: str | None = None  # the stack's python3 version, when it has one
    built_at: str = ""
    build_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> StackInfo:
        if not isinstance(data, dict):
            raise ValueError("stack metadata is not an object")
        known = {name for name in cls.__dataclass_fields__}
        values = {key: value for key, value in data.items() if key in known}
        info = cls(**values)
        if not isinstance(info.key, str) or not isinstance(info.inputs, dict):
            raise ValueError("stack metadata has no key or inputs")
        return info


class StackStore:
    def __init__(self, directory: Path) -> None:
        self.dir = directory

    def root(self, name: str) -> Path:
        return self.dir / name

    def meta_path(self, name: str) -> Path:
        return self.dir / f".{name}.json"

    def ensure(self) -> None:
        # The state dir is the agent's (0700, as the daemon makes it); the stacks in it are
        # reached by dynos only through their mounts.
        if not self.dir.parent.exists():
            self.dir.parent.mkdir(mode=0o700, parents=True)
        self.dir.mkdir(mode=0o755, exist_ok=True)

    @contextlib.contextmanager
    def locked(self, waiting: Callable[[], None] | None = None) -> Iterator[None]:
        """Hold the directory's lock (one builder or remover at a time); `waiting` is called
        once if another holds it."""
        self.ensure()
        fd = os.open(self.dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if waiting is not None:
                    waiting()
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def names(self) -> list[str]:
        if not self.dir.is_dir():
            return []
        return sorted(entry.name for entry in self.dir.iterdir()
                      if STACK.fullmatch(entry.name) and entry.is_dir()
                      and not entry.is_symlink())

    def exists(self, name: str) -> bool:
        root = self.root(name)
        return root.is_dir() and not root.is_symlink()

    def info(self, name: str) -> StackInfo | None:
        """The stack's metadata; None when it has none or it cannot be read."""
        try:
            return StackInfo.from_json(json.loads(self.meta_path(name).read_bytes()))
        except (OSError, ValueError, TypeError):
            return None

    def write_info(self, info: StackInfo) -> None:
        path = self.meta_path(info.name)
        fd, tmp = tempfile.mkstemp(prefix=f".{info.name}.json{TMP_MARK}", dir=self.dir)
        try:
            with os.fdopen(fd, "w") as out:
                json.dump(info.to_json(), out, indent=2, sort_keys=True)
                out.write("\n")
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def temp_root(self, name: str) -> Path:
        return Path(tempfile.mkdtemp(prefix=f".{name}{TMP_MARK}", dir=self.dir))

    def install(self, name: str, built: Path, info: StackInfo) -> None:
        """Put `built` in place as the stack `name`, replacing the one there; the metadata is
        written last, so that a crash on the way leaves a stack without metadata (rebuilt by
        the next build), never metadata that describes another tree."""
        self.meta_path(name).unlink(missing_ok=True)
        old: Path | None = None
        if self.exists(name):
            old = Path(tempfile.mkdtemp(prefix=f".{name}{OLD_MARK}", dir=self.dir))
            # Onto the empty directory mkdtemp reserved: rename(2) replaces an empty one.
            os.rename(self.root(name), old)
        os.rename(built, self.root(name))
        self.write_info(info)
        if old is not None:
            shutil.rmtree(old)

    def remove(self, name: str) -> None:
        """Take the stack out of its name first (a dyno starting now finds no stack instead of
        half of one), then delete it."""
        self.meta_path(name).unlink(missing_ok=True)
        if not self.exists(name):
            return
        gone = Path(tempfile.mkdtemp(prefix=f".{name}{OLD_MARK}", dir=self.dir))
        os.rename(self.root(name), gone)
        shutil.rmtree(gone)

    def sweep(self) -> list[Path]:
        """Remove what killed builds and removals left (call with the lock held)."""
        found = [entry for entry in self.dir.iterdir()
                 if entry.name.startswith(".") and (TMP_MARK in entry.name or
                                                    OLD_MARK in entry.name)]
        for entry in found:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        return found


def dynos_using(state_dir: Path, name: str) -> list[str]:
    """Ids of the dynos whose records in `state_dir` name the stack: the agent keeps a record
    for every dyno it has, running or not, until the dyno is deleted. Only this state dir's
    agent is known here; a stacks directory shared by several agents (a symlink) is not."""
    found = []
    for path in sorted((state_dir / "dynos").glob("*.json")):
        try:
            data = json.loads(path.read_bytes())
            stack = data["spec"]["release"]["stack"]
        except (OSError, ValueError, TypeError, KeyError):
            continue
        if stack == name:
            found.append(path.stem)
    return found


def link_stacks(state_dir: Path, stacks_dir: Path) -> None:
    """Make `<state_dir>/stacks` a symlink to `stacks_dir` (an agent whose own state dir is
    private, like `dynoagent up`'s, runs the stacks built in another's), unless the state dir
    has stacks of its own. Replaced atomically: agents only ever resolve it whole."""
    link = state_dir / "stacks"
    if link.exists() and not link.is_symlink():
        return
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = state_dir / f".stacks{TMP_MARK}{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(stacks_dir.absolute())
    os.replace(tmp, link)
