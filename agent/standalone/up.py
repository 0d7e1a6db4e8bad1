"""Standalone mode (`dynoagent up DIR`): the embedded local controller that feeds a Procfile's
formation through the convergence engine, runs the release first, publishes web dynos through
the router, prints logs like `heroku local`, and stops everything on Ctrl-C."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import os
import shutil
import socket
import sys
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from agent import errors
from agent.builds import Builder, BuildRequest, NothingDetected
from agent.config import Config
from agent.daemon.service import Daemon, Step
from agent.observability.logs import Follower, LogLine, LogSource
from agent.sizes import DEFAULT_SIZE, Size
from agent.spec import DEFAULT_PORT, HOST_STACK, ID, ONE_SHOT_TYPES
from agent.standalone.build import local_builder
from agent.standalone.procfile import (
    AppDirError,
    FormationItem,
    ProcessType,
    Procfile,
    check_types,
    load_env_file,
    load_procfile,
    parse_formation_items,
)
from agent.standalone.proxy import Backend, Router
from agent.supervision.reconcile import Engine, Observed, Report, SupervisorFleet
from agent.supervision.states import DynoState
from agent.unixsocket import live_peer

STANDALONE_RUN_BASE = Path("/run/dynoagent-up")
DEFAULT_SOCKET = Path("/run/dynoagent/dynoagent.sock")
# Each app gets a /20 (16 spaces) of 172.24.0.0/13, which a default agent (172.20.0.0/14)
# never uses, so `dynoagent up` works next to an installed agent.
STANDALONE_POOL = ipaddress.IPv4Network("172.24.0.0/13")
STANDALONE_APP_PREFIX = 20
# Short cool-offs: on a developer's machine a crash should come back while they watch.
STANDALONE_RESTART_SCHEDULE_S = (5.0, 10.0, 20.0, 40.0)
RELEASE_VERSION = 1
# heroku local's palette, in the order it hands colours out.
COLOURS = (36, 33, 32, 35, 31, 34, 96, 93, 92, 95, 91, 94)
SYSTEM = "system"
ROUTER = "router"  # the dyno name of router lines, like Heroku's `heroku[router]`


@dataclass(frozen=True)
class AppSource:
    """An app directory as `up` reads it; `directory` is absolute (it is the slug). `env`
    is the config vars as first read from `env_path` (None: from nowhere, as in tests)."""

    directory: Path
    app: str
    procfile: Procfile
    env: Mapping[str, str]
    env_path: Path | None = None
    env_required: bool = False
    # Config vars the build's buildpacks gave (bin/release): under the app's own.
    release_env: Mapping[str, str] = field(default_factory=dict)

    def read_env(self) -> Mapping[str, str]:
        """The config vars as the file has them now (blocks: run it on a thread)."""
        if self.env_path is None:
            return {**self.release_env, **self.env}
        return {**self.release_env, **load_env_file(self.env_path, self.env_required)}


@dataclass
class FormationEntry:
    quantity: int
    size: str = DEFAULT_SIZE


def initial_formation(procfile: Procfile, items: list[FormationItem],
                      sizes: Mapping[str, Size]) -> dict[str, FormationEntry]:
    """One dyno of every type, or (with --formation) exactly what the items name, like
    `heroku local -m`: types not named get none."""
    check_types(items, procfile)
    if not items:
        return {name: FormationEntry(q) for name, q in procfile.default_formation().items()}
    formation = {name: FormationEntry(0) for name in procfile.default_formation()}
    for item in items:
        formation[item.type] = FormationEntry(item.quantity, _size(item, sizes))
    return formation


def _size(item: FormationItem, sizes: Mapping[str, Size]) -> str:
    if item.size is None:
        return DEFAULT_SIZE
    name = item.size.lower()
    if name not in sizes:
        raise AppDirError(f"unknown size {errors.excerpt(item.size)} for {item.type}; known sizes: "
                          f"{', '.join(sizes)}", value=item.size)
    return name


def built_procfile(slug_dir: Path, process_types: Mapping[str, str]) -> Procfile:
    """The built app's Procfile, with the types only the buildpacks named (bin/release's
    default_process_types) added: the app's own Procfile wins, as on Heroku."""
    own = load_procfile(slug_dir) if (slug_dir / "Procfile").is_file() else Procfile(())
    extra = tuple(ProcessType(name, command, 0) for name, command in process_types.items()
                  if own.command(name) is None)
    return Procfile(own.types + extra)


