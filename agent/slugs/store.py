"""Slugs: turning a release's slug source (local directory, local tarball, or URL + sha256)
into a directory the launcher can mount read-only at /app, via a cache keyed by digest
whose entries appear atomically and are extracted without trusting the archive."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import lzma
import os
import shutil
import stat
import tarfile
import tempfile
import zlib
from collections import deque
from collections.abc import Awaitable, Callable, Set
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import aiohttp

from agent.spec import SlugSource

log = logging.getLogger(__name__)

# Inside a dyno the slug is mounted here, so an absolute symlink into /app stays inside.
SLUG_MOUNT = "/app"
DEFAULT_MAX_UNPACKED_BYTES = 4 * 1024**3
# Heroku's compressed slug limit (raised from 500 MB to 1 GB in 2026).
DEFAULT_MAX_DOWNLOAD_BYTES = 1024**3
DEFAULT_MAX_ENTRIES = 500_000
DEFAULT_DOWNLOAD_TIMEOUT_S = 600.0
_CHUNK_BYTES = 1024 * 1024
# Same bound as the kernel's MAXSYMLINKS: more hops than this is a loop, not a layout.
_MAX_LINK_HOPS = 40

SessionFactory = Callable[[], aiohttp.ClientSession]
# Given a private work directory, produce the archive to extract and, when its bytes
# still have to be checked while extracting, the digest they must have.
_Fetch = Callable[[Path], Awaitable[tuple[Path, str | None]]]


class SlugError(Exception):
    """A slug cannot be made available; `member` names the archive entry at fault, if any."""

    def __init__(self, message: str, *, path: str | None = None, member: str | None = None,
                 errno_: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.path = path
        self.member = member
        self.errno = errno_


class SlugNotFoundError(SlugError):
    """A local slug path does not exist or is neither a directory nor a regular file."""


class BadArchiveError(SlugError):
    """The tarball is corrupt, truncated, or in a format we do not read."""


class UnsafeMemberError(SlugError):
    """An archive entry would write or point outside the slug, or create a special file."""


class AbsolutePathError(UnsafeMemberError):
    """An entry's name is an absolute path."""


class ParentTraversalError(UnsafeMemberError):
    """An entry's name contains a `..` component."""


class SpecialFileError(UnsafeMemberError):
    """An entry is a device node or a fifo (or another kind a slug never needs)."""


class LinkEscapeError(UnsafeMemberError):
    """A symlink or hard link points outside the slug, or an entry is written through one."""


class SlugTooLargeError(SlugError):
    """The slug exceeds the unpacked-size, entry-count, or download-size limit."""


class DownloadError(SlugError):
    """Fetching the slug URL failed (HTTP status, connection, timeout)."""


class ChecksumError(SlugError):
    """The slug's sha256 is not the one the release names: Heroku's R17, the dyno crashes."""

    def __init__(self, expected: str, actual: str, *, path: str | None = None) -> None:
        super().__init__(
            "Error R17 (Checksum error) -> Checksum does not match expected value. "
            f"Expected: SHA256:{expected} Actual: SHA256:{actual}", path=path)
        self.expected = expected
        self.actual = actual


@dataclass(frozen=True, slots=True)
class Slug:
    """A usable slug: the directory to mount at /app, and the cache digest (None for a
    local directory, which is used in place)."""

    path: Path
    digest: str | None


# --------------------------------------------------------------------------- extraction


def _parts(name: str, member: str, what: str = "path") -> tuple[str, ...]:
    if name.startswith("/"):
        raise AbsolutePathError(f"slug entry {member!r}: absolute {what} {name!r} refused",
                                member=member)
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise ParentTraversalError(f"slug entry {member!r}: '..' in {what} {name!r} refused",
                                   member=member)
    return parts


