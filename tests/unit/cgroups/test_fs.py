"""CgroupFS: the one I/O seam, and every kernel error mapped to a typed error with context."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from cgroups.errors import (
    AlreadyExists,
    Busy,
    CgroupError,
    InvalidValue,
    NoSpace,
    NotFound,
    PermissionDenied,
)
from cgroups.fs import CgroupFS, normalise


class FailingFS(CgroupFS):
    """Fails the next syscall with a chosen errno, like the kernel would."""

    def __init__(self, mount: Path, err: int) -> None:
        super().__init__(mount)
        self.err = err

    def _raw_write(self, path: str, data: bytes) -> None:
        raise OSError(self.err, "injected")

    def _raw_read(self, path: str) -> bytes:
        raise OSError(self.err, "injected")

    def _raw_rmdir(self, path: str) -> None:
        raise OSError(self.err, "injected")

    def _raw_mkdir(self, path: str) -> None:
        raise OSError(self.err, "injected")


@pytest.fixture
def tree(tmp_path: Path) -> CgroupFS:
    (tmp_path / "g").mkdir()
    # Empty: cgroupfs replaces the value on write, a regular file without O_TRUNC would not.
    (tmp_path / "g" / "pids.max").write_text("")
    (tmp_path / "g" / "cgroup.procs").write_text("1\n22\n")
    return CgroupFS(tmp_path)


def test_read_write_roundtrip(tree: CgroupFS) -> None:
    tree.write("g", "pids.max", "20")
    assert tree.read("/g/", "pids.max") == "20"
    assert tree.procs("g") == [1, 22]


def test_write_to_missing_file_is_not_found_and_creates_nothing(tree: CgroupFS) -> None:
    with pytest.raises(NotFound) as info:
        tree.write("g", "memory.max", "1")
    assert info.value.file == "memory.max"
    assert info.value.value == "1"
    assert info.value.errno == errno.ENOENT
    assert info.value.path == str(tree.mount / "g")
    assert not (tree.mount / "g" / "memory.max").exists()


@pytest.mark.parametrize(("err", "cls"), [
    (errno.ENOENT, NotFound), (errno.ENODEV, NotFound), (errno.EBUSY, Busy),
    (errno.EINVAL, InvalidValue), (errno.ERANGE, InvalidValue), (errno.EACCES, PermissionDenied),
    (errno.EPERM, PermissionDenied), (errno.ENOSPC, NoSpace), (errno.EEXIST, AlreadyExists),
    (errno.EIO, CgroupError)])
def test_every_errno_maps_to_a_typed_error(tmp_path: Path, err: int,
                                           cls: type[CgroupError]) -> None:
    fs = FailingFS(tmp_path, err)
    for call in (lambda: fs.write("g", "cpu.max", "x y"), lambda: fs.read("g", "cpu.max"),
                 lambda: fs.mkdir("g"), lambda: fs.rmdir("g")):
        with pytest.raises(cls) as info:
            call()
        assert info.value.errno == err
        assert info.value.path.endswith("/g")
        assert errno.errorcode[err] in str(info.value)


def test_write_error_carries_value_and_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidValue) as info:
        FailingFS(tmp_path, errno.EINVAL).write("a/b", "cpu.max", "bogus")
    exc = info.value
    assert (exc.file, exc.value) == ("cpu.max", "bogus")
    assert "cpu.max" in str(exc) and "bogus" in str(exc) and "EINVAL" in str(exc)


def test_mkdir_rmdir_children(tree: CgroupFS) -> None:
    tree.mkdir("g/child")
    with pytest.raises(AlreadyExists):
        tree.mkdir("g/child")
    assert tree.children("g") == ["child"]
    tree.rmdir("g/child")
    with pytest.raises(NotFound):
        tree.rmdir("g/child")
    with pytest.raises(NotFound):
        tree.children("nope")


@pytest.mark.parametrize("rel", ["../x", "a/../../b", "a/./b"])
def test_paths_cannot_escape_the_mount(tree: CgroupFS, rel: str) -> None:
    with pytest.raises(InvalidValue):
        tree.path(rel)


def test_normalise() -> None:
    assert normalise("/a//b/") == "a/b"
    assert normalise("") == ""
    assert normalise("/") == ""


def test_unparsable_procs(tree: CgroupFS) -> None:
    (tree.mount / "g" / "cgroup.procs").write_text("1\nx\n")
    with pytest.raises(CgroupError):
        tree.procs("g")


def test_open_fd_missing(tree: CgroupFS) -> None:
    with pytest.raises(NotFound):
        tree.open_fd("g", "memory.oom_control")
