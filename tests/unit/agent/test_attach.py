"""The attach socket's seams without the kernel: the stdio registry and how the runtime hands
a one-off's pipes or pty to its launch, the exits of entered commands, and what the attach
server asks of the supervisor (`Dynos`)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from agent import errors
from agent.api.attach import (
    AttachServer,
    Dynos,
    StdioRegistry,
    _ExitWatch,
    attach_path,
    one_off_env,
)
from agent.holder import ExitEvent, Launched, LaunchFailed
from agent.spec import DynoSpec, parse_spec
from agent.supervision.events import EventBus, EventFollower
from agent.supervision.records import Placement
from agent.supervision.runtime import DynoStartError, HostRuntime
from tests.unit.agent.fakes import Harness, make_harness


def fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@pytest.fixture
def three_fds() -> Iterator[tuple[int, int, int]]:
    fds = (os.open(os.devnull, os.O_RDONLY), *os.pipe())
    yield fds[0], fds[1], fds[2]
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def test_attach_path() -> None:
    assert attach_path(Path("/run/dynoagent/dynoagent.sock")) == Path(
        "/run/dynoagent/dynoagent.attach.sock")


async def test_stdio_registry_owns_pipes_until_taken(three_fds: tuple[int, int, int]) -> None:
    registry = StdioRegistry()
    registry.put_pipes("a", three_fds)
    assert "a" in registry
    taken = registry.take("a")
    assert taken is not None and taken.pipes == three_fds and "a" not in registry
    registry.put_pipes("b", three_fds)
    registry.discard("b")
    assert not any(fd_open(fd) for fd in three_fds)
    master = registry.put_tty("c", 30, 100)
    registry.discard("c")
    assert master.cancelled()


# -- the runtime's launch with the registry as its stdio source ---------------------------

def spec(dyno_id: str) -> DynoSpec:
    return parse_spec({"id": dyno_id, "app": "shop", "name": "run.1234", "command": "sh",
                       "release": {"version": 1, "slug": {"path": "/slug"}}})


PLACEMENT = Placement(cgroup="app-shop.slice/dyno-x.scope", netns="dyno-x",
                      netns_path="/run/netns/dyno-x", space="shop", ip="10.1.2.3", uid=1000,
                      gid=1000, slug_dir="/slug", dyno_dir="/run/dynos/x")


class FakeHolder:
    """The launches the runtime asks for; a pty's master is a real fd, as the holder's is."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any, Any]] = []
        self.masters: list[int] = []
        self.fail = False

    async def launch(self, request: Any, *, stdio: tuple[int, int, int] | None = None,
                     tty: tuple[int, int] | None = None) -> Launched:
        self.calls.append((request.dyno_id, stdio, tty))
        if self.fail:
            raise LaunchFailed("no such stack")
        master = None
        if tty is not None:
            master = os.open(os.devnull, os.O_RDONLY)
            self.masters.append(master)
        return Launched(1, 2, {}, os.open(os.devnull, os.O_RDONLY), master)


def host_runtime(holder: FakeHolder, registry: StdioRegistry, tmp_path: Path) -> HostRuntime:
    tree = SimpleNamespace(group=lambda rel: SimpleNamespace(procs_paths=lambda: ("/procs",)))
    return HostRuntime(tree=cast(Any, tree), network=cast(Any, None), uids=cast(Any, None),
                       slugs=cast(Any, None), holder=cast(Any, holder), state_dir=tmp_path,
                       run_dir=tmp_path, hide_paths=(),
                       slug_roots=cast(Any, SimpleNamespace(resolve=lambda path: path)),
                       stdio=registry)