def _link_escapes(root: Path, parent: tuple[str, ...], target: str) -> bool:
    """Whether symlink `target`, placed in directory `parent` of the slug, resolves outside it.

    Links already on disk are followed, so a final pass over every link catches chains
    (`b -> a/..` with `a -> .`) that a purely lexical check would let through.
    """
    stack: list[str] = list(parent)
    pending: deque[str] = deque()
    hops = 0

    def push(link: str) -> bool:
        nonlocal stack
        if link.startswith("/"):
            if link != SLUG_MOUNT and not link.startswith(SLUG_MOUNT + "/"):
                return False
            stack = []
            link = link[len(SLUG_MOUNT):]
        pending.extendleft(reversed(link.split("/")))
        return True

    if not push(target):
        return True
    while pending:
        part = pending.popleft()
        if part in ("", "."):
            continue
        if part == "..":
            if not stack:
                return True
            stack.pop()
            continue
        candidate = root.joinpath(*stack, part)
        if candidate.is_symlink():
            hops += 1
            if hops > _MAX_LINK_HOPS or not push(os.readlink(candidate)):
                return True
        else:
            stack.append(part)
    return False


class _HashingReader:
    """A read-only file wrapper that hashes what tarfile reads, to bind content to a digest."""

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
        self.hasher = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self.hasher.update(data)
        return data

    def drain(self) -> str:
        while data := self._raw.read(_CHUNK_BYTES):
            self.hasher.update(data)
        return self.hasher.hexdigest()


