"""Issue 6 end to end: the real daemon in a test host supervises real dynos by Heroku's rules
(crash cool-off, R10, R12, R14/R15, one-off), keeps every log line a follower can be given,
survives its own SIGKILL without touching its dynos, and leaves nothing behind when idle."""

from __future__ import annotations

import contextlib
import glob
import itertools
import json
import os
import re
import secrets
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.config import Config
from agent.daemon.service import instance_names
from tests.support.agentproc import AgentProcess, ApiError, ApiStream
from tests.support.names import unique
from tests.support.testhost import TestHost, new_test_host
from tests.support.wait import wait_for

# Shortened Heroku numbers so the whole module runs in well under a minute of waiting.
COOL_OFF_S = 4
STOP_TIMEOUT_S = 2
BOOT_TIMEOUT_S = 2
SAMPLE_INTERVAL_S = 0.5
FAST_CONFIG: dict[str, Any] = {
    "restart_schedule_s": [COOL_OFF_S, 2 * COOL_OFF_S],
    "stop_timeout_s": STOP_TIMEOUT_S,
    "boot_timeout_s": BOOT_TIMEOUT_S,
    "sample_interval_s": SAMPLE_INTERVAL_S,
    # 64 MiB quota, killed at 2x: small enough to cross both lines quickly.
    "sizes": {"tiny": {"memory_mb": 64, "pids_max": 256, "kill_at": 2}},
}
METRICS_LINE = re.compile(r"^source=\S+ dyno=")

# A web server that binds $PORT with a plain socket (http.server's reverse lookup on bind
# takes 5 s in a dyno). CRASH_AFTER_ACCEPT=1: exit 3 shortly after the first connection
# (the agent's boot probe), so the dyno is seen `up` before it crashes.
SERVER_PY = """\
import os, socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(os.environ["PORT"])))
s.listen(64)
print("listening on", os.environ["PORT"], flush=True)
while True:
    c, _ = s.accept()
    c.close()
    if os.environ.get("CRASH_AFTER_ACCEPT"):
        time.sleep(0.3)
        print("crashing", flush=True)
        sys.exit(3)
"""


# -- plumbing --------------------------------------------------------------------------------

class LineCollector:
    """Reads a follow stream on a thread into `lines` (decoded), calling `on_line` first."""

    def __init__(self, stream: ApiStream, on_line: Callable[[str], None] | None = None) -> None:
        self.stream = stream
        self.lines: list[str] = []
        self.error: BaseException | None = None
        self._on_line = on_line
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while True:
                raw = self.stream.readline()
                if not raw:
                    return
                text = raw.decode("utf-8", "replace").rstrip("\n")
                if self._on_line is not None:
                    self._on_line(text)
                self.lines.append(text)
        except (OSError, ValueError, AttributeError) as exc:
            # Closing the stream from the test thread ends the read with one of these.
            self.error = exc
        except BaseException as exc:
            self.error = exc

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in list(self.lines) if line.startswith("{")]

    def close(self) -> None:
        sock = self.stream.conn.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(10)
        self.stream.close()


def make_slug(files: Mapping[str, str] | None = None) -> Path:
    """A slug directory with server.py and `files` (name -> text), readable by any dyno."""
    slug = Path(tempfile.mkdtemp(prefix="dtslug", dir="/tmp"))
    slug.chmod(0o755)
    for name, text in {"server.py": SERVER_PY, **(files or {})}.items():
        (slug / name).write_text(text)
        (slug / name).chmod(0o644)
    return slug


def spec(app: str, name: str, command: str, slug: Path, **extra: Any) -> dict[str, Any]:
    return {"app": app, "name": name, "command": command,
            "release": {"version": 1, "slug": {"path": str(slug)}}, **extra}


def dyno(agent: AgentProcess, ref: str) -> dict[str, Any]:
    result: dict[str, Any] = agent.api("GET", f"/v1/dynos/{ref}")
    return result


def wait_state(agent: AgentProcess, ref: str, state: str, timeout_s: float = 20,
               where: Callable[[dict[str, Any]], bool] | None = None) -> dict[str, Any]:
    def check() -> dict[str, Any]:
        status = dyno(agent, ref)
        if status["state"] == state and (where is None or where(status)):
            return status
        return {}
    return wait_for(check, timeout_s, interval_s=0.05, what=f"{ref} {state}")