async def test_the_launch_of_a_one_off_gets_its_sessions_pipes_and_pty(
        three_fds: tuple[int, int, int], tmp_path: Path) -> None:
    holder, registry = FakeHolder(), StdioRegistry()
    runtime = host_runtime(holder, registry, tmp_path)
    assert (await runtime.launch(spec("web-1"), PLACEMENT, {})).pid == 1
    registry.put_pipes("one-off", three_fds)
    await runtime.launch(spec("one-off"), PLACEMENT, {})
    assert holder.calls == [("web-1", None, None), ("one-off", three_fds, None)]
    assert not any(fd_open(fd) for fd in three_fds)  # the holder has its own copies
    master = registry.put_tty("tty-off", 30, 100)
    await runtime.launch(spec("tty-off"), PLACEMENT, {})
    assert holder.calls[-1] == ("tty-off", None, (30, 100))
    assert master.result() == holder.masters[0]  # the session's, not the runtime's
    os.close(holder.masters[0])
    # A session that has gone: the master is closed, not leaked.
    gone = registry.put_tty("tty-gone", 30, 100)
    gone.cancel()
    await runtime.launch(spec("tty-gone"), PLACEMENT, {})
    assert not fd_open(holder.masters[1])


async def test_a_failed_launch_closes_the_sessions_ends(three_fds: tuple[int, int, int],
                                                       tmp_path: Path) -> None:
    holder, registry = FakeHolder(), StdioRegistry()
    holder.fail = True
    runtime = host_runtime(holder, registry, tmp_path)
    registry.put_pipes("one-off", three_fds)
    master = registry.put_tty("tty-off", 30, 100)
    for dyno_id in ("one-off", "tty-off"):
        with pytest.raises(DynoStartError):
            await runtime.launch(spec(dyno_id), PLACEMENT, {})
    # Nothing will ever write to these: the session must see them closed, not wait on them.
    assert not any(fd_open(fd) for fd in three_fds)
    assert master.cancelled()
    assert "one-off" not in registry and "tty-off" not in registry


async def test_exit_watch_keeps_an_exit_that_came_before_the_waiter() -> None:
    watch = _ExitWatch()
    watch.on_event(ExitEvent("d1", "enter", 42, 7, None, 0.0))
    watch.on_event(ExitEvent("d1", "launch", 43, 1, None, 0.0))  # not an entered command
    assert (await watch.wait("d1", 42)) == 7
    waiter = watch.wait("d1", 44)
    assert not waiter.done()
    watch.on_event(ExitEvent("d1", "enter", 44, 137, 9, 0.0))  # the holder's status
    assert (await waiter) == 137
    assert not watch.wait("d1", 43).done()


# -- what the attach server asks of the supervisor ----------------------------------------

@pytest.fixture
async def h(tmp_path: Path) -> Any:
    harness = await make_harness(tmp_path)
    yield harness
    await harness.supervisor.detach_all()


async def test_the_supervisor_answers_what_attach_asks(h: Harness) -> None:
    dynos: Dynos = h.supervisor
    web = await h.create("web.1")
    await h.create("worker.1", app="blog")
    await h.state(web, "up")
    assert sorted(s.name for s in dynos.specs()) == ["web.1", "worker.1"]
    assert [s.name for s in dynos.specs("demo")] == ["web.1"]
    assert dynos.specs("nope") == []
    for ref in (web, "web.1"):
        found, placement = dynos.running(ref, "demo")
        assert (found.id, placement) == (web, h.supervisor.dynos[web].placement)
    with pytest.raises(errors.NotFound):
        dynos.running("web.1", "blog")
    await h.supervisor.stop_dyno(web)
    with pytest.raises(errors.Conflict, match="no running process"):
        dynos.running(web)


class FakeDynos:
    """`Dynos` over a list of specs."""

    def __init__(self, *specs: DynoSpec) -> None:
        self._specs = list(specs)
        self.bus = EventBus()

    def specs(self, app: str | None = None) -> list[DynoSpec]:
        return [s for s in self._specs if app is None or s.app == app]

    def running(self, ref: str, app: str | None = None) -> tuple[DynoSpec, Placement]:
        raise errors.NotFound(ref)

    def subscribe_events(self) -> EventFollower:
        return self.bus.subscribe()

    async def create_dyno(self, body: Any) -> dict[str, Any]:
        raise AssertionError("not in these tests")

    async def wait_ended(self, dyno_id: str, follower: EventFollower) -> int:
        raise AssertionError("not in these tests")

    async def delete_dyno(self, ref: str, app: str | None = None) -> None:
        raise AssertionError("not in these tests")


