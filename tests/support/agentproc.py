"""Run the real `dynoagent serve` as a subprocess on a private config, socket and state dir."""

from __future__ import annotations

import contextlib
import functools
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.support.names import unique
from tests.support.wait import wait_for

BIN = Path(sys.executable).parent


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP/1.1 over the agent's Unix socket (the operator API)."""

    def __init__(self, path: Path, timeout_s: float) -> None:
        super().__init__("localhost", timeout=timeout_s)
        self._path = str(path)

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self._path)
        except BaseException:
            # An agent that is down (killed, restarting): the socket would only be closed by
            # the garbage collector, with a ResourceWarning.
            sock.close()
            raise
        self.sock = sock


class ApiStream:
    """A streamed answer read line by line; closing it closes the connection."""

    def __init__(self, conn: UnixHTTPConnection, response: http.client.HTTPResponse) -> None:
        self.conn = conn
        self.response = response

    def readline(self) -> bytes:
        return self.response.readline()

    def settimeout(self, timeout_s: float | None) -> None:
        assert self.conn.sock is not None
        self.conn.sock.settimeout(timeout_s)

    def close(self) -> None:
        self.response.close()
        self.conn.close()

    def __enter__(self) -> ApiStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ApiError(AssertionError):
    """The operator API answered with an unexpected status; carries the status and body."""

    def __init__(self, method: str, path: str, status: int, body: bytes) -> None:
        super().__init__(f"{method} {path} -> {status}: {body[:2000]!r}")
        self.status = status
        self.body = body


