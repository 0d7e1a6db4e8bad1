"""The per-dyno /etc files as text: hosts, hostname and a resolv.conf a dyno can use."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.launcher import etc


def test_hosts_maps_the_hostname_and_aliases_to_the_private_address() -> None:
    text = etc.hosts_text("web-1", "10.9.0.7", ("abc123", "web-1"))
    lines = [line.split() for line in text.splitlines()]
    assert ["127.0.0.1", "localhost"] in lines
    assert lines[1][:2] == ["::1", "localhost"]
    assert lines[-1] == ["10.9.0.7", "web-1", "abc123"]  # duplicates dropped, order kept


def test_hosts_without_an_address_uses_127_0_1_1() -> None:
    assert etc.hosts_text("web-1", None).splitlines()[-1].split() == ["127.0.1.1", "web-1"]


def test_hostname_file() -> None:
    assert etc.hostname_text("abc") == "abc\n"


@pytest.mark.parametrize(("address", "loopback"), [
    ("127.0.0.53", True), ("127.0.0.1", True), ("::1", True), ("fe80::1%eth0", False),
    ("10.255.255.53", False), ("2001:db8::1", False), ("not-an-ip", False),
])
def test_is_loopback(address: str, loopback: bool) -> None:
    assert etc.is_loopback(address) is loopback


def test_a_reachable_host_resolver_is_kept_verbatim() -> None:
    host = "# generated\nnameserver 10.255.255.53\nsearch example.internal\noptions ndots:2\n"
    assert etc.resolv_conf_text(host) == host


def test_loopback_resolvers_are_dropped_and_others_kept() -> None:
    host = "nameserver 127.0.0.53\nnameserver 10.0.0.2\nsearch corp\n"
    out = etc.resolv_conf_text(host)
    assert etc.nameservers(out) == ["10.0.0.2"]
    assert "search corp" in out
    assert out.startswith("# dynoagent: dropped loopback nameserver(s) 127.0.0.53")
    assert "no reachable nameserver" not in out


def test_only_loopback_resolvers_leave_no_nameserver_and_say_why() -> None:
    out = etc.resolv_conf_text("nameserver 127.0.0.53\nnameserver ::1\noptions edns0\n")
    assert etc.nameservers(out) == []
    assert "127.0.0.53 ::1" in out and "no reachable nameserver" in out
    assert "options edns0" in out


def test_resolved_upstream_replaces_a_stub_only(tmp_path: Path) -> None:
    stub, upstream = tmp_path / "resolv.conf", tmp_path / "upstream.conf"
    stub.write_text("nameserver 127.0.0.53\n")
    upstream.write_text("nameserver 192.0.2.1\n")
    assert etc.read_host_resolv_conf(str(stub), str(upstream)) == "nameserver 192.0.2.1\n"
    stub.write_text("nameserver 127.0.0.53\nnameserver 192.0.2.9\n")  # not only a stub
    assert etc.read_host_resolv_conf(str(stub), str(upstream)) == stub.read_text()
    stub.write_text("nameserver 127.0.0.53\n")
    upstream.unlink()
    assert etc.read_host_resolv_conf(str(stub), str(upstream)) == "nameserver 127.0.0.53\n"
    assert etc.read_host_resolv_conf(str(tmp_path / "absent"), str(upstream)) == ""


def test_etc_files_names_and_order() -> None:
    files = etc.etc_files("web-1", "10.0.0.3", ("id1",), "nameserver 127.0.0.1\n")
    assert tuple(files) == etc.FILE_NAMES
    assert files["hostname"] == "web-1\n"
    assert etc.nameservers(files["resolv.conf"]) == []