def named(app: str, name: str) -> DynoSpec:
    return parse_spec({"id": f"{app}-{name.replace('.', '-')}", "app": app, "name": name,
                       "command": "x", "release": {"version": 1, "slug": {"path": "/slug"}}})


def test_a_one_off_takes_the_release_of_a_formation_dyno_of_its_app() -> None:
    dynos = FakeDynos(named("shop", "run.1001"), named("shop", "worker.1"),
                      named("shop", "web.1"), named("blog", "web.1"))
    server = AttachServer(dynos, cast(Any, None), cast(Any, None), StdioRegistry(), None)
    assert server._template("shop").id == "shop-web-1"
    with pytest.raises(errors.BadRequest, match="blog, shop"):
        server._template(None)
    with pytest.raises(errors.NotFound):
        server._template("nope")
    assert AttachServer(FakeDynos(named("blog", "web.1")), cast(Any, None), cast(Any, None),
                        StdioRegistry(), None)._template(None).app == "blog"
    assert server._one_off_name("shop") != "run.1001"


async def test_removing_a_one_off_that_is_gone_is_quiet() -> None:
    class Gone(FakeDynos):
        async def delete_dyno(self, ref: str, app: str | None = None) -> None:
            raise errors.NotFound(ref)

    server = AttachServer(Gone(), cast(Any, None), cast(Any, None), StdioRegistry(), None)
    await asyncio.wait_for(server._remove("d1"), 5)


def test_a_one_offs_config_vars_override_the_apps_and_the_terminals() -> None:
    template = parse_spec({"id": "shop-web-1", "app": "shop", "name": "web.1", "command": "x",
                           "env": {"GREETING": "hi", "KEEP": "k"},
                           "release": {"version": 1, "slug": {"path": "/slug"}}})
    request = {"env": {"TERM": "xterm", "NOT_TERMINAL": "dropped"},
               "config_vars": {"GREETING": "over", "TERM": "dumb", "NEW": ""}}
    assert one_off_env(template, request) == {"GREETING": "over", "KEEP": "k", "TERM": "dumb",
                                              "NEW": ""}
    assert one_off_env(template, {}) == {"GREETING": "hi", "KEEP": "k"}
    for bad, words in [([["A", "1"]], "must be an object"), ({"1A": "x"}, "must match"),
                       ({"A": 1}, "must be a string"), ({"A": "a\x00"}, "without NUL")]:
        with pytest.raises(errors.BadRequest, match=words):
            one_off_env(template, {"config_vars": bad})


async def test_a_signal_before_the_agent_knows_the_one_off_runs_goes_once_it_does() -> None:
    # Before its fix: a caller's Ctrl-C that came while the agent had not yet heard back from
    # the holder (the command had already written its first line) was dropped; the command
    # never got it and `dynoctl run` waited for ever.
    placement = cast(Any, "the-placement")
    known: list[bool] = [False]

    class Starting(FakeDynos):
        def running(self, ref: str, app: str | None = None) -> tuple[DynoSpec, Placement]:
            if not known[0]:
                raise errors.Conflict(f"{ref} has no running process to enter")
            return named("shop", "run.1"), placement

    signalled: list[tuple[Any, signal.Signals]] = []

    class Processes:
        def signal_all(self, where: Any, sig: signal.Signals) -> int:
            signalled.append((where, sig))
            return 1

    server = AttachServer(Starting(), cast(Any, Processes()), cast(Any, None), StdioRegistry(),
                          None)
    task = asyncio.ensure_future(server._signal_once_running("d1", signal.SIGINT))
    await asyncio.sleep(0.05)
    assert signalled == []
    known[0] = True
    await asyncio.wait_for(task, 5)
    assert signalled == [(placement, signal.SIGINT)]
