"""The etcd key layout (dynocoord.keys): the exact keys, their parsing back, the order etcd
sorts them in, and that the module's table documents every kind."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dynocoord.keys as keys_module
from dynocoord.keys import (
    BadKey,
    Keys,
    decode_generation,
    encode_generation,
    range_end,
)
from dynocoord.model import APP_NAME, HOST_ID

KEYS = Keys()


def test_every_key_kind_exactly() -> None:
    assert KEYS.app("shop") == "/dynocoord/apps/shop"
    assert KEYS.apps() == "/dynocoord/apps/"
    assert KEYS.release("shop", 7) == "/dynocoord/releases/shop/00000000000000000007"
    assert KEYS.releases("shop") == "/dynocoord/releases/shop/"
    assert KEYS.formation_entry("shop", "web") == "/dynocoord/formation/shop/web"
    assert KEYS.formation("shop") == "/dynocoord/formation/shop/"
    assert KEYS.formations() == "/dynocoord/formation/"
    assert KEYS.host("h1") == "/dynocoord/hosts/h1"
    assert KEYS.hosts() == "/dynocoord/hosts/"
    assert KEYS.alive("h1") == "/dynocoord/alive/h1"
    assert KEYS.alives() == "/dynocoord/alive/"
    assert KEYS.placement("h1", "d-1") == "/dynocoord/placements/h1/d-1"
    assert KEYS.host_placements("h1") == "/dynocoord/placements/h1/"
    assert KEYS.placements() == "/dynocoord/placements/"
    assert KEYS.generation("h1") == "/dynocoord/generations/h1"
    assert KEYS.generations() == "/dynocoord/generations/"
    assert KEYS.leader() == "/dynocoord/leader"


def test_the_module_table_lists_every_kind() -> None:
    doc = keys_module.__doc__ or ""
    for kind in ("apps", "releases", "formation", "hosts", "alive", "placements",
                 "generations", "leader"):
        assert f"| `/{kind}" in doc, kind


def test_parse_is_the_inverse() -> None:
    assert KEYS.parse_app(KEYS.app("shop")) == "shop"
    assert KEYS.parse_release(KEYS.release("shop", 2**63 - 1)) == ("shop", 2**63 - 1)
    assert KEYS.parse_formation_entry(KEYS.formation_entry("shop", "web")) == ("shop", "web")
    assert KEYS.parse_host(KEYS.host("h.1")) == "h.1"
    assert KEYS.parse_alive(KEYS.alive("h1")) == "h1"
    assert KEYS.parse_placement(KEYS.placement("h1", "d-1")) == ("h1", "d-1")
    assert KEYS.parse_generation(KEYS.generation("h1")) == "h1"


@pytest.mark.parametrize("key", [
    "/dynocoord/apps/",
    "/dynocoord/apps/shop/x",
    "/other/apps/shop",
    "/dynocoord/hosts/h1",
    "/dynocoord/appsshop",
])
def test_parse_app_refuses(key: str) -> None:
    with pytest.raises(BadKey):
        KEYS.parse_app(key)


@pytest.mark.parametrize("key", [
    "/dynocoord/releases/shop/7",
    "/dynocoord/releases/shop/0000000000000000000x",
    "/dynocoord/releases/shop/-0000000000000000007",
    "/dynocoord/releases//00000000000000000007",
    "/dynocoord/releases/shop/00000000000000000007/x",
])
def test_parse_release_refuses(key: str) -> None:
    with pytest.raises(BadKey):
        KEYS.parse_release(key)


def test_parse_placement_refuses_a_host_prefix() -> None:
    with pytest.raises(BadKey):
        KEYS.parse_placement(KEYS.host_placements("h1"))


def test_release_keys_sort_in_version_order() -> None:
    versions = [1, 2, 9, 10, 11, 99, 100, 12345, 2**63 - 1]
    ordered = sorted(KEYS.release("shop", v).encode() for v in versions)
    assert [KEYS.parse_release(k.decode())[1] for k in ordered] == versions


def test_release_key_refuses_a_negative_version() -> None:
    with pytest.raises(ValueError, match="out of range"):
        KEYS.release("shop", -1)


def test_a_prefix_of_its_own() -> None:
    keys = Keys("/tenant/a")
    assert keys.app("shop") == "/tenant/a/apps/shop"
    assert keys.parse_app("/tenant/a/apps/shop") == "shop"
    with pytest.raises(BadKey):
        keys.parse_app(KEYS.app("shop"))
    assert Keys("").host("h") == "/hosts/h"


@pytest.mark.parametrize("prefix", ["/dynocoord/", "dynocoord"])
def test_prefix_shape(prefix: str) -> None:
    with pytest.raises(ValueError, match="prefix"):
        Keys(prefix)


def test_one_app_prefix_is_not_another_apps() -> None:
    # "shop" must not range over "shop-2"'s releases: the trailing slash sees to it.
    assert not KEYS.release("shop-2", 1).startswith(KEYS.releases("shop"))
    assert not KEYS.placement("h10", "d").startswith(KEYS.host_placements("h1"))


@pytest.mark.parametrize(("prefix", "end"), [
    ("/dynocoord/apps/", "/dynocoord/apps0"),
    ("a", "b"),
    ("", "\x00"),
])
def test_range_end(prefix: str, end: str) -> None:
    assert range_end(prefix) == end


def test_generation_values() -> None:
    assert decode_generation(encode_generation(0)) == 0
    assert decode_generation(encode_generation(2**63 - 1)) == 2**63 - 1
    for bad in (b"", b"-1", b"1.5", b" 1", str(2**63).encode(), b"\xff"):
        with pytest.raises(ValueError):
            decode_generation(bad)


@settings(max_examples=200, deadline=None)
@given(st.from_regex(APP_NAME, fullmatch=True), st.from_regex(HOST_ID, fullmatch=True),
       st.from_regex(r"[a-z0-9-]{1,64}", fullmatch=True), st.integers(1, 2**63 - 1))
def test_round_trip_of_any_valid_names(app: str, host: str, dyno: str, version: int) -> None:
    assert KEYS.parse_app(KEYS.app(app)) == app
    assert KEYS.parse_release(KEYS.release(app, version)) == (app, version)
    assert KEYS.parse_placement(KEYS.placement(host, dyno)) == (host, dyno)
    assert KEYS.parse_alive(KEYS.alive(host)) == host
