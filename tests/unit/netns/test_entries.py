"""Name-only records (netns.entries): hard links to one anchor, exclusive claims, and an
entry of its own where no link can be made."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from netns import AddressBook, entries
from netns.ipam import ANCHOR_FILE, IPAM_DIR


def test_entries_share_the_anchor_inode(tmp_path: Path) -> None:
    anchor = tmp_path / "anchor"
    for name in ("a", "b", "c"):
        entries.add(anchor, tmp_path / name, exclusive=True)
    inode = anchor.stat().st_ino
    assert {(tmp_path / n).stat().st_ino for n in "abc"} == {inode}
    assert anchor.stat().st_nlink == 4
    assert anchor.stat().st_size == 0 and anchor.stat().st_mode & 0o777 == 0o600


def test_exclusive_claim_of_a_taken_name_fails(tmp_path: Path) -> None:
    anchor = tmp_path / "anchor"
    entries.add(anchor, tmp_path / "a", exclusive=True)
    with pytest.raises(FileExistsError):
        entries.add(anchor, tmp_path / "a", exclusive=True)
    (tmp_path / "b").write_text("")  # made some other way: still taken
    with pytest.raises(FileExistsError):
        entries.add(anchor, tmp_path / "b", exclusive=True)
    entries.add(anchor, tmp_path / "a", exclusive=False)  # idempotent without
    assert anchor.stat().st_nlink == 2


def test_missing_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        entries.add(tmp_path / "anchor", tmp_path / "no" / "a", exclusive=False)


@pytest.mark.parametrize("code", [errno.EMLINK, errno.EPERM, errno.EXDEV])
def test_an_entry_of_its_own_where_no_link_can_be_made(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    def refuse(src: object, dst: object) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "link", refuse)
    entries.add(tmp_path / "anchor", tmp_path / "a", exclusive=True)
    assert (tmp_path / "a").stat().st_size == 0
    with pytest.raises(FileExistsError):
        entries.add(tmp_path / "anchor", tmp_path / "a", exclusive=True)
    entries.add(tmp_path / "anchor", tmp_path / "a", exclusive=False)


def test_other_errors_are_raised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(src: object, dst: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "link", refuse)
    with pytest.raises(OSError) as caught:
        entries.add(tmp_path / "anchor", tmp_path / "a", exclusive=True)
    assert caught.value.errno == errno.ENOSPC and not (tmp_path / "a").exists()


def test_addresses_are_links_and_survive_a_restart(tmp_path: Path) -> None:
    book = AddressBook(tmp_path, durable=False)
    book.lease_space("s")
    first, second = book.assign("s", "n1"), book.assign("s", "n2")
    anchor = tmp_path / IPAM_DIR / ANCHOR_FILE
    members = list((tmp_path / IPAM_DIR / "s").iterdir())
    assert len(members) == 2 and {m.stat().st_ino for m in members} == {anchor.stat().st_ino}
    book.release("s", "n1")
    assert anchor.stat().st_nlink == 2
    book.close()
    again = AddressBook(tmp_path, durable=False)
    assert again.address_of("s", "n2") == second and again.address_of("s", "n1") is None
    assert again.assign("s", "n3") == first  # the released address, reused
    again.close()
