"""Log drains with the real daemon in a test host: Debian's rsyslog (TCP and TLS) receives a
dyno's 100,000 lines in order with Heroku's RFC 5424 fields; an HTTPS receiver checks logplex
framing frame by frame, including a retried frame; faults (receiver down at start, killed
mid-stream, reading 10 lines a second, the agent SIGKILLed) lose nothing silently; /metrics
passes promtool."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.drains.rfc5424 import split_frames
from tests.e2e.test_supervision import agent_in_host, spec, wait_state
from tests.support.agentproc import AgentProcess
from tests.support.drainmetrics import drain_metrics
from tests.support.names import unique
from tests.support.pki import make_pki
from tests.support.poller import Poller
from tests.support.testhost import TestHost
from tests.support.wait import wait_for

TOP = Path(__file__).resolve().parents[2]
LINES = 100_000


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pki")
    directory.chmod(0o755)
    return make_pki(directory)


@pytest.fixture(scope="module")
def agent(host: TestHost, pki: Path) -> Iterator[AgentProcess]:
    with agent_in_host(host, log_drains_ca_file=str(pki / "ca.pem"),
                       log_level="info") as running:
        yield running


@pytest.fixture
def app(agent: AgentProcess) -> Iterator[str]:
    name = unique("dr", 8)
    try:
        yield name
    finally:
        for status in agent.api("GET", f"/v1/dynos?app={name}"):
            agent.api("DELETE", f"/v1/dynos/{status['id']}", expect=204)


class Process:
    """A receiver in the test host, ended by its pid."""

    def __init__(self, host: TestHost, argv: list[str], ready: str | None = "ready") -> None:
        self.proc = host.popen(argv, cwd=TOP, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if ready is not None:
            assert self.proc.stdout is not None
            line = self.proc.stdout.readline()
            assert ready in line, (line, self.stop())

    def send(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            _, err = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate(timeout=10)
        return err or ""


def receiver(host: TestHost, kind: str, port: int, out: Path, *extra: str) -> Process:
    return Process(host, [sys.executable, "-m", "tests.support.drainreceiver", kind,
                          str(port), str(out), *extra])


RSYSLOG_TLS = """global(DefaultNetstreamDriver="gtls" DefaultNetstreamDriverCAFile="{pki}/ca.pem"
       DefaultNetstreamDriverCertFile="{pki}/server.pem"
       DefaultNetstreamDriverKeyFile="{pki}/server.key")
