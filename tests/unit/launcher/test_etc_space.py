"""A space dyno's resolv.conf names only its space's resolver (issue 16): the text, the
request field that carries the gateway, and its passage to the holder."""

from __future__ import annotations

import dataclasses

import pytest

from agent.holder.client import _fields
from agent.launcher import LaunchRequest, RequestError, etc

HOST = "nameserver 10.255.255.53\nsearch example.internal\noptions ndots:2\n"


def _req(**overrides: object) -> LaunchRequest:
    base = LaunchRequest(
        dyno_id="abc-1", hostname="web-1", argv=("/bin/sh", "-c", "true"),
        env=(("PATH", "/bin"),), uid=400001, gid=400001, stack_dir="/", slug_dir="/s",
        dyno_dir="/run/d/abc-1", writable_limit_bytes=1 << 20,
        cgroup_procs=("/sys/fs/cgroup/pids/x/cgroup.procs",), netns_path=None)
    return dataclasses.replace(base, **overrides)  # type: ignore[arg-type]


def test_resolv_conf_for_a_space_names_only_its_gateway() -> None:
    text = etc.resolv_conf_for_space("10.64.3.1")
    assert etc.nameservers(text) == ["10.64.3.1"]
    assert [line.split()[0] for line in text.splitlines() if not line.startswith("#")] == [
        "nameserver"]


def test_etc_files_take_the_space_resolver_over_the_host_s() -> None:
    files = etc.etc_files("web-1", "10.64.3.2", (), HOST, nameserver="10.64.3.1")
    assert files["resolv.conf"] == etc.resolv_conf_for_space("10.64.3.1")
    assert etc.etc_files("web-1", "10.64.3.2", (), HOST)["resolv.conf"] == HOST


def test_the_nameserver_field_is_an_address() -> None:
    _req(nameserver="10.64.3.1").validate()
    assert _req().nameserver is None
    with pytest.raises(RequestError) as caught:
        _req(nameserver="gateway").validate()
    assert caught.value.field == "nameserver"


def test_an_unset_nameserver_is_not_sent_to_the_holder() -> None:
    # A holder started by an older agent refuses unknown fields: send it only when set.
    assert "nameserver" not in _fields(_req())
    assert _fields(_req(nameserver="10.64.3.1"))["nameserver"] == "10.64.3.1"