def formation_dyno_id(app: str, kind: str, number: int) -> str:
    """Stable ids, so converging twice is a no-op: `<app>-<type>-<n>`, hashed when too long."""
    candidate = f"{app}-{kind.replace('_', '-')}-{number}"
    if ID.fullmatch(candidate):
        return candidate
    digest = hashlib.sha256(f"{app}\0{kind}".encode()).hexdigest()[:12]
    return f"{app[:30]}-{digest}-{number}"


def standalone_config(app: str, base: Config | None = None) -> tuple[Config, bool]:
    """The agent configuration of `up`: `base` (from --config) as it is, else private
    directories, cgroup root, firewall table and address pool for this app, and the default
    operator socket when no other agent holds it. The flag says whether defaults were made."""
    if base is not None:
        return base, False
    run_dir = STANDALONE_RUN_BASE / app
    index = int.from_bytes(hashlib.sha256(app.encode()).digest()[:4], "big")
    blocks = 2 ** (STANDALONE_APP_PREFIX - STANDALONE_POOL.prefixlen)
    block_size = 2 ** (32 - STANDALONE_APP_PREFIX)
    first = int(STANDALONE_POOL.network_address) + (index % blocks) * block_size
    pool = ipaddress.IPv4Network((first, STANDALONE_APP_PREFIX))
    socket_path = DEFAULT_SOCKET if socket_free(DEFAULT_SOCKET) else run_dir / "dynoagent.sock"
    return replace(Config(), state_dir=run_dir / "state", run_dir=run_dir, socket=socket_path,
                   cgroup_root=f"dynoagent-up-{app}", address_pool=str(pool),
                   restart_schedule_s=STANDALONE_RESTART_SCHEDULE_S, log_level="warning"), True


def socket_free(path: Path) -> bool:
    """Nobody answers on `path` (no file, or a stale socket left by a dead agent)."""
    try:
        return live_peer(path) is None
    except OSError:
        return False


class FormationFleet(SupervisorFleet):
    """The supervisor as the standalone engine sees it: the app's formation dynos only, so
    that converging the formation never touches one-off (`run`) or release dynos."""

    def __init__(self, supervisor: Any, app: str) -> None:
        super().__init__(supervisor)
        self.app = app

    def observe(self) -> dict[str, Observed]:
        return {dyno_id: seen for dyno_id, seen in super().observe().items()
                if self._formations(seen)}

    def observe_one(self, dyno_id: str) -> Observed | None:
        seen = super().observe_one(dyno_id)
        return seen if seen is not None and self._formations(seen) else None

    def _formations(self, seen: Observed) -> bool:
        return seen.spec.app == self.app and seen.spec.type not in ONE_SHOT_TYPES


