"""Group.sample_files(): a periodic sample through control files kept open (one pread each),
the same Stats as Group.sample(); and parse_flat_fields, the parse of the memory.stat fields
a sample uses."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

import cgroups
from cgroups.errors import CgroupError, NotFound
from cgroups.fs import CgroupFS
from cgroups.limits import Limits
from cgroups.stats import parse_flat, parse_flat_fields
from cgroups.tree import Tree
from tests.unit.cgroups.fakekernel import FakeHost

NAME = "app-a.slice/dyno-1.scope"
LIMITS = Limits(memory_high_bytes=32 << 20, memory_max_bytes=64 << 20, pids_max=64)


def _tree(host: FakeHost) -> Tree:
    tree = Tree(host.layout())
    tree.ensure()
    return tree


def _set_usage(host: FakeHost, rel: str, current: int, rss: int, oom_kills: int) -> None:
    if host.mode == "v2":
        host.set("unified", rel, "memory.current", f"{current}\n")
        host.set("unified", rel, "memory.stat", f"anon {rss}\nfile 4096\nkernel 8192\n")
        host.set("unified", rel, "memory.events",
                 f"low 0\nhigh 0\nmax 0\noom {oom_kills}\noom_kill {oom_kills}\n")
    else:
        host.set("memory", rel, "memory.usage_in_bytes", f"{current}\n")
        host.set("memory", rel, "memory.stat",
                 f"cache 1\nrss 2\ntotal_cache 4096\ntotal_rss {rss}\ntotal_swap 0\n")
        host.set("memory", rel, "memory.oom_control",
                 f"oom_kill_disable 0\nunder_oom 0\noom_kill {oom_kills}\n")


def _opens(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    opened: list[str] = []
    real_open = CgroupFS._raw_open

    def counting_open(self: CgroupFS, path: str) -> int:
        opened.append(path)
        return real_open(self, path)
    monkeypatch.setattr(CgroupFS, "_raw_open", counting_open)
    return opened


def test_reads_what_sample_reads_and_follows_changes_without_reopening(
        host: FakeHost, monkeypatch: pytest.MonkeyPatch) -> None:
    g = _tree(host).create_group(NAME, LIMITS)
    _set_usage(host, g.rel, 1 << 20, 1 << 19, 0)
    opened = _opens(monkeypatch)
    files = g.sample_files()
    try:
        first_opens = len(opened)
        assert first_opens > 0
        assert files.read() == g.sample()
        assert files.read().memory_rss_bytes == 1 << 19
        _set_usage(host, g.rel, 2 << 20, 3 << 19, 1)
        again = files.read()
        assert again == g.sample()
        assert (again.memory_current_bytes, again.memory_rss_bytes,
                again.oom_kill_events) == (2 << 20, 3 << 19, 1)
        assert len(opened) == first_opens  # read through the same fds
    finally:
        files.close()


def test_a_file_the_kernel_lacks_is_left_out_as_sample_leaves_it(tmp_path: Path) -> None:
    host = FakeHost(tmp_path, "hybrid", without={"memory.memsw.usage_in_bytes"})
    g = _tree(host).create_group(NAME, LIMITS)
    files = g.sample_files()
    try:
        stats = files.read()
        assert stats.memory_swap_bytes is None
        assert stats == g.sample()
    finally:
        files.close()


def test_a_removed_group_reads_not_found(host: FakeHost) -> None:
    tree = _tree(host)
    g = tree.create_group(NAME, LIMITS)
    files = g.sample_files()
    try:
        g.remove()
        with pytest.raises(NotFound):
            files.read()
        with pytest.raises(NotFound):
            g.sample_files()
    finally:
        files.close()


def test_close_releases_every_fd_and_reads_no_more(host: FakeHost) -> None:
    g = _tree(host).create_group(NAME, LIMITS)
    before = set(os.listdir("/proc/self/fd"))
    files = g.sample_files()
    held = set(os.listdir("/proc/self/fd")) - before
    assert len(held) >= 6 and files.fds == len(held)
    files.close()
    files.close()
    assert files.fds == 0
    assert not held & set(os.listdir("/proc/self/fd"))
    with pytest.raises(CgroupError):
        files.read()


def test_a_failed_open_leaves_no_fd(host: FakeHost) -> None:
    g = _tree(host).create_group(NAME, LIMITS)
    before = set(os.listdir("/proc/self/fd"))
    calls = 0
    real_open = CgroupFS._raw_open

    def fail_third(self: CgroupFS, path: str) -> int:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise OSError(errno.EMFILE, "Too many open files", path)
        return real_open(self, path)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(CgroupFS, "_raw_open", fail_third)
        with pytest.raises(CgroupError) as raised:
            g.sample_files()
    assert raised.value.errno == errno.EMFILE
    assert set(os.listdir("/proc/self/fd")) == before


def test_pread_reads_a_file_longer_than_its_first_read(tmp_path: Path) -> None:
    path = tmp_path / "memory.stat"
    text = "".join(f"key{n} {n}\n" for n in range(3000))  # some 30 KiB
    path.write_text(text)
    fs = CgroupFS(tmp_path)
    fd = fs.open_fd("", "memory.stat")
    try:
        assert fs.pread(fd, "", "memory.stat") == text
        assert fs.pread(fd, "", "memory.stat") == text  # from the start again
    finally:
        fs.close_fd(fd)


MEMORY_STAT_V1 = ("cache 10\nrss 20\nrss_huge 0\nshmem 0\nmapped_file 0\n"
                  "total_cache 4096\ntotal_rss 8192\ntotal_unevictable 0\n")


def test_parse_flat_fields_is_parse_flat_of_the_keys_asked_for() -> None:
    keys = frozenset({"total_rss", "rss", "total_cache", "cache", "absent"})
    assert parse_flat_fields(MEMORY_STAT_V1, keys) == {
        k: v for k, v in parse_flat(MEMORY_STAT_V1).items() if k in keys}
    assert parse_flat_fields("", keys) == {}
    assert parse_flat_fields("a 1\nb 22\n\n", frozenset({"b"})) == {"b": 22}
    assert parse_flat_fields("a 1\nb 22", frozenset({"a", "b"})) == {"a": 1, "b": 22}


def test_parse_flat_fields_refuses_what_parse_flat_refuses() -> None:
    for bad in ("a\n", "a 1 2\n", "a x\n", "a 1\nb\n", "a 1 2\nb 3\n"):
        with pytest.raises(CgroupError):
            parse_flat_fields(bad, frozenset({"a", "b"}), file="memory.stat")


def test_sample_files_is_exported() -> None:
    assert cgroups.SampleFiles is cgroups.group.SampleFiles