class _Extractor:
    """One extraction into a fresh private directory. Every path it writes lies under
    directories it created itself, so nothing it does can follow a link out."""

    def __init__(self, root: Path, max_unpacked_bytes: int, max_entries: int) -> None:
        self.root = root
        self.max_unpacked_bytes = max_unpacked_bytes
        self.max_entries = max_entries
        self.unpacked_bytes = 0
        self.entries = 0
        self.dirs: set[tuple[str, ...]] = {()}
        self.symlinks: list[tuple[tuple[str, ...], str]] = []

    def _parent(self, parts: tuple[str, ...], member: str) -> Path:
        for depth in range(1, len(parts)):
            prefix = parts[:depth]
            if prefix in self.dirs:
                continue
            path = self.root.joinpath(*prefix)
            if path.is_symlink():
                raise LinkEscapeError(f"slug entry {member!r} is written through the symlink "
                                      f"{'/'.join(prefix)!r}; refused", member=member)
            if os.path.lexists(path):
                raise BadArchiveError(f"slug entry {member!r}: {'/'.join(prefix)!r} is not a "
                                      "directory", member=member)
            # Tarballs may omit directory entries; make them as `tar` would.
            os.mkdir(path, 0o755)
            self.dirs.add(prefix)
        return self.root.joinpath(*parts[:-1])

    def _clear(self, parts: tuple[str, ...], member: str) -> Path:
        # A later entry of the same name replaces the earlier one, as with `tar x`; but
        # never a directory, whose contents were already checked under its name.
        path = self.root.joinpath(*parts)
        if parts in self.dirs:
            raise BadArchiveError(f"slug entry {member!r} would replace a directory",
                                  member=member)
        if os.path.lexists(path):
            os.unlink(path)
        return path

    def add(self, tar: tarfile.TarFile, info: tarfile.TarInfo) -> None:
        member = info.name
        self.entries += 1
        if self.entries > self.max_entries:
            raise SlugTooLargeError(f"slug has more than {self.max_entries} entries (at "
                                    f"{member!r})", member=member)
        if info.ischr() or info.isblk() or info.isfifo():
            kind = "fifo" if info.isfifo() else "device node"
            raise SpecialFileError(f"slug entry {member!r} is a {kind}; refused", member=member)
        parts = _parts(member, member)
        if info.isdir():
            self._directory(parts, member)
        elif not parts:
            raise BadArchiveError(f"slug entry {member!r} names the slug root but is not a "
                                  "directory", member=member)
        elif info.isreg():
            self._file(tar, info, parts, member)
        elif info.issym():
            self._symlink(info, parts, member)
        elif info.islnk():
            self._hardlink(info, parts, member)
        else:
            raise SpecialFileError(f"slug entry {member!r} has unsupported type "
                                   f"{info.type!r}; refused", member=member)

    def _directory(self, parts: tuple[str, ...], member: str) -> None:
        if parts in self.dirs:
            return
        self._parent(parts, member)
        path = self.root.joinpath(*parts)
        if os.path.lexists(path):
            raise BadArchiveError(f"slug entry {member!r}: a non-directory of that name came "
                                  "earlier", member=member)
        # Every dyno runs as its own uid, none of them the owner: directories must be
        # traversable by all, and nothing in the shared lower layer writable by them.
        os.mkdir(path, 0o755)
        self.dirs.add(parts)

    def _file(self, tar: tarfile.TarFile, info: tarfile.TarInfo, parts: tuple[str, ...],
              member: str) -> None:
        if self.unpacked_bytes + info.size > self.max_unpacked_bytes:
            raise SlugTooLargeError(
                f"slug entry {member!r} ({info.size} bytes) takes the slug over its limit of "
                f"{self.max_unpacked_bytes} unpacked bytes", member=member)
        self._parent(parts, member)
        path = self._clear(parts, member)
        source = tar.extractfile(info)
        if source is None:
            raise BadArchiveError(f"slug entry {member!r} has no data", member=member)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        try:
            written = 0
            while chunk := source.read(_CHUNK_BYTES):
                written += len(chunk)
                if written > info.size:
                    raise BadArchiveError(f"slug entry {member!r} holds more than its declared "
                                          "size", member=member)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
            # Same reasoning as for directories: readable by every dyno uid; executable
            # by all when the archive marks it executable for anyone.
            os.fchmod(fd, 0o755 if info.mode & 0o111 else 0o644)
        finally:
            os.close(fd)
        self.unpacked_bytes += info.size
        # A nonsense timestamp in a header is no reason to refuse the slug.
        with contextlib.suppress(OverflowError, OSError, ValueError):
            os.utime(path, (info.mtime, info.mtime))

    def _symlink(self, info: tarfile.TarInfo, parts: tuple[str, ...], member: str) -> None:
        if _link_escapes(self.root, parts[:-1], info.linkname):
            raise LinkEscapeError(f"slug entry {member!r} is a symlink to {info.linkname!r}, "
                                  "outside the slug; refused", member=member)
        self._parent(parts, member)
        path = self._clear(parts, member)
        os.symlink(info.linkname, path)
        self.symlinks.append((parts, info.linkname))

    def _hardlink(self, info: tarfile.TarInfo, parts: tuple[str, ...], member: str) -> None:
        try:
            target = _parts(info.linkname, member, "hard link target")
        except UnsafeMemberError:
            raise LinkEscapeError(f"slug entry {member!r} is a hard link to {info.linkname!r}, "
                                  "outside the slug; refused", member=member) from None
        target_path = self.root.joinpath(*target)
        # The target's parents must be directories this extraction made (no symlink on
        # the way) and the target itself a regular file it wrote.
        inside = all(target[:d] in self.dirs for d in range(1, len(target)))
        try:
            is_file = inside and stat.S_ISREG(os.lstat(target_path).st_mode)
        except FileNotFoundError:
            is_file = False
        if not target or not is_file:
            raise LinkEscapeError(f"slug entry {member!r} is a hard link to {info.linkname!r}, "
                                  "which is not a file extracted earlier from this slug; refused",
                                  member=member)
        self._parent(parts, member)
        path = self._clear(parts, member)
        os.link(target_path, path, follow_symlinks=False)

    def finish(self) -> None:
        # Links added later can redirect earlier ones; only the complete tree tells.
        for parts, target in self.symlinks:
            if _link_escapes(self.root, parts[:-1], target):
                member = "/".join(parts)
                raise LinkEscapeError(f"slug entry {member!r} is a symlink to {target!r} that "
                                      "resolves outside the slug through other links; refused",
                                      member=member)
        os.chmod(self.root, 0o755)


