"""What a dyno on the `host` stack is kept from seeing: the agent's own directories, sockets and
secrets, resolved through symlinks, plus every agent's default places; nested paths once."""

from __future__ import annotations

from pathlib import Path

from agent.config import HOST_WIDE_PATHS, Config
from agent.daemon.service import hidden_paths


def test_own_directories_sockets_secrets_and_host_wide_places(tmp_path: Path) -> None:
    config = Config(state_dir=tmp_path / "state", run_dir=tmp_path / "run",
                    socket=tmp_path / "sock" / "agent.sock", coordinator_url="ws://c",
                    coordinator_token_file=tmp_path / "secret" / "token")
    hidden = hidden_paths(config, tmp_path / "agent.toml")
    for path in ("state", "run", "sock/agent.sock", "sock/agent.attach.sock", "secret/token",
                 "agent.toml"):
        assert str(tmp_path / path) in hidden, path
    for place in HOST_WIDE_PATHS:
        assert str(place) in hidden
    assert "/run/netns" in hidden


def test_symlinks_are_resolved_and_nested_paths_left_to_the_outer_mask(tmp_path: Path) -> None:
    (tmp_path / "real" / "run").mkdir(parents=True)
    (tmp_path / "state-link").symlink_to(tmp_path / "real")
    config = Config(state_dir=tmp_path / "state-link", run_dir=tmp_path / "real" / "run")
    hidden = hidden_paths(config, None)
    assert str(tmp_path / "real") in hidden
    assert str(tmp_path / "state-link") not in hidden  # the directory it names is masked
    # run_dir and the socket in it lie inside the state dir: its mask hides them.
    assert not any(path.startswith(str(tmp_path / "real") + "/") for path in hidden), hidden
    assert hidden == tuple(sorted(hidden))
