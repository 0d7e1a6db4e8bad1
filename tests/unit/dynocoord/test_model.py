"""The coordinator's records (dynocoord.model): what each accepts and refuses, with the field
named, and that every record survives its round trip through etcd's JSON bytes."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.coordinator.payloads import hello_payload
from agent.spec import ID, parse_spec
from dynocoord.model import (
    COMMANDS_MAX_BYTES,
    PROCESS_TYPES_MAX,
    QUANTITY_MAX,
    App,
    FormationEntry,
    Host,
    HostState,
    Invalid,
    Placement,
    Release,
    apply_config_patch,
    parse_app_create,
    parse_formation_patch,
    parse_release_create,
)
from dynocoord.placement import dyno_id

NOW = "2026-12-02T19:50:00.000000+00:00"
DIGEST = "ab" * 32


def _release(**body: Any) -> Release:
    data: dict[str, Any] = {"slug": {"url": "https://slugs.example/a.tgz", "sha256": DIGEST},
                            "process_types": {"web": "gunicorn app:app", "worker": "rq"}}
    data.update(body)
    return parse_release_create(data, "shop", 3, NOW)


def _invalid(call: Any, *args: Any, **kwargs: Any) -> Invalid:
    with pytest.raises(Invalid) as caught:
        call(*args, **kwargs)
    return caught.value


# ---------------------------------------------------------------- apps

@pytest.mark.parametrize("name", ["abc", "shop-1", "a" * 30, "a-b-c", "x12"])
def test_app_names_heroku_accepts(name: str) -> None:
    app = parse_app_create({"name": name}, NOW)
    assert app == App(name, NOW)
    assert App.from_json(app.to_json()) == app


@pytest.mark.parametrize("name", ["ab", "a" * 31, "1abc", "-abc", "abc-", "Shop", "sh_op",
                                  "sh op", "shop/x", "", "shöp"])
def test_app_names_heroku_refuses(name: str) -> None:
    error = _invalid(parse_app_create, {"name": name}, NOW)
    assert error.field == "name"
    assert "3-30" in error.message


@pytest.mark.parametrize(("body", "field"), [
    ({}, "name"),
    ({"name": "shop", "region": "eu"}, "region"),
    ({"name": 5}, "name"),
    ([], "body"),
])
def test_app_body_errors_name_the_field(body: Any, field: str) -> None:
    assert _invalid(parse_app_create, body, NOW).field == field


def test_app_refuses_a_time_without_offset() -> None:
    assert _invalid(App, "shop", "2026-12-02T19:50:00").field == "created"


def test_a_huge_unknown_key_is_not_the_field() -> None:
    error = _invalid(parse_app_create, {"name": "shop", "x" * 100_000: 1}, NOW)
    assert error.field == "body"
    assert len(str(error)) < 1000


def test_bytes_that_are_not_json_are_invalid() -> None:
    assert _invalid(App.from_json, b"\xff{").field == "app"
    assert _invalid(App.from_json, b"[1]").field == "app"


# ---------------------------------------------------------------- releases

def test_release_round_trip_through_json() -> None:
    release = _release(env={"A": "1", "B": "x" * 100}, stack="heroku-24")
    assert Release.from_json(release.to_json()) == release
    assert json.loads(release.to_json())["slug"] == {"url": "https://slugs.example/a.tgz",
                                                     "sha256": DIGEST}
    assert release.slug_key == DIGEST
    assert release.stack == "heroku-24"


def test_release_json_is_canonical() -> None:
    a = _release(process_types={"web": "a", "worker": "b"}, env={"X": "1", "A": "2"})
    b = _release(process_types={"worker": "b", "web": "a"}, env={"A": "2", "X": "1"})
    assert a.to_json() == b.to_json()


def test_release_defaults_stack_host_and_no_env() -> None:
    release = _release()
    assert release.stack == "host"
    assert dict(release.env) == {}


def test_path_slug_key_is_distinct_from_a_digest() -> None:
    release = _release(slug={"path": "/srv/slugs/shop.tgz"})
    assert release.slug_key == "path:/srv/slugs/shop.tgz"


@pytest.mark.parametrize(("body", "field"), [
    ({"slug": {"path": "relative/x"}}, "slug.path"),
    ({"slug": {"url": "https://a.example/x.tgz"}}, "slug.sha256"),
    ({"slug": {"url": "ftp://a.example/x.tgz", "sha256": DIGEST}}, "slug.url"),
    ({"slug": {"path": "/a", "url": "https://a.example/x"}}, "slug.url"),
    ({"slug": {}}, "slug"),
    ({"stack": "../etc"}, "stack"),
    ({"process_types": {"Web": "x"}}, "process_types"),
    ({"process_types": {"run": "x"}}, "process_types.run"),
    ({"process_types": {"web": ""}}, "process_types.web"),
    ({"process_types": {"web": 5}}, "process_types.web"),
    ({"process_types": {"web": "a\x00b"}}, "process_types.web"),
    ({"env": {"1X": "a"}}, "env.1X"),
    ({"env": {"X": 1}}, "env.X"),
    ({"formation": {}}, "formation"),
])
def test_release_body_errors_name_the_field(body: dict[str, Any], field: str) -> None:
    assert _invalid(_release, **body).field == field


def test_release_config_limit_is_32_kib() -> None:
    _release(env={"X": "v" * (32 * 1024 - 1)})
    error = _invalid(_release, env={"X": "v" * (32 * 1024)})
    assert error.field == "env"
    assert "32768" in error.message


def test_release_process_type_limits() -> None:
    _release(process_types={f"t{i}": "x" for i in range(PROCESS_TYPES_MAX)})
    error = _invalid(_release, process_types={f"t{i}": "x" for i in range(PROCESS_TYPES_MAX + 1)})
    assert error.field == "process_types"
    one = _invalid(_release, process_types={"web": "x" * (64 * 1024 + 1)})
    assert one.field == "process_types.web"
    per_type = 60 * 1024  # each under the per-command limit, 5 of them over the total
    assert 4 * per_type <= COMMANDS_MAX_BYTES < 5 * per_type
    _release(process_types={f"t{i}": "x" * per_type for i in range(4)})
    total = _invalid(_release, process_types={f"t{i}": "x" * per_type for i in range(5)})
    assert total.field == "process_types"
    assert str(COMMANDS_MAX_BYTES) in total.message


def test_release_record_refuses_version_zero_and_unknown_keys() -> None:
    data = json.loads(_release().to_json())
    assert _invalid(Release.from_dict, {**data, "version": 0}).field == "version"
    assert _invalid(Release.from_dict, {**data, "version": True}).field == "version"
    assert _invalid(Release.from_dict, {**data, "extra": 1}).field == "extra"


def test_config_patch_sets_and_unsets() -> None:
    env = apply_config_patch({"A": "1", "B": "2"}, {"B": None, "C": "3", "Z": None})
    assert dict(env) == {"A": "1", "C": "3"}


@pytest.mark.parametrize(("body", "field"), [
    ({"1A": "x"}, "body"),
    ({"A": 5}, "body.A"),
    ({"A": "v" * 40_000}, "body"),
    ("A=1", "body"),
])
def test_config_patch_errors(body: Any, field: str) -> None:
    assert _invalid(apply_config_patch, {}, body).field == field


# ---------------------------------------------------------------- formation

def test_formation_entry_round_trip() -> None:
    entry = FormationEntry("shop", "web", 3, "standard-2x")
    assert FormationEntry.from_json(entry.to_json()) == entry


@pytest.mark.parametrize(("data", "field"), [
    ({"quantity": -1}, "quantity"),
    ({"quantity": QUANTITY_MAX + 1}, "quantity"),
    ({"quantity": True}, "quantity"),
    ({"quantity": 1.0}, "quantity"),
    ({"size": "huge"}, "size"),
    ({"type": "run"}, "type"),
    ({"type": "release"}, "type"),
    ({"type": "web.1"}, "type"),
    ({"app": "ab"}, "app"),
])
def test_formation_entry_refuses(data: dict[str, Any], field: str) -> None:
    good = {"app": "shop", "type": "web", "quantity": 1, "size": "standard-1x"}
    assert _invalid(FormationEntry.from_dict, {**good, **data}).field == field


def test_formation_patch_keeps_what_it_does_not_name() -> None:
    current = {"web": FormationEntry("shop", "web", 2, "standard-2x")}
    changed = parse_formation_patch("shop", {"web": {"quantity": 5},
                                             "worker": {"size": "Performance-M"}}, current)
    assert changed == [FormationEntry("shop", "web", 5, "standard-2x"),
                       FormationEntry("shop", "worker", 0, "performance-m")]


@pytest.mark.parametrize(("body", "field"), [
    ({}, "body"),
    ({"web": {}}, "web"),
    ({"web": {"quantity": 1, "count": 2}}, "web.count"),
    ({"web": {"quantity": QUANTITY_MAX + 1}}, "web.quantity"),
    ({"web": {"size": "xl"}}, "web.size"),
    ({"web": 3}, "web"),
    ({"clock": {"quantity": 1}}, "clock"),
    ({"run": {"quantity": 1}}, "run"),
])
def test_formation_patch_errors(body: Any, field: str) -> None:
    error = _invalid(parse_formation_patch, "shop", body, {}, process_types={"web", "worker"})
    assert error.field == field


# ---------------------------------------------------------------- hosts

def _hello(**changes: Any) -> dict[str, Any]:
    info = {"agent_id": "0f" * 16, "host": "node-1", "version": "0.1.0", "boot_id": "b" * 36,
            "started_at": 1.5, "capacity": {"cpus": 4, "memory_bytes": 16 << 30},
            "cgroup_mode": "v2"}
    payload = hello_payload(info, [], 7, False)
    payload.update(changes)
    return payload


def test_host_from_the_agents_own_hello() -> None:
    host = Host.from_hello(_hello(), HostState.READY, NOW)
    assert (host.id, host.host, host.state) == ("0f" * 16, "node-1", HostState.READY)
    assert (host.capacity.cpus, host.capacity.memory_bytes) == (4, 16 << 30)
    assert host.labels["cgroup_mode"] == "v2"
    assert Host.from_json(host.to_json()) == host


def test_host_from_hello_ignores_what_a_newer_agent_adds() -> None:
    hello = _hello(future_field=1)
    hello["capacity"] = {**hello["capacity"], "gpus": 2}
    assert Host.from_hello(hello, HostState.READY, NOW).capacity.cpus == 4


@pytest.mark.parametrize(("changes", "field"), [
    ({"agent_id": "a/b"}, "agent_id"),
    ({"agent_id": ""}, "agent_id"),
    ({"capacity": {"cpus": 4}}, "capacity.memory_bytes"),
    ({"capacity": {"cpus": 0, "memory_bytes": 1}}, "capacity.cpus"),
    ({"capacity": {"cpus": 1, "memory_bytes": "1G"}}, "capacity.memory_bytes"),
    ({"labels": {"k": 1}}, "labels.k"),
    ({"labels": {f"k{i}": "v" for i in range(33)}}, "labels"),
    ({"host": "h" * 254}, "host"),
])
def test_host_from_hello_refuses(changes: dict[str, Any], field: str) -> None:
    assert _invalid(Host.from_hello, _hello(**changes), HostState.READY, NOW).field == field


def test_host_record_state_is_one_of_three() -> None:
    data = json.loads(Host.from_hello(_hello(), HostState.LOST, NOW).to_json())
    assert data["state"] == "lost"
    error = _invalid(Host.from_dict, {**data, "state": "gone"})
    assert (error.field, "ready, draining, lost" in error.message) == ("state", True)


# ---------------------------------------------------------------- placements

def _placement(**changes: Any) -> dict[str, Any]:
    data = {"id": dyno_id("shop", "web.1", 3, 9), "app": "shop", "name": "web.1",
            "type": "web", "release": 3, "size": "standard-1x", "host": "0f" * 16,
            "generation": 9}
    data.update(changes)
    return data


def test_placement_round_trip() -> None:
    placement = Placement.from_dict(_placement())
    assert (placement.type, placement.number) == ("web", 1)
    assert Placement.from_json(placement.to_json()) == placement
    assert json.loads(placement.to_json())["type"] == "web"


@pytest.mark.parametrize(("changes", "field"), [
    ({"id": "ABC"}, "id"),
    ({"id": "x" * 65}, "id"),
    ({"name": "web.0"}, "name"),
    ({"name": "web.01"}, "name"),
    ({"type": "worker"}, "type"),
    ({"release": 0}, "release"),
    ({"size": "tiny"}, "size"),
    ({"host": "../x"}, "host"),
    ({"generation": -1}, "generation"),
    ({"generation": 2**63}, "generation"),
])
def test_placement_refuses(changes: dict[str, Any], field: str) -> None:
    assert _invalid(Placement.from_dict, _placement(**changes)).field == field


def test_coordinator_dyno_ids_are_valid_agent_ids() -> None:
    ident = dyno_id("shop", "web.12", 4, 2**63 - 1)
    assert ID.fullmatch(ident)
    spec = parse_spec({"id": ident, "app": "shop", "name": "web.12", "command": "x",
                       "release": {"version": 4, "slug": {"path": "/s"}}})
    assert spec.id == ident


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([App, Release, FormationEntry, Host, Placement]), json_values,
       st.dictionaries(st.sampled_from(["name", "created", "app", "version", "slug", "type",
                                        "quantity", "size", "id", "state", "host"]),
                       json_values, max_size=6))
def test_records_refuse_anything_with_invalid_only(record: Any, value: Any,
                                                   shaped: dict[str, Any]) -> None:
    for data in (value, shaped):
        try:
            record.from_json(json.dumps(data).encode())
        except Invalid as exc:
            assert exc.field