def extract_tarball(archive: Path, dest: Path, max_unpacked_bytes: int,
                    max_entries: int = DEFAULT_MAX_ENTRIES,
                    expected_sha256: str | None = None) -> None:
    """Extract `archive` (tar, optionally gz/bz2/xz) into the empty directory `dest`.

    Blocking; run it in a thread. Refuses unsafe entries with an UnsafeMemberError subclass
    and leaves `dest` half-filled: the caller owns `dest` and removes it on failure. With
    `expected_sha256`, the archive's bytes as read are checked against it (ChecksumError).
    """
    extractor = _Extractor(dest, max_unpacked_bytes, max_entries)
    try:
        with open(archive, "rb") as raw:
            reader = _HashingReader(raw)
            # Stream mode: one sequential pass, so a gzip archive is inflated only once.
            with tarfile.open(fileobj=reader, mode="r|*") as tar:  # type: ignore[call-overload]
                for info in tar:
                    extractor.add(tar, info)
            actual = reader.drain()
    except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError) as exc:
        raise BadArchiveError(f"slug {archive} is not a readable tarball: {exc}",
                              path=str(archive)) from None
    except OSError as exc:
        # Corrupt bz2 data also surfaces as OSError; so do ENOSPC and EACCES on our side.
        raise SlugError(f"extracting slug {archive}: {exc}", path=exc.filename or str(archive),
                        errno_=exc.errno) from None
    if expected_sha256 is not None and actual != expected_sha256:
        raise ChecksumError(expected_sha256, actual, path=str(archive))
    extractor.finish()


def slug_root(extracted: Path) -> Path:
    """The directory to mount at /app. Heroku slugs are made with `tar czf slug.tgz ./app`,
    so an archive whose only top-level entry is the directory `app` has its root there."""
    with os.scandir(extracted) as entries:
        names = [(e.name, e.is_dir(follow_symlinks=False)) for e in entries]
    if names == [("app", True)]:
        return extracted / "app"
    return extracted


def sha256_file(path: Path | str) -> str:
    """The hex sha256 of a file's bytes, read in 1 MiB chunks."""
    hasher = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(_CHUNK_BYTES):
            hasher.update(data)
    return hasher.hexdigest()


def stat_local(path: str) -> os.stat_result:
    """The stat of a local slug (`SlugSource.path`; blocks), for materialize()."""
    try:
        return os.stat(path)
    except OSError as exc:
        raise SlugNotFoundError(f"slug path {Path(path)}: {exc.strerror}", path=str(Path(path)),
                                errno_=exc.errno) from None


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------- the store


def _default_session() -> aiohttp.ClientSession:
    # A slug is an opaque blob hashed byte for byte: never let aiohttp inflate a body
    # that a server labelled Content-Encoding: gzip.
    return aiohttp.ClientSession(
        auto_decompress=False,
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=60))


