"""The dyno spec of DESIGN §5: what parses, what is refused (naming the field), defaults,
round-trips, and the environment a dyno starts with."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.sizes import DEFAULT_SIZES, apply_overrides
from agent.spec import (
    DEFAULT_PATH,
    ENV_MAX_BYTES,
    ID,
    DynoSpec,
    Env,
    SlugSource,
    SpecError,
    dyno_env,
    parse_spec,
)

DIGEST = "ab" * 32


def minimal(**extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "app": "shop",
        "name": "web.1",
        "command": "python -m http.server $PORT",
        "release": {"version": 3, "slug": {"path": "/srv/slugs/shop"}},
    }
    data.update(extra)
    return data


def test_minimal_spec_gets_design_defaults() -> None:
    spec = parse_spec(minimal())
    assert ID.fullmatch(spec.id)
    assert (spec.app, spec.name, spec.type) == ("shop", "web.1", "web")
    assert spec.env == {}
    assert spec.release.version == 3
    assert spec.release.slug == SlugSource(path="/srv/slugs/shop")
    assert spec.release.stack == "host"
    assert spec.size == DEFAULT_SIZES["standard-1x"]
    assert spec.space == "shop"
    assert spec.restart == "always"
    # Absent: the agent's configured defaults apply when the dyno runs.
    assert (spec.boot_timeout_s, spec.stop_timeout_s) == (None, None)
    assert spec.is_web and not spec.is_one_shot


def test_generated_ids_differ() -> None:
    assert parse_spec(minimal()).id != parse_spec(minimal()).id


@pytest.mark.parametrize(("name", "restart"), [
    ("run.4821", "never"), ("release.7", "never"), ("worker.3", "always"), ("web.1", "always"),
])
def test_restart_default_follows_the_type(name: str, restart: str) -> None:
    spec = parse_spec(minimal(name=name))
    assert spec.restart == restart
    assert spec.is_one_shot == (restart == "never")


def test_full_spec_is_kept_as_given() -> None:
    data = minimal(
        id="d-1234", name="worker_high.12", env={"DATABASE_URL": "postgres://x", "_A1": ""},
        release={"version": 0, "slug": {"url": "https://slugs.example/s.tgz",
                                        "sha256": DIGEST.upper()}, "stack": "heroku-24"},
        size="Performance-M", space="shared-net", restart="never", boot_timeout_s=5,
        stop_timeout_s=1)
    spec = parse_spec(data)
    assert spec.id == "d-1234"
    assert spec.type == "worker_high"
    assert spec.env == {"DATABASE_URL": "postgres://x", "_A1": ""}
    assert spec.release.slug == SlugSource(url="https://slugs.example/s.tgz", sha256=DIGEST)
    assert spec.release.stack == "heroku-24"
    assert spec.size.name == "performance-m"
    assert (spec.space, spec.restart, spec.boot_timeout_s, spec.stop_timeout_s) == (
        "shared-net", "never", 5, 1)


def test_spec_is_frozen_and_hashable() -> None:
    spec = parse_spec(minimal(env={"A": "1"}))
    with pytest.raises(AttributeError):
        spec.app = "other"  # type: ignore[misc]
    assert isinstance(spec.env, Env)
    with pytest.raises(TypeError):
        spec.env["B"] = "2"  # type: ignore[index]
    assert hash(spec) == hash(parse_spec(spec.to_dict()))


def test_input_is_not_aliased() -> None:
    data = minimal(env={"A": "1"})
    spec = parse_spec(data)
    data["env"]["A"] = "changed"
    assert spec.env["A"] == "1"


def test_size_from_overridden_table() -> None:
    sizes = apply_overrides(DEFAULT_SIZES, {"tiny": {"memory_mb": 64, "pids_max": 16}})
    assert parse_spec(minimal(size="tiny"), sizes).size is sizes["tiny"]
    with pytest.raises(SpecError) as caught:
        parse_spec(minimal(size="tiny"))
    assert caught.value.field == "size"


def _set(data: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    data = copy.deepcopy(data)
    *parents, last = path.split(".")
    node = data
    for part in parents:
        node = node[part]
    node[last] = value
    return data


def _drop(data: dict[str, Any], path: str) -> dict[str, Any]:
    data = copy.deepcopy(data)
    *parents, last = path.split(".")
    node = data
    for part in parents:
        node = node[part]
    del node[last]
    return data


REJECTED = [
    # (what to change, value, field named by the error)
    ("id", "", "id"), ("id", "Upper", "id"), ("id", "a" * 65, "id"), ("id", 7, "id"),
    ("app", "9lives", "app"), ("app", "a" * 31, "app"), ("app", "my_app", "app"),
    ("app", None, "app"),
    ("name", "web", "name"), ("name", "web.0", "name"), ("name", "web.01", "name"),
    ("name", "Web.1", "name"), ("name", "web.x", "name"), ("name", "w-eb.1", "name"),
    ("name", "a" * 31 + ".1", "name"),
    ("command", "", "command"), ("command", "  ", "command"), ("command", ["ls"], "command"),
    ("command", "echo \x00", "command"), ("command", "\ud800", "command"),
    ("env", [], "env"), ("env", {"1A": "x"}, "env.1A"), ("env", {"A-B": "x"}, "env.A-B"),
    ("env", {"A": 1}, "env.A"), ("env", {"A": None}, "env.A"), ("env", {"A": "a\x00"}, "env.A"),
    ("env", {"A": "x" * ENV_MAX_BYTES}, "env"),
    ("release", "v3", "release"), ("release.version", "3", "release.version"),
    ("release.version", -1, "release.version"), ("release.version", True, "release.version"),
    ("release.stack", "../etc", "release.stack"), ("release.stack", "", "release.stack"),
    ("release.slug", {}, "release.slug"), ("release.slug", "x", "release.slug"),
    ("release.slug", {"path": "rel/dir"}, "release.slug.path"),
    ("release.slug", {"path": "/x", "sha256": DIGEST}, "release.slug.sha256"),
    ("release.slug", {"url": "https://h/s.tgz"}, "release.slug.sha256"),
    ("release.slug", {"url": "ftp://h/s.tgz", "sha256": DIGEST}, "release.slug.url"),
    ("release.slug", {"url": "https:///nohost", "sha256": DIGEST}, "release.slug.url"),
    ("release.slug", {"url": "http://[::1", "sha256": DIGEST}, "release.slug.url"),
    ("release.slug", {"url": "https://h/s.tgz", "sha256": "abc"}, "release.slug.sha256"),
    ("release.slug", {"url": "https://h/s", "sha256": DIGEST, "md5": "x"}, "release.slug.md5"),
    ("release.extra", 1, "release.extra"),
    ("size", "huge", "size"), ("size", 1, "size"),
    ("space", "Bad Space", "space"),
    ("restart", "on-failure", "restart"), ("restart", True, "restart"),
    ("boot_timeout_s", 0, "boot_timeout_s"), ("boot_timeout_s", 1.5, "boot_timeout_s"),
    ("boot_timeout_s", False, "boot_timeout_s"), ("stop_timeout_s", -3, "stop_timeout_s"),
    ("stop_timeout_s", 10**9, "stop_timeout_s"),
    ("colour", "blue", "colour"),
]


@pytest.mark.parametrize(("path", "value", "field"), REJECTED)
def test_rejection_names_the_field(path: str, value: Any, field: str) -> None:
    with pytest.raises(SpecError) as caught:
        parse_spec(_set(minimal(), path, value))
    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}: ")


@pytest.mark.parametrize(("path", "field"), [
    ("app", "app"), ("name", "name"), ("command", "command"), ("release", "release"),
    ("release.version", "release.version"), ("release.slug", "release.slug"),
])
def test_missing_required_key_is_named(path: str, field: str) -> None:
    with pytest.raises(SpecError) as caught:
        parse_spec(_drop(minimal(), path))
    assert caught.value.field == field
    assert "required" in caught.value.message


@pytest.mark.parametrize("data", [None, [], "spec", 3])
def test_non_object_spec(data: Any) -> None:
    with pytest.raises(SpecError) as caught:
        parse_spec(data)
    assert caught.value.field == "spec"


def test_env_limit_counts_bytes() -> None:
    # 2-byte characters: under the limit in characters, over it in bytes.
    value = "é" * (ENV_MAX_BYTES // 2)
    with pytest.raises(SpecError) as caught:
        parse_spec(minimal(env={"A": value}))
    assert caught.value.field == "env"
    parse_spec(minimal(env={"A": "x" * (ENV_MAX_BYTES - 1)}))


def test_dyno_env_for_web() -> None:
    spec = parse_spec(minimal(id="d1", env={"A": "1", "PATH": "/app/.venv/bin:/usr/bin",
                                             "DYNO": "spoofed", "HOME": "/root"}))
    assert dyno_env(spec, "10.1.0.5", 5000) == {
        "A": "1",
        "PATH": "/app/.venv/bin:/usr/bin",
        "DYNO": "web.1",
        "PORT": "5000",
        "HOME": "/app",
        "DYNOAGENT_DYNO_ID": "d1",
        "DYNOAGENT_PRIVATE_IP": "10.1.0.5",
        "HEROKU_PRIVATE_IP": "10.1.0.5",
        "HEROKU_DNS_FORMATION_NAME": "web.shop.app.localspace",
        "HEROKU_DNS_DYNO_NAME": "1.web.shop.app.localspace",
        "HEROKU_DNS_APP_NAME": "shop.app.localspace",
    }


def test_dyno_env_for_worker_has_no_port_and_default_path() -> None:
    spec = parse_spec(minimal(id="d2", name="worker.2", env={"PORT": "9"}))
    env = dyno_env(spec, "10.1.0.6")
    assert "PORT" not in env
    assert env["PATH"] == DEFAULT_PATH
    assert env["DYNO"] == "worker.2"
    assert env["HEROKU_DNS_DYNO_NAME"] == "2.worker.shop.app.localspace"


def test_dyno_env_dns_names_of_a_one_off_and_config_vars_cannot_spoof_them() -> None:
    spec = parse_spec(minimal(id="d3", name="run.3",
                              env={"HEROKU_PRIVATE_IP": "1.2.3.4",
                                   "HEROKU_DNS_APP_NAME": "other.app.localspace"}))
    env = dyno_env(spec, "10.1.0.7")
    assert env["HEROKU_PRIVATE_IP"] == "10.1.0.7"
    assert env["HEROKU_DNS_FORMATION_NAME"] == "run.shop.app.localspace"
    assert env["HEROKU_DNS_DYNO_NAME"] == "3.run.shop.app.localspace"
    assert env["HEROKU_DNS_APP_NAME"] == "shop.app.localspace"


# ---------------------------------------------------------------- properties

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_like = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=20)

# Arbitrary values under the real keys reach deeper than arbitrary keys ever would.
spec_shaped = st.fixed_dictionaries({}, optional={
    "id": json_like | st.from_regex(ID, fullmatch=True),
    "app": json_like | st.sampled_from(["shop", "a"]),
    "name": json_like | st.sampled_from(["web.1", "run.7", "x.0"]),
    "command": json_like,
    "env": json_like | st.dictionaries(st.text(max_size=6), json_like, max_size=3),
    "release": json_like | st.fixed_dictionaries({}, optional={
        "version": json_like, "stack": json_like,
        "slug": json_like | st.fixed_dictionaries({}, optional={
            "path": json_like, "url": json_like, "sha256": json_like})}),
    "size": json_like | st.sampled_from(["eco", "Standard-2X"]),
    "space": json_like, "restart": json_like, "boot_timeout_s": json_like,
    "stop_timeout_s": json_like, "extra": json_like,
})


@settings(max_examples=200, deadline=None)
@given(st.one_of(json_like, spec_shaped))
def test_parse_spec_raises_only_spec_error(data: Any) -> None:
    try:
        spec = parse_spec(data)
    except SpecError as exc:
        assert exc.field
    else:
        assert isinstance(spec, DynoSpec)


app_names = st.from_regex(r"[a-z][a-z0-9-]{0,29}", fullmatch=True)
valid_specs = st.fixed_dictionaries(
    {
        "app": app_names,
        "name": st.from_regex(r"[a-z][a-z0-9_]{0,29}\.[1-9][0-9]{0,5}", fullmatch=True),
        "command": st.text(min_size=1, max_size=40).filter(
            lambda s: s.strip() and "\x00" not in s),
        "release": st.fixed_dictionaries({
            "version": st.integers(0, 10**6),
            "slug": st.one_of(
                st.builds(lambda p: {"path": "/" + p},
                          st.text(alphabet="abc/._-", max_size=20)),
                st.builds(lambda h, d: {"url": f"https://{h}.example/slug.tgz", "sha256": d},
                          st.from_regex(r"[a-z]{1,10}", fullmatch=True),
                          st.from_regex(r"[0-9a-f]{64}", fullmatch=True))),
        }, optional={"stack": st.sampled_from(["host", "heroku-24"])}),
    },
    optional={
        "id": st.from_regex(ID, fullmatch=True),
        "env": st.dictionaries(st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,10}", fullmatch=True),
                               st.text(max_size=20).filter(lambda s: "\x00" not in s),
                               max_size=5),
        "size": st.sampled_from(sorted(DEFAULT_SIZES)),
        "space": app_names,
        "restart": st.sampled_from(["always", "never"]),
        "boot_timeout_s": st.integers(1, 86_400),
        "stop_timeout_s": st.integers(1, 86_400),
    })


@settings(max_examples=300, deadline=None)
@given(valid_specs)
def test_valid_specs_round_trip(data: dict[str, Any]) -> None:
    spec = parse_spec(data)
    again = parse_spec(spec.to_dict())
    assert again == spec
    assert again.to_dict() == spec.to_dict()
    for key, value in data.items():
        if key not in ("release", "size"):
            assert spec.to_dict()[key] == value