def log_lines(agent: AgentProcess, app: str, dyno_name: str | None = None,
              tail: int = 1500) -> list[dict[str, str]]:
    query = f"/v1/logs?app={app}&tail={tail}&format=json"
    if dyno_name is not None:
        query += f"&dyno={dyno_name}"
    text = agent.api("GET", query) or ""
    return [json.loads(line) for line in text.splitlines() if line]


def platform_lines(agent: AgentProcess, app: str, dyno_name: str) -> list[dict[str, str]]:
    """The agent's lines about one dyno, without the periodic runtime-metrics samples."""
    return [line for line in log_lines(agent, app, dyno_name)
            if line["source"] == "agent" and not METRICS_LINE.match(line["text"])
            and not line["text"].startswith("Process running mem=")]


def texts(lines: list[dict[str, str]]) -> list[str]:
    return [line["text"] for line in lines]


def at(line: dict[str, str]) -> float:
    return datetime.fromisoformat(line["at"]).timestamp()


def app_texts(agent: AgentProcess, app: str, dyno_name: str) -> list[str]:
    return [line["text"] for line in log_lines(agent, app, dyno_name) if line["source"] == "app"]


def cgroup_procs_files(agent: AgentProcess, rel: str) -> list[str]:
    """Every hierarchy's cgroup.procs of one dyno cgroup (v1 controllers and the v2 tree)."""
    root = agent.settings["cgroup_root"]
    return (glob.glob(f"/sys/fs/cgroup/*/{root}/{rel}/cgroup.procs")
            + glob.glob(f"/sys/fs/cgroup/{root}/{rel}/cgroup.procs"))


def delete_app(agent: AgentProcess, app: str) -> None:
    with contextlib.suppress(ApiError, OSError):
        for status in agent.api("GET", f"/v1/dynos?app={app}"):
            with contextlib.suppress(ApiError):
                agent.api("DELETE", f"/v1/dynos/{status['id']}", expect=204)


@contextlib.contextmanager
def agent_in_host(host: TestHost, *, parent_dir: str = "/tmp",
                  prepare: Callable[[AgentProcess], None] | None = None,
                  **extra: Any) -> Iterator[AgentProcess]:
    """An agent on FAST_CONFIG + `extra` in `host`; `prepare` may change it before it starts.
    Every dyno it has is deleted and everything it left is removed on the way out."""
    agent = AgentProcess(extra={**FAST_CONFIG, **extra}, netns=host.name, parent_dir=parent_dir)
    try:
        if prepare is not None:
            prepare(agent)
        agent.start()
        yield agent
    except BaseException:
        print(agent.log()[-20000:])
        raise
    finally:
        with contextlib.suppress(Exception):
            for status in agent.api("GET", "/v1/dynos", timeout_s=10):
                with contextlib.suppress(Exception):
                    agent.api("DELETE", f"/v1/dynos/{status['id']}", timeout_s=30)
        agent.cleanup()


@pytest.fixture(scope="module")
def agent() -> Iterator[AgentProcess]:
    with new_test_host() as host, agent_in_host(host) as running:
        yield running



@pytest.fixture
def events(agent: AgentProcess, app: str) -> Iterator[LineCollector]:
    collector = LineCollector(agent.stream(f"/v1/events?app={app}&follow=1"))
    try:
        yield collector
    finally:
        collector.close()


def one_off_result(agent: AgentProcess, app: str, slug: Path, script: str,
                   env: Mapping[str, str]) -> dict[str, Any]:
    """Run `script` of the slug in a one-off dyno of `app` (deleted once complete) and return
    the JSON object it printed on a line starting with "RESULT "."""
    name = f"run.{secrets.randbelow(9000) + 1000}"
    created = agent.api("POST", "/v1/dynos",
                        spec(app, name, f"python3 -u {script}", slug, env=dict(env)),
                        expect=201)

    def result() -> dict[str, Any]:
        for text in app_texts(agent, app, name):
            if text.startswith("RESULT "):
                parsed: dict[str, Any] = json.loads(text[len("RESULT "):])
                return parsed
        return {}
    try:
        return wait_for(result, 60, interval_s=0.1, what=f"the result of {script}")
    finally:
        wait_state(agent, created["id"], "complete", 30)
        agent.api("DELETE", f"/v1/dynos/{created['id']}", expect=204)


def event_of(collector: LineCollector, dyno_id: str, state: str) -> dict[str, Any]:
    def find() -> dict[str, Any]:
        for event in collector.events():
            if event.get("id") == dyno_id and event.get("state") == state:
                return event
        return {}
    return wait_for(find, 20, what=f"event {state} of {dyno_id}")


