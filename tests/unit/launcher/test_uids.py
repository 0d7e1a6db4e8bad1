"""UidAllocator: unique, stable, persisted, released on forget, refused when exhausted."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.launcher import UidAllocationError, UidAllocator


def test_allocations_are_unique_stable_and_persisted(tmp_path: Path) -> None:
    alloc = UidAllocator(str(tmp_path))
    a = alloc.allocate("web-1")
    b = alloc.allocate("web-2")
    assert a == (400000, 400000) and b == (400001, 400001)
    assert alloc.allocate("web-1") == a
    again = UidAllocator(str(tmp_path))  # a restarted agent
    assert again.lookup("web-2") == b
    assert again.allocations() == {"web-1": 400000, "web-2": 400001}


def test_release_frees_the_uid_for_reuse(tmp_path: Path) -> None:
    alloc = UidAllocator(str(tmp_path), first=500, last=501)
    alloc.allocate("a")
    alloc.allocate("b")
    with pytest.raises(UidAllocationError) as info:
        alloc.allocate("c")
    assert "exhausted" in str(info.value) and info.value.path == alloc.path
    alloc.release("a")
    alloc.release("never-allocated")
    assert alloc.lookup("a") is None
    assert alloc.allocate("c") == (500, 500)


def test_writes_leave_no_temp_files(tmp_path: Path) -> None:
    alloc = UidAllocator(str(tmp_path))
    for i in range(5):
        alloc.allocate(f"d{i}")
    assert sorted(os.listdir(tmp_path)) == ["uids.json", "uids.json.lock"]


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"a": "400000"}'])
def test_a_corrupt_table_is_an_error_not_a_reset(tmp_path: Path, content: str) -> None:
    (tmp_path / "uids.json").write_text(content)
    with pytest.raises(UidAllocationError):
        UidAllocator(str(tmp_path)).allocate("x")


def test_bad_ranges_are_refused(tmp_path: Path) -> None:
    with pytest.raises(UidAllocationError):
        UidAllocator(str(tmp_path), first=0, last=10)
    with pytest.raises(UidAllocationError):
        UidAllocator(str(tmp_path), first=20, last=10)
