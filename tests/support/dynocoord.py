"""`dynocoord serve` replicas started by a test (in the root namespace or inside a test host),
and plain requests to their platform API."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.support.testhost import Netns

ROOT = Path(__file__).resolve().parents[2]
# Straight to the coordinator, whatever proxy the environment names.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class Replica:
    """One `dynocoord serve` process, logging to `<log_dir>/<name>.log`; killed by pid."""

    def __init__(self, *, etcd_url: str, prefix: str, token_file: Path, name: str,
                 log_dir: Path, address: str, port: int, netns: Netns | None = None,
                 host_ttl_s: int = 3, takeover_grace_s: float = 30,
                 extra_args: tuple[str, ...] = ()) -> None:
        self.name = name
        self.netns = netns
        self.port = port
        tls = "--tls-cert" in extra_args
        self.url = f"{'https' if tls else 'http'}://{address}:{port}"
        self.agent_url = f"{'wss' if tls else 'ws'}://{address}:{port}/v1/agents/connect"
        self.argv = [sys.executable, "-m", "dynocoord.server", "--etcd", etcd_url,
                     "--listen", f"{address}:{port}", "--token-file", str(token_file),
                     "--prefix", prefix, "--id", name, "--host-ttl", str(host_ttl_s),
                     "--takeover-grace", str(takeover_grace_s), "--log-level", "info",
                     *extra_args]
        self.log = log_dir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Replica:
        argv = self.netns.command(*self.argv) if self.netns is not None else self.argv
        with self.log.open("ab") as out:
            # nsenter execs the server (no fork for a network namespace): the pid is its own.
            self.process = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=out)
        return self

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-6000:] if self.log.exists() else ""


def request(url: str, method: str, body: Any, token: str) -> tuple[int, Any]:
    """One platform API request: (status, decoded body); status 0 when nothing answered."""
    data = None if body is None else json.dumps(body).encode()
    sent = urllib.request.Request(url, data=data, method=method,
                                  headers={"Authorization": f"Bearer {token}",
                                           "Content-Type": "application/json"})
    try:
        with OPENER.open(sent, timeout=10) as response:
            raw = response.read()
            if not response.headers.get("Content-Type", "").startswith("application/json"):
                return response.status, raw.decode(errors="replace")
            return response.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        exc.close()
        try:
            return exc.code, json.loads(raw)
        except ValueError:
            return exc.code, raw.decode(errors="replace")
    except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
        return 0, str(exc)
