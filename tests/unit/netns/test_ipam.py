"""Address book on a temp state dir: allocation order, reuse, idempotence, restart,
exhaustion, corruption and the single-owner lock."""

from __future__ import annotations

import os
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path

import pytest

from netns import (
    AddressBook,
    AddressError,
    Fleet,
    Overlay,
    PoolExhaustedError,
    SpaceLease,
    StateLockedError,
)

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


ALPHA = IPv4Network("10.64.0.0/18")
SLICE = IPv4Network("10.64.3.0/24")
OVERLAY = Overlay(17, IPv4Address("192.0.2.7"), 4789, 1450)


def test_configured_space_uses_its_slice(tmp_path: Path) -> None:
    book = AddressBook(tmp_path, POOL, durable=False)
    lease, readdressed = book.configure_space("alpha", ALPHA, SLICE, OVERLAY)
    assert readdressed and lease == SpaceLease("alpha", ALPHA, SLICE, OVERLAY)
    assert lease.gateway == IPv4Interface("10.64.3.1/18")
    given = [book.assign("alpha", f"n{i}") for i in range(253)]
    assert given[0] == IPv4Interface("10.64.3.2/18")
    assert given[-1] == IPv4Interface("10.64.3.254/18")
    with pytest.raises(PoolExhaustedError):
        book.assign("alpha", "one-more")
    # A local space never lands on the configured subnet.
    assert not book.lease_space("local").subnet.overlaps(ALPHA)
    book.close()


def test_configure_is_idempotent_and_persisted(tmp_path: Path) -> None:
    book = AddressBook(tmp_path, POOL, durable=False)
    book.configure_space("alpha", ALPHA, SLICE, OVERLAY)
    book.assign("alpha", "n1")
    before = (tmp_path / "ipam" / "spaces.json").stat().st_mtime_ns
    assert book.configure_space("alpha", ALPHA, SLICE, OVERLAY)[1] is False
    assert (tmp_path / "ipam" / "spaces.json").stat().st_mtime_ns == before
    changed = Overlay(18, IPv4Address("192.0.2.8"), 4790, None)
    assert book.configure_space("alpha", ALPHA, SLICE, changed)[1] is False
    fleet = Fleet((IPv4Network("10.64.0.0/10"),), (IPv4Address("192.0.2.7"),), 4789)
    assert book.set_fleet(fleet) and not book.set_fleet(fleet)
    book.close()
    again = AddressBook(tmp_path, POOL, durable=False)
    assert again.space("alpha") == SpaceLease("alpha", ALPHA, SLICE, changed)
    assert again.fleet() == fleet
    assert again.members("alpha") == {"n1": IPv4Interface("10.64.3.2/18")}
    assert again.clear_overlay("alpha") and not again.clear_overlay("alpha")
    assert again.space("alpha") == SpaceLease("alpha", ALPHA, SLICE, None)
    again.close()


def test_readdressing_refused_while_members_hold_addresses(tmp_path: Path) -> None:
    book = AddressBook(tmp_path, POOL, durable=False)
    book.configure_space("alpha", ALPHA, SLICE, OVERLAY)
    book.assign("alpha", "n1")
    other = IPv4Network("10.64.4.0/24")
    with pytest.raises(AddressError, match="while 1 namespace"):
        book.configure_space("alpha", ALPHA, other, OVERLAY)
    book.release("alpha", "n1")
    lease, readdressed = book.configure_space("alpha", ALPHA, other, OVERLAY)
    assert readdressed and lease.gateway == IPv4Interface("10.64.4.1/18")
    with pytest.raises(AddressError, match=r"overlaps subnet 10\.64\.0\.0/18 of space alpha"):
        book.configure_space("beta", IPv4Network("10.64.0.0/16"), other, OVERLAY)
    with pytest.raises(AddressError, match="not inside"):
        book.configure_space("beta", IPv4Network("10.65.0.0/18"), other, OVERLAY)
    book.close()


def test_reads_the_old_format(tmp_path: Path) -> None:
    (tmp_path / "ipam" / "a").mkdir(parents=True)
    (tmp_path / "ipam" / "a" / "10.10.0.2@n1").touch()
    (tmp_path / "ipam" / "spaces.json").write_text(
        '{"version": 1, "pool": "10.10.0.0/22", "spaces": {"a": "10.10.0.0/24"}}')
    book = AddressBook(tmp_path, POOL, durable=False)
    assert book.space("a") == SpaceLease("a", IPv4Network("10.10.0.0/24"))
    assert book.fleet() == Fleet()
    assert book.members("a") == {"n1": IPv4Interface("10.10.0.2/24")}
    book.close()


def test_local_lease_avoids_host_networks(tmp_path: Path) -> None:
    book = AddressBook(tmp_path, POOL, durable=False)
    lease = book.lease_space("a", avoid=[IPv4Network("10.10.0.0/23")])
    assert lease.subnet == IPv4Network("10.10.2.0/24")
    book.close()


def test_only_changes_of_the_spaces_are_fsynced(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    book = AddressBook(tmp_path, POOL)  # durable
    book.lease_space("a")
    assert synced, "a new space is on disk before lease_space returns"
    synced.clear()
    book.assign("a", "n1")
    book.assign("a", "n2")
    book.release("a", "n1")
    assert synced == [], "addresses die with their namespaces at a reboot: never fsynced"
    book.close()
    again = AddressBook(tmp_path, POOL)
    assert again.address_of("a", "n2") == IPv4Interface("10.10.0.3/24")
    assert again.address_of("a", "n1") is None
    again.close()
