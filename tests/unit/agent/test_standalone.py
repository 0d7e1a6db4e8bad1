"""Standalone mode without the kernel: formation controller on the real engine with a fake
fleet, the formation fleet's filter, config defaults, log printer, the router's listener (the
router: test_router.py), and `dynoctl scale`/`run` against a served API (the attach socket:
test_attach.py)."""

from __future__ import annotations

import errno
import io
import ipaddress
import socket
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from agent import errors
from agent.cli import dynoctl as ctl
from agent.config import Config
from agent.observability.logs import LogLine
from agent.sizes import DEFAULT_SIZES
from agent.spec import DynoSpec, parse_spec
from agent.standalone import up as standalone
from agent.standalone.procfile import AppDirError, parse_formation_items, parse_procfile
from agent.standalone.proxy import Backend, ProxyError, bind_listener
from agent.supervision.reconcile import Engine, Observed
from agent.supervision.states import DynoState
from tests.unit.agent.fakes import FakeBackend, sample_backend
from tests.unit.agent.test_ctl import ServedBackend, run_ctl, short_dir  # noqa: F401

PROCFILE = parse_procfile("web: python3 web.py\nworker: python3 worker.py\nrelease: ./rel\n")


class FakeFleet:
    def __init__(self) -> None:
        self.dynos: dict[str, Observed] = {}
        self.calls: list[tuple[str, str]] = []

    def parse(self, body: Any) -> DynoSpec:
        return parse_spec(body)

    def observe(self) -> Mapping[str, Observed]:
        return dict(self.dynos)

    def observe_one(self, dyno_id: str) -> Observed | None:
        return self.dynos.get(dyno_id)

    async def start(self, spec: DynoSpec) -> None:
        self.calls.append(("start", spec.name))
        self.dynos[spec.id] = Observed(spec, True, False)

    async def resume(self, dyno_id: str) -> None:
        self.calls.append(("resume", dyno_id))

    async def remove(self, dyno_id: str) -> None:
        self.calls.append(("remove", self.dynos[dyno_id].spec.name))
        del self.dynos[dyno_id]


def controller(fleet: FakeFleet, supervisor: Any = None) -> standalone.FormationController:
    source = standalone.AppSource(Path("/srv/hello"), "hello", PROCFILE, {"GREETING": "hi"})
    formation = standalone.initial_formation(PROCFILE, [], DEFAULT_SIZES)
    return standalone.FormationController(source, formation, Engine(fleet), supervisor,
                                          DEFAULT_SIZES)


async def test_converge_starts_one_of_each_type_except_release() -> None:
    fleet = FakeFleet()
    ctrl = controller(fleet)
    report = await ctrl.converge()
    assert sorted(fleet.calls) == [("start", "web.1"), ("start", "worker.1")]
    assert report.started == ["hello-web-1", "hello-worker-1"]
    spec = fleet.dynos["hello-web-1"].spec
    assert spec.app == "hello" and spec.command == "python3 web.py"
    assert dict(spec.env) == {"GREETING": "hi"}
    assert spec.release.slug.path == "/srv/hello" and spec.release.stack == "host"
    fleet.calls.clear()
    await ctrl.converge()  # same formation again: nothing to do
    assert fleet.calls == []


async def test_scale_up_down_and_size() -> None:
    fleet = FakeFleet()
    ctrl = controller(fleet)
    await ctrl.converge()
    fleet.calls.clear()
    result = await ctrl.scale(None, ["web=3"])
    assert sorted(fleet.calls) == [("start", "web.2"), ("start", "web.3")]
    assert {"type": "web", "quantity": 3, "size": "standard-1x",
            "command": "python3 web.py"} in result["formation"]
    fleet.calls.clear()
    await ctrl.scale("hello", ["web=1,worker=0"])
    assert sorted(fleet.calls) == [("remove", "web.2"), ("remove", "web.3"),
                                   ("remove", "worker.1")]
    fleet.calls.clear()
    await ctrl.scale(None, ["web=1:Standard-2X"])
    assert fleet.calls == [("remove", "web.1"), ("start", "web.1")]
    assert fleet.dynos["hello-web-1"].spec.size.name == "standard-2x"


@pytest.mark.parametrize(("items", "error", "words"), [
    (["clock=1"], errors.BadRequest, "no process type 'clock'"),
    (["web=2", "clock=1"], errors.BadRequest, "no process type 'clock'"),
    (["web=2:huge"], errors.BadRequest, "unknown size 'huge'"),
    (["release=1"], errors.BadRequest, "not part of the formation"),
    (["web"], errors.BadRequest, "TYPE=QUANTITY"),
    ([], errors.BadRequest, "non-empty list"),
    ("web=2", errors.BadRequest, "non-empty list"),
])
async def test_scale_refusals_change_nothing(items: Any, error: type[Exception],
                                             words: str) -> None:
    fleet = FakeFleet()
    ctrl = controller(fleet)
    await ctrl.converge()
    before, generation = ctrl.describe(), ctrl.generation
    fleet.calls.clear()
    with pytest.raises(error, match=words):
        await ctrl.scale(None, items)
    assert fleet.calls == [] and ctrl.describe() == before and ctrl.generation == generation


