"""Helpers of the netns privileged tests: probe servers and clients run inside namespaces."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.support.testhost import Netns

PROBE = str(Path(__file__).with_name("probe.py"))
ALLOWED_TCP_PORT = 7070
TABLE = "dt_agent"
LINK_PREFIX = "dt"


class Server:
    """A probe server running in a namespace; stopped (by pid) when the test ends."""

    def __init__(self, ns: Netns, *args: str) -> None:
        self.proc = ns.popen([sys.executable, PROBE, *args])
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if line != "ready":
            self.stop()
            raise AssertionError(f"probe server did not start: {line!r} {self.stderr()}")

    def stderr(self) -> str:
        return self.proc.stderr.read() if self.proc.stderr and self.proc.poll() is not None \
            else ""

    def output(self, timeout_s: float) -> str:
        out, _ = self.proc.communicate(timeout=timeout_s)
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=10)


def probe(ns: Netns, *args: str, timeout_s: float = 20.0) -> subprocess.CompletedProcess[str]:
    return ns.run(sys.executable, PROBE, *args, check=False, timeout_s=timeout_s)


def ping(ns: Netns, address: str) -> bool:
    done = ns.run("busybox", "ping", "-c", "1", "-W", "1", address, check=False, timeout_s=10)
    return done.returncode == 0