class FormationController:
    """The local source of desired state: the formation of one app, changed by `scale`.
    It is the `agent.api.formation.Formation` that standalone mode hands the daemon."""

    def __init__(self, source: AppSource, formation: dict[str, FormationEntry], engine: Engine,
                 supervisor: Any, sizes: Mapping[str, Size], stack: str = HOST_STACK) -> None:
        self.source = source
        self.stack = stack
        self.formation = formation
        self.engine = engine
        self.supervisor = supervisor
        self.sizes = sizes
        # The config vars dynos (re)start with: .env is read again on every restart and scale.
        self.env: dict[str, str] = dict(source.env)
        self.generation = 0
        self._lock = asyncio.Lock()

    @property
    def app(self) -> str:
        return self.source.app

    def release(self) -> dict[str, Any]:
        return {"version": RELEASE_VERSION, "slug": {"path": str(self.source.directory)},
                "stack": self.stack}

    def body(self, kind: str, number: int, command: str, size: str) -> dict[str, Any]:
        return {"id": formation_dyno_id(self.app, kind, number), "app": self.app,
                "name": f"{kind}.{number}", "command": command, "env": dict(self.env),
                "release": self.release(), "size": size}

    def desired(self) -> list[dict[str, Any]]:
        bodies: list[dict[str, Any]] = []
        for kind, entry in self.formation.items():
            command = self.source.procfile.command(kind)
            assert command is not None
            bodies.extend(self.body(kind, n, command, entry.size)
                          for n in range(1, entry.quantity + 1))
        return bodies

    async def converge(self) -> Report:
        async with self._lock:
            self.generation += 1
            return await self.engine.apply(self.generation, self.desired())

    def web_backends(self) -> list[Backend]:
        """Web dynos that are `up`, in name order (the router rotates over them)."""
        dynos = [d for d in self.supervisor.dynos.values()
                 if d.spec.app == self.app and d.spec.is_web and d.state is DynoState.UP
                 and d.placement is not None]
        dynos.sort(key=lambda d: int(d.spec.name.rpartition(".")[2]))
        return [Backend(d.spec.name, d.placement.ip, DEFAULT_PORT) for d in dynos]

    def _check_app(self, app: str | None) -> None:
        if app is not None and app != self.app:
            raise errors.NotFound(f"this agent runs app {self.app}, not {app}")

    def describe(self, app: str | None = None) -> dict[str, Any]:
        self._check_app(app)
        return {"app": self.app, "generation": self.generation, "formation": [
            {"type": kind, "quantity": entry.quantity, "size": entry.size,
             "command": self.source.procfile.command(kind)}
            for kind, entry in self.formation.items()]}

    async def scale(self, app: str | None, items: Any) -> dict[str, Any]:
        """Apply `TYPE=N[:SIZE]` items; all are checked before anything changes."""
        self._check_app(app)
        if not isinstance(items, list) or not items or not all(isinstance(i, str) for i in items):
            raise errors.BadRequest('formation must be a non-empty list of "TYPE=N[:SIZE]"')
        try:
            parsed = parse_formation_items(items)
            check_types(parsed, self.source.procfile)
            changes = {item.type: FormationEntry(
                item.quantity, _size(item, self.sizes) if item.size is not None
                else self.formation.get(item.type, FormationEntry(0)).size) for item in parsed}
        except AppDirError as exc:
            raise errors.BadRequest(exc.message) from None
        async with self._lock:
            await self._read_env()
            self.formation.update(changes)
            self.generation += 1
            report = await self.engine.apply(self.generation, self.desired())
        result = self.describe()
        result["report"] = report.as_dict()
        if report.failed:
            first = report.failed[0]
            raise errors.AgentError(f"scaling left {len(report.failed)} dyno(s) unchanged; "
                                    f"{first.id}: {first.message}")
        return result

    async def restart(self, ref: str, app: str | None = None) -> dict[str, Any]:
        """`dynoctl restart`: .env is read again first, and a formation dyno whose config vars
        it changed starts with the new ones (replaced: stopped, then created anew under its
        id); any other dyno restarts as it is."""
        spec = self.supervisor.find(ref, app).spec
        if spec.app != self.app or spec.is_one_shot:
            return dict(await self.supervisor.restart_dyno(ref, app))
        async with self._lock:
            await self._read_env()
            if dict(spec.env) == self.env:
                return dict(await self.supervisor.restart_dyno(ref, app))
            number = int(spec.name.rpartition(".")[2])
            body = self.body(spec.type, number, spec.command, spec.size.name)
            await self.supervisor.delete_dyno(spec.id)
            await self.engine.start(body)
        return dict(self.supervisor.find(spec.id).status())

    async def _read_env(self) -> None:
        try:
            self.env = dict(await asyncio.to_thread(self.source.read_env))
        except AppDirError as exc:
            raise errors.BadRequest(f"{exc} (nothing was changed)") from None