async def test_scale_of_another_app_is_not_found() -> None:
    with pytest.raises(errors.NotFound, match="runs app hello, not other"):
        await controller(FakeFleet()).scale("other", ["web=1"])


def fake_dyno(app: str, name: str, state: DynoState = DynoState.UP,
              ip: str | None = "10.0.0.2") -> Any:
    spec = parse_spec({"id": f"{app}-{name.replace('.', '-')}", "app": app, "name": name,
                       "command": "x", "release": {"version": 1, "slug": {"path": "/s"}}})
    placement = SimpleNamespace(ip=ip) if ip else None
    return SimpleNamespace(spec=spec, state=state, placement=placement,
                           record=SimpleNamespace(desired="running"))


def test_formation_fleet_sees_only_the_apps_formation_dynos() -> None:
    dynos = [fake_dyno("hello", "web.1"), fake_dyno("hello", "run.4821"),
             fake_dyno("hello", "release.1", DynoState.COMPLETE), fake_dyno("other", "web.1")]
    supervisor = SimpleNamespace(config=Config(), dynos={d.spec.id: d for d in dynos})
    fleet = standalone.FormationFleet(supervisor, "hello")
    assert list(fleet.observe()) == ["hello-web-1"]


def test_web_backends_are_up_web_dynos_in_order() -> None:
    dynos = [fake_dyno("hello", "web.10", ip="10.0.0.10"),
             fake_dyno("hello", "web.2", ip="10.0.0.2"),
             fake_dyno("hello", "web.3", DynoState.STARTING, ip="10.0.0.3"),
             fake_dyno("hello", "worker.1", ip="10.0.0.4"),
             fake_dyno("other", "web.1", ip="10.0.0.5")]
    supervisor = SimpleNamespace(dynos={d.spec.id: d for d in dynos})
    ctrl = controller(FakeFleet(), supervisor)
    assert ctrl.web_backends() == [Backend("web.2", "10.0.0.2", 5000),
                                   Backend("web.10", "10.0.0.10", 5000)]


def test_initial_formation() -> None:
    default = standalone.initial_formation(PROCFILE, [], DEFAULT_SIZES)
    assert {k: (e.quantity, e.size) for k, e in default.items()} == {
        "web": (1, "standard-1x"), "worker": (1, "standard-1x")}
    chosen = standalone.initial_formation(PROCFILE, parse_formation_items(["web=2:eco"]),
                                          DEFAULT_SIZES)
    assert {k: (e.quantity, e.size) for k, e in chosen.items()} == {
        "web": (2, "eco"), "worker": (0, "standard-1x")}  # heroku local -m: unnamed types get 0
    with pytest.raises(AppDirError, match="unknown size"):
        standalone.initial_formation(PROCFILE, parse_formation_items(["web=1:nope"]),
                                     DEFAULT_SIZES)


def test_formation_dyno_ids_are_stable_and_valid() -> None:
    assert standalone.formation_dyno_id("hello", "web", 2) == "hello-web-2"
    assert standalone.formation_dyno_id("hello", "job_runner", 1) == "hello-job-runner-1"
    long_id = standalone.formation_dyno_id("a" * 30, "b" * 30, 123)
    assert long_id == standalone.formation_dyno_id("a" * 30, "b" * 30, 123)
    assert len(long_id) <= 64 and long_id.endswith("-123")
    assert long_id != standalone.formation_dyno_id("a" * 30, "c" * 30, 123)


def test_standalone_config_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(standalone, "DEFAULT_SOCKET", tmp_path / "absent.sock")
    config, defaults = standalone.standalone_config("hello")
    assert defaults
    assert config.run_dir == Path("/run/dynoagent-up/hello")
    assert config.state_dir == Path("/run/dynoagent-up/hello/state")
    assert config.cgroup_root == "dynoagent-up-hello"
    assert config.socket == tmp_path / "absent.sock"
    pool = ipaddress.IPv4Network(config.address_pool)
    assert pool.prefixlen == 20 and pool.subnet_of(ipaddress.IPv4Network("172.24.0.0/13"))
    assert not pool.overlaps(ipaddress.IPv4Network(Config().address_pool))
    other, _ = standalone.standalone_config("world")
    assert other.address_pool != config.address_pool and other.cgroup_root != config.cgroup_root
    base = Config(run_dir=tmp_path)
    assert standalone.standalone_config("hello", base) == (base, False)


