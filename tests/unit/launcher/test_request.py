"""LaunchRequest.validate(): every unusable field is refused with its name."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from agent.launcher import LaunchRequest, RequestError


def _req(**overrides: Any) -> LaunchRequest:
    base = LaunchRequest(
        dyno_id="abc-1", hostname="web-1", argv=("/bin/sh", "-c", "true"),
        env=(("PATH", "/bin"),), uid=400001, gid=400001, stack_dir="/", slug_dir="/s",
        dyno_dir="/run/d/abc-1", writable_limit_bytes=1 << 20,
        cgroup_procs=("/sys/fs/cgroup/pids/x/cgroup.procs",), netns_path=None)
    return dataclasses.replace(base, **overrides)


def test_a_sane_request_validates() -> None:
    _req().validate()
    _req(netns_path="/run/netns/dyno-abc-1", hide_paths=("/var/lib/dynoagent",)).validate()
    _req(dyno_id="-" + "a" * 63, hostname="-" + "a" * 63).validate()  # any valid dyno id


@pytest.mark.parametrize(("override", "field"), [
    ({"dyno_id": "Bad_Id"}, "dyno_id"),
    ({"hostname": "a b"}, "hostname"),
    ({"hostname": ""}, "hostname"),
    ({"hostname": "a" * 65}, "hostname"),
    ({"argv": ()}, "argv"),
    ({"uid": 0}, "uid/gid"),
    ({"gid": 0}, "uid/gid"),
    ({"writable_limit_bytes": 10}, "writable_limit_bytes"),
    ({"env": (("A=B", "x"),)}, "env"),
    ({"env": (("A", "x\0y"),)}, "env"),
    ({"stack_dir": "relative"}, "stack_dir"),
    ({"slug_dir": "/slugs/a,upperdir=/etc"}, "slug_dir"),
    ({"slug_dir": "/slugs/a:b"}, "slug_dir"),
    ({"dyno_dir": "/run/x\\y"}, "dyno_dir"),
    ({"reaper": "tini"}, "reaper"),
    ({"cgroup_procs": ("cgroup.procs",)}, "path"),
    ({"hide_paths": ("var/lib",)}, "path"),
    ({"netns_path": "netns"}, "netns_path"),
    ({"private_ip": "10.0.0.300"}, "private_ip"),
    ({"private_ip": "web-1"}, "private_ip"),
    ({"nofile_limit": 10}, "nofile_limit"),
    ({"nofile_limit": (1 << 20) + 1}, "nofile_limit"),
    ({"seccomp": 0}, "seccomp"),
    ({"seccomp": "false"}, "seccomp"),
    ({"app_dir": "builds/app"}, "app_dir"),
    ({"binds": (("relative", "cache", True),)}, "binds"),
    ({"binds": (("/abs", "../etc", True),)}, "binds"),
    ({"binds": (("/abs", "cache", 1),)}, "binds"),
    ({"binds": (("/abs", "cache"),)}, "binds"),
])
def test_bad_fields_are_named(override: dict[str, Any], field: str) -> None:
    with pytest.raises(RequestError) as info:
        _req(**override).validate()
    assert info.value.field == field
    assert field in str(info.value)


def test_defaults_keep_old_callers_working() -> None:
    req = _req()
    assert (req.private_ip, req.own_etc, req.nofile_limit) == (None, True, 10000)
    assert req.seccomp is True


def test_private_ip_falls_back_to_a_valid_address_in_env() -> None:
    assert _req().effective_private_ip() is None
    env = (("PATH", "/bin"), ("DYNOAGENT_PRIVATE_IP", "10.1.2.3"))
    assert _req(env=env).effective_private_ip() == "10.1.2.3"
    assert _req(env=env, private_ip="fd00::5").effective_private_ip() == "fd00::5"
    bad = (("DYNOAGENT_PRIVATE_IP", "nonsense"),)
    assert _req(env=bad).effective_private_ip() is None
