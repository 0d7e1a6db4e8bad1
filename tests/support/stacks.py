"""The stack that e2e tests run named-stack dynos on: built once by `make setup-stack` (the
Makefile's TEST_STACKS_STATE and TEST_STACK) and shared by every test agent through a symlink
`<state_dir>/stacks` -> the cache's stacks directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.agentproc import AgentProcess, write_config
from tests.support.names import unique

TEST_STACKS_STATE = Path("/var/cache/dynoagent-tests")
TEST_STACKS_DIR = TEST_STACKS_STATE / "stacks"
TEST_STACK = "test-bookworm"


def built_test_stack() -> Path:
    """The test stack's root; skips the test, naming what is missing, when it was not built
    (it needs Debian's archive once: `make setup-stack`, which `make test` runs)."""
    root = TEST_STACKS_DIR / TEST_STACK
    meta = TEST_STACKS_DIR / f".{TEST_STACK}.json"
    if not (root / "usr/bin/python3").is_file() or not meta.is_file():
        pytest.skip(f"the test stack {root} is not built (it needs Debian's archive once): "
                    "run `make setup-stack`")
    return root


def built_test_stack_info() -> dict[str, object]:
    data: dict[str, object] = json.loads((TEST_STACKS_DIR / f".{TEST_STACK}.json").read_text())
    return data


def share_test_stacks(agent: AgentProcess) -> None:
    """An AgentProcess `prepare` step: the agent's stacks are the test cache's."""
    state = Path(agent.settings["state_dir"])
    state.mkdir(mode=0o700, parents=True, exist_ok=True)
    (state / "stacks").symlink_to(TEST_STACKS_DIR)


def stack_agent_config(base: Path, prefix: str, address_pool: str) -> Path:
    """The config file of a private agent under `base` (for `dynoagent build`/`up
    --config`) whose stacks are the tests' through the `<state_dir>/stacks` symlink."""
    (base / "state").mkdir(parents=True, mode=0o700)
    (base / "state" / "stacks").symlink_to(TEST_STACKS_DIR)
    config = base / "agent.toml"
    write_config(config, {"state_dir": str(base / "state"), "run_dir": str(base / "run"),
                          "socket": str(base / "run" / "dynoagent.sock"),
                          "cgroup_root": f"dynoagent-{unique(prefix)}", "log_level": "warning",
                          "stop_timeout_s": 10, "address_pool": address_pool})
    return config
