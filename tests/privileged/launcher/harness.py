"""Launcher test harness: a subreaper holder stand-in, uniquely named cgroups in every
hierarchy (removed even on failure) and a factory of launch requests."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support.names import unique
from tests.support.wait import wait_for

HELPER = Path(__file__).with_name("holder_helper.py")
REPO = Path(__file__).resolve().parents[3]
HIERARCHIES = ("memory", "pids", "cpu", "unified")


class Holder:
    """Talks to holder_helper.py; remembers every dyno pid so teardown can kill leftovers."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, str(HELPER)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, cwd=REPO)
        self.pids: list[int] = []

    def call(self, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("holder helper died")
        answer: dict[str, Any] = json.loads(line)
        if "pid" in answer and cmd["op"] in ("launch", "enter"):
            self.pids.append(answer["pid"])
        return answer

    def launch(self, req: dict[str, Any], out: Path) -> dict[str, Any]:
        return self.call(op="launch", req=req, stdout=str(out))

    def wait(self, pid: int, timeout_s: float = 30) -> int:
        answer = self.call(op="wait", pid=pid, timeout_s=timeout_s)
        assert "status" in answer, f"pid {pid} did not exit within {timeout_s}s: {answer}"
        self.pids.remove(pid)
        return int(answer["status"])

    def close(self) -> None:
        for pid in list(self.pids):
            self.call(op="kill", pid=pid, sig=int(signal.SIGKILL))
            self.call(op="wait", pid=pid, timeout_s=10)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=10)
        self.proc.stdout.close()


@pytest.fixture
def holder() -> Iterator[Holder]:
    h = Holder()
    try:
        yield h
    finally:
        h.close()


@dataclass
class Cgroups:
    made: list[Path] = field(default_factory=list)

    def make(self) -> tuple[str, ...]:
        name = unique("dtl")
        procs = []
        for hierarchy in HIERARCHIES:
            path = Path("/sys/fs/cgroup") / hierarchy / name
            path.mkdir()
            self.made.append(path)
            procs.append(str(path / "cgroup.procs"))
        return tuple(procs)

    def remove_all(self) -> None:
        for path in reversed(self.made):
            for pid in (path / "cgroup.procs").read_text().split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            procs = path / "cgroup.procs"

            def empty(procs: Path = procs) -> bool:
                return not procs.read_text().strip()

            wait_for(empty, 10, what=f"{path} empty")
            path.rmdir()


@pytest.fixture
def cgroups() -> Iterator[Cgroups]:
    c = Cgroups()
    try:
        yield c
    finally:
        c.remove_all()


@dataclass
class Dyno:
    """A launch request (as the helper's JSON) plus where its output goes."""

    req: dict[str, Any]
    out: Path
    base: Path

    def output(self) -> str:
        return self.out.read_text() if self.out.exists() else ""


@pytest.fixture
def make_dyno(tmp_path: Path, cgroups: Cgroups) -> Any:
    def make(command: str, *, name: str | None = None, slug_files: dict[str, str] | None = None,
             **overrides: Any) -> Dyno:
        name = name or unique("d")
        base = tmp_path / name
        slug = base / "slug"
        dyno_dir = base / "dyno"
        slug.mkdir(parents=True, exist_ok=True)
        dyno_dir.mkdir(exist_ok=True)
        for rel, text in (slug_files or {"Procfile": "web: true\n"}).items():
            (slug / rel).parent.mkdir(parents=True, exist_ok=True)
            (slug / rel).write_text(text)
        uid = 600000 + secrets.randbelow(60000)  # above every agent's range
        req: dict[str, Any] = {
            "dyno_id": name, "hostname": f"{name}-host", "argv": ["/bin/sh", "-c", command],
            "env": [["PATH", "/usr/local/bin:/usr/bin:/bin"], ["HOME", "/app"]],
            "uid": uid, "gid": uid, "stack_dir": "/", "slug_dir": str(slug),
            "dyno_dir": str(dyno_dir), "writable_limit_bytes": 32 << 20,
            "cgroup_procs": list(cgroups.make()), "netns_path": None,
            "hide_paths": [str(tmp_path)],
        }
        req.update(overrides)
        return Dyno(req=req, out=base / "out.txt", base=base)

    return make


def run(holder: Holder, dyno: Dyno, timeout_s: float = 30) -> tuple[int, str]:
    """Launch, wait for exit, return (status, combined output)."""
    answer = holder.launch(dyno.req, dyno.out)
    assert "pid" in answer, answer
    status = holder.wait(answer["pid"], timeout_s)
    return status, dyno.output()
