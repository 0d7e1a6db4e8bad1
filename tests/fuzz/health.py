"""The invariants checked after every fuzz batch: the agent process is alive, answers
`GET /v1/info` within a second, keeps its RSS bounded, writes no traceback, no error-level
line and no oversized line to its log, and leaves no dyno in `starting`."""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.agentproc import AgentProcess, UnixHTTPConnection

INFO_DEADLINE_S = 1.0
RSS_LIMIT_BYTES = int(os.environ.get("FUZZ_RSS_MB", "300")) * 1024 * 1024
# A log line quotes at most a bounded excerpt of what it rejects (issue 19 item 3); 64 KiB
# is far above any honest line and far below an echoed frame.
LOG_LINE_MAX_BYTES = 64 * 1024
LOG_TOTAL_MAX_BYTES = 64 * 1024 * 1024
STARTING_MAX_S = 45.0
ERROR_LEVELS = (b"level=error", b"level=critical")


class Violation(AssertionError):
    """An invariant broke; the message says which, with the evidence and the seed."""


@dataclass
class AgentWatch:
    agent: AgentProcess
    seed: int
    log_offset: int = 0
    info_latencies_s: list[float] = field(default_factory=list)
    max_rss_bytes: int = 0
    # dyno id -> when the watch first saw it in `starting` (reset when it leaves it)
    starting_since: dict[str, float] = field(default_factory=dict)
    checks: int = 0
    findings: list[str] = field(default_factory=list)
    kinds: set[str] = field(default_factory=set)

    def fail(self, what: str) -> Violation:
        return Violation(f"{what}\n(replay with FUZZ_SEED={self.seed})")

    @property
    def pid(self) -> int:
        assert self.agent.proc is not None
        return self.agent.proc.pid

    def info(self, timeout_s: float = INFO_DEADLINE_S) -> tuple[float, dict[str, Any]]:
        """GET /v1/info: (seconds taken, body)."""
        started = time.monotonic()
        conn = UnixHTTPConnection(self.agent.socket, timeout_s)
        try:
            conn.request("GET", "/v1/info")
            response = conn.getresponse()
            body = response.read()
        finally:
            conn.close()
        taken = time.monotonic() - started
        if response.status != 200:
            raise self.fail(f"GET /v1/info answered {response.status}: {body[:500]!r}")
        info: dict[str, Any] = json.loads(body)
        return taken, info

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise self.fail("the agent's /proc status has no VmRSS")

    def check(self, after: str) -> None:
        """Every invariant, now; `after` names the batch just run (for the message). An
        agent that died or stopped answering fails at once; anything else is recorded in
        `findings` and the fuzzing goes on, so that one run reports every kind of fault."""
        self.checks += 1
        assert self.agent.proc is not None
        if self.agent.proc.poll() is not None:
            raise self.fail(f"after {after}: the agent exited {self.agent.proc.returncode}\n"
                            f"{self.agent.log()[-5000:]}")
        try:
            taken, _info = self.info()
        except (TimeoutError, OSError) as exc:
            raise self.fail(f"after {after}: GET /v1/info got no answer within "
                            f"{INFO_DEADLINE_S}s ({exc!r})") from None
        self.info_latencies_s.append(taken)
        rss = self.rss_bytes()
        self.max_rss_bytes = max(self.max_rss_bytes, rss)
        if rss > RSS_LIMIT_BYTES:
            self.found(f"after {after}: the agent's RSS is {rss / 2**20:.0f} MiB, over "
                       f"{RSS_LIMIT_BYTES / 2**20:.0f} MiB")
        self.check_log(after)
        self.check_starting(after)

    def found(self, *problems: str) -> None:
        """Record problems, one of each kind (digits and quoted values do not make a new
        kind): a fault hit a thousand times is reported once."""
        for problem in problems:
            kind = re.sub(r"'[^']*'|\d+", "_", problem)[:120]
            if kind not in self.kinds:
                self.kinds.add(kind)
                self.findings.append(problem)

    def verdict(self) -> None:
        if self.findings:
            raise self.fail(f"{len(self.findings)} kinds of fault:\n\n" + "\n\n".join(
                f[:4000] for f in self.findings))

    def check_log(self, after: str) -> None:
        size = self.agent.log_path.stat().st_size
        if size > LOG_TOTAL_MAX_BYTES:
            raise self.fail(f"after {after}: the agent's log reached {size} bytes")
        with open(self.agent.log_path, "rb") as log:
            log.seek(self.log_offset)
            new = log.read()
        # Only whole lines; a partial last line is read again next time.
        end = new.rfind(b"\n") + 1
        self.log_offset += end
        for line in new[:end].splitlines():
            if len(line) > LOG_LINE_MAX_BYTES:
                self.found(f"after {after}: a log line of {len(line)} bytes: {line[:300]!r}…")
            elif b"Traceback" in line or any(level in line for level in ERROR_LEVELS):
                shown = line[:3000].decode(errors="replace")
                # The kind is the line without its time stamp.
                self.found(f"the agent logged: {shown.partition(' ')[2]}\n"
                           f"(after {after[:300]})")

    def check_starting(self, after: str) -> None:
        now = time.monotonic()
        statuses = self.agent.api("GET", "/v1/dynos", timeout_s=5)
        starting = {s["id"] for s in statuses if s["state"] == "starting"}
        for gone in set(self.starting_since) - starting:
            del self.starting_since[gone]
        for dyno_id in starting:
            since = self.starting_since.setdefault(dyno_id, now)
            if now - since > STARTING_MAX_S:
                self.found(f"after {after}: dyno {dyno_id!r} (id of {len(dyno_id)} "
                                f"characters) has been starting for over {STARTING_MAX_S:g}s")

    def summary(self) -> str:
        latencies = sorted(self.info_latencies_s) or [0.0]
        p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
        return (f"{self.checks} checks, GET /v1/info max {latencies[-1] * 1000:.0f} ms "
                f"p99 {p99 * 1000:.0f} ms, agent RSS max {self.max_rss_bytes / 2**20:.0f} MiB, "
                f"log {self.agent.log_path.stat().st_size} bytes")