# -- crash and cool-off -----------------------------------------------------------------------

def test_crashing_web_dyno_shows_heroku_lines_and_waits_its_cool_off(
        agent: AgentProcess, app: str, slug: Path) -> None:
    command = "python3 /app/server.py"
    created = agent.api("POST", "/v1/dynos", spec(app, "web.1", command, slug,
                                                  env={"CRASH_AFTER_ACCEPT": "1"}), expect=201)
    # Third start: after the immediate restart, the second crash waited the cool-off.
    def third_start() -> list[dict[str, str]]:
        lines = platform_lines(agent, app, "web.1")
        starts = [i for i, line in enumerate(lines) if line["text"].startswith("Starting")]
        return lines if len(starts) >= 3 else []
    lines = wait_for(third_start, COOL_OFF_S + 15, interval_s=0.1, what="third start")
    starting = f"Starting process with command `{command}`"
    assert texts(lines)[:11] == [
        starting,
        "State changed from starting to up",
        "Process exited with status 3",
        "State changed from up to crashed",
        "State changed from crashed to starting",
        starting,
        "State changed from starting to up",
        "Process exited with status 3",
        "State changed from up to crashed",
        "State changed from crashed to starting",
        starting,
    ], texts(lines)
    first_restart_s = at(lines[4]) - at(lines[3])
    cool_off_s = at(lines[9]) - at(lines[8])
    assert first_restart_s < 1.0, "the first crash restarts at once"
    assert COOL_OFF_S - 0.1 <= cool_off_s < COOL_OFF_S + 2.0, cool_off_s
    assert "crashing" in app_texts(agent, app, "web.1")
    status = dyno(agent, created["id"])
    assert status["restarts"] >= 2
    assert status["exit_status"] == 3


# -- stop: R12 and 143 ------------------------------------------------------------------------

def test_dyno_ignoring_sigterm_gets_r12_and_sigkill_after_the_timeout(
        agent: AgentProcess, app: str, slug: Path, events: LineCollector) -> None:
    command = "trap '' TERM; echo ready; while :; do sleep 0.2; done"
    created = agent.api("POST", "/v1/dynos", spec(app, "worker.1", command, slug), expect=201)
    wait_state(agent, created["id"], "up")
    wait_for(lambda: "ready" in app_texts(agent, app, "worker.1"), 10, what="trap installed")
    started = time.monotonic()
    stopped = agent.api("POST", f"/v1/dynos/{created['id']}/stop")
    took_s = time.monotonic() - started
    assert stopped["state"] == "down"
    assert stopped["exit_status"] == 137
    assert STOP_TIMEOUT_S - 0.1 <= took_s < STOP_TIMEOUT_S + 3, took_s
    lines = platform_lines(agent, app, "worker.1")
    term = texts(lines).index("Stopping all processes with SIGTERM")
    assert texts(lines)[term:] == [
        "Stopping all processes with SIGTERM",
        "Error R12 (Exit timeout) -> At least one process failed to exit within "
        f"{STOP_TIMEOUT_S} seconds of SIGTERM",
        "Stopping remaining processes with SIGKILL",
        "Process exited with status 137",
        "State changed from up to down",
    ]
    assert STOP_TIMEOUT_S - 0.1 <= at(lines[term + 1]) - at(lines[term]) < STOP_TIMEOUT_S + 1
    down = event_of(events, created["id"], "down")
    assert (down["previous"], down["reason"], down["exit_status"]) == ("up", "stopped", 137)
    assert set(down) >= {"id", "app", "name", "state", "previous", "reason", "exit_status", "at"}
    assert (down["app"], down["name"]) == (app, "worker.1")
    assert datetime.fromisoformat(down["at"]).utcoffset() is not None


