"""The builder: one build of an app's source into a slug, in a build dyno.

A build gets a workspace of its own: a tmpfs holding a copy of the source (bound read-write
at /app in the build dyno, so every path a buildpack writes is the path the app runs from),
the buildpacks and the driver (read-only at /tmp/build), the config vars as files (ENV_DIR,
read-only at /tmp/env) and a directory for what the agent reads back (/tmp/out). The app's
build cache (CACHE_DIR, /tmp/cache) outlives the build. The build dyno is an ordinary dyno
of the supervisor (`build.<n>`: its states, logs and limits like any other) that the runtime
gives these mounts instead of a slug.

Once the dyno has ended (every process of it gone, so nothing changes the tree any more),
/app is packed into a gzip tarball in Heroku's layout (`./app/...`), hashed, and extracted
again with the slug store's extractor, which refuses what a hostile build could leave (links
out of /app, device files); the result is published atomically under the store, keyed by
the build's inputs, so an unchanged app is not built twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import secrets
import shutil
import stat
import tarfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent import errors
from agent.builds import buildpacks as bp
from agent.builds.release import ReleaseError, ReleaseInfo, merge_releases, parse_release
from agent.errors import BuildFailed
from agent.launcher import syscalls as sc
from agent.observability.logs import LogLine
from agent.slugs.store import (
    DEFAULT_MAX_UNPACKED_BYTES,
    SlugError,
    extract_tarball,
    sha256_file,
    slug_root,
)
from agent.spec import APP, BUILD_TYPE, ENV_KEY, HOST_STACK, STACK, SlugSource
from agent.supervision.runtime import BuildMounts

log = logging.getLogger(__name__)

# Heroku's limit on a build's duration.
DEFAULT_TIMEOUT_S = 25 * 60
# Builds compile (pip wheels, npm's native modules): more memory than a web dyno needs.
DEFAULT_BUILD_SIZE = "performance-m"
DRIVER = Path(__file__).with_name("driver.sh")
# Part of every cache key: a change to how builds run makes every app build again.
BUILD_FORMAT = "dynoagent-build-1"
# The driver's exit statuses that are not a buildpack's.
_EXIT_NOT_DETECTED = 99
_EXIT_NOT_APPLICABLE = 98
# Directories of a source that never reach a slug (as with `git push heroku`).
SKIPPED_SOURCE = frozenset({".git"})
_COMPRESS_LEVEL = 6


class NothingDetected(BuildFailed):
    """No buildpack detected the app; `tried` names them."""

    def __init__(self, tried: Sequence[str]) -> None:
        super().__init__(f"no buildpack detected this app (tried: {', '.join(tried)}); name one "
                         "with -b, or add the files a buildpack looks for (requirements.txt, "
                         "package.json, ...)")
        self.tried = tuple(tried)


@dataclass(frozen=True)
class BuildRequest:
    app: str
    source: Path
    # Built-in names (python, nodejs), directories, or tarball URLs with #sha256=HEX. Empty:
    # the built-in ones, the first that detects the app; named: every one, in order.
    buildpacks: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    stack: str = HOST_STACK
    size: str = DEFAULT_BUILD_SIZE
    timeout_s: float = DEFAULT_TIMEOUT_S
    # Use a slug already built from the same inputs.
    use_cache: bool = True
    # The slug the build dyno's release names: where `source` came from (a tarball or a URL
    # the slug store extracted into its cache, which no release may name by path), or, by
    # default, `source` itself.
    slug: SlugSource | None = None

    def validate(self) -> None:
        if not APP.fullmatch(self.app):
            raise errors.BadRequest(f"app {errors.excerpt(self.app)} must match {APP.pattern}")
        if self.stack != HOST_STACK and not STACK.fullmatch(self.stack):
            raise errors.BadRequest(f"stack {errors.excerpt(self.stack)} is not a stack name")
        for key in self.env:
            if not ENV_KEY.fullmatch(key):
                raise errors.BadRequest(f"config var name {errors.excerpt(key)} must match "
                                        f"{ENV_KEY.pattern}")
        if not 1 <= self.timeout_s <= 24 * 3600:
            raise errors.BadRequest("timeout_s must be within 1..86400")


@dataclass(frozen=True)
class BuildResult:
    key: str
    slug_path: Path  # the gzip tarball
    slug_dir: Path  # the same slug extracted: what /app of a dyno is
    sha256: str
    size_bytes: int
    process_types: dict[str, str]
    config_vars: dict[str, str]
    buildpacks: tuple[str, ...]
    stack: str
    cached: bool
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "slug": {"path": str(self.slug_path), "sha256": self.sha256,
                                          "dir": str(self.slug_dir),
                                          "size_bytes": self.size_bytes},
                "process_types": self.process_types, "config_vars": self.config_vars,
                "buildpacks": list(self.buildpacks), "stack": self.stack,
                "cached": self.cached, "seconds": round(self.seconds, 3)}

    @classmethod
    def load(cls, entry: Path, cached: bool) -> BuildResult:
        meta = json.loads((entry / "build.json").read_text())
        return cls(key=meta["key"], slug_path=entry / "slug.tgz",
                   slug_dir=slug_root(entry / "tree"), sha256=meta["sha256"],
                   size_bytes=int(meta["size_bytes"]),
                   process_types=dict(meta["process_types"]),
                   config_vars=dict(meta["config_vars"]), buildpacks=tuple(meta["buildpacks"]),
                   stack=meta["stack"], cached=cached, seconds=float(meta["seconds"]))


Say = Callable[[str], None]


class Builder:
    """Runs builds through `supervisor` (build dynos) and `runtime` (their mounts).

    `store` keeps finished slugs (one directory per cache key), `caches` the per-app build
    caches, `work` the workspaces of running builds (swept at start)."""

    def __init__(self, supervisor: Any, runtime: Any, *, store: Path, caches: Path,
                 work: Path, buildpack_cache: Path,
                 max_app_bytes: int = DEFAULT_MAX_UNPACKED_BYTES) -> None:
        self.supervisor = supervisor
        self.runtime = runtime
        self.store = store
        self.caches = caches
        self.work = work
        self.buildpack_cache = buildpack_cache
        self.max_app_bytes = max_app_bytes
        self._locks: dict[str, asyncio.Lock] = {}

    # -- the whole build ---------------------------------------------------------------------
    async def build(self, request: BuildRequest, say: Say | None = None,
                    named: Say | None = None) -> BuildResult:
        """Build `request`'s source, or find it built. The build's lines (the builder's own
        and the build dyno's output) go to the log hub as the build dyno's, and to `say`;
        `named` learns the build dyno's name (`build.N`) once it is chosen."""
        request.validate()
        began = time.monotonic()
        # One build per app at a time: its cache is one directory.
        async with self._locks.setdefault(request.app, asyncio.Lock()):
            name = f"{BUILD_TYPE}.{self._next_number(request.app)}"
            if named is not None:
                named(name)
            hub = self.supervisor.log_hub

            def tell(text: str) -> None:
                hub.publish(LogLine.output(datetime.now(UTC), request.app, name, text))
                if say is not None:
                    say(text)

            if not await asyncio.to_thread(request.source.is_dir):
                raise BuildFailed(f"the source {request.source} is not a directory")
            packs = await bp.resolve_all(request.buildpacks, self.buildpack_cache)
            if not request.buildpacks and not await asyncio.to_thread(
                    bp.builtins_may_detect, request.source):
                raise NothingDetected([p.name for p in packs])
            stack_identity = await asyncio.to_thread(self._stack_identity, request.stack)
            key = await asyncio.to_thread(cache_key, request, packs, stack_identity)
            entry = self.store / key
            if request.use_cache and await asyncio.to_thread((entry / "build.json").is_file):
                result = await asyncio.to_thread(BuildResult.load, entry, True)
                tell(f"-----> Using the slug built from the same source and buildpacks "
                     f"({result.sha256[:12]}, built in {result.seconds:.1f} s)")
                return result
            return await self._build(request, packs, key, began, name, tell)

    def _stack_identity(self, stack: str) -> bytes:
        """What the stack was built from (its metadata, `stack build` writes it): a rebuilt
        stack makes its apps build again."""
        if stack == HOST_STACK:
            return b""
        try:
            return (Path(self.runtime.state_dir) / "stacks" / f".{stack}.json").read_bytes()
        except OSError:
            return b""

    def _next_number(self, app: str) -> int:
        return 1 + max((_ordinal(d.spec.name) for d in self.supervisor.dynos.values()
                        if d.spec.app == app and d.spec.type == BUILD_TYPE), default=0)

    async def _build(self, request: BuildRequest, packs: Sequence[bp.Buildpack], key: str,
                     began: float, name: str, say: Say) -> BuildResult:
        build_id = f"{request.app[:40]}-build-{secrets.token_hex(6)}"
        workspace = Workspace(self.work / build_id)
        cache = self.caches / request.app
        try:
            say(f"-----> Building {request.app} on stack {request.stack}")
            await asyncio.to_thread(workspace.prepare, request, packs, cache,
                                    self.max_app_bytes)
            mode = "all" if request.buildpacks else "first"
            self.runtime.builds[build_id] = BuildMounts(
                app_dir=str(workspace.app),
                binds=((str(workspace.build), "build", False), (str(cache), "cache", True),
                       (str(workspace.env), "env", False), (str(workspace.out), "out", True)),
                owned=(str(workspace.app), str(cache), str(workspace.out)))
            status = await self._run(request, build_id, name, mode)
            if status == _EXIT_NOT_DETECTED:
                raise NothingDetected([p.name for p in packs])
            if status == _EXIT_NOT_APPLICABLE:
                raise BuildFailed("a buildpack named for this build does not apply to the app "
                                  "(its bin/detect failed; see the build output)")
            if status != 0:
                raise BuildFailed(f"the build failed: a buildpack exited {status} (see the "
                                  "build output); no slug was made")
            release = await asyncio.to_thread(workspace.release)
            say("-----> Compressing...")
            result = await asyncio.to_thread(self._publish, workspace, request, key, release,
                                             began)
            say(f"       Done: {result.size_bytes / 1e6:.1f} MB, sha256 {result.sha256}")
            return result
        finally:
            self.runtime.builds.pop(build_id, None)
            await asyncio.to_thread(workspace.remove)

    async def _run(self, request: BuildRequest, build_id: str, name: str, mode: str) -> int:
        """Create the build dyno, wait for its end within the time limit, delete it."""
        supervisor = self.supervisor
        body = {"id": build_id, "app": request.app, "name": name,
                "command": f"/bin/sh /tmp/build/driver.sh {mode}",
                "env": {"STACK": request.stack},
                "release": {"version": 1,
                            "slug": (request.slug or SlugSource(path=str(request.source)))
                            .to_dict(),
                            "stack": request.stack},
                "size": request.size, "restart": "never", "stop_timeout_s": 5}
        with supervisor.subscribe_events() as events:
            await supervisor.create_dyno(body)
            try:
                async with asyncio.timeout(request.timeout_s):
                    return int(await supervisor.wait_ended(build_id, events))
            except TimeoutError:
                raise BuildFailed(f"the build ran past its time limit of "
                                  f"{request.timeout_s:g} s and was stopped") from None
            finally:
                # Stops whatever still runs (SIGTERM, SIGKILL to the cgroup after 5 s); the
                # tree is packed or removed only once no process of the build is left, also
                # when the build itself is cancelled (Ctrl-C, shutdown).
                deletion = asyncio.ensure_future(supervisor.delete_dyno(build_id))
                try:
                    await asyncio.shield(deletion)
                except asyncio.CancelledError:
                    await asyncio.gather(deletion, return_exceptions=True)
                    raise
                except errors.NotFound:
                    pass

    def _publish(self, workspace: Workspace, request: BuildRequest, key: str,
                 release: ReleaseInfo, began: float) -> BuildResult:
        self.store.mkdir(parents=True, exist_ok=True, mode=0o755)
        staging = self.store / f".{key}.{secrets.token_hex(4)}"
        staging.mkdir(mode=0o755)
        try:
            check_tree(workspace.app, "the build left")
            tarball = staging / "slug.tgz"
            pack(workspace.app, tarball)
            digest = sha256_file(tarball)
            (staging / "tree").mkdir(mode=0o755)
            try:
                extract_tarball(tarball, staging / "tree", self.max_app_bytes)
            except SlugError as exc:
                raise BuildFailed(f"the build's /app is not a safe slug: {exc}") from None
            meta = {"key": key, "app": request.app, "sha256": digest,
                    "size_bytes": tarball.stat().st_size,
                    "process_types": release.process_types,
                    "config_vars": release.config_vars,
                    "buildpacks": list(workspace.used_buildpacks()),
                    "stack": request.stack, "seconds": round(time.monotonic() - began, 3),
                    "built_at": datetime.now(UTC).isoformat(timespec="seconds")}
            (staging / "build.json").write_text(json.dumps(meta, indent=2) + "\n")
            final = self.store / key
            if final.exists():
                shutil.rmtree(final)
            os.rename(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return BuildResult.load(final, False)

    def sweep(self) -> list[str]:
        """Workspaces left by an agent that died mid-build: unmounted and removed."""
        if not self.work.is_dir():
            return []
        swept = []
        for entry in self.work.iterdir():
            Workspace(entry).remove()
            swept.append(entry.name)
        for staging in self.store.glob(".*") if self.store.is_dir() else ():
            shutil.rmtree(staging, ignore_errors=True)
        return swept


def _ordinal(name: str) -> int:
    tail = name.rpartition(".")[2]
    return int(tail) if tail.isdigit() else 0


class Workspace:
    """The host side of one build: app (a tmpfs), build (driver + buildpacks), env, out."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.app = path / "app"
        self.build = path / "build"
        self.env = path / "env"
        self.out = path / "out"

    def prepare(self, request: BuildRequest, packs: Sequence[bp.Buildpack], cache: Path,
                max_app_bytes: int) -> None:
        self.path.mkdir(parents=True, mode=0o700)
        for directory in (self.app, self.build, self.env, self.out):
            directory.mkdir(mode=0o755)
        # The path itself is private to root; the dyno reaches the parts through its binds.
        # A tmpfs bounds what the build may write, and goes away in one unmount.
        sc.mount("tmpfs", str(self.app), "tmpfs", sc.MS_NOSUID | sc.MS_NODEV,
                 f"size={max_app_bytes},mode=0755")
        check_tree(request.source, "the source has")
        copy_tree(request.source, self.app, self.path / "source.tar", max_app_bytes)
        shutil.copy2(DRIVER, self.build / "driver.sh")
        (self.build / "buildpacks").mkdir(mode=0o755)
        for index, pack_ in enumerate(packs):
            target = self.build / "buildpacks" / f"{index:02d}-{pack_.name}"
            target.mkdir(mode=0o755)
            copy_tree(pack_.path, target, self.path / "buildpack.tar", max_app_bytes)
        for key, value in request.env.items():
            (self.env / key).write_text(value)
            os.chmod(self.env / key, 0o644)
        cache.mkdir(parents=True, exist_ok=True, mode=0o755)

    def release(self) -> ReleaseInfo:
        try:
            infos = [parse_release(path.read_text(errors="replace"), path.name)
                     for path in sorted(self.out.glob("*.release.yml"))]
        except ReleaseError as exc:
            raise BuildFailed(f"a buildpack's bin/release: {exc}") from None
        return merge_releases(infos)

    def used_buildpacks(self) -> list[str]:
        try:
            return (self.out / "buildpacks").read_text().split()
        except FileNotFoundError:
            return []

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            sc.umount2(str(self.app), sc.MNT_DETACH)
        shutil.rmtree(self.path, ignore_errors=True)


# -- trees: check, copy, pack, hash -----------------------------------------------------------
def check_tree(top: Path, what: str) -> None:
    """Refuse what no slug may hold: device files, fifos, sockets, setuid/setgid files.
    (Links that leave the tree are refused by the extractor that every copy goes through.)"""
    for parent, dirs, files in os.walk(top):
        dirs[:] = [d for d in dirs if not (Path(parent) == top and d in SKIPPED_SOURCE)]
        for name in (*dirs, *files):
            path = os.path.join(parent, name)
            mode = os.lstat(path).st_mode
            shown = os.path.relpath(path, top)
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode)):
                raise BuildFailed(f"{what} a special file at {shown}; refused")
            if mode & (stat.S_ISUID | stat.S_ISGID) and not stat.S_ISDIR(mode):
                raise BuildFailed(f"{what} a setuid or setgid file at {shown}; refused")


def pack(top: Path, tarball: Path, arcname: str = "./app") -> None:
    """A gzip tarball of `top` in Heroku's slug layout, owned by root, modes without
    setuid/setgid/sticky bits, `.git` left out."""
    def clean(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        parts = Path(info.name).parts
        if len(parts) > 1 and parts[1] in SKIPPED_SOURCE:
            return None
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        info.mode &= 0o777
        return info

    with tarfile.open(tarball, "w:gz", compresslevel=_COMPRESS_LEVEL,
                      format=tarfile.PAX_FORMAT) as tar:
        tar.add(str(top), arcname=arcname, recursive=True, filter=clean)


def copy_tree(source: Path, dest: Path, scratch: Path, max_bytes: int) -> None:
    """Copy `source` into `dest` through a tarball and the slug extractor, so that the copy
    holds nothing a slug may not (links out of it refused, files 0644/0755 owned by root)."""
    try:
        pack(source, scratch, arcname=".")
        try:
            extract_tarball(scratch, dest, max_bytes)
        except SlugError as exc:
            raise BuildFailed(f"{source} cannot be built: {exc}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            scratch.unlink()


def tree_digest(top: Path, hasher: Any) -> None:
    """Feed `hasher` with everything of `top` a build can see: names, kinds, exec bits, link
    targets and contents, in a fixed order (`.git` left out)."""
    for parent, dirs, files in os.walk(top):
        dirs.sort()
        dirs[:] = [d for d in dirs if not (Path(parent) == top and d in SKIPPED_SOURCE)]
        rel = os.path.relpath(parent, top)
        for name in sorted(files) + [d for d in dirs if os.path.islink(os.path.join(parent, d))]:
            path = os.path.join(parent, name)
            st = os.lstat(path)
            hasher.update(f"\0{rel}/{name}\0{st.st_mode & 0o170111:o}\0".encode())
            if stat.S_ISLNK(st.st_mode):
                hasher.update(os.readlink(path).encode())
            elif stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    while chunk := f.read(1 << 20):
                        hasher.update(chunk)
        hasher.update(f"\0dir\0{rel}\0".encode())


def cache_key(request: BuildRequest, packs: Sequence[bp.Buildpack],
              stack_identity: bytes = b"") -> str:
    hasher = hashlib.sha256(BUILD_FORMAT.encode())
    hasher.update(hashlib.sha256(stack_identity).digest())
    hasher.update(DRIVER.read_bytes())
    hasher.update(f"\0stack\0{request.stack}\0size\0{request.size}\0".encode())
    for key in sorted(request.env):
        hasher.update(f"\0env\0{key}\0{request.env[key]}".encode())
    for pack_ in packs:
        hasher.update(f"\0buildpack\0{pack_.name}\0".encode())
        tree_digest(pack_.path, hasher)
    hasher.update(b"\0source\0")
    tree_digest(request.source, hasher)
    return hasher.hexdigest()[:32]