PRINT_BATCH_LINES = 1000


class LogPrinter:
    """`HH:MM:SS web.1 | text` lines, a colour per dyno when writing to a terminal."""

    def __init__(self, out: TextIO, colour: bool) -> None:
        self.out = out
        self.colour = colour
        self._colours: dict[str, int] = {}
        self._width = len(SYSTEM)

    def format(self, at: datetime, dyno: str, text: str) -> str:
        self._width = max(self._width, len(dyno))
        stamp = at.astimezone().strftime("%H:%M:%S")
        label = f"{stamp} {dyno:<{self._width}} |"
        if not self.colour:
            return f"{label} {text}"
        code = self._colours.setdefault(dyno, COLOURS[len(self._colours) % len(COLOURS)])
        return f"\x1b[{code}m{label}\x1b[0m {text}"

    def render(self, line: LogLine) -> str | None:
        # Runtime-metric samples are for drains and `dynoctl logs`; on a terminal they
        # would drown the app's own output every 20 s.
        if line.source is LogSource.AGENT and line.text.startswith("source="):
            return None
        return self.format(line.at, line.dyno, line.text)

    def line(self, line: LogLine) -> None:
        text = self.render(line)
        if text is not None:
            self.write(text)

    def system(self, text: str) -> None:
        self.write(self.format(datetime.now().astimezone(), SYSTEM, text))

    def write(self, text: str) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.out.write(text + "\n")
            self.out.flush()

    async def follow(self, follower: Follower) -> None:
        """Print in batches, each written on a worker thread: a terminal that does not read
        (`dynoagent up | less`, Ctrl-S) then stalls only the printing, never the agent; the
        follower meanwhile keeps a bounded backlog and reports what it had to drop (L10)."""
        async for line in follower:
            batch = [line]
            while len(batch) < PRINT_BATCH_LINES and (more := follower.get_nowait()) is not None:
                batch.append(more)
            texts = [text for text in map(self.render, batch) if text is not None]
            if texts:
                await asyncio.to_thread(self.write, "\n".join(texts))

    def drain(self, follower: Follower) -> None:
        while (more := follower.get_nowait()) is not None:
            self.line(more)


@dataclass
class UpOptions:
    source: AppSource
    formation: dict[str, FormationEntry]
    listener: socket.socket
    out: TextIO = field(default_factory=lambda: sys.stdout)
    colour: bool = False
    remove_run_dir: bool = False
    stack: str = HOST_STACK  # `--stack NAME`: installed in the agent's <state_dir>/stacks
    # Build the directory first (None: --no-build, run it as is).
    build: UpBuild | None = None
    # --formation as given: applied again to the Procfile the build leaves.
    items: list[FormationItem] = field(default_factory=list)


@dataclass(frozen=True)
class UpBuild:
    buildpacks: tuple[str, ...] = ()
    # Where slugs and build caches outlive the run (None: the agent's own state dir).
    cache_base: Path | None = None