def test_normal_stop_exits_143_and_is_down_only_with_an_empty_cgroup(
        agent: AgentProcess, app: str, slug: Path) -> None:
    created = agent.api("POST", "/v1/dynos", spec(
        app, "worker.1", "echo ready; sleep 1000 & sleep 1000 & exec sleep 1000", slug),
        expect=201)
    rel = wait_state(agent, created["id"], "up")["cgroup"]
    files = cgroup_procs_files(agent, rel)
    assert files, f"no cgroup.procs for {rel}"
    wait_for(lambda: len(Path(files[0]).read_text().split()) >= 4, 10,
             what="tini, its child and two background sleeps")
    seen_at_down: dict[str, str] = {}

    def on_event(line: str) -> None:
        # Read the cgroup the moment `down` is announced: it must already be empty.
        if '"state":"down"' in line.replace(" ", ""):
            for path in files:
                seen_at_down[path] = Path(path).read_text()
    collector = LineCollector(agent.stream(f"/v1/events?app={app}&follow=1"), on_event)
    try:
        stopped = agent.api("POST", f"/v1/dynos/{created['id']}/stop")
        wait_for(lambda: seen_at_down, 10, what="down event")
    finally:
        collector.close()
    assert stopped["state"] == "down"
    assert stopped["exit_status"] == 143
    assert stopped["pid"] is None
    assert seen_at_down and all(text.strip() == "" for text in seen_at_down.values()), \
        seen_at_down
    lines = texts(platform_lines(agent, app, "worker.1"))
    assert lines[-3:] == ["Stopping all processes with SIGTERM",
                          "Process exited with status 143", "State changed from up to down"]
    assert not any("R12" in line for line in lines)
    # A stopped dyno stays down: nothing restarts it.
    assert dyno(agent, created["id"])["state"] == "down"


def test_stop_gives_the_app_its_graceful_shutdown(
        agent: AgentProcess, app: str, slug: Path) -> None:
    # The app needs a second after SIGTERM to drain; the shell that starts it must not take
    # it down early (dash would die at once, and the dyno's PID 1 with it).
    drain = ("import signal, sys, time\n"
             "def bye(*_):\n"
             "    time.sleep(1)\n"
             "    print('drained', flush=True)\n"
             "    sys.exit(0)\n"
             "signal.signal(signal.SIGTERM, bye)\n"
             "print('ready', flush=True)\n"
             "while True: time.sleep(0.1)\n")
    (slug / "drain.py").write_text(drain)
    (slug / "drain.py").chmod(0o644)
    created = agent.api("POST", "/v1/dynos", spec(app, "worker.1", "python3 -u drain.py", slug),
                        expect=201)
    wait_state(agent, created["id"], "up")
    wait_for(lambda: "ready" in app_texts(agent, app, "worker.1"), 10, what="handler installed")
    stopped = agent.api("POST", f"/v1/dynos/{created['id']}/stop")
    assert stopped["state"] == "down"
    assert stopped["exit_status"] == 0
    assert "drained" in app_texts(agent, app, "worker.1")
    lines = texts(platform_lines(agent, app, "worker.1"))
    assert lines[-3:] == ["Stopping all processes with SIGTERM",
                          "Process exited with status 0", "State changed from up to down"]


# -- boot timeout: R10 ----------------------------------------------------------------------

def test_web_dyno_that_never_binds_gets_r10_and_crashes_with_boot_timeout(
        agent: AgentProcess, app: str, slug: Path, events: LineCollector) -> None:
    created = agent.api("POST", "/v1/dynos", spec(app, "web.1", "exec sleep 1000", slug,
                                                  boot_timeout_s=BOOT_TIMEOUT_S), expect=201)
    crashed = event_of(events, created["id"], "crashed")
    assert (crashed["previous"], crashed["reason"], crashed["exit_status"]) == \
        ("starting", "boot-timeout", 137)
    lines = platform_lines(agent, app, "web.1")
    assert texts(lines)[:5] == [
        "Starting process with command `exec sleep 1000`",
        "Error R10 (Boot timeout) -> Web process failed to bind to $PORT within "
        f"{BOOT_TIMEOUT_S} seconds of launch",
        "Stopping process with SIGKILL",
        "Process exited with status 137",
        "State changed from starting to crashed",
    ], texts(lines)
    waited_s = at(lines[1]) - at(lines[0])
    assert BOOT_TIMEOUT_S - 0.1 <= waited_s < BOOT_TIMEOUT_S + 1.5, waited_s
    assert "State changed from starting to up" not in texts(lines)


# -- memory: R14 and R15 --------------------------------------------------------------------

