"""The daemon as systemd and operators see it: start, info, refusal, notify, clean stop."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.support.agentproc import AgentProcess, running_agent
from tests.support.wait import wait_for


def _expected_cgroup_mode() -> str:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        if left.split()[4] == "/sys/fs/cgroup":
            return "v2" if right.split()[0] == "cgroup2" else "hybrid"
    return "hybrid"


def test_info_then_sigterm_exits_zero_and_removes_socket() -> None:
    with running_agent() as agent:
        info = agent.ctl_json("info")
        assert info["version"] == "0.1.0"
        assert info["host"] == socket.gethostname()
        assert info["cgroup_mode"] == _expected_cgroup_mode()
        assert info["state"] == "ready"
        assert agent.socket.exists()
        assert agent.socket.stat().st_mode & 0o777 == 0o660
        started = time.monotonic()
        agent.signal(signal.SIGTERM)
        assert agent.wait(5) == 0
        assert time.monotonic() - started < 5
        assert not agent.socket.exists()


def test_human_info_output() -> None:
    with running_agent() as agent:
        out = agent.ctl("info").stdout
        assert "dynoagent 0.1.0" in out
        assert f"Cgroups:     {_expected_cgroup_mode()}" in out


def test_second_agent_on_same_socket_is_refused() -> None:
    with running_agent() as first:
        second = AgentProcess()
        second.config_path.write_text(first.config_path.read_text())
        try:
            result = subprocess.run(second.argv("serve", "--config", str(first.config_path)),
                                    capture_output=True, text=True, timeout=20)
        finally:
            second.cleanup()
        assert result.returncode == 1
        assert "another dynoagent" in result.stderr
        assert str(first.socket) in result.stderr
        # The first agent is untouched and still answers.
        assert first.ctl_json("info")["pid"] == first.proc.pid  # type: ignore[union-attr]


def test_stale_socket_of_a_dead_agent_is_replaced() -> None:
    agent = AgentProcess()
    try:
        agent.socket.parent.mkdir(parents=True)
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(str(agent.socket))
        stale.close()  # bound, never listening: what a SIGKILLed agent leaves behind
        agent.start()
        assert agent.ctl_json("info")["state"] == "ready"
    finally:
        agent.cleanup()


@pytest.mark.parametrize(("line", "key"), [
    ('stop_timeout_s = -1', "stop_timeout_s"),
    ('bogus_key = 1', "bogus_key"),
    ('boot_timeout_s = "soon"', "boot_timeout_s"),
    ('socket = "/tmp/' + "s" * 120 + '.sock"', "socket"),
    ('address_pool = "10.0.0.0/30"', "address_pool"),
])
def test_bad_config_is_refused_naming_the_key(tmp_path: Path, line: str, key: str) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(f'state_dir = "{tmp_path}/state"\nrun_dir = "{tmp_path}/run"\n{line}\n')
    agent = AgentProcess()
    try:
        result = subprocess.run(agent.argv("serve", "--config", str(config)),
                                capture_output=True, text=True, timeout=20)
    finally:
        agent.cleanup()
    assert result.returncode == 2
    assert f"config: {key}:" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "state").exists(), "a refused config must change nothing"


def test_notify_ready_then_stopping_and_watchdog(tmp_path: Path) -> None:
    notify_path = tmp_path / "notify.sock"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(notify_path))
    receiver.settimeout(0.2)
    messages: list[str] = []
    done = threading.Event()

    def drain() -> None:
        # A reader as systemd is: always reading (the queue holds only 10 datagrams).
        while not done.is_set():
            with contextlib.suppress(TimeoutError):
                messages.append(receiver.recv(4096).decode())

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    agent = AgentProcess(env={"NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "200000"})
    try:
        agent.start()
        wait_for(lambda: any("READY=1" in m for m in messages), 10, what="READY=1")
        wait_for(lambda: any("WATCHDOG=1" in m for m in messages), 5, what="WATCHDOG=1")
        agent.signal(signal.SIGTERM)
        assert agent.wait(5) == 0
        wait_for(lambda: any("STOPPING=1" in m for m in messages), 5, what="STOPPING=1")
    finally:
        done.set()
        reader.join(5)
        agent.cleanup()
        receiver.close()
    ready = next(i for i, m in enumerate(messages) if "READY=1" in m)
    stopping = next(i for i, m in enumerate(messages) if "STOPPING=1" in m)
    assert ready < stopping
    assert any(m.startswith("STATUS=starting") for m in messages[:ready])
    assert f"MAINPID={agent.proc.pid}" in messages[ready]  # type: ignore[union-attr]


def test_a_notify_receiver_that_never_reads_does_not_block_the_agent(tmp_path: Path) -> None:
    notify_path = tmp_path / "notify.sock"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(notify_path))  # bound, never read: its queue fills after 10 datagrams
    agent = AgentProcess(env={"NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "20000"})
    try:
        agent.start()
        for _ in range(5):
            assert agent.ctl_json("info")["state"] == "ready"
        agent.signal(signal.SIGTERM)
        assert agent.wait(5) == 0
        assert "notifications dropped" in agent.log()
    finally:
        agent.cleanup()
        receiver.close()


def test_sighup_reloads_log_level_and_keeps_serving() -> None:
    with running_agent() as agent:
        text = agent.config_path.read_text().replace('log_level = "debug"', 'log_level = "info"')
        agent.config_path.write_text(text + 'cgroup_root = "changed"\n'
                                     if "cgroup_root" not in text else
                                     text.replace(agent.settings["cgroup_root"], "changed"))
        agent.signal(signal.SIGHUP)
        wait_for(lambda: "configuration reloaded" in agent.log(), 10, what="reload logged")
        assert "need a restart and were not applied: cgroup_root" in agent.log()
        assert agent.ctl_json("info")["state"] == "ready"


def test_dynoctl_without_agent_is_one_clear_line(tmp_path: Path) -> None:
    path = tmp_path / "nobody.sock"
    agent = AgentProcess()
    try:
        result = agent.ctl("--socket", str(path), "info", check=False)
    finally:
        agent.cleanup()
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0
    assert result.stderr.startswith(f"dynoctl: cannot reach dynoagent at {path}")
    assert "Traceback" not in result.stderr
