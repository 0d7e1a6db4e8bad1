"""The one choke point for cgroupfs I/O: reads, writes, mkdir and rmdir under one hierarchy mount.

The mount path is a parameter, so unit tests point it at a temporary directory.
"""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path

from cgroups.errors import CgroupError, InvalidValue, from_os_error

# What `pread` asks for first: more than any control file a sample reads.
_PREAD_FIRST = 8192


@functools.lru_cache(maxsize=8192)  # pure; every read of a control file asks
def normalise(rel: str) -> str:
    """Canonical relative group path ("" is the mount root); refuses anything that could escape."""
    parts = [p for p in rel.strip("/").split("/") if p]
    for part in parts:
        if part in (".", ".."):
            raise InvalidValue("group path may not contain . or ..", path=rel, value=rel)
    return "/".join(parts)


class CgroupFS:
    """Every cgroupfs syscall of the library for one hierarchy mounted at `mount`.

    Group paths are relative to the mount. Writes use os.open + os.write on an unbuffered fd,
    because the kernel reports a rejected value only as the write's errno and buffered text I/O
    can defer or swallow it. The `_raw_*` methods are the only places that touch the OS, so
    tests can inject kernel errors there.
    """

    def __init__(self, mount: Path) -> None:
        self.mount = Path(mount)
        self._mount_str = str(self.mount).rstrip("/")

    def __repr__(self) -> str:
        return f"CgroupFS({str(self.mount)!r})"

    # -- paths --------------------------------------------------------------------------------

    def path(self, rel: str, file: str | None = None) -> Path:
        base = self.mount / normalise(rel) if normalise(rel) else self.mount
        return base / file if file else base

    def _dir(self, rel: str) -> str:
        return str(self.path(rel))

    def _file(self, rel: str, file: str) -> str:
        """str(self.path(rel, file)) without pathlib's objects: a few microseconds less per
        read, and an agent reads thousands of control files a minute (samples)."""
        norm = normalise(rel)
        return f"{self._mount_str}/{norm}/{file}" if norm else f"{self._mount_str}/{file}"

    # -- operations ---------------------------------------------------------------------------

    def read(self, rel: str, file: str) -> str:
        try:
            data = self._raw_read(self._file(rel, file))
        except OSError as exc:
            raise from_os_error(exc, "read", path=self._dir(rel), file=file) from exc
        return data.decode("utf-8", "replace")

    def write(self, rel: str, file: str, value: str) -> None:
        try:
            self._raw_write(str(self.path(rel, file)), value.encode())
        except OSError as exc:
            raise from_os_error(exc, "write", path=self._dir(rel), file=file,
                                value=value) from exc

    def exists(self, rel: str, file: str | None = None) -> bool:
        if file:
            return os.path.exists(self._file(rel, file))
        norm = normalise(rel)
        return os.path.exists(f"{self._mount_str}/{norm}" if norm else self.mount)

    def mkdir(self, rel: str) -> None:
        try:
            self._raw_mkdir(self._dir(rel))
        except OSError as exc:
            raise from_os_error(exc, "mkdir", path=self._dir(rel)) from exc

    def rmdir(self, rel: str) -> None:
        try:
            self._raw_rmdir(self._dir(rel))
        except OSError as exc:
            raise from_os_error(exc, "rmdir", path=self._dir(rel)) from exc

    def children(self, rel: str) -> list[str]:
        """Names of the child groups (subdirectories), sorted."""
        try:
            with os.scandir(self._dir(rel)) as it:
                return sorted(e.name for e in it if e.is_dir(follow_symlinks=False))
        except OSError as exc:
            raise from_os_error(exc, "list", path=self._dir(rel)) from exc

    def procs(self, rel: str) -> list[int]:
        """Pids in the group itself (not its descendants)."""
        text = self.read(rel, "cgroup.procs")
        try:
            return [int(line) for line in text.split()]
        except ValueError as exc:
            raise CgroupError("unparsable cgroup.procs", path=self._dir(rel),
                              file="cgroup.procs", value=text) from exc

    def open_fd(self, rel: str, file: str) -> int:
        """A read-only fd on a control file (the v1 event_control registration; control
        files kept open for `pread`)."""
        try:
            return self._raw_open(self._file(rel, file))
        except OSError as exc:
            raise from_os_error(exc, "open", path=self._dir(rel), file=file) from exc

    def pread(self, fd: int, rel: str, file: str) -> str:
        """The whole of control file `file` of group `rel` through `fd` (from open_fd), kept
        open: a read from offset 0 has the kernel format the file afresh, as after an open,
        without the open's path walk and the close. A group removed since answers NotFound
        (ENODEV)."""
        try:
            data = self._raw_pread(fd, self._file(rel, file))
        except OSError as exc:
            raise from_os_error(exc, "read", path=self._dir(rel), file=file) from exc
        return data.decode("utf-8", "replace")

    def close_fd(self, fd: int) -> None:
        """Close an fd from open_fd (errors ignored: there is nothing left to do with it)."""
        with contextlib.suppress(OSError):
            self._raw_close(fd)

    # -- the only OS calls --------------------------------------------------------------------

    def _raw_read(self, path: str) -> bytes:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            chunks: list[bytes] = []
            while True:
                chunk = os.read(fd, 65536)
                if not chunk:
                    return b"".join(chunks)
                chunks.append(chunk)
        finally:
            os.close(fd)

    def _raw_pread(self, fd: int, path: str) -> bytes:
        # One call for any control file a sample reads (memory.stat is some 1-2 KiB), and no
        # 64 KiB buffer to allocate and shrink for it.
        data = os.pread(fd, _PREAD_FIRST, 0)
        if len(data) < _PREAD_FIRST:
            return data
        chunks = [data]
        offset = len(data)
        while True:
            chunk = os.pread(fd, 65536, offset)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            offset += len(chunk)

    def _raw_close(self, fd: int) -> None:
        os.close(fd)

    def _raw_write(self, path: str, data: bytes) -> None:
        # No O_CREAT/O_TRUNC: a control file that does not exist means a missing controller
        # or group, and creating a regular file in its place would hide that.
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            # cgroupfs takes one value per write(2); a short write would be a kernel bug,
            # but a fake tree must not silently truncate either.
            written = os.write(fd, data)
            if written != len(data):
                raise OSError(0, f"short write {written}/{len(data)}")
        finally:
            os.close(fd)

    def _raw_open(self, path: str) -> int:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    def _raw_mkdir(self, path: str) -> None:
        os.mkdir(path, 0o755)

    def _raw_rmdir(self, path: str) -> None:
        os.rmdir(path)