def test_dyno_past_its_kill_point_gets_r15_exit_137_and_reason_oom(
        agent: AgentProcess, app: str, slug: Path, events: LineCollector) -> None:
    command = ("python3 -c \"import time; print('allocating', flush=True); "
               "b = b'x' * (256 << 20); print('survived', flush=True); time.sleep(1000)\"")
    created = agent.api("POST", "/v1/dynos", spec(app, "worker.1", command, slug, size="tiny"),
                        expect=201)
    crashed = event_of(events, created["id"], "crashed")
    assert (crashed["reason"], crashed["exit_status"]) == ("oom", 137)
    lines = texts(platform_lines(agent, app, "worker.1"))
    r15 = lines.index("Error R15 (Memory quota vastly exceeded)")
    assert lines[r15 + 1:r15 + 4] == ["Stopping process with SIGKILL",
                                      "Process exited with status 137",
                                      "State changed from up to crashed"], lines
    assert "survived" not in app_texts(agent, app, "worker.1")
    status = dyno(agent, created["id"])
    # The first crash restarts at once, so the API may already show the next attempt; the
    # last exit and the kernel's OOM count stay.
    assert status["exit_status"] == 137
    assert status["stats"] is None or (status["stats"]["oom_kills"] or 0) >= 1
    assert not any(e.get("state") == "crashed" and e.get("reason") == "crash"
                   for e in events.events()), "an OOM kill is never a plain crash"


def test_dyno_over_quota_under_kill_point_logs_r14_and_keeps_running(
        agent: AgentProcess, app: str, slug: Path) -> None:
    command = ("python3 -c \"import time; b = b'x' * (96 << 20); print('holding', flush=True); "
               "time.sleep(1000)\"")
    created = agent.api("POST", "/v1/dynos", spec(app, "worker.1", command, slug, size="tiny"),
                        expect=201)
    pid = wait_state(agent, created["id"], "up")["pid"]
    wait_for(lambda: "holding" in app_texts(agent, app, "worker.1"), 15, what="allocated")
    wait_for(lambda: texts(log_lines(agent, app, "worker.1")).count(
        "Error R14 (Memory quota exceeded)") >= 2, 10, what="two R14 lines")
    lines = log_lines(agent, app, "worker.1")
    all_texts = texts(lines)
    first = all_texts.index("Error R14 (Memory quota exceeded)")
    assert re.fullmatch(r"Process running mem=(\d+)M\((\d+\.\d)%\)", all_texts[first - 1])
    mem = int(re.findall(r"mem=(\d+)M", all_texts[first - 1])[0])
    assert 64 < mem < 128, all_texts[first - 1]
    r14_times = [at(line) for line in lines if line["text"].startswith("Error R14")]
    gaps = [b - a for a, b in itertools.pairwise(r14_times)]
    assert all(gap >= SAMPLE_INTERVAL_S * 0.9 for gap in gaps), "at most once per sample period"
    assert not any("R15" in text for text in all_texts)
    status = dyno(agent, created["id"])
    assert (status["state"], status["pid"], status["restarts"]) == ("up", pid, 0)


# -- one-off dynos --------------------------------------------------------------------------

def test_one_off_dyno_ends_complete_with_its_status_and_is_never_restarted(
        agent: AgentProcess, app: str, slug: Path, events: LineCollector) -> None:
    created = agent.api("POST", "/v1/dynos", spec(app, "run.1", "echo one-off; exit 7", slug),
                        expect=201)
    done = event_of(events, created["id"], "complete")
    assert done["exit_status"] == 7
    status = dyno(agent, created["id"])
    assert (status["state"], status["exit_status"], status["restarts"], status["pid"]) == \
        ("complete", 7, 0, None)
    # Long enough for an immediate restart (a first crash) to have shown up.
    wait_for(lambda: len(platform_lines(agent, app, "run.1")) >= 3, 5, what="exit lines")
    time.sleep(1.0)  # not a wait for a condition: a window in which nothing may happen
    lines = texts(platform_lines(agent, app, "run.1"))
    assert lines.count("Starting process with command `echo one-off; exit 7`") == 1, lines
    assert lines[-2:] == ["Process exited with status 7", "State changed from up to complete"]
    assert "one-off" in app_texts(agent, app, "run.1")
    with pytest.raises(ApiError) as refused:
        agent.api("POST", f"/v1/dynos/{created['id']}/restart")
    assert refused.value.status == 409


# -- metrics --------------------------------------------------------------------------------

