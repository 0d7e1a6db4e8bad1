"""Small pieces the benches share: the bare-pipe peer, a throwaway slug directory, the
root/tools check of the launch benches, and closing a followed event stream."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from tests.support.tempdirs import readable_temp_dir


def seq_pipe_rate(lines: int) -> float:
    """Lines per second of `seq 1 lines` read line by line from a plain pipe by this process."""
    started = time.monotonic()
    with subprocess.Popen(["seq", "1", str(lines)], stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        count = sum(1 for _ in proc.stdout)
    assert count == lines
    return lines / (time.monotonic() - started)


def temp_slug() -> contextlib.AbstractContextManager[Path]:
    """An empty, world-readable slug directory under /tmp, removed after."""
    return readable_temp_dir("dtslug", "/tmp")


def launch_bench_skipped() -> bool:
    """True (having printed why) unless running as root with runc, busybox, tini-static and ip."""
    if os.geteuid() != 0:
        print("skipped: needs root (namespaces, cgroups, netns)")
        return True
    missing = [t for t in ("runc", "busybox", "tini-static", "ip") if shutil.which(t) is None]
    if missing:
        print(f"skipped: missing {', '.join(missing)}")
        return True
    return False


def close_stream(stream: Any, thread: threading.Thread) -> None:
    """Stop a thread reading a followed stream: shut its socket down, join, close."""
    sock = stream.conn.sock
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(2)
    thread.join(10)
    stream.close()


class InfoProbe:
    """GET /v1/info every 50 ms on a thread: how responsive the agent stays meanwhile."""

    def __init__(self, agent: Any) -> None:
        self.agent = agent
        self.latencies_ms: list[tuple[float, float]] = []  # (sent at, ms)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            t0 = time.monotonic()
            self.agent.api("GET", "/v1/info", timeout_s=60)
            self.latencies_ms.append((t0, (time.monotonic() - t0) * 1e3))

    def stop(self) -> list[tuple[float, float]]:
        """Stop probing: (sent at, ms) of every request."""
        self._stop.set()
        self._thread.join(70)
        return self.latencies_ms
