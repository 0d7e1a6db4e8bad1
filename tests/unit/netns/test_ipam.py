"""Address book on a temp state dir: allocation order, reuse, idempotence, restart,
exhaustion, corruption and the single-owner lock."""

from __future__ import annotations

from ipaddress import IPv4Interface, IPv4Network
from pathlib import Path

import pytest

from netns import AddressBook, AddressError, PoolExhaustedError, StateLockedError

POOL = IPv4Network("10.10.0.0/22")


def test_subnets_and_addresses_in_order(tmp_path: Path) -> None:
    book = AddressBook(tmp_path, POOL, durable=False)
    a = book.lease_space("a")
    b = book.lease_space("b")
    assert (a.subnet, b.subnet) == (IPv4Network("10.10.0.0/24"), IPv4Network("10.10.1.0/24"))
    assert a.gateway == IPv4Interface("10.10.0.1/24")
    assert book.lease_space("a") == a
    assert book.assign("a", "n1") == IPv4Interface("10.10.0.2/24")
    assert book.assign("a", "n2") == IPv4Interface("10.10.0.3/24")
    assert book.assign("a", "n1") == IPv4Interface("10.10.0.2/24")  # idempotent
    assert book.release("a", "n1") and not book.release("a", "n1")
    assert book.assign("a", "n3") == IPv4Interface("10.10.0.2/24")  # released, reused
    book.close()


def test_restart_keeps_everything(tmp_path: Path) -> None:
    book = AddressBook(tmp_path, POOL)
    book.lease_space("a")
    given = {f"n{i}": book.assign("a", f"n{i}") for i in range(50)}
    book.release("a", "n7")
    book.close()
    again = AddressBook(tmp_path, POOL)
    assert again.members("a") == {k: v for k, v in given.items() if k != "n7"}
    assert again.assign("a", "new") == given["n7"]
    assert again.assign("a", "n8") == given["n8"]
    assert again.lease_space("b").subnet == IPv4Network("10.10.1.0/24")
    again.close()


def test_exhaustion(tmp_path: Path) -> None:
    book = AddressBook(tmp_path, IPv4Network("10.0.0.0/23"), subnet_prefix=29, durable=False)
    for i in range(64):
        book.lease_space(f"s{i}")
    with pytest.raises(PoolExhaustedError):
        book.lease_space("one-too-many")
    for i in range(5):  # a /29: .1 gateway, .2-.6 hosts
        book.assign("s0", f"n{i}")
    with pytest.raises(PoolExhaustedError):
        book.assign("s0", "n5")
    book.close()


def test_release_space_and_retain(tmp_path: Path) -> None:
    book = AddressBook(tmp_path, POOL, durable=False)
    for space in ("a", "b"):
        book.lease_space(space)
        book.assign(space, f"{space}1")
        book.assign(space, f"{space}2")
    dropped = book.retain(["a"], ["a1"])
    assert dropped == ["a/a2", "b"]
    assert [s.space_id for s in book.spaces()] == ["a"]
    assert book.release_space("a") and not book.release_space("a")
    assert book.spaces() == []
    book.close()
    assert AddressBook(tmp_path, POOL).spaces() == []


def test_unknown_space_and_bad_owner(tmp_path: Path) -> None:
    book = AddressBook(tmp_path, POOL, durable=False)
    with pytest.raises(AddressError):
        book.assign("nope", "n1")
    book.lease_space("a")
    with pytest.raises(ValueError):
        book.assign("a", "bad@owner")
    book.close()


def test_corrupt_state_is_reported(tmp_path: Path) -> None:
    book = AddressBook(tmp_path, POOL, durable=False)
    book.lease_space("a")
    book.assign("a", "n1")
    book.close()
    (tmp_path / "ipam" / "a" / "10.10.0.2@n2").touch()  # a second owner of one address
    with pytest.raises(AddressError) as info:
        AddressBook(tmp_path, POOL)
    assert "clashes" in str(info.value) and info.value.path == tmp_path / "ipam"
    (tmp_path / "ipam" / "a" / "10.10.0.2@n2").unlink()
    (tmp_path / "ipam" / "spaces.json").write_text("{not json")
    with pytest.raises(AddressError):
        AddressBook(tmp_path, POOL)


def test_one_owner_per_state_dir(tmp_path: Path) -> None:
    book = AddressBook(tmp_path, POOL)
    with pytest.raises(StateLockedError):
        AddressBook(tmp_path, POOL)
    book.close()
    AddressBook(tmp_path, POOL).close()