def test_metrics_parse_with_prometheus_parser_and_show_the_dynos(
        agent: AgentProcess, app: str, slug: Path) -> None:
    ids = []
    for n in (1, 2):
        created = agent.api("POST", "/v1/dynos", spec(app, f"worker.{n}", "exec sleep 1000",
                                                      slug), expect=201)
        ids.append(created["id"])
    for dyno_id in ids:
        wait_state(agent, dyno_id, "up")
    # Memory figures come from the periodic sample.
    def sampled() -> dict[str, Any]:
        families = {f.name: f for f in text_string_to_metric_families(agent.api("GET",
                                                                               "/metrics"))}
        rss = [s for s in families["dynoagent_dyno_memory_bytes"].samples
               if s.labels.get("app") == app and s.labels.get("kind") == "rss" and s.value > 0]
        return families if len(rss) == 2 else {}
    families = wait_for(sampled, 10, interval_s=0.1, what="sampled memory in /metrics")
    state = {(s.labels["id"], s.labels["state"]): s.value
             for s in families["dynoagent_dyno_state"].samples if s.labels["app"] == app}
    for dyno_id in ids:
        assert state[(dyno_id, "up")] == 1
        assert state[(dyno_id, "crashed")] == 0
    quota = [s for s in families["dynoagent_dyno_memory_quota_bytes"].samples
             if s.labels["app"] == app]
    assert sorted(s.labels["dyno"] for s in quota) == ["worker.1", "worker.2"]
    assert all(s.value == 512 * 2**20 for s in quota)
    # The same sample as a runtime-metrics log line (DESIGN §6).
    metric_lines = [text for text in texts(log_lines(agent, app, "worker.1"))
                    if METRICS_LINE.match(text)]
    assert metric_lines, "no runtime-metrics line"
    assert re.fullmatch(rf"source=worker\.1 dyno={ids[0]} sample#memory_total=\d+\.\d\dMB "
                        r"sample#memory_rss=\d+\.\d\dMB .*sample#memory_quota=512\.00MB",
                        metric_lines[-1]), metric_lines[-1]


# -- logs: 100,000 lines and a slow follower -------------------------------------------------

LOG_LINES = 100_000
TAIL = 1500


def test_100k_lines_keep_the_tail_and_a_slow_follower_gets_l10_not_a_blocked_dyno(
        agent: AgentProcess, app: str, slug: Path) -> None:
    follower = agent.stream(f"/v1/logs?app={app}&dyno=worker.1&follow=1&format=json",
                            timeout_s=60)
    try:
        created = agent.api("POST", "/v1/dynos", spec(
            app, "worker.1", f"seq 1 {LOG_LINES}; echo printed-all; exec sleep 1000", slug),
            expect=201)
        # Nobody reads the follower yet: the dyno must still get all its lines out.
        wait_for(lambda: "printed-all" in texts(log_lines(agent, app, "worker.1", tail=5)),
                 60, interval_s=0.1, what="dyno finished printing while the follower stalls")
        status = dyno(agent, created["id"])
        assert (status["state"], status["restarts"]) == ("up", 0)
        window = log_lines(agent, app, tail=TAIL)
        assert len(window) == TAIL
        numbers = [int(line["text"]) for line in window
                   if line["source"] == "app" and line["text"].isdigit()]
        assert not any("L10" in line["text"] for line in window)
        # Every printed line inside the tail's range is there, in order.
        assert numbers == list(range(numbers[0], LOG_LINES + 1))
        assert len(numbers) > TAIL - 100  # the rest are platform lines of the same period

        received: list[int] = []
        dropped = 0
        follower_l10: list[str] = []
        follower.settimeout(30)
        # The stalled follower kept what fit in its queue and dropped the rest (the closing
        # marker too); once it has read its backlog it is told how many lines it lost. An
        # L10 of the dyno itself (the holder dropping its oldest unsent lines under a burst,
        # counted in the API's `output_dropped`) may come before or be dropped itself.
        # Under load the agent may have pushed part of the backlog into the socket before
        # the stall, so the loss can come in several L10s. The dyno's runtime-metrics lines
        # keep arriving (every SAMPLE_INTERVAL_S); one after an L10 means the backlog is read
        # and every loss so far has been reported.
        while True:
            raw = follower.readline()
            assert raw, "the follow stream ended early"
            line = json.loads(raw)
            if follower_l10 and METRICS_LINE.match(line["text"]):
                break
            text = line["text"]
            if text.startswith("Error L10 (output buffer overflow): ") and \
                    line["dyno"] == "logs":
                dropped += int(re.findall(r": (\d+) messages dropped$", text)[0])
                follower_l10.append(line["line"])
            elif line["source"] == "app" and text.isdigit():
                received.append(int(text))
        holder_dropped = dyno(agent, created["id"])["output_dropped"]
    finally:
        follower.close()
    assert re.search(r" agent\[logs\]: Error L10 \(output buffer overflow\): "
                     r"\d+ messages dropped$", follower_l10[0]), follower_l10
    assert received == sorted(set(received)), "lines arrive once and in order"
    # Its queue (50,000 lines) was full when it stalled; a few of those are platform lines.
    assert len(received) >= 9_900
    print(f"received {len(received)}, follower dropped {dropped}, holder dropped "
          f"{holder_dropped} of {LOG_LINES}")
    assert LOG_LINES - len(received) <= dropped + holder_dropped, "every loss was reported"