module(load="imtcp" StreamDriver.Name="gtls" StreamDriver.Mode="1" StreamDriver.AuthMode="anon")
"""
RSYSLOG = """global(workDirectory="{work}" maxMessageSize="64k")
{modules}
main_queue(queue.size="200000")
input(type="imtcp" port="{port}" ruleset="drain")
ruleset(name="drain") {{
  action(type="omfile" file="{out}" template="RSYSLOG_SyslogProtocol23Format")
}}
"""


def rsyslog(host: TestHost, work: Path, port: int, tls: Path | None) -> tuple[Process, Path]:
    if shutil.which("rsyslogd") is None:
        pytest.skip("rsyslogd is missing (Debian's rsyslog package; `make setup` installs it)")
    out = work / "received.log"
    modules = RSYSLOG_TLS.format(pki=tls) if tls is not None else 'module(load="imtcp")'
    conf = work / "rsyslog.conf"
    conf.write_text(RSYSLOG.format(work=work, modules=modules, port=port, out=out))
    proc = Process(host, ["rsyslogd", "-n", "-f", str(conf), "-i", str(work / "rsyslog.pid")],
                   ready=None)
    # Listening once `ss` shows the port (rsyslog prints nothing when it is ready).
    wait_for(lambda: f":{port} " in host.run("ss", "-ltnH").stdout, 10,
             what="rsyslog listening")
    return proc, out


def wait_drained(agent: AgentProcess, app: str, timeout_s: float = 60) -> dict[str, float]:
    def empty() -> dict[str, float] | None:
        found = drain_metrics(agent, app)
        return found if found and found["dynoagent_drain_lines_queued"] == 0 else None
    result = wait_for(empty, timeout_s, interval_s=0.2, what=f"{app}'s drain empty")
    assert result is not None
    return result


def l10_counts(texts: list[str]) -> list[int]:
    return [int(t.split("): ", 1)[1].split()[0]) for t in texts
            if t.startswith("Error L10 (output buffer overflow): ")]


# -- rsyslog -----------------------------------------------------------------------------------
@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
def test_rsyslog_gets_every_line_in_order_with_herokus_fields(
        host: TestHost, agent: AgentProcess, app: str, slug: Path, tmp_path: Path, pki: Path,
        tls: bool) -> None:
    tmp_path.chmod(0o755)
    port = 6514 if tls else 5514
    daemon, out = rsyslog(host, tmp_path, port, pki if tls else None)
    try:
        scheme = "syslog+tls" if tls else "syslog"
        started = time.monotonic()
        agent.api("POST", "/v1/dynos", spec(
            app, "worker.1", f"seq {LINES}; exec sleep 1000", slug,
            log_drains=[f"{scheme}://127.0.0.1:{port}"]))

        def app_lines() -> list[list[str]] | None:
            try:
                # Whole lines only: rsyslog may be midway through writing the last one.
                raw = out.read_text(errors="replace").split("\n")[:-1]
            except FileNotFoundError:
                return None
            fields = [line.split(" ", 7) for line in raw]
            return fields if sum(1 for f in fields if f[3] == "app") >= LINES else None

        fields = wait_for(app_lines, 60, interval_s=0.2, what=f"{LINES} lines in rsyslog")
        elapsed = time.monotonic() - started
        print(f"\n{scheme}: {LINES} lines at rsyslog in {elapsed:.1f}s "
              f"({LINES / elapsed:,.0f} lines/s, dyno start included)")
        assert fields is not None
        app_fields = [f for f in fields if f[3] == "app"]
        # <PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID SD MSG
        assert {(f[0], f[2], f[4], f[5]) for f in app_fields} == {("<190>1", "host", "worker.1",
                                                                 "-")}
        assert [f[7] for f in app_fields] == [str(n) for n in range(1, LINES + 1)]
        platform = [f[7] for f in fields if f[3] == "heroku" and f[4] == "worker.1"]
        assert platform[0].startswith("Starting process with command `seq")
        assert "State changed from starting to up" in platform
        assert {f[0] for f in fields if f[3] == "heroku"} == {"<158>1"}
        found = wait_drained(agent, app)
        assert found["dynoagent_drain_lines_dropped_total"] == 0
        assert found["dynoagent_drain_lines_delivered_total"] == \
            found["dynoagent_drain_lines_emitted_total"] >= LINES + 2
    finally:
        daemon.stop()


# -- HTTPS ---------------------------------------------------------------------------------------
def posts(out: Path) -> list[dict[str, Any]]:
    """The receiver's records so far; a line it is still writing (no newline yet) is left for
    the next read."""
    try:
        text = out.read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.split("\n")[:-1]]


def test_https_drain_posts_logplex_frames_and_a_retry_keeps_its_frame_id(
        host: TestHost, agent: AgentProcess, app: str, slug: Path, tmp_path: Path,
        pki: Path) -> None:
    out = tmp_path / "posts.jsonl"
    server = receiver(host, "http", 7443, out, "--cert", str(pki / "server.pem"),
                      "--key", str(pki / "server.key"), "--fail-first", "1")
    try:
        agent.api("POST", "/v1/dynos", spec(app, "web.1", "seq 3000; exec sleep 1000", slug,
                                             log_drains=["https://127.0.0.1:7443/logs"]))

        def all_lines() -> list[dict[str, Any]] | None:
            got = posts(out)
            texts = [f for p in got if p["status"] == 200
                     for f in split_frames(base64.b64decode(p["body"]))[0]]
            return got if sum(1 for t in texts if b" host app web.1 - " in t) >= 3000 else None

        got = wait_for(all_lines, 30, interval_s=0.2, what="3000 lines posted")
        assert got is not None
        ids = set()
        for post in got:
            headers = post["headers"]
            body = base64.b64decode(post["body"])
            frames, used = split_frames(body)
            assert used == len(body)  # nothing but whole frames
            assert headers["Content-Type"] == "application/logplex-1"
            assert int(headers["Logplex-Msg-Count"]) == len(frames) <= 500
            assert headers["Logplex-Drain-Token"].startswith("d.")
            for frame in frames:
                length, _, message = frame.partition(b" ")
                assert int(length) == len(message)
                assert message.startswith((b"<190>1 ", b"<158>1 "))
            ids.add(headers["Logplex-Frame-Id"])
        # The frame answered 503 came again, the same frame under the same id.
        assert got[0]["status"] == 503 and got[1]["status"] == 200
        assert got[0]["headers"]["Logplex-Frame-Id"] == got[1]["headers"]["Logplex-Frame-Id"]
        assert got[0]["body"] == got[1]["body"]
        assert len(ids) == len(got) - 1
        texts = [f.split(b" - ", 1)[1].decode() for p in got[1:]
                 for f in split_frames(base64.b64decode(p["body"]))[0]
                 if b" host app web.1 - " in f]
        assert texts == [str(n) for n in range(1, 3001)]
        assert drain_metrics(agent, app)["dynoagent_drain_retries_total"] >= 1
    finally:
        server.stop()


# -- faults --------------------------------------------------------------------------------------
def received_texts(out: Path) -> list[str]:
    """The messages a receiver took (HTTP: accepted posts; a frame posted twice counted once
    by its frame id)."""
    seen: set[str] = set()
    texts = []
    for post in posts(out):
        frame_id = post["headers"]["Logplex-Frame-Id"]
        if post["status"] != 200 or frame_id in seen:
            continue
        seen.add(frame_id)
        texts += [f.split(b" - ", 1)[1].decode()
                  for f in split_frames(base64.b64decode(post["body"]))[0]]
    return texts


def test_receiver_down_at_start_then_killed_mid_stream_loses_nothing_silently(
        host: TestHost, agent: AgentProcess, app: str, slug: Path, tmp_path: Path) -> None:
    out = tmp_path / "posts.jsonl"
    agent.api("POST", "/v1/dynos", spec(
        app, "worker.1", "seq 20000; for i in $(seq 40); do echo tick $i; sleep 0.05; done; "
        "exec sleep 1000", slug, log_drains=["http://127.0.0.1:7080/"]))
    wait_for(lambda: drain_metrics(agent, app).get("dynoagent_drain_retries_total", 0) >= 2, 30,
             interval_s=0.2, what="retries while the receiver is down")
    server = receiver(host, "http", 7080, out)
    try:
        wait_for(lambda: len(received_texts(out)) > 1000, 30, interval_s=0.05,
                 what="lines after the receiver came")
        server.stop(signal.SIGKILL)
        server = receiver(host, "http", 7080, out)
        found = wait_for(lambda: (m := drain_metrics(agent, app)) and
                         m["dynoagent_drain_lines_queued"] == 0 and
                         any(t == "tick 40" for t in received_texts(out)) and m, 60,
                         interval_s=0.2, what="every line sent")
        assert found
        texts = received_texts(out)
        app_texts = [t for t in texts if t.isdigit() or t.startswith("tick ")]
        expected = [str(n) for n in range(1, 20001)] + [f"tick {n}" for n in range(1, 41)]
        dropped = sum(l10_counts(texts))
        assert dropped == found["dynoagent_drain_lines_dropped_total"]
        # In order, each once, and what is missing is what the L10 lines counted.
        have = set(app_texts)
        assert app_texts == [t for t in expected if t in have]
        assert len(expected) - len(app_texts) <= dropped
        assert found["dynoagent_drain_lines_delivered_total"] + dropped == \
            found["dynoagent_drain_lines_emitted_total"]
        print(f"\nkilled mid-stream: {len(texts)} delivered, {dropped} dropped, "
              f"{found['dynoagent_drain_retries_total']:.0f} retries")
    finally:
        server.stop()


class ApiLatency(Poller):
    """Times `GET /v1/dynos` on a thread: the slowest answer."""

    join_s = 15.0

    def __init__(self, agent: AgentProcess) -> None:
        self.agent = agent
        self.samples: list[float] = []
        self.start()

    def poll(self) -> None:
        started = time.monotonic()
        self.agent.api("GET", "/v1/dynos", timeout_s=10)
        self.samples.append(time.monotonic() - started)


def test_a_slow_receiver_holds_up_nothing_and_its_drops_are_counted(
        host: TestHost, agent: AgentProcess, app: str, slug: Path, tmp_path: Path) -> None:
    out = tmp_path / "slow.log"
    server = receiver(host, "syslog", 5600, out, "--slow")
    other = unique("do", 8)
    latency = ApiLatency(agent)
    try:
        agent.api("POST", "/v1/dynos", spec(app, "worker.1", "seq 150000; exec sleep 1000",
                                             slug, log_drains=["syslog://127.0.0.1:5600"]))
        wait_for(lambda: drain_metrics(agent, app).get("dynoagent_drain_lines_dropped_total",
                                                        0) > 0,
                 30, interval_s=0.2, what="drops while the receiver is slow")
        # Another app's dyno, started while the drain is stuck, runs and logs as ever.
        started = time.monotonic()
        agent.api("POST", "/v1/dynos", spec(other, "worker.1", "echo hello; exec sleep 1000",
                                             slug))
        wait_state(agent, agent.api("GET", f"/v1/dynos?app={other}")[0]["id"], "up")
        wait_for(lambda: "hello" in agent.api("GET", f"/v1/logs?app={other}&tail=10"), 10,
                 what="the other dyno's line")
        other_s = time.monotonic() - started
        stuck = drain_metrics(agent, app)
        assert stuck["dynoagent_drain_lines_queued"] > 0
        server.send(signal.SIGUSR1)  # the receiver reads at full speed again
        found = wait_drained(agent, app)
        latency.close()
        ordered = sorted(latency.samples)
        print(f"\nslow receiver: API GET /v1/dynos slowest {ordered[-1] * 1000:.0f} ms, "
              f"median {ordered[len(ordered) // 2] * 1000:.1f} ms over {len(ordered)} calls; "
              f"another app's dyno up and logging in {other_s:.2f}s; "
              f"dropped {found['dynoagent_drain_lines_dropped_total']:.0f}")
        assert ordered[-1] < 2.0
        frames, _ = split_frames(out.read_bytes())
        texts = [f.split(b" - ", 1)[1].decode() for f in frames]
        numbers = [int(t) for t in texts if t.isdigit()]
        assert numbers == sorted(numbers)
        dropped = found["dynoagent_drain_lines_dropped_total"]
        assert dropped > 0 and sum(l10_counts(texts)) == dropped
        # The receiver has what was counted delivered (and the dyno's runtime-metrics lines
        # go on coming: perhaps some more since).
        after = drain_metrics(agent, app)["dynoagent_drain_lines_delivered_total"]
        assert found["dynoagent_drain_lines_delivered_total"] <= \
            len(texts) - len(l10_counts(texts)) <= after
        assert found["dynoagent_drain_lines_delivered_total"] + dropped == \
            found["dynoagent_drain_lines_emitted_total"]
    finally:
        latency.close()
        for status in agent.api("GET", f"/v1/dynos?app={other}"):
            agent.api("DELETE", f"/v1/dynos/{status['id']}", expect=204)
        server.stop()


def test_lines_queued_for_a_drain_outlive_an_agent_sigkill(
        host: TestHost, agent: AgentProcess, app: str, slug: Path, tmp_path: Path) -> None:
    out = tmp_path / "posts.jsonl"
    agent.api("POST", "/v1/dynos", spec(app, "worker.1", "seq 5000; exec sleep 1000", slug,
                                         log_drains=["http://127.0.0.1:7081/"]))
    wait_for(lambda: drain_metrics(agent, app).get("dynoagent_drain_lines_queued", 0) >= 5000, 30,
             interval_s=0.2, what="lines queued for the absent receiver")
    assert agent.proc is not None
    agent.proc.kill()
    agent.proc.wait(10)
    agent.start()
    server = receiver(host, "http", 7081, out)
    try:
        wait_for(lambda: "5000" in received_texts(out), 30, interval_s=0.2,
                 what="the lines from before the SIGKILL")
        numbers = [int(t) for t in received_texts(out) if t.isdigit()]
        assert numbers == list(range(1, 5001))
    finally:
        server.stop()


def test_metrics_pass_promtool(agent: AgentProcess, app: str, slug: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is missing (Debian's prometheus package; `make setup` has it)")
    agent.api("POST", "/v1/dynos", spec(app, "worker.1", "exec sleep 1000", slug,
                                         log_drains=["syslog://127.0.0.1:9"]))
    text = agent.api("GET", "/metrics")
    assert f'app="{app}"' in text and "dynoagent_drain_lines_dropped_total" in text
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                            text=True, timeout=30, env={**os.environ})
    assert result.returncode == 0, result.stdout + result.stderr
