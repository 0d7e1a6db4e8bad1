"""A real etcd (Debian's /usr/bin/etcd) for a test: a one-member cluster on free ports, its
data in a temp dir, on loopback or inside a test host's network namespace (entered with
nsenter, see tests.support.testhost); stopped by pid, restartable on the same data."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from tests.support.testhost import Netns

ETCD = Path("/usr/bin/etcd")
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 5.0

# Run inside the namespace that etcd listens in: free ports there, and etcd's health there
# (a test host's loopback is not reachable from the root namespace).
_FREE_PORTS = """
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[2]))]
for s in socks:
    s.bind((sys.argv[1], 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
"""
_HEALTH = """
import json, sys, time, urllib.request
deadline = time.monotonic() + float(sys.argv[2])
while True:
    try:
        with urllib.request.urlopen(sys.argv[1] + "/health", timeout=1) as answer:
            if json.load(answer).get("health") == "true":
                sys.exit(0)
    except Exception:
        pass
    if time.monotonic() >= deadline:
        sys.exit(1)
    time.sleep(0.05)
"""


class EtcdProcess:
    """One etcd member. `url` is its client URL (what EtcdClient takes); `restart()` keeps
    the data dir and the ports, as an operator restarting the service would."""

    def __init__(self, *, host: str = "127.0.0.1", netns: Netns | None = None,
                 name: str = "default", extra_args: tuple[str, ...] = ()) -> None:
        if not ETCD.exists():
            raise FileNotFoundError(f"{ETCD} missing: `make setup` installs etcd-server")
        self.host = host
        self.netns = netns
        self.name = name
        self.extra_args = extra_args
        self.base = Path(tempfile.mkdtemp(prefix="dtetcd"))
        self.data_dir = self.base / "data"
        self.log_path = self.base / "etcd.log"
        self.client_port, self.peer_port = self._free_ports(2)
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer_port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def argv(self) -> list[str]:
        return [str(ETCD), "--name", self.name, "--data-dir", str(self.data_dir),
                "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
                "--listen-peer-urls", self.peer_url,
                "--initial-advertise-peer-urls", self.peer_url,
                "--initial-cluster", f"{self.name}={self.peer_url}",
                "--initial-cluster-state", "new",
                "--logger", "zap", "--log-outputs", "stderr",
                # One member: a short election makes the first start and every restart
                # serve within a fraction of a second (and lease TTLs of 1 s possible).
                "--heartbeat-interval", "25", "--election-timeout", "250",
                *self.extra_args]

    def start(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Start etcd (on the existing data dir if any) and wait until it is healthy."""
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError(f"etcd already running (pid {self.process.pid})")
        argv = self.argv()
        if self.netns is not None:
            argv = self.netns.command(*argv)
        with self.log_path.open("ab") as log:
            log.write(f"--- start {self.starts + 1}: {' '.join(argv)}\n".encode())
            log.flush()
            # nsenter execs etcd (no fork for a network namespace): the pid is etcd's.
            self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                            stdout=log, stderr=log, start_new_session=True)
        self.starts += 1
        if not self._wait_healthy(timeout_s):
            self.stop()
            raise RuntimeError(f"etcd at {self.url} not healthy within {timeout_s}s; "
                               f"log:\n{self.log_tail()}")

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM, then SIGKILL after `timeout_s`; returns the exit status (None if it was
        not running)."""
        process, self.process = self.process, None
        if process is None:
            return None
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGTERM)
            try:
                return process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGKILL)
        return process.wait(timeout=timeout_s)

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        process, self.process = self.process, None
        if process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=STOP_TIMEOUT_S)

    def restart(self, timeout_s: float = START_TIMEOUT_S) -> None:
        self.stop()
        self.start(timeout_s)

    def close(self) -> None:
        """Stop etcd and remove its data dir."""
        try:
            self.stop()
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def is_healthy(self, timeout_s: float = 1.0) -> bool:
        return self._probe(timeout_s=timeout_s, deadline_s=0.0)

    def _wait_healthy(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                return False
            if self._probe(timeout_s=1.0, deadline_s=min(1.0, deadline - time.monotonic())):
                return True
        return False

    def _probe(self, timeout_s: float, deadline_s: float) -> bool:
        if self.netns is None:
            end = time.monotonic() + deadline_s
            while True:
                try:
                    with urllib.request.urlopen(self.url + "/health",
                                                timeout=timeout_s) as answer:
                        if json.load(answer).get("health") == "true":
                            return True
                except (OSError, ValueError):
                    pass
                if time.monotonic() >= end:
                    return False
                time.sleep(0.02)
        done = self.netns.run(sys.executable, "-c", _HEALTH, self.url, str(deadline_s),
                              check=False, timeout_s=deadline_s + timeout_s + 10)
        return done.returncode == 0

    def _free_ports(self, count: int) -> tuple[int, ...]:
        if self.netns is None:
            socks = [socket.socket() for _ in range(count)]
            try:
                for sock in socks:
                    sock.bind((self.host, 0))
                return tuple(sock.getsockname()[1] for sock in socks)
            finally:
                for sock in socks:
                    sock.close()
        done = self.netns.run(sys.executable, "-c", _FREE_PORTS, self.host, str(count))
        return tuple(int(port) for port in done.stdout.split())


@contextlib.contextmanager
def running_etcd(*, host: str = "127.0.0.1", netns: Netns | None = None,
                 extra_args: tuple[str, ...] = ()) -> Iterator[EtcdProcess]:
    """A started etcd, stopped and its data removed on exit (even when the test failed)."""
    etcd = EtcdProcess(host=host, netns=netns, extra_args=extra_args)
    try:
        etcd.start()
        yield etcd
    finally:
        etcd.close()
