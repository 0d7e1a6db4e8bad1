"""The pure parts of the runtime: how a dyno's command is handed to the shell, and the cgroup
limits a dyno's size becomes in each cgroup mode."""

from __future__ import annotations

import pytest

from agent.sizes import DEFAULT_SIZES, MIB
from agent.startup import shell_command
from agent.supervision.runtime import dyno_limits
from cgroups import Mode, Write, plan_writes


@pytest.mark.parametrize(("command", "expected"), [
    ("python3 -u web.py", "exec python3 -u web.py"),
    ("  bundle exec puma -p $PORT  ", "exec bundle exec puma -p $PORT"),
    ("gunicorn -b 0.0.0.0:$PORT 'app:create()'",
     "exec gunicorn -b 0.0.0.0:$PORT 'app:create()'"),
    ("sh -c 'trap \"exit 5\" INT; sleep 9'", "exec sh -c 'trap \"exit 5\" INT; sleep 9'"),
    ("web > log 2>&1", "exec web > log 2>&1"),
])
def test_simple_commands_are_execd(command: str, expected: str) -> None:
    assert shell_command(command) == expected


@pytest.mark.parametrize("command", [
    "a && b", "a || b", "a; b", "a | b", "a &", "(a)", "{ a; }", "a\nb",
    "FOO=1 cmd", "exec cmd", "trap '' TERM", "cd /app", "while :; do x; done",
    "if x; then y; fi", "! x", ". ./env", "", "echo $(date)", "a|b", "x 'unbalanced",
])
def test_everything_else_keeps_the_shell(command: str) -> None:
    assert shell_command(command) == command


def test_dyno_limits_kill_point_is_the_hard_limit_and_the_quota_soft_only_on_hybrid() -> None:
    size = DEFAULT_SIZES["standard-1x"]
    hybrid = dyno_limits(size, Mode.HYBRID)
    assert (hybrid.memory_high_bytes, hybrid.memory_max_bytes) == (512 * MIB, 1024 * MIB)
    assert (hybrid.pids_max, hybrid.cpu_weight, hybrid.swap_allowed) == (256, 100, False)
    v1_files = {w.file: w.value for w in plan_writes(hybrid, Mode.HYBRID,
                                                     swap_accounting=True)}
    assert v1_files["memory.soft_limit_in_bytes"] == str(512 * MIB)
    assert v1_files["memory.limit_in_bytes"] == str(1024 * MIB)


def test_dyno_limits_on_v2_kill_the_whole_group_at_the_kill_point_and_never_throttle() -> None:
    # memory.high would throttle a dyno past its quota short of the kill point (no swap to
    # reclaim into): R15 would never come. The whole group goes at memory.max.
    v2 = dyno_limits(DEFAULT_SIZES["standard-2x"], Mode.V2)
    assert (v2.memory_high_bytes, v2.memory_max_bytes) == (None, 2048 * MIB)
    writes = plan_writes(v2, Mode.V2, swap_accounting=True)
    assert Write("memory", "memory.oom.group", "1") in writes
    assert Write("memory", "memory.max", str(2048 * MIB)) in writes
    assert Write("memory", "memory.swap.max", "0") in writes
    assert all(w.file != "memory.high" for w in writes)