class SlugStore:
    """The slug cache of one agent: `<cache_dir>/slugs/<sha256>/` holds extracted slugs,
    `<cache_dir>/tmp/` their work in progress (never visible under slugs/ until complete).

    Concurrent resolves of one digest share one download and extraction. Owns its HTTP
    session and in-flight tasks: call `aclose()` (or use `async with`).
    """

    def __init__(self, cache_dir: Path, max_unpacked_bytes: int = DEFAULT_MAX_UNPACKED_BYTES,
                 *, max_download_bytes: int = DEFAULT_MAX_DOWNLOAD_BYTES,
                 max_entries: int = DEFAULT_MAX_ENTRIES,
                 download_timeout_s: float = DEFAULT_DOWNLOAD_TIMEOUT_S,
                 session_factory: SessionFactory = _default_session) -> None:
        self.cache_dir = Path(cache_dir)
        self.max_unpacked_bytes = max_unpacked_bytes
        self.max_download_bytes = max_download_bytes
        self.max_entries = max_entries
        self.download_timeout_s = download_timeout_s
        self._session_factory = session_factory
        self._session: aiohttp.ClientSession | None = None
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._waiters: dict[str, int] = {}
        # digest -> the directory to mount, for slugs known to be complete in the cache.
        self._roots: dict[str, Path] = {}
        # (st_dev, st_ino, st_size, st_mtime_ns) of a local tarball -> its digest, so a
        # tarball used by many dynos is hashed once, and again only when it changes.
        self._local_digests: dict[tuple[int, int, int, int], str] = {}
        self.downloads_started = 0
        self.slugs_dir = self.cache_dir / "slugs"
        self.tmp_dir = self.cache_dir / "tmp"

    async def __aenter__(self) -> SlugStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._session is not None:
            await self._session.close()
            self._session = None

    def cached(self) -> set[str]:
        """Digests whose extracted slug is complete in the cache."""
        try:
            return {e.name for e in os.scandir(self.slugs_dir) if e.is_dir()}
        except FileNotFoundError:
            return set()

    def _ensure_dirs(self) -> None:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        # Readable by all: dynos run as uids of their own and see slugs through overlays.
        self.slugs_dir.mkdir(mode=0o755, exist_ok=True)
        self.tmp_dir.mkdir(mode=0o700, exist_ok=True)

    async def resolve(self, source: SlugSource, info: os.stat_result | None = None) -> Path:
        """The directory to mount read-only at /app for `source`."""
        return (await self.materialize(source, info)).path

    async def materialize(self, source: SlugSource,
                          info: os.stat_result | None = None) -> Slug:
        """Like resolve(), also returning the cache digest (to pass to prune()'s keep set).

        `info`: the stat_local() of a local slug, made just before on a thread that had other
        blocking work to do (saves this one a trip to a thread of its own)."""
        if source.url is not None:
            assert source.sha256 is not None
            digest = source.sha256.lower()
            url = source.url
            return await self._cached(digest, lambda work: self._download(url, digest, work))
        assert source.path is not None
        local = Path(source.path)
        if info is None:
            info = await asyncio.to_thread(stat_local, source.path)
        if stat.S_ISDIR(info.st_mode):
            return Slug(local, None)
        if not stat.S_ISREG(info.st_mode):
            raise SlugNotFoundError(f"slug path {local} is neither a directory nor a tarball",
                                    path=str(local))
        key = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
        known = self._local_digests.get(key)
        if known is None:
            known = await asyncio.to_thread(sha256_file, local)
            self._local_digests[key] = known
        local_digest = known

        async def local_archive(work: Path) -> tuple[Path, str | None]:
            # Re-hashed while extracting: the file may have changed since it was hashed.
            return local, local_digest

        return await self._cached(local_digest, local_archive)

    async def _cached(self, digest: str,
                      fetch: _Fetch) -> Slug:
        known = self._roots.get(digest)
        # The hot path of every dyno start: no syscall for a slug this store already saw
        # complete. Only prune() removes cache entries, and it forgets them here first.
        if known is not None:
            return Slug(known, digest)
        final = self.slugs_dir / digest
        if await asyncio.to_thread(os.path.isdir, final):
            return Slug(await self._root_of(digest), digest)
        task = self._inflight.get(digest)
        if task is None:
            task = asyncio.create_task(self._populate(digest, fetch),
                                       name=f"slug-fetch-{digest[:12]}")
            self._inflight[digest] = task
            task.add_done_callback(lambda t: self._forget(digest, t))
        # Shielded: one caller giving up (its dyno stopped) must not cancel the work
        # other dynos of the release are waiting for.
        self._waiters[digest] = self._waiters.get(digest, 0) + 1
        try:
            await asyncio.shield(task)
        finally:
            self._waiters[digest] -= 1
            if not self._waiters[digest]:
                del self._waiters[digest]
        return Slug(await self._root_of(digest), digest)

    async def _root_of(self, digest: str) -> Path:
        root = await asyncio.to_thread(slug_root, self.slugs_dir / digest)
        self._roots[digest] = root
        return root

    def waiting(self, digest: str) -> int:
        """How many resolves are waiting for `digest` to be fetched and extracted."""
        return self._waiters.get(digest, 0)

    def _forget(self, digest: str, task: asyncio.Task[None]) -> None:
        if self._inflight.get(digest) is task:
            del self._inflight[digest]
        # Mark the outcome retrieved: if every waiter was cancelled nobody else will.
        if not task.cancelled():
            task.exception()

    async def _populate(self, digest: str, fetch: _Fetch) -> None:
        await asyncio.to_thread(self._ensure_dirs)
        work = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix=f"{digest[:12]}-",
                                            dir=self.tmp_dir))
        try:
            archive, verify = await fetch(work)
            root = work / "root"
            await asyncio.to_thread(os.mkdir, root, 0o755)
            await asyncio.to_thread(extract_tarball, archive, root, self.max_unpacked_bytes,
                                    self.max_entries, verify)
            await asyncio.to_thread(self._publish, root, self.slugs_dir / digest)
            log.info("slug cached", extra={"SLUG_DIGEST": digest})
        finally:
            await asyncio.to_thread(_remove_tree, work)

    @staticmethod
    def _publish(root: Path, final: Path) -> None:
        # rename(2) of a directory is atomic: the slug appears whole or not at all.
        try:
            os.rename(root, final)
        except OSError as exc:
            # Another agent process sharing the cache published the same digest first.
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise SlugError(f"publishing slug {final}: {exc.strerror}", path=str(final),
                                errno_=exc.errno) from None

    async def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = self._session_factory()
        return self._session

    async def _download(self, url: str, digest: str, work: Path) -> tuple[Path, str | None]:
        archive = work / "slug.tar"
        self.downloads_started += 1
        hasher = hashlib.sha256()
        received = 0
        session = await self._http()
        fd = await asyncio.to_thread(
            os.open, archive, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            async with asyncio.timeout(self.download_timeout_s), session.get(
                    url, auto_decompress=False) as response:
                if response.status != 200:
                    raise DownloadError(f"downloading slug {url}: HTTP {response.status} "
                                        f"{response.reason}", path=url)
                declared = response.content_length
                if declared is not None and declared > self.max_download_bytes:
                    raise SlugTooLargeError(f"slug {url} is {declared} bytes; the limit is "
                                            f"{self.max_download_bytes}", path=url)
                async for chunk in response.content.iter_chunked(_CHUNK_BYTES):
                    received += len(chunk)
                    if received > self.max_download_bytes:
                        raise SlugTooLargeError(f"slug {url} exceeds the download limit of "
                                                f"{self.max_download_bytes} bytes", path=url)
                    await asyncio.to_thread(_write_and_hash, fd, hasher, chunk)
        except TimeoutError:
            raise DownloadError(f"downloading slug {url}: no complete answer within "
                                f"{self.download_timeout_s:g} s", path=url) from None
        except aiohttp.ClientError as exc:
            raise DownloadError(f"downloading slug {url}: {exc or type(exc).__name__}",
                                path=url) from None
        finally:
            os.close(fd)
        actual = hasher.hexdigest()
        if actual != digest:
            raise ChecksumError(digest, actual, path=url)
        log.info("slug downloaded", extra={"SLUG_URL": url, "SLUG_BYTES": received})
        return archive, None

    async def prune(self, keep: Set[str]) -> list[str]:
        """Remove cached slugs whose digest is not in `keep` (and stale work directories).

        `keep` must hold the digest of every slug a known dyno uses or is about to use.
        Returns the digests removed.
        """
        busy = set(self._inflight)
        removed: list[str] = []
        for digest in sorted(self.cached() - set(keep) - busy):
            self._roots.pop(digest, None)
            if await asyncio.to_thread(self._retire, self.slugs_dir / digest):
                removed.append(digest)
        try:
            leftovers = [e.name for e in os.scandir(self.tmp_dir)]
        except FileNotFoundError:
            leftovers = []
        for name in leftovers:
            if not any(name.startswith(d[:12] + "-") for d in busy):
                await asyncio.to_thread(_remove_tree, self.tmp_dir / name)
        return removed

    def _retire(self, path: Path) -> bool:
        # Renamed away first so the digest disappears at once, never half-deleted.
        self._ensure_dirs()
        trash = Path(tempfile.mkdtemp(prefix="prune-", dir=self.tmp_dir))
        try:
            os.rename(path, trash / "slug")
        except FileNotFoundError:
            _remove_tree(trash)
            return False
        _remove_tree(trash)
        return True


def _write_and_hash(fd: int, hasher: Any, chunk: bytes) -> None:
    hasher.update(chunk)
    view = memoryview(chunk)
    while view:
        view = view[os.write(fd, view):]
