"""Configuration: defaults, every key's validation, and what SIGHUP may change."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent import config
from agent.errors import ConfigError


def test_defaults_match_the_design() -> None:
    c = config.Config()
    assert c.state_dir == Path("/var/lib/dynoagent")
    assert c.socket_path == Path("/run/dynoagent/dynoagent.sock")
    assert c.restart_schedule_s == (1200.0, 2400.0, 3600.0, 10800.0, 19200.0)
    assert (c.boot_timeout_s, c.stop_timeout_s, c.cycle_after_s) == (60.0, 30.0, 86400.0)
    assert c.address_pool == "172.20.0.0/14"


def test_every_key_is_accepted() -> None:
    c = config.from_mapping({
        "state_dir": "/s", "run_dir": "/r", "socket": "/r/x.sock", "socket_group": "ops",
        "cgroup_root": "agent2", "address_pool": "10.64.0.0/16",
        "coordinator_url": "wss://c.example/v1/agents/connect",
        "coordinator_token_file": "/etc/t", "coordinator_ca_file": "/etc/ca.pem",
        "restart_schedule_s": [1, 2.5], "boot_timeout_s": 5, "stop_timeout_s": 2,
        "cycle_after_s": 3600, "log_level": "DEBUG",
        "sizes": {"tiny": {"memory_mb": 64, "pids_max": 10}, "eco": {"kill_at": 3}},
    })
    assert c.socket_path == Path("/r/x.sock")
    assert c.restart_schedule_s == (1.0, 2.5)
    assert c.log_level == "debug"
    assert c.sizes["tiny"].memory_quota_bytes == 64 * 2**20
    assert c.sizes["eco"].kill_at == 3
    assert c.sizes["standard-2x"].memory_quota_bytes == 2**30


def test_coordinator_url_is_one_url_or_several_replicas() -> None:
    token = {"coordinator_token_file": "/etc/t"}
    one = config.from_mapping({"coordinator_url": "ws://a/v1/agents/connect", **token})
    assert one.coordinator_url == ("ws://a/v1/agents/connect",)
    listed = config.from_mapping({"coordinator_url": ["ws://a/x", "wss://b/x"], **token})
    joined = config.from_mapping({"coordinator_url": "ws://a/x, wss://b/x", **token})
    assert listed.coordinator_url == joined.coordinator_url == ("ws://a/x", "wss://b/x")
    for bad in ([], ["ws://a/x", "http://b/x"], ["ws://a/x", 5], "ws://a/x,", ["ws://a"] * 17):
        with pytest.raises(config.ConfigError) as caught:
            config.from_mapping({"coordinator_url": bad, **token})
        assert caught.value.key == "coordinator_url"


def test_uid_quarantine_defaults_to_ten_minutes_and_may_be_zero() -> None:
    assert config.Config().uid_quarantine_s == 600.0
    assert config.from_mapping({"uid_quarantine_s": 0}).uid_quarantine_s == 0.0
    assert config.from_mapping({"uid_quarantine_s": 30}).uid_quarantine_s == 30.0


def test_restart_schedule_none_means_no_cool_off() -> None:
    assert config.from_mapping({"restart_schedule_s": "none"}).restart_schedule_s == ()


@pytest.mark.parametrize(("data", "key"), [
    ({"nope": 1}, "nope"),
    ({"state_dir": "relative/dir"}, "state_dir"),
    ({"state_dir": 5}, "state_dir"),
    ({"run_dir": ""}, "run_dir"),
    ({"socket": "/" + "x" * 107}, "socket"),
    ({"run_dir": "/" + "r" * 100}, "run_dir"),
    ({"socket_group": "a/b"}, "socket_group"),
    ({"cgroup_root": ".."}, "cgroup_root"),
    ({"address_pool": "300.0.0.0/8"}, "address_pool"),
    ({"address_pool": "10.0.0.0/25"}, "address_pool"),
    ({"address_pool": "10.0.0.1/16"}, "address_pool"),
    ({"coordinator_url": "http://x"}, "coordinator_url"),
    ({"coordinator_url": "ws://x"}, "coordinator_token_file"),
    ({"restart_schedule_s": [1, -2]}, "restart_schedule_s[1]"),
    ({"restart_schedule_s": "sometimes"}, "restart_schedule_s"),
    ({"boot_timeout_s": 0}, "boot_timeout_s"),
    ({"stop_timeout_s": -1}, "stop_timeout_s"),
    ({"stop_timeout_s": True}, "stop_timeout_s"),
    ({"cycle_after_s": float("inf")}, "cycle_after_s"),
    ({"log_level": "loud"}, "log_level"),
    ({"uid_quarantine_s": -1}, "uid_quarantine_s"),
    ({"uid_quarantine_s": "10m"}, "uid_quarantine_s"),
    ({"uid_quarantine_s": float("nan")}, "uid_quarantine_s"),
    ({"sizes": {"x": 3}}, "sizes.x"),
    ({"sizes": []}, "sizes"),
    ({"sizes": {"eco": {"memory_mb": -5}}}, "sizes.eco.memory_mb"),
    ({"sizes": {"eco": {"color": "red"}}}, "sizes.eco.color"),
])
def test_bad_values_name_their_key(data: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.from_mapping(data)
    assert info.value.key == key
    assert str(info.value).startswith(f"config: {key}: ")


def test_load_missing_default_file_gives_defaults(monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Path) -> None:
    monkeypatch.delenv("DYNOAGENT_CONFIG", raising=False)
    monkeypatch.setattr(config, "DEFAULT_CONFIG_PATH", tmp_path / "absent.toml")
    assert config.load(None) == config.Config()


def test_load_explicit_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "absent.toml")


def test_load_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "a.toml"
    path.write_text('log_level = "warning"\n')
    monkeypatch.setenv("DYNOAGENT_CONFIG", str(path))
    assert config.load(None).log_level == "warning"


def test_load_invalid_toml(tmp_path: Path) -> None:
    path = tmp_path / "a.toml"
    path.write_text("state_dir = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(path)


def test_reload_applies_reloadable_keys_and_names_the_rest() -> None:
    old = config.Config()
    new = config.from_mapping({"log_level": "debug", "stop_timeout_s": 3,
                               "state_dir": "/elsewhere", "cgroup_root": "other"})
    merged, ignored = config.reload_changes(old, new)
    assert merged.log_level == "debug"
    assert merged.stop_timeout_s == 3
    assert merged.state_dir == old.state_dir
    assert sorted(ignored) == ["cgroup_root", "state_dir"]