class StandaloneDaemon(Daemon):
    """The daemon with a formation of its own: an extra last step runs the local controller,
    and its shutdown half stops every dyno so the agent exits with nothing left behind."""

    def __init__(self, config: Config, options: UpOptions) -> None:
        super().__init__(config, None)
        self.warn_host_stack = False  # the banner says it, once, on the terminal
        self.options = options
        self.printer = LogPrinter(options.out, options.colour)
        self.exit_code: int | None = None
        self.proxy: Router | None = None
        self._main: asyncio.Task[None] | None = None
        self._forced_event = asyncio.Event()

    @property
    def app(self) -> str:
        return self.options.source.app

    def request_stop(self, signame: str) -> None:
        first = not self._stop.is_set()
        super().request_stop(signame)
        if first:
            self.printer.system(f"{signame}: stopping all dynos (again to force)")
        elif not self._forced_event.is_set():
            self._forced_event.set()

    def steps(self) -> list[Step]:
        return [*super().steps(), Step("standalone", self._standalone)]

    @contextlib.asynccontextmanager
    async def _coordinator(self) -> AsyncIterator[None]:
        """Standalone has no coordinator: the engine converges the Procfile's formation, and
        its desired set is not persisted (the Procfile is the source of truth)."""
        assert self.supervisor is not None
        self.engine = Engine(FormationFleet(self.supervisor, self.app))
        yield

    @contextlib.asynccontextmanager
    async def _standalone(self) -> AsyncIterator[None]:
        assert self.supervisor is not None and self.engine is not None
        supervisor = self.supervisor
        follower = self.hub.subscribe(self.app)
        printer_task = asyncio.create_task(self.printer.follow(follower), name="up-printer")
        controller = FormationController(self.options.source, self.options.formation,
                                         self.engine, supervisor, self.config.sizes,
                                         self.options.stack)
        proxy = Router(self.options.listener, controller.web_backends, self._router_line)
        try:
            await proxy.start()
            self.proxy = proxy
            self.formation = controller
            self._banner(controller, proxy)
            self._main = asyncio.create_task(self._build_release_formation(controller),
                                             name="up-main")
            yield
        finally:
            self.formation = None
            await self._cancel_main()
            await proxy.close()
            await self._stop_all()  # normally done already, by before_shutdown
            self.printer.drain(follower)
            follower.close()
            await asyncio.gather(printer_task, return_exceptions=True)

    def _router_line(self, text: str) -> None:
        """Router lines join the app's log like platform messages: on the terminal as
        `router | at=info …`, and in `dynoctl logs` as `agent[router]: at=info …`."""
        self.hub.publish(LogLine.agent(datetime.now(UTC), self.app, ROUTER, text))

    def _banner(self, controller: FormationController, proxy: Router) -> None:
        source = self.options.source
        counts = ", ".join(f"{k}={e.quantity}" for k, e in controller.formation.items())
        host, port = proxy.address
        say = self.printer.system
        say(f"app {source.app} from {source.directory} (formation {counts or 'empty'})")
        socket_note = "" if self.config.socket_path == DEFAULT_SOCKET else (
            f" (export DYNOAGENT_SOCKET={self.config.socket_path})")
        say(f"operator socket {self.config.socket_path}{socket_note}")
        if self.options.stack == HOST_STACK:
            say("stack host: dynos see this machine's own files (for development only)")
        else:
            say(f"stack {self.options.stack}")
        if "web" in controller.formation:
            say(f"web dynos on http://{host}:{port}")
        say("Ctrl-C stops everything")

    def make_builder(self, supervisor: Any, runtime: Any) -> Builder:
        build = self.options.build
        if build is None or build.cache_base is None:
            return super().make_builder(supervisor, runtime)
        return local_builder(supervisor, runtime, self.config, self.app, build.cache_base)

    async def _build_release_formation(self, controller: FormationController) -> None:
        if self.options.build is not None and not await self._build(controller,
                                                                    self.options.build):
            return
        if not controller.source.procfile.types:
            self.printer.system(f"{controller.source.directory} has no Procfile and no "
                                "buildpack named process types: nothing to run")
            self.exit_code = 1
            self.request_stop("nothing to run")
            return
        await self._release_then_formation(controller)

    async def _build(self, controller: FormationController, build: UpBuild) -> bool:
        """Build the app directory (or find it built) and make the slug the app's source;
        False when the build failed (then `up` stops)."""
        assert self.builder is not None
        source = controller.source
        try:
            env = await asyncio.to_thread(source.read_env)
            result = await self.builder.build(BuildRequest(
                app=self.app, source=source.directory, buildpacks=build.buildpacks,
                env=env, stack=self.options.stack))
        except NothingDetected as exc:
            if build.buildpacks:
                return self._build_failed(exc.message)
            self.printer.system("no buildpack detected this app: running the directory as it "
                                "is (--no-build skips the detection)")
            return True
        except (errors.AgentError, OSError) as exc:
            return self._build_failed(getattr(exc, "message", str(exc)))
        try:
            procfile = await asyncio.to_thread(built_procfile, result.slug_dir,
                                               result.process_types)
            formation = initial_formation(procfile, self.options.items, self.config.sizes)
        except AppDirError as exc:
            return self._build_failed(str(exc))
        controller.source = replace(source, directory=result.slug_dir, procfile=procfile,
                                    release_env=dict(result.config_vars))
        controller.env = dict(await asyncio.to_thread(controller.source.read_env))
        if procfile != source.procfile:
            controller.formation = formation
        counts = ", ".join(f"{k}={e.quantity}" for k, e in controller.formation.items())
        self.printer.system(f"running slug {result.sha256[:12]} (formation {counts or 'empty'})")
        return True

    def _build_failed(self, message: str) -> bool:
        self.printer.system(f"build failed: {message}")
        self.exit_code = 1
        self.request_stop("build failed")
        return False

    async def _release_then_formation(self, controller: FormationController) -> None:
        release = controller.source.procfile.release
        if release is not None:
            status = await self._run_release(controller, release)
            if status != 0:
                self.printer.system(f"release.1 failed with status {status}; not starting the "
                                    "formation")
                self.exit_code = status
                self.request_stop("release failed")
                return
        report = await controller.converge()
        for failure in report.failed:
            self.printer.system(f"could not {failure.action} {failure.id}: {failure.message}")

    async def _run_release(self, controller: FormationController, command: str) -> int:
        assert self.supervisor is not None
        body = controller.body("release", 1, command, DEFAULT_SIZE)
        body["id"] = formation_dyno_id(self.app, "release", RELEASE_VERSION)
        body["restart"] = "never"
        with self.bus.subscribe() as events:
            try:
                await self.supervisor.create_dyno(body)
            except errors.AgentError as exc:
                self.printer.system(f"cannot start release.1: {exc.message}")
                return 1
            try:
                return await self.supervisor.wait_ended(body["id"], events)
            finally:
                with contextlib.suppress(errors.AgentError):
                    await self.supervisor.delete_dyno(body["id"])

    async def before_shutdown(self) -> None:
        # The holder's events still flow now; once the daemon's tasks are cancelled no dyno
        # would learn that its process exited.
        await self._cancel_main()
        if self.proxy is not None:
            await self.proxy.close()
        await self._stop_all()

    async def _cancel_main(self) -> None:
        if self._main is not None:
            self._main.cancel()
            await asyncio.gather(self._main, return_exceptions=True)

    async def _stop_all(self) -> None:
        """Every dyno stopped gracefully (SIGTERM, then SIGKILL after its stop timeout), or
        at once after a second Ctrl-C."""
        supervisor = self.supervisor
        if supervisor is None or not supervisor.dynos:
            return
        stopping = asyncio.ensure_future(supervisor.stop_all())
        forced = asyncio.ensure_future(self._forced_event.wait())
        try:
            await asyncio.wait([stopping, forced], return_when=asyncio.FIRST_COMPLETED)
            if not stopping.done():
                self.printer.system("forcing: SIGKILL to every dyno")
                for dyno in list(supervisor.dynos.values()):
                    if dyno.placement is not None:
                        with contextlib.suppress(Exception):
                            supervisor.runtime.kill(dyno.placement)
                await stopping
        finally:
            forced.cancel()
            await asyncio.gather(forced, return_exceptions=True)

    async def run(self) -> int:
        code = await super().run()
        if self.options.remove_run_dir and self.idle_at_exit:
            # Defaults of `up` live under /run/dynoagent-up/<app>; once idle, nothing there
            # is needed by anyone (the holder is gone too).
            await asyncio.to_thread(shutil.rmtree, self.config.run_dir, True)
            with contextlib.suppress(OSError):
                os.rmdir(STANDALONE_RUN_BASE)
        return self.exit_code if self.exit_code is not None else code
