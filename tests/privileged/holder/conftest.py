"""Fixtures of the privileged holder tests: the unit tier's holder harness, a holder with the
real launcher, and per-test cgroups (uniquely named, emptied and removed even on failure)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.names import unique
from tests.support.wait import wait_for
from tests.unit.holder.harness import HolderProc, kill_held, short_dir, start_holder, stop_holder

__all__ = ["TINI", "cgroup_factory", "isolated_holder", "request_factory", "short_dir"]

HIERARCHIES = ("memory", "pids", "cpu", "unified")
TINI = "/usr/bin/tini"

@pytest.fixture
def cgroup_factory() -> Iterator[Callable[[], list[str]]]:
    made: list[Path] = []

    def make() -> list[str]:
        name = unique("dth")
        for hierarchy in HIERARCHIES:
            path = Path("/sys/fs/cgroup") / hierarchy / name
            path.mkdir()
            made.append(path)
        return [str(Path("/sys/fs/cgroup") / h / name / "cgroup.procs") for h in HIERARCHIES]

    yield make
    for path in reversed(made):
        # Only processes this test launched can be in a cgroup it created.
        for pid in (path / "cgroup.procs").read_text().split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        wait_for(_emptied(path), 10, what=f"{path} empty")
        path.rmdir()


def _emptied(path: Path) -> Callable[[], bool]:
    return lambda: not (path / "cgroup.procs").read_text().strip()


@pytest.fixture
def isolated_holder(short_dir: str) -> Iterator[HolderProc]:
    h = HolderProc(os.path.join(short_dir, "iso.sock"), os.path.join(short_dir, "iso-state"),
                   extra=["--backend", "isolated"])
    start_holder(h)
    try:
        yield h
    finally:
        with contextlib.suppress(Exception):
            asyncio.run(kill_held(h.socket))
        stop_holder(h)


@pytest.fixture
def request_factory(tmp_path: Path,
                    cgroup_factory: Callable[[], list[str]]) -> Callable[..., dict[str, Any]]:
    def make(command: str) -> dict[str, Any]:
        name = unique("dh")
        slug = tmp_path / name / "slug"
        dyno_dir = tmp_path / name / "dyno"
        slug.mkdir(parents=True)
        dyno_dir.mkdir()
        uid = 600000 + secrets.randbelow(60000)  # above every agent's range
        return {"dyno_id": name, "hostname": f"{name}-host",
                "argv": ["/bin/sh", "-c", command],
                "env": [["PATH", "/usr/local/bin:/usr/bin:/bin"], ["HOME", "/app"]],
                "uid": uid, "gid": uid, "stack_dir": "/", "slug_dir": str(slug),
                "dyno_dir": str(dyno_dir), "writable_limit_bytes": 32 << 20,
                "cgroup_procs": cgroup_factory(), "netns_path": None,
                "hide_paths": [str(tmp_path)], "reaper": TINI}

    return make