def toml_value(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return str(value)


def write_config(path: Path, settings: Mapping[str, Any]) -> None:
    lines = [f"{key} = {toml_value(value)}" for key, value in settings.items()
             if not isinstance(value, dict)]
    for key, table in settings.items():
        if isinstance(table, dict):
            for name, sub in table.items():
                lines.append(f"[{key}.{name}]")
                lines.extend(f"{k} = {toml_value(v)}" for k, v in sub.items())
    path.write_text("\n".join(lines) + "\n")


class AgentProcess:
    """One daemon: its directories live under a short temp dir (socket paths must stay short)."""

    def __init__(self, extra: Mapping[str, Any] | None = None,
                 env: Mapping[str, str] | None = None, netns: str | None = None,
                 parent_dir: str = "/tmp") -> None:
        # `parent_dir`: where the agent's directories go; a dyno's /tmp is its own, so a test
        # that a dyno cannot reach the agent's files puts them elsewhere.
        self.base = Path(tempfile.mkdtemp(prefix="dt", dir=parent_dir))
        self.name = unique("dt")
        self.socket = self.base / "run" / "dynoagent.sock"
        self.settings: dict[str, Any] = {
            "state_dir": str(self.base / "state"),
            "run_dir": str(self.base / "run"),
            "cgroup_root": f"dynoagent-{self.name}",
            "log_level": "debug",
            # Tests make their slugs with tempfile, under /tmp (and the agent's base dir).
            "slug_roots": ["/tmp", str(self.base)],
            **(extra or {}),
        }
        self.config_path = self.base / "agent.toml"
        write_config(self.config_path, self.settings)
        self.env = {**os.environ, **(env or {})}
        self.netns = netns
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.base / "agent.log"

    def argv(self, *args: str) -> list[str]:
        prefix = ["nsenter", f"--net=/run/netns/{self.netns}"] if self.netns else []
        return [*prefix, str(BIN / "dynoagent"), *args]

    def start(self, wait: bool = True) -> AgentProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child, closed below
        try:
            self.proc = subprocess.Popen(self.argv("serve", "--config", str(self.config_path)),
                                         stdout=log, stderr=subprocess.STDOUT, env=self.env)
        finally:
            log.close()
        if wait:
            wait_for(lambda: self.ready() or self._died(), 15, what="agent ready")
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited {self.proc.returncode}:\n{self.log()}")
        return self

    def _died(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def ready(self) -> bool:
        result = self.ctl("info", "--json", check=False)
        return result.returncode == 0

    def ctl(self, *args: str, check: bool = True, input: bytes | None = None,
            timeout_s: float = 30) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([str(BIN / "dynoctl"), "--socket", str(self.socket), *args],
                                capture_output=True, text=True, timeout=timeout_s,
                                input=None if input is None else input.decode())
        if check and result.returncode != 0:
            raise AssertionError(f"dynoctl {' '.join(args)} failed {result.returncode}: "
                                 f"{result.stderr}")
        return result

    def ctl_json(self, *args: str) -> Any:
        return json.loads(self.ctl(*args, "--json").stdout)

    def api(self, method: str, path: str, body: Any = None, expect: int | None = None,
            timeout_s: float = 60) -> Any:
        """One JSON request to the operator API; the decoded body (None when empty). Raises
        ApiError unless the status is `expect` (any 2xx when None)."""
        conn = UnixHTTPConnection(self.socket, timeout_s)
        try:
            payload = None if body is None else json.dumps(body).encode()
            headers = {} if payload is None else {"Content-Type": "application/json"}
            conn.request(method, path, body=payload, headers=headers)
            response = conn.getresponse()
            data = response.read()
        finally:
            conn.close()
        ok = response.status == expect if expect is not None else 200 <= response.status < 300
        if not ok:
            raise ApiError(method, path, response.status, data)
        if not data:
            return None
        if response.getheader("Content-Type", "").startswith("application/json"):
            return json.loads(data)
        return data.decode("utf-8", "replace")

    def stream(self, path: str, timeout_s: float = 60) -> ApiStream:
        """Open a follow stream (`/v1/logs?follow=1`, `/v1/events?follow=1`)."""
        conn = UnixHTTPConnection(self.socket, timeout_s)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
        except BaseException:
            conn.close()
            raise
        if response.status != 200:
            data = response.read()
            conn.close()
            raise ApiError("GET", path, response.status, data)
        return ApiStream(conn, response)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout_s: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout_s)

    def stop(self, timeout_s: float = 60) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout=10)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def cleanup(self) -> None:
        self.stop()
        self.force_leftovers_away()
        shutil.rmtree(self.base, ignore_errors=True)

    def force_leftovers_away(self) -> list[str]:
        """A safety net for a failed test: whatever this agent left (its holder, its dynos'
        processes, cgroups and namespaces) is ended and removed. Returns what it found, so a
        test that expects a clean exit can assert it is empty."""
        found: list[str] = []
        holder_socket = str(self.base / "run" / "holder.sock").encode()
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    if holder_socket in (entry / "cmdline").read_bytes():
                        found.append(f"holder pid {entry.name}")
                        os.kill(int(entry.name), signal.SIGKILL)
        namespaces: set[str] = set()
        for record in (self.base / "state" / "dynos").glob("*.json"):
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                namespaces.add(json.loads(record.read_text())["placement"]["netns"])
        # And those made before their dyno's placement was on disk (an agent ended mid-start):
        # the agent marks every namespace it makes in its state directory first.
        with contextlib.suppress(OSError):
            namespaces.update(os.listdir(self.base / "state" / "network" / "namespaces"))
        for netns in sorted(namespaces):
            if (Path("/run/netns") / netns).exists():
                found.append(f"netns {netns}")
                subprocess.run(["ip", "netns", "del", netns], check=False,
                               capture_output=True, timeout=30)
        root = self.settings["cgroup_root"]
        for hierarchy in Path("/sys/fs/cgroup").iterdir():
            top = hierarchy / root
            if not top.is_dir():
                continue
            found.append(f"cgroup {top}")
            below = sorted((p for p in top.rglob("*") if p.is_dir()),
                           key=lambda p: len(p.parts), reverse=True)
            groups = [*below, top]
            for group in groups:
                with contextlib.suppress(OSError, ValueError):
                    for pid in (group / "cgroup.procs").read_text().split():
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(int(pid), signal.SIGKILL)
            for group in groups:
                wait_for(functools.partial(rmdir_quietly, group), 5, what=f"rmdir {group}")
        return found


@contextmanager
def running_agent(**kwargs: Any) -> Iterator[AgentProcess]:
    agent = AgentProcess(**kwargs)
    try:
        agent.start()
        yield agent
    finally:
        agent.cleanup()


def rmdir_quietly(path: Path) -> bool:
    """rmdir that answers whether the directory is gone (for polling with wait_for)."""
    try:
        path.rmdir()
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True
