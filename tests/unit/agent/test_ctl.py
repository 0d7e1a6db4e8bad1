"""dynoctl against a real aiohttp server on a Unix socket (the FakeBackend of test_api behind
it, served from a thread): output formats, exit codes, and which dynos each command hits."""

from __future__ import annotations

import asyncio
import io
import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Coroutine, Iterator
from contextlib import redirect_stdout
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiohttp import web

from agent.api.server import build_app
from agent.cli import dynoctl as ctl
from agent.observability.logs import LogLine
from tests.support.wait import wait_for
from tests.unit.agent.fakes import FakeBackend, make_status, sample_backend

T = TypeVar("T")


class ServedBackend:
    """The operator API over a FakeBackend, on a Unix socket, in an event loop of its own."""

    def __init__(self, backend: FakeBackend, socket_path: str) -> None:
        self.backend = backend
        self.socket_path = socket_path
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="api-server")
        self.runner: web.AppRunner | None = None

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=10)

    def call(self, func: Any, *args: Any) -> Any:
        async def inside() -> Any:
            return func(*args)
        return self.run(inside())

    async def _start(self) -> None:
        self.runner = web.AppRunner(build_app(self.backend), access_log=None,
                                    shutdown_timeout=1.0)
        await self.runner.setup()
        await web.UnixSite(self.runner, self.socket_path).start()

    def start(self) -> None:
        self.thread.start()
        self.run(self._start())

    def stop(self) -> None:
        try:
            if self.runner is not None:
                self.run(self.runner.cleanup())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)
            self.loop.close()

    def publish(self, app: str, dyno: str, text: str) -> None:
        line = LogLine.output(datetime.now(UTC), app, dyno, text)
        self.call(self.backend.hub.publish, line)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # AF_UNIX paths are limited to 108 bytes; pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="dctl-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def served(short_dir: Path) -> Iterator[ServedBackend]:
    server = ServedBackend(sample_backend(), str(short_dir / "api.sock"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def run_ctl(served: ServedBackend | None, *argv: str,
            capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    prefix = ["--socket", served.socket_path] if served is not None else []
    code = ctl.main([*prefix, *argv])
    out, err = capsys.readouterr()
    return code, out, err


# -- ps ---------------------------------------------------------------------------------------

def test_ps_groups_by_type_like_heroku(served: ServedBackend,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    since = datetime.now(UTC) - timedelta(minutes=5, seconds=10)
    for status in served.backend.dynos.values():
        status["since"] = since.isoformat()
    served.backend.add(make_status("a4", "shop", "web.10", since=since))
    stamp = since.astimezone().strftime("%Y/%m/%d %H:%M:%S %z")
    code, out, err = run_ctl(served, "ps", "-a", "shop", capsys=capsys)
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        "=== web (Standard-1X): `python3 -m http.server $PORT`",
        f"web.1: up {stamp} (~ 5m ago)",
        f"web.2: starting {stamp} (~ 5m ago)",
        f"web.10: up {stamp} (~ 5m ago)",
        "",
        "=== worker (Standard-1X): `python3 worker.py`",
        f"worker.1: up {stamp} (~ 5m ago)",
    ]


def test_ps_json_and_empty(served: ServedBackend, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_ctl(served, "ps", "--json", "-a", "blog", capsys=capsys)
    assert code == 0
    assert json.loads(out) == [served.backend.dynos["b1"]]
    code, out, _ = run_ctl(served, "ps", "-a", "nothing", capsys=capsys)
    assert (code, out) == (0, "No dynos of nothing.\n")


def test_format_ps_one_offs_and_several_apps() -> None:
    now = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
    since = now - timedelta(hours=2)
    dynos = [make_status("r1", "shop", "run.4821", command="bash", since=since,
                         size="performance-m"),
             make_status("w1", "shop", "worker.1", since=since, command="w"),
             make_status("x1", "blog", "web.1", since=since, command="serve"),
             {"id": "odd", "name": "clock.1"}]  # missing optional keys must not crash
    lines = ctl.format_ps(dynos, now)
    stamp = since.astimezone().strftime("%Y/%m/%d %H:%M:%S %z")
    assert lines == [
        "=== ? clock (?)", "clock.1: ?", "",
        "=== blog web (Standard-1X): `serve`", f"web.1: up {stamp} (~ 2h ago)", "",
        "=== shop worker (Standard-1X): `w`", f"worker.1: up {stamp} (~ 2h ago)", "",
        "=== shop run: one-off processes",
        f"run.4821 (Performance-M): up {stamp} (~ 2h ago): bash",
    ]


@pytest.mark.parametrize(("seconds", "text"), [(-3, "~ 0s ago"), (59, "~ 59s ago"),
                                               (60, "~ 1m ago"), (3599, "~ 59m ago"),
                                               (3600, "~ 1h ago"), (25 * 3600 - 1, "~ 24h ago"),
                                               (3 * 86400, "~ 3d ago")])
def test_ago(seconds: int, text: str) -> None:
    assert ctl.ago(seconds) == text


# -- logs -------------------------------------------------------------------------------------

def test_logs_n_and_filters(served: ServedBackend, capsys: pytest.CaptureFixture[str]) -> None:
    for i in range(5):
        served.publish("shop", "web.1", f"web says {i}")
    served.publish("shop", "worker.1", "worker says")
    served.publish("blog", "web.1", "blog says")
    code, out, _ = run_ctl(served, "logs", "-n", "2", capsys=capsys)
    assert code == 0
    assert [x.split(" ", 1)[1] for x in out.splitlines()] == [
        "app[worker.1]: worker says", "app[web.1]: blog says"]
    code, out, _ = run_ctl(served, "logs", "-a", "shop", "-d", "web.1", capsys=capsys)
    assert [x.split(": ", 1)[1] for x in out.splitlines()] == [f"web says {i}"
                                                                  for i in range(5)]
    code, out, _ = run_ctl(served, "logs", "--json", "-n", "1", capsys=capsys)
    assert json.loads(out)["text"] == "blog says"


def test_logs_follow_prints_new_lines_until_the_agent_ends_the_stream(
        served: ServedBackend) -> None:
    out = io.StringIO()
    result: list[int] = []

    def follow() -> None:
        with redirect_stdout(out):
            result.append(ctl.main(["--socket", served.socket_path, "logs", "-t", "-n", "0"]))

    served.publish("shop", "web.1", "before")
    thread = threading.Thread(target=follow)
    thread.start()
    try:
        wait_for(lambda: served.call(lambda: served.backend.hub.followers) == 1, 10,
                 what="dynoctl following")
        served.publish("shop", "web.1", "after 1")
        served.publish("shop", "worker.1", "after 2")
        wait_for(lambda: "after 2" in out.getvalue(), 10, what="lines printed while following")
    finally:
        served.call(served.backend.hub.close)
        thread.join(timeout=10)
    assert not thread.is_alive()
    assert result == [0]
    assert [x.split(" ", 1)[1] for x in out.getvalue().splitlines()] == [
        "app[web.1]: after 1", "app[worker.1]: after 2"]


def test_logs_follow_ends_on_ctrl_c_and_the_agent_lets_go(served: ServedBackend) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli.dynoctl", "--socket",
                             served.socket_path, "logs", "-t", "-n", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=Path(__file__).resolve().parents[3])
    try:
        wait_for(lambda: served.call(lambda: served.backend.hub.followers) == 1, 20,
                 what="dynoctl following")
        served.publish("shop", "web.1", "seen live")
        assert proc.stdout is not None
        assert proc.stdout.readline().decode().endswith("app[web.1]: seen live\n")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (proc.returncode, out, err) == (0, b"", b"")
    wait_for(lambda: served.call(lambda: served.backend.hub.followers) == 0, 10,
             what="the agent closed the follower of a client that left")


# -- inspect ----------------------------------------------------------------------------------

def test_inspect(served: ServedBackend, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_ctl(served, "inspect", "worker.1", "--json", capsys=capsys)
    assert code == 0
    detail = json.loads(out)
    assert detail == served.backend.get_dyno("a3")
    code, out, _ = run_ctl(served, "inspect", "a3", capsys=capsys)
    lines = out.splitlines()
    assert lines[0] == "=== worker.1 (a3)"
    assert "Memory:    64.0 MiB of 512.0 MiB (12.5%)" in lines
    assert "Cgroup:    /dynoagent/app-shop.slice/dyno-a3.scope" in lines
    assert "Last exit: -" in lines


def test_format_inspect_tolerates_a_bare_status() -> None:
    lines = ctl.format_inspect({"id": "x", "name": "web.1", "state": "down", "stats": None,
                                "timings_ms": {"launch": 5.523456, "slug": 12}})
    assert lines[0] == "=== web.1 (x)"
    assert "State:     down" in lines and "Memory:    -" in lines
    assert "Timings:   slug 12.0 ms, launch 5.5 ms" in lines
    assert "Launch:    -" in lines


def test_inspect_shows_the_phases_in_order_with_units() -> None:
    timings = {"launch.exec": 6.123456, "up": 0.3333, "netns": 11.71, "launch": 27.049,
               "exit": 3.0, "exit_event": 2.0, "run": 1.25, "record": 0.25, "cgroup": 7.94,
               "slug": 0.31, "queue": 1.5,
               "uid": 1.2, "dir": 0.1, "prepare": 0.02, "launch.fork": 7.0,
               "launch.total": 18.5, "launch.prepare": 1.04, "launch.mounts": 2.5}
    lines = ctl.format_inspect({"id": "x", "name": "run.1", "state": "complete",
                                "timings_ms": timings})
    assert ("Timings:   record 0.25 ms, queue 1.5 ms, slug 0.31 ms, uid 1.2 ms, dir 0.10 ms, "
            "cgroup 7.9 ms, netns 11.7 ms, prepare 0.02 ms, launch 27.0 ms, up 0.33 ms, "
            "run 1.2 ms, exit_event 2.0 ms, exit 3.0 ms") in lines
    assert ("Launch:    prepare 1.0 ms, fork 7.0 ms, mounts 2.5 ms, exec 6.1 ms, "
            "total 18.5 ms") in lines


def test_inspect_prints_no_none_nor_unrounded_float() -> None:
    """Every field of a dyno as the agent describes it (nulls where it has no value, floats
    in limits and counters) reads as text: no `None`, no float past 2 decimals."""
    dyno = {"id": "x", "app": None, "name": "web.1", "type": None, "state": "crashed",
            "since": None, "reason": None, "command": None, "size": None, "pid": None,
            "ip": None, "restarts": 0, "exit_status": None, "cgroup": None, "netns": None,
            "seccomp": None, "stats": {"memory_bytes": 1234567.891, "memory_quota_bytes": 3e8,
                                       "cpu_seconds": 0.123456789, "pids": None},
            "limits": {"memory_quota_bytes": 536870912, "cpu_max_cpus": None,
                       "cpu_weight": 100, "share": 0.333333333},
            "timings_ms": {"launch": 5.523456, "weird": None, "launch.fork": 0.123456}}
    out = "\n".join(ctl.format_inspect(dyno))
    assert "None" not in out
    assert not re.search(r"\d\.\d{3,}", out), out
    assert "cpu_max_cpus=none" in out and "share=0.33" in out
    assert "Timings:   launch 5.5 ms, weird none" in out


@pytest.mark.parametrize(("argv", "code"), [(("inspect", "nope"), "not_found"),
                                            (("inspect", "web.1"), "conflict")])
def test_errors_are_one_line_and_exit_1(served: ServedBackend,
                                        capsys: pytest.CaptureFixture[str],
                                        argv: tuple[str, ...], code: str) -> None:
    status, out, err = run_ctl(served, *argv, capsys=capsys)
    assert (status, out) == (1, "")
    assert err.startswith("dynoctl: ") and err.endswith(f"({code})\n")
    assert err.count("\n") == 1


def test_unreachable_agent(short_dir: Path, capsys: pytest.CaptureFixture[str],
                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DYNOAGENT_SOCKET", str(short_dir / "missing.sock"))
    status, out, err = run_ctl(None, "ps", capsys=capsys)
    assert (status, out) == (1, "")
    assert err == f"dynoctl: cannot reach dynoagent at {short_dir}/missing.sock: " \
                  "No such file or directory\n"


@pytest.mark.parametrize("argv", [(), ("frobnicate",), ("logs", "-n", "-5"), ("logs", "-n", "x"),
                                  ("inspect",), ("stop",), ("top", "--interval", "0"),
                                  ("ps", "extra")])
def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], argv: tuple[str, ...]) -> None:
    status, out, err = run_ctl(None, *argv, capsys=capsys)
    assert (status, out) == (2, "")
    assert "usage: dynoctl" in err


# -- restart and stop -------------------------------------------------------------------------

def test_restart_type_hits_every_dyno_of_the_type(served: ServedBackend,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_ctl(served, "restart", "web", "-a", "shop", capsys=capsys)
    assert code == 0
    assert served.backend.calls == [("restart", "a1"), ("restart", "a2")]
    assert out.splitlines() == ["Restarting web.1... done (starting)",
                                "Restarting web.2... done (starting)"]


def test_restart_type_across_apps_and_all(served: ServedBackend,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert run_ctl(served, "restart", "web", capsys=capsys)[0] == 0
    assert sorted(served.backend.calls) == [("restart", "a1"), ("restart", "a2"),
                                            ("restart", "b1")]
    served.backend.calls.clear()
    assert run_ctl(served, "restart", "-a", "shop", capsys=capsys)[0] == 0
    assert sorted(served.backend.calls) == [("restart", "a1"), ("restart", "a2"),
                                            ("restart", "a3")]


def test_restart_and_stop_one_dyno(served: ServedBackend,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_ctl(served, "restart", "web.1", "-a", "blog", capsys=capsys)
    assert (code, served.backend.calls) == (0, [("restart", "b1")])
    code, out, _ = run_ctl(served, "stop", "worker.1", capsys=capsys)
    assert (code, out) == (0, "Stopping worker.1... done (down)\n")
    assert served.backend.calls[-1] == ("stop", "a3")


def test_restart_unknown_fails(served: ServedBackend,
                               capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_ctl(served, "restart", "ghost", capsys=capsys)
    assert code == 1
    assert out == "Restarting ghost... failed\n"
    assert err.startswith("dynoctl: restart ghost: ") and err.endswith("(not_found)\n")
    assert served.backend.calls == []


# -- top --------------------------------------------------------------------------------------

def test_top_once(served: ServedBackend, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_ctl(served, "top", "--once", "-a", "shop", capsys=capsys)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("dynoctl top - ") and lines[0].endswith(" - 3 dynos")
    assert lines[1].split() == ["DYNO", "APP", "STATE", "MEM", "MiB", "QUOTA", "MiB", "MEM%",
                                "CPU%", "CPU", "s", "PIDS"]
    assert [row.split() for row in lines[2:]] == [
        ["web.1", "shop", "up", "64.0", "512", "12.5", "-", "1.50", "3"],
        ["web.2", "shop", "starting", "64.0", "512", "12.5", "-", "1.50", "3"],
        ["worker.1", "shop", "up", "64.0", "512", "12.5", "-", "1.50", "3"],
    ]


def test_top_json_and_cpu_percent_between_frames(served: ServedBackend) -> None:
    ticks = iter([100.0, 102.0])
    sampler = ctl._TopSampler(ctl.Client(served.socket_path), "blog", clock=lambda: next(ticks))
    status = served.backend.dynos["b1"]
    status["stats"] = {"memory_bytes": 2**20, "memory_quota_bytes": 2**29,
                       "cpu_seconds": 10.0, "pids": 1}
    first = sampler.frame()
    status["stats"] = {**status["stats"], "cpu_seconds": 11.0}
    second = sampler.frame()
    assert first[0]["cpu_percent"] is None
    assert second == [{"id": "b1", "app": "blog", "name": "web.1", "state": "up",
                       "memory_bytes": 2**20, "memory_quota_bytes": 2**29,
                       "memory_percent": 0.2, "cpu_seconds": 11.0, "cpu_percent": 50.0,
                       "pids": 1}]


def test_top_without_stats_shows_dashes(served: ServedBackend,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    served.backend.dynos["b1"]["stats"] = None  # a dyno not placed yet has no stats
    code, out, _ = run_ctl(served, "top", "--once", "-a", "blog", capsys=capsys)
    assert code == 0
    assert out.splitlines()[2].split() == ["web.1", "blog", "up", "-", "-", "-", "-", "-", "-"]


def test_top_json_once(served: ServedBackend, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_ctl(served, "top", "--once", "--json", capsys=capsys)
    rows = json.loads(out)
    assert code == 0
    assert sorted(r["id"] for r in rows) == ["a1", "a2", "a3", "b1"]
    assert {r["memory_percent"] for r in rows} == {12.5}


def test_ctl_does_not_import_aiohttp() -> None:
    probe = "import sys, agent.cli.dynoctl; print('aiohttp' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            check=True, cwd=Path(__file__).resolve().parents[3])
    assert result.stdout.strip() == "False"


def test_ctl_imports_only_what_run_needs() -> None:
    """What only other commands need is imported when they run: not at dynoctl's start (-S:
    no site-packages, no site's own imports; msgpack is not even on the path)."""
    probe = ("import sys; sys.path.insert(0, '.'); import agent.cli.dynoctl; print(sorted("
             "{'typing', 'datetime', 'msgpack', 'http.client', 'urllib.parse', 'shlex', "
             "'termios', 'pathlib', 'dataclasses'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-I", "-S", "-c", probe], capture_output=True,
                            text=True, check=True, cwd=Path(__file__).resolve().parents[3])
    assert result.stdout.strip() == "[]"


def test_fake_backend_is_shared() -> None:
    assert isinstance(sample_backend(), FakeBackend)


def test_run_e_sends_config_vars_and_refuses_malformed_ones(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    sent: list[dict[str, Any]] = []

    def attach(client: Any, request: dict[str, Any], started: Any, *,
               detached: bool = False) -> int:
        sent.append(request)
        return 0

    monkeypatch.setattr(ctl, "attach", attach)
    assert ctl.main(["--socket", "/nowhere", "run", "-e", "A=1", "--env", "B=x=y", "-e", "A=",
                     "--", "true"]) == 0
    assert sent[0]["config_vars"] == {"A": "", "B": "x=y"}  # the last of a key wins
    assert ctl.main(["--socket", "/nowhere", "run", "--", "-e", "X=1"]) == 0
    assert "config_vars" not in sent[1] and sent[1]["command"] == "-e X=1"
    for bad, words in [("1A=x", "config var name '1A' must match"),
                       ("A-B=1", "config var name 'A-B' must match"),
                       ("=x", "config var name '' must match"),
                       ("NOVALUE", "expected KEY=VALUE, got 'NOVALUE'")]:
        capsys.readouterr()
        assert ctl.main(["--socket", "/nowhere", "run", "-e", bad, "--", "true"]) == 2
        assert words in capsys.readouterr().err
    assert len(sent) == 2