# -- agent SIGKILL and re-adoption ----------------------------------------------------------

TICKER = "i=0; while :; do i=$((i+1)); echo tick $i; sleep 0.1; done"


def test_agent_sigkill_then_new_agent_readopts_10_dynos_with_their_output(
        slug: Path) -> None:
    app = unique("t", 8)
    with new_test_host() as host, agent_in_host(host, sample_interval_s=5) as agent:
        ids = [agent.api("POST", "/v1/dynos", spec(app, f"worker.{n}", TICKER, slug),
                         expect=201)["id"] for n in range(1, 11)]
        pids = {dyno_id: wait_state(agent, dyno_id, "up")["pid"] for dyno_id in ids}
        wait_for(lambda: all(any(t.startswith("tick") for t in app_texts(agent, app,
                                                                         f"worker.{n}"))
                             for n in range(1, 11)), 15, what="every dyno ticking")
        assert agent.proc is not None
        agent.proc.kill()
        agent.wait(10)
        for pid in pids.values():
            os.kill(pid, 0)  # every dyno outlived its agent
        # One dyno dies while no agent watches: the holder keeps its exit status for the
        # next agent, which handles it by policy (a first crash: restarted at once).
        died_away = ids[7]
        os.kill(pids[died_away], signal.SIGKILL)
        time.sleep(1.0)  # the agent's absence: output printed now must not be lost
        agent.start()

        for dyno_id, pid in pids.items():
            if dyno_id != died_away:
                status = dyno(agent, dyno_id)
                assert (status["state"], status["pid"]) == ("up", pid), status
        back = wait_state(agent, died_away, "up", 15,
                          where=lambda s: s["pid"] not in (None, pids[died_away]))
        assert back["restarts"] == 1
        away_lines = texts(platform_lines(agent, app, "worker.8"))
        assert "Process exited with status 137" in away_lines
        assert "State changed from up to crashed" in away_lines
        # Later output arrives, and the ticks printed while no agent ran were kept.
        with agent.stream(f"/v1/logs?app={app}&follow=1&format=json") as stream:
            seen: set[str] = set()
            stream.settimeout(15)
            while len(seen) < 10:
                line = json.loads(stream.readline())
                if line["source"] == "app" and line["text"].startswith("tick"):
                    seen.add(line["dyno"])
        for n in range(1, 11):
            if n == 8:
                continue  # restarted: its counter began again
            ticks = [int(t.split()[1]) for t in app_texts(agent, app, f"worker.{n}")
                     if t.startswith("tick ")]
            assert ticks == list(range(ticks[0], ticks[-1] + 1)), f"gap in worker.{n}"
            assert ticks[-1] - ticks[0] >= 10  # the window spans the agent's absence

        victim = ids[3]
        os.kill(pids[victim], signal.SIGKILL)
        restarted = wait_state(agent, victim, "up", 15,
                               where=lambda s: s["pid"] not in (None, pids[victim]))
        assert restarted["restarts"] == 1
        lines = texts(platform_lines(agent, app, "worker.4"))
        assert "Process exited with status 137" in lines
        assert "State changed from up to crashed" in lines
        for dyno_id in ids:
            if dyno_id not in (victim, died_away):
                assert dyno(agent, dyno_id)["pid"] == pids[dyno_id]


def test_graceful_agent_stop_leaves_running_dynos_to_the_next_agent(slug: Path) -> None:
    app = unique("t", 8)
    with new_test_host() as host, agent_in_host(host) as agent:
        created = agent.api("POST", "/v1/dynos", spec(app, "web.1", "python3 /app/server.py",
                                                      slug), expect=201)
        pid = wait_state(agent, created["id"], "up")["pid"]
        assert agent.stop(30) == 0
        os.kill(pid, 0)  # a stopping agent never takes its dynos down with it
        holder = _processes_mentioning(f"{agent.base}/run/holder.sock")
        assert holder, "the holder stays while it holds a dyno"
        agent.start()
        status = dyno(agent, created["id"])
        assert (status["state"], status["pid"], status["restarts"]) == ("up", pid, 0)
        assert _processes_mentioning(f"{agent.base}/run/holder.sock") == holder