def test_default_socket_taken_means_a_per_app_socket(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "s.sock"
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        live.bind(str(path))
        live.listen(1)
        monkeypatch.setattr(standalone, "DEFAULT_SOCKET", path)
        assert not standalone.socket_free(path)
        config, _ = standalone.standalone_config("hello")
        assert config.socket_path == Path("/run/dynoagent-up/hello/dynoagent.sock")
    finally:
        live.close()
    assert standalone.socket_free(path)  # a stale socket file: nobody answers
    assert standalone.socket_free(tmp_path / "none")


def test_log_printer_plain_and_coloured() -> None:
    at = datetime(2026, 11, 26, 10, 0, 1, tzinfo=UTC)
    out = io.StringIO()
    printer = standalone.LogPrinter(out, colour=False)
    printer.line(LogLine.output(at, "hello", "web.1", "listening"))
    printer.line(LogLine.agent(at, "hello", "worker.1", "State changed from starting to up"))
    printer.line(LogLine.agent(at, "hello", "web.1", "source=web.1 dyno=x sample#memory_rss=1MB"))
    stamp = at.astimezone().strftime("%H:%M:%S")
    assert out.getvalue().splitlines() == [
        f"{stamp} web.1  | listening",
        f"{stamp} worker.1 | State changed from starting to up"]
    coloured = standalone.LogPrinter(io.StringIO(), colour=True)
    web = coloured.format(at, "web.1", "a")
    worker = coloured.format(at, "worker.1", "b")
    assert web.startswith("\x1b[36m") and worker.startswith("\x1b[33m") and "\x1b[0m a" in web
    assert coloured.format(at, "web.1", "c").startswith("\x1b[36m")  # a dyno keeps its colour


# -- the router's listener ------------------------------------------------------------------

def test_taken_port_is_one_clear_error() -> None:
    taken = bind_listener("127.0.0.1", 0)
    try:
        port = taken.getsockname()[1]
        with pytest.raises(ProxyError) as caught:
            bind_listener("127.0.0.1", port)
        assert caught.value.errno == errno.EADDRINUSE
        assert str(caught.value) == (f"127.0.0.1:{port} is already in use; pick another port "
                                     "with --port")
    finally:
        taken.close()


# -- dynoctl scale and run against a served API -----------------------------------------------

class FormationBackend(FakeBackend):
    def __init__(self) -> None:
        super().__init__()
        self.formation = {"web": 1, "worker": 1}

    def get_formation(self, app: str | None = None) -> dict[str, Any]:
        return {"app": "hello", "formation": [
            {"type": k, "quantity": q, "size": "standard-1x", "command": k}
            for k, q in self.formation.items()]}

    async def scale(self, app: str | None, items: Any) -> dict[str, Any]:
        for item in items:
            kind, _, quantity = item.partition("=")
            if kind not in self.formation:
                raise errors.BadRequest(f"no process type {kind!r} in the Procfile")
            self.formation[kind] = int(quantity)
        return self.get_formation(app)


def test_scale_on_a_plain_agent_is_a_clear_error(
        short_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    server = ServedBackend(sample_backend(), str(short_dir / "api.sock"))
    server.start()
    try:
        code, out, err = run_ctl(server, "scale", "web=2", capsys=capsys)
    finally:
        server.stop()
    assert code == 1 and out == "Scaling dynos... failed\n"
    assert err.startswith("dynoctl: this agent has no formation of its own") and \
        err.count("\n") == 1


def test_scale_and_show_formation(short_dir: Path,  # noqa: F811
                                  capsys: pytest.CaptureFixture[str]) -> None:
    backend = FormationBackend()
    server = ServedBackend(backend, str(short_dir / "api.sock"))
    server.start()
    try:
        code, out, _ = run_ctl(server, "scale", "web=3", capsys=capsys)
        assert code == 0
        assert out == ("Scaling dynos... done, now running web at 3:Standard-1X, "
                       "worker at 1:Standard-1X\n")
        assert run_ctl(server, "scale", capsys=capsys)[1] == (
            "web=3:Standard-1X worker=1:Standard-1X\n")
        code, _, err = run_ctl(server, "scale", "clock=1", capsys=capsys)
        assert code == 1 and "no process type 'clock'" in err
        assert backend.formation == {"web": 3, "worker": 1}
    finally:
        server.stop()


def test_run_without_command_and_without_attach_socket(
        short_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    server = ServedBackend(sample_backend(), str(short_dir / "api.sock"))
    server.start()
    try:
        code, _, err = run_ctl(server, "run", "--", capsys=capsys)
        assert code == 1 and "no command given" in err
        code, _, err = run_ctl(server, "run", "--", "true", capsys=capsys)
        assert code == 1 and "no attach socket" in err
    finally:
        server.stop()


@pytest.mark.parametrize(("argv", "text"), [
    (["--", "python3 -V"], "python3 -V"),
    (["--", "sh", "-c", "exit 7"], "sh -c 'exit 7'"),
    (["echo", "a b"], "echo 'a b'"),
])
def test_run_command_text(argv: list[str], text: str) -> None:
    assert ctl._command_text(argv) == text
