"""`dynoagent stack build`: a recipe made into a stack with mmdebstrap in a temporary directory,
verified (its python3 runs, the launcher's mount points are there, nothing of the host), its
contents recorded, then renamed into place. Equal inputs and a stack in place: nothing to do.

The machine (mmdebstrap, chroot) is behind `Machine`, so the unit tests drive every path
with a fake; everything else here is plain logic over the stacks directory.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import os
import shutil
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol, TextIO

from agent.launcher.rootfs import MOUNT_POINTS, stack_has_mount_points
from agent.slugs.store import sha256_file
from agent.stacks import recipe as rc
from agent.stacks.store import StackInfo, StackStore

# A cold bookworm build takes about a minute on the development machines; a build that has
# not finished in this long is stuck (a mirror that stopped answering).
BUILD_TIMEOUT_S = 1800.0
VERIFY_TIMEOUT_S = 120.0
# How much of a failed build's output its error repeats.
TAIL_LINES = 15
# What the stack's python3 must be able to do: import the modules whose C libraries a web app
# needs, and make a virtualenv with pip in it when python3-venv is in.
_PYTHON_CHECK = """\
import sys, ssl, sqlite3, ctypes, zlib, json
extra = sys.argv[1:]
for name in extra:
    __import__(name)
print("python", ".".join(map(str, sys.version_info[:3])))
"""
# The package that brings each module the check imports when it is in the recipe.
_PYTHON_EXTRAS = (("python3-venv", "ensurepip"), ("python3-pip", "pip"))
INDENT = "       "


class StackBuildError(Exception):
    """A build failed or may not run; the message says why. Nothing was left behind."""


class Machine(Protocol):
    def versions(self) -> rc.Tools: ...

    def mmdebstrap(self, argv: Sequence[str], env: Mapping[str, str],
                   line: Callable[[str], None], timeout_s: float) -> int:
        """Run mmdebstrap; every line of its output goes to `line`; its exit status."""

    def run_in(self, root: Path, argv: Sequence[str], timeout_s: float) -> tuple[int, str]:
        """Run `argv` chrooted into `root`: (exit status, stdout and stderr)."""


@dataclass(frozen=True)
class BuildResult:
    info: StackInfo
    built: bool  # False: it was up to date


def build(store: StackStore, name: str, recipe: rc.Recipe, machine: Machine, out: TextIO, *,
          rebuild: bool = False, in_use: Callable[[], list[str]] = list,
          clock: Callable[[], float] = time.monotonic,
          timeout_s: float = BUILD_TIMEOUT_S) -> BuildResult:
    """Build stack `name` from `recipe` unless one built from the same inputs is in place
    (`rebuild` builds it anyway, e.g. for newer package versions). A stack that `in_use()`
    dynos run on is not replaced."""
    rc.check_name(name)
    data = rc.inputs(recipe, machine.versions())
    key = rc.input_key(data)

    def say(text: str) -> None:
        out.write(text + "\n")
        out.flush()

    def waiting() -> None:
        say(f"-----> Waiting for another build or removal in {store.dir}")

    with store.locked(waiting):
        store.sweep()
        current = store.info(name)
        in_place = store.exists(name)
        if (not rebuild and in_place and current is not None and current.key == key
                and stack_has_mount_points(str(store.root(name)))):
            say(f"-----> Stack {name} is up to date ({rc.describe(recipe.packages, recipe.suite)}"
                f", key {key[:12]}, built {current.built_at})")
            return BuildResult(current, built=False)
        if in_place:
            users = in_use()
            if users:
                raise StackBuildError(f"stack {name} is in use by dyno(s) {', '.join(users)}: "
                                      "stop them before rebuilding it")
        started = clock()
        say(f"-----> Building stack {name} ({rc.describe(recipe.packages, recipe.suite)})")
        say(f"{INDENT}packages: {', '.join(recipe.packages)}")
        say(f"{INDENT}sources: {'; '.join(recipe.sources())}")
        say(f"{INDENT}mmdebstrap {data['mmdebstrap']}, {data['architecture']}, "
            f"SOURCE_DATE_EPOCH={recipe.source_date_epoch}, key {key[:12]}")
        target = store.temp_root(name)
        try:
            info = _make(name, key, data, recipe, target, machine, say, timeout_s)
            info = replace(info, build_s=round(clock() - started, 1))
            store.install(name, target, info)
        except BaseException:
            shutil.rmtree(target, ignore_errors=True)
            raise
    say(f"-----> Stack {name} ready in {store.root(name)}: "
        f"{info.size_bytes / 1e6:.0f} MB, {len(info.packages)} packages"
        f"{f', Python {info.python}' if info.python else ''} (built in {info.build_s:.0f} s)")
    return BuildResult(info, built=True)


def _make(name: str, key: str, data: dict[str, object], recipe: rc.Recipe, target: Path,
          machine: Machine, say: Callable[[str], None], timeout_s: float) -> StackInfo:
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)

    def line(text: str) -> None:
        tail.append(text)
        say(INDENT + text)

    argv = rc.mmdebstrap_argv(recipe, str(target))
    status = machine.mmdebstrap(argv, rc.build_env(recipe, os.environ), line, timeout_s)
    if status != 0:
        last = "\n".join(tail)
        raise StackBuildError(f"mmdebstrap exited with status {status}; its last lines:\n"
                              f"{last}")
    say("-----> Verifying the stack")
    python = verify(target, recipe.packages, machine)
    if python:
        say(f"{INDENT}python3 {python} runs in it")
    say(f"{INDENT}mount points {', '.join('/' + m for m in MOUNT_POINTS)} present")
    say("-----> Recording its contents")
    digest, size_bytes, files = content_hash(target)
    packages = installed_packages(target / "var/lib/dpkg/status")
    say(f"{INDENT}{len(packages)} packages, {files} files, content sha256 {digest[:12]}")
    return StackInfo(name=name, key=key, inputs=dict(data), packages=packages,
                     content_sha256=digest, size_bytes=size_bytes, files=files, python=python,
                     built_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))


def verify(root: Path, packages: Iterable[str], machine: Machine) -> str | None:
    """Check a freshly built root; the stack's python3 version (None when it has none).
    Raises StackBuildError naming what is wrong."""
    missing = [f"/{m}" for m in MOUNT_POINTS
               if not (root / m).is_dir() or (root / m).is_symlink()]
    if missing:
        raise StackBuildError(f"the stack lacks the mount points {', '.join(missing)}")
    hostname = root / "etc/hostname"
    if hostname.is_file() and hostname.read_text(errors="replace").strip() != "localhost":
        raise StackBuildError("the stack's /etc/hostname is not the neutral one (the build "
                              "copied the host's)")
    status, output = machine.run_in(root, ["/bin/sh", "-c", "exit 0"], VERIFY_TIMEOUT_S)
    if status != 0:
        raise StackBuildError(f"/bin/sh does not run in the stack (status {status}): "
                              f"{output.strip()[-500:]}")
    if not (root / "usr/bin/python3").exists():
        return None
    names = set(packages)
    extras = [module for package, module in _PYTHON_EXTRAS if package in names]
    # -I: no user site, no PYTHON* variables; -B: writes no bytecode into the stack.
    status, output = machine.run_in(
        root, ["/usr/bin/python3", "-I", "-B", "-c", _PYTHON_CHECK, *extras], VERIFY_TIMEOUT_S)
    words = output.split()
    if status != 0 or len(words) < 2 or words[-2] != "python":
        raise StackBuildError(f"the stack's python3 fails (status {status}): "
                              f"{output.strip()[-500:]}")
    return words[-1]


def installed_packages(status_file: Path) -> list[str]:
    """`name=version` of every installed package in a dpkg status file, sorted."""
    found = []
    for paragraph in status_file.read_text(errors="replace").split("\n\n"):
        fields = {}
        for text in paragraph.splitlines():
            key, sep, value = text.partition(":")
            if sep and not text.startswith((" ", "\t")):
                fields[key] = value.strip()
        if "Package" in fields and fields.get("Status", "").endswith(" installed"):
            found.append(f"{fields['Package']}={fields.get('Version', '')}")
    return sorted(found)


def content_hash(root: Path) -> tuple[str, int, int]:
    """(sha256 of the tree, bytes in its regular files, entries). Every entry counts with its
    path, type, mode, owner, and content (files), target (symlinks) or device number; mtimes
    do not (they are the build's, not the packages')."""
    digest = hashlib.sha256()
    size_bytes = entries = 0
    for top, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted([*dirs, *files]):
            path = os.path.join(top, name)
            st = os.lstat(path)
            entries += 1
            if stat.S_ISREG(st.st_mode):
                what = sha256_file(path)
                size_bytes += st.st_size
            elif stat.S_ISLNK(st.st_mode):
                what = os.readlink(path)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                what = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
            else:
                what = ""
            rel = os.path.relpath(path, root)
            digest.update(os.fsencode(f"{st.st_mode:o} {st.st_uid}:{st.st_gid} {what} {rel}"))
            digest.update(b"\0")
    return digest.hexdigest(), size_bytes, entries


class HostMachine:
    """The real machine: mmdebstrap as root in a mount namespace of its own (the mounts it
    makes in the new root vanish with it, even when it is killed), chroot for the checks."""

    def versions(self) -> rc.Tools:
        return rc.Tools(mmdebstrap=_output(["mmdebstrap", "--version"]).split()[-1],
                        architecture=_output(["dpkg", "--print-architecture"]).strip())

    def mmdebstrap(self, argv: Sequence[str], env: Mapping[str, str],
                   line: Callable[[str], None], timeout_s: float) -> int:
        try:
            # A process group of its own, so that a timeout or a Ctrl-C ends apt and dpkg too.
            proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", *argv],
                                    env=dict(env), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    process_group=0)
        except FileNotFoundError as exc:
            raise StackBuildError(f"{exc.filename} is not installed (apt-get install "
                                  "mmdebstrap util-linux)") from None
        expired = threading.Event()

        def expire() -> None:
            expired.set()
            _kill_group(proc.pid)

        timer = threading.Timer(timeout_s, expire)
        timer.start()
        try:
            assert proc.stdout is not None
            for raw in proc.stdout:
                line(raw.decode(errors="replace").rstrip("\n"))
            status = proc.wait()
            if expired.is_set():
                raise StackBuildError(f"mmdebstrap did not finish in {timeout_s:.0f} s")
            return status
        finally:
            timer.cancel()
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    _kill_group(proc.pid)
                    proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()

    def run_in(self, root: Path, argv: Sequence[str], timeout_s: float) -> tuple[int, str]:
        try:
            result = subprocess.run(["/usr/sbin/chroot", str(root), *argv], capture_output=True,
                                    text=True, errors="replace", timeout=timeout_s,
                                    env={"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"},
                                    stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return -signal.SIGKILL, f"no answer in {timeout_s:.0f} s"
        return result.returncode, result.stdout + result.stderr


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def _output(argv: list[str]) -> str:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise StackBuildError(f"{argv[0]} is not installed (apt-get install mmdebstrap)") \
            from None
    if result.returncode != 0:
        raise StackBuildError(f"{' '.join(argv)} failed: {result.stderr.strip()}")
    return result.stdout + result.stderr