# -- nothing left behind ----------------------------------------------------------------------

def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if text.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
    return found


def test_nothing_is_left_after_all_dynos_are_deleted_and_the_agent_stops(slug: Path) -> None:
    app_a, app_b = unique("t", 8), unique("t", 8)
    with new_test_host() as host:
        agent = AgentProcess(extra=FAST_CONFIG, netns=host.name)
        try:
            agent.start()
            web = agent.api("POST", "/v1/dynos", spec(app_a, "web.1", "python3 /app/server.py",
                                                      slug), expect=201)
            worker = agent.api("POST", "/v1/dynos", spec(app_b, "worker.1",
                                                         "sleep 1000 & exec sleep 1000", slug),
                               expect=201)
            one_off = agent.api("POST", "/v1/dynos", spec(app_b, "run.1", "true", slug),
                                expect=201)
            pids = [wait_state(agent, d["id"], "up")["pid"] for d in (web, worker)]
            wait_state(agent, one_off["id"], "complete")
            ids = [web["id"], worker["id"], one_off["id"]]
            holder = [pid for pid in _processes_mentioning(str(agent.base))
                      if pid != agent.proc.pid]  # type: ignore[union-attr]
            assert holder, "the holder runs with the agent's run dir on its command line"
            for dyno_id in ids:
                agent.api("DELETE", f"/v1/dynos/{dyno_id}", expect=204)
            assert agent.api("GET", "/v1/dynos") == []
            assert agent.stop(30) == 0
            prefix, table = instance_names(Config(cgroup_root=agent.settings["cgroup_root"]))
            root = agent.settings["cgroup_root"]

            for pid in pids + holder:
                wait_for(lambda pid=pid: not Path(f"/proc/{pid}").exists(), 10,  # type: ignore[misc]
                         what=f"pid {pid} gone")
            assert _processes_mentioning(str(agent.base)) == []
            assert glob.glob(f"/sys/fs/cgroup/*/{root}") + glob.glob(f"/sys/fs/cgroup/{root}") \
                == []
            # Namespace deletion is deferred off the critical path; it still must happen.
            wait_for(lambda: not any(Path(f"/run/netns/dyno-{i}").exists() for i in ids), 10,
                     what="dyno netns removed")
            links = host.run("ip", "-o", "link").stdout
            assert not re.search(rf"^\d+: {prefix}", links, re.M), links
            tables = host.run("nft", "list", "tables").stdout
            assert table not in tables.split(), tables
            mounts = Path("/proc/self/mountinfo").read_text()
            assert str(agent.base) not in mounts
            assert not any(f"dyno-{i}" in mounts for i in ids)
            assert not any(Path(p).exists() for p in
                           (agent.base / "run" / "dynos" / i for i in ids))
        except BaseException:
            print(agent.log()[-20000:])
            raise
        finally:
            agent.cleanup()



def test_a_dead_holder_costs_its_dynos_one_restart_not_their_supervision(
        agent: AgentProcess, app: str, slug: Path) -> None:
    created = agent.api("POST", "/v1/dynos", spec(app, "worker.1", TICKER, slug), expect=201)
    first = wait_state(agent, created["id"], "up")
    holders = _processes_mentioning(f"{agent.base}/run/holder.sock")
    assert len(holders) == 1, holders
    os.kill(holders[0], signal.SIGKILL)
    # The agent reconnects to a new holder, finds the dyno's process unknown to it (no exit
    # status or output could reach it any more), ends it and restarts it by policy.
    wait_for(lambda: (d := dyno(agent, created["id"]))["state"] == "up"
             and d["pid"] not in (None, first["pid"]), 30, what="restarted under a new holder")

    def old_process_gone() -> bool:
        # Re-parented to the machine's init when the holder died: a zombie until it reaps.
        try:
            stat = Path(f"/proc/{first['pid']}/stat").read_text()
        except FileNotFoundError:
            return True
        return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")
    wait_for(old_process_gone, 10, what="the orphaned process ended")
    restarted = dyno(agent, created["id"])
    wait_for(lambda: any(t.startswith("tick") for t in app_texts(agent, app, "worker.1")
                         [-3:]), 10, what="output through the new holder")
    assert restarted["restarts"] >= 1
    assert len(_processes_mentioning(f"{agent.base}/run/holder.sock")) == 1
