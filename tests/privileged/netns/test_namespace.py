"""Namespaces on the real kernel: create, enter, list, delete, shared root, and that the
caller's thread never changes namespace."""

from __future__ import annotations

import errno
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from netns import (
    HostNetwork,
    HostNetworkConfig,
    NamespaceDir,
    NamespaceExistsError,
    NamespaceNotFoundError,
    entered,
    namespace_id,
)
from tests.support.names import unique
from tests.support.testhost import TestHost

THREAD_NETNS = Path("/proc/thread-self/ns/net")


@pytest.fixture
def nsdir(tmp_path: Path) -> Iterator[NamespaceDir]:
    directory = NamespaceDir(tmp_path / "netns", shared=False)
    try:
        yield directory
    finally:
        for name in directory.names():
            directory.delete(name)


def test_create_enter_list_delete(nsdir: NamespaceDir) -> None:
    own = namespace_id(THREAD_NETNS)
    path = nsdir.create("dtone")
    assert nsdir.names() == ["dtone"] and nsdir.exists("dtone")
    assert namespace_id(path) != own
    with entered(path):
        assert namespace_id(THREAD_NETNS) == namespace_id(path)
        # A fresh namespace holds nothing but a down loopback.
        links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True,
                               check=True).stdout
        assert links.count("\n") == 1 and "lo:" in links
    assert namespace_id(THREAD_NETNS) == own
    with pytest.raises(NamespaceExistsError) as info:
        nsdir.create("dtone")
    assert info.value.errno == errno.EEXIST and info.value.path == path
    nsdir.delete("dtone")
    assert not path.exists() and nsdir.names() == []
    nsdir.delete("dtone")  # missing_ok by default
    with pytest.raises(NamespaceNotFoundError):
        nsdir.delete("dtone", missing_ok=False)


def test_enter_missing_namespace_is_typed(nsdir: NamespaceDir) -> None:
    with pytest.raises(NamespaceNotFoundError) as info, entered(nsdir.root / "dtnone"):
        pass
    assert info.value.operation == "enter" and info.value.errno == errno.ENOENT


def test_bad_names_are_refused(nsdir: NamespaceDir) -> None:
    for bad in ("../etc", "a/b", "", "x" * 80):
        with pytest.raises(ValueError):
            nsdir.create(bad)


def test_shared_root_is_a_shared_mount(tmp_path: Path) -> None:
    root = tmp_path / "shared"
    directory = NamespaceDir(root, shared=True)
    try:
        directory.create("dtshr")
        mountinfo = Path("/proc/self/mountinfo").read_text().splitlines()
        mine = [line for line in mountinfo if line.split()[4] == str(root)]
        assert mine and "shared:" in mine[-1]
    finally:
        directory.delete("dtshr")
        subprocess.run(["umount", str(root)], check=False)
    assert str(root) not in Path("/proc/self/mounts").read_text()


def test_host_network_never_moves_the_caller(host: TestHost, tmp_path: Path) -> None:
    own = namespace_id(THREAD_NETNS)
    config = HostNetworkConfig(state_dir=tmp_path / "state", link_prefix="dt",
                               table="dt_agent", host_netns=host.path, durable_state=False)
    name = unique("dt", 8)
    with HostNetwork(config) as net:
        try:
            path = net.create_namespace(name)
            assert net.namespaces() == [name]
            assert namespace_id(THREAD_NETNS) == own
            assert namespace_id(path) not in (own, namespace_id(host.path))
            assert net.create_namespace(name, exist_ok=True) == path
            with pytest.raises(NamespaceExistsError):
                net.create_namespace(name)
        finally:
            net.delete_namespace(name)
        assert net.namespaces() == [] and not path.exists()
