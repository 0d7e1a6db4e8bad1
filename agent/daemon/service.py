"""The daemon's lifecycle: ordered start-up with deadlines, the serving loop, reverse shutdown.

Signal handlers only set flags: the first SIGTERM/SIGINT starts a graceful shutdown, a second
one forces it (shorter deadlines, no waiting for dynos); SIGHUP reloads what can be reloaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import hashlib
import ipaddress
import logging
import os
import shutil
import signal
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

import cgroups
import netns
from agent import __version__, journal
from agent import config as config_mod
from agent.api.attach import AttachServer, StdioRegistry, attach_path
from agent.api.formation import Formation
from agent.api.server import HTTP_LAYER_LOG, build_app
from agent.builds import Builder
from agent.builds.service import Builds
from agent.config import Config
from agent.coordinator.appdrains import FILE_NAME as APP_DRAINS_FILE
from agent.coordinator.appdrains import AppDrains
from agent.coordinator.link import CoordinatorLink
from agent.coordinator.logfeed import LogFeed
from agent.coordinator.payloads import dyno_metrics, hello_payload, network_payload
from agent.coordinator.requests import Requests
from agent.coordinator.spaces import SpaceSync
from agent.daemon import dynoscope
from agent.daemon import sdnotify as notify
from agent.daemon.spacenames import SpaceNames
from agent.discovery import SpaceResolver
from agent.drains.manager import DrainManager
from agent.errors import AgentError, ConfigError, Conflict, NotReady
from agent.holder import ConnectionLost, HolderClient, HolderError
from agent.launcher import UidAllocationError, UidAllocator
from agent.observability.logs import LogHub
from agent.observability.logtail import SWEEP_INTERVAL_S, TailStore
from agent.peercred import group_id
from agent.slugs.roots import SlugRoots
from agent.slugs.store import SlugStore
from agent.spec import BUILD_TYPE
from agent.supervision.events import EventBus, EventFollower
from agent.supervision.reconcile import DesiredStore, Engine, SupervisorFleet
from agent.supervision.records import RecordStore, RecordWriter
from agent.supervision.runtime import HostRuntime
from agent.supervision.states import StateChange
from agent.supervision.supervisor import Supervisor
from agent.tasks import OwnedTasks
from agent.unixsocket import UnixListener, listen, live_peer

log = logging.getLogger(__name__)

START_STEP_TIMEOUT_S = 30.0
STOP_STEP_TIMEOUT_S = 60.0
FORCED_STOP_STEP_TIMEOUT_S = 3.0
# Generous: a slow (emulated) host has been seen to need more than 10 s.
HOLDER_START_TIMEOUT_S = 30.0
UNPLACE_AT_EXIT_S = 30.0


class StartupError(Exception):
    """A start-up step failed; the message is meant for the operator's terminal."""


@dataclass(frozen=True)
class Step:
    """One start-up step: an async context manager whose exit is the matching shutdown step."""

    name: str
    run: Callable[[], contextlib.AbstractAsyncContextManager[None]]
    start_timeout_s: float = START_STEP_TIMEOUT_S


def instance_names(config: Config) -> tuple[str, str]:
    """Link prefix and nft table: the defaults for the default agent, else derived from the
    cgroup root so that agents side by side never touch each other's links or tables."""
    if config.cgroup_root == config_mod.Config().cgroup_root:
        return "dy", "dynoagent"
    digest = hashlib.sha256(config.cgroup_root.encode()).hexdigest()
    return f"d{digest[:2]}", f"dynoagent_{digest[:8]}"


def hidden_paths(config: Config, config_path: Path | None) -> tuple[str, ...]:
    """What a dyno on the host stack (the host's own root, read-only) must not see: this
    agent's state, run dir, sockets, config and coordinator secrets, and whatever any agent on
    the host keeps in the default places (config.HOST_WIDE_PATHS), such as /run/netns.

    Symlinks are resolved here, on the host, so the mask covers the directory itself; a path
    inside another hidden one is left out (the outer mask already hides it, and the inner
    path no longer exists under it).
    """
    candidates = [config.state_dir, config.run_dir, config.socket_path,
                  attach_path(config.socket_path), *config_mod.HOST_WIDE_PATHS]
    candidates += [path for path in (config_path, config.coordinator_token_file,
                                     config.coordinator_client_key_file,
                                     config.coordinator_client_cert_file) if path is not None]
    resolved = sorted({os.path.realpath(path) for path in candidates})
    return tuple(path for path in resolved
                 if not any(path.startswith(other.rstrip("/") + "/") for other in resolved))


def _read_or_create_agent_id(state_dir: Path) -> str:
    path = state_dir / "agent-id"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        agent_id = uuid.uuid4().hex
        tmp = path.with_suffix(".tmp")
        tmp.write_text(agent_id + "\n")
        os.replace(tmp, path)
        return agent_id


@functools.cache
def _boot_id() -> str:
    # Read once: it names the boot, and `info` answers every poll of the operator API.
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


class Daemon:
    """Owns the agent's process-wide resources and their order of creation and release."""

    def __init__(self, config: Config, config_path: Path | None) -> None:
        self.config = config
        self.config_path = config_path
        self.started_at = time.time()
        self.state = "starting"
        self.agent_id = ""
        self.cgroup_mode = "unknown"
        self._socket_gid: int | None = None
        self._stop = asyncio.Event()
        self._forced = False
        self._reload_requested = asyncio.Event()
        self._tasks = OwnedTasks()
        self.hub = LogHub()
        self.bus = EventBus()
        self.drains: DrainManager | None = None  # log drains (agent/drains)
        self.app_drains: AppDrains | None = None  # the coordinator's drains (drains.sync)
        self.tree: cgroups.Tree | None = None
        self.network: netns.HostNetwork | None = None
        self.space_names: SpaceNames | None = None
        self.holder: HolderClient | None = None
        # Under systemd (pure v2): the scope the holder and the dynos live in (dynoscope).
        self.scope: dynoscope.ScopePlan | None = None
        # A holder being started again after the last one was lost: a shutdown meanwhile
        # waits for it, so that the holder it started is ended too, not left behind.
        self._holder_starting: asyncio.Future[HolderClient] | None = None
        # The holder step owns `holder` (closes it at the end); before, the cgroups step does.
        self._holder_taken = False
        self.supervisor: Supervisor | None = None
        # The supervisor's runtime, as built here: a reconnect hands it the new holder.
        self.runtime: HostRuntime | None = None
        # Builds of slugs in build dynos (`POST /v1/builds`, `build.start`, `dynoagent build`).
        self.builder: Builder | None = None
        # The builds others asked for (operator API, coordinator), run through `builder`.
        self.builds: Builds | None = None
        self.engine: Engine | None = None
        self.coordinator: CoordinatorLink | None = None
        # Set at shutdown when no dyno is left: then the agent also removes what it shares
        # between dynos (holder, cgroup root, firewall table), leaving nothing behind.
        self.idle_at_exit = False
        # `dynoctl run`/`exec`: caller fds waiting for their one-off's launch, and whoever
        # else wants the holder's events (exits of entered commands).
        self.stdio = StdioRegistry()
        self.holder_listeners: list[Callable[[object], None]] = []
        # Set by standalone mode (`dynoagent up`): the formation that `dynoctl scale` changes.
        self.formation: Formation | None = None
        # Log that the `host` stack is for development only (standalone mode prints its own
        # line on the terminal instead).
        self.warn_host_stack = True

    # -- what the operator API reads -------------------------------------------------------
    @property
    def socket_gid(self) -> int | None:
        return self._socket_gid

    def info(self) -> dict[str, Any]:
        return {
            "version": __version__,
            "agent_id": self.agent_id,
            "host": socket.gethostname(),
            "boot_id": _boot_id(),
            "pid": os.getpid(),
            "state": self.state,
            "started_at": self.started_at,
            "uptime_s": round(time.time() - self.started_at, 3),
            "cgroup_mode": self.cgroup_mode,
            "capacity": {
                "cpus": os.cpu_count() or 1,
                "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
            },
            "coordinator": self._coordinator_info(),
            "dynos": (self.supervisor.counts() if self.supervisor is not None
                      else {"total": 0, "by_state": {}}),
            "socket": str(self.config.socket_path),
            "attach_socket": str(attach_path(self.config.socket_path)),
        }

    def _coordinator_info(self) -> dict[str, Any]:
        link: dict[str, Any] = (
            self.coordinator.info() if self.coordinator is not None
            else {"state": "disabled" if self.config.coordinator_url is None
                  else "disconnected",
                  "url": self.config.coordinator_url[0] if self.config.coordinator_url else None})
        link["generation"] = self.engine.generation if self.engine is not None else None
        return link

    # -- signals ---------------------------------------------------------------------------
    def request_stop(self, signame: str) -> None:
        if self._stop.is_set():
            if not self._forced:
                log.warning("second %s: forcing shutdown", signame)
                self._forced = True
            return
        log.info("%s: shutting down gracefully (send it again to force)", signame)
        self._stop.set()

    def _install_signal_handlers(self, loop: asyncio.AbstractEventLoop) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, sig.name)
        loop.add_signal_handler(signal.SIGHUP, self._reload_requested.set)

    async def _reload_loop(self) -> None:
        while True:
            await self._reload_requested.wait()
            self._reload_requested.clear()
            self.reload()

    def reload(self) -> None:
        with notify.reloading_done():
            try:
                new = config_mod.load(self.config_path)
            except ConfigError as exc:
                log.error("reload refused, keeping the running configuration: %s", exc)
                return
            self.config, ignored = config_mod.reload_changes(self.config, new)
            journal.set_level(self.config.log_level)
            if self.supervisor is not None:
                self.supervisor.reconfigure(self.config)
            if ignored:
                log.warning("reload: these keys need a restart and were not applied: %s",
                            ", ".join(ignored))
            log.info("configuration reloaded")

    # -- start-up steps ----------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def _directories(self) -> AsyncIterator[None]:
        for path, mode in ((self.config.state_dir, 0o700), (self.config.run_dir, 0o755),
                           (self.config.socket_path.parent, 0o755)):
            try:
                path.mkdir(mode=mode, parents=True, exist_ok=True)
            except OSError as exc:
                raise StartupError(f"cannot create {path}: {exc.strerror}") from None
        self.agent_id = _read_or_create_agent_id(self.config.state_dir)
        try:
            # Each app's log tail survives the agent (a SIGKILL included): loaded before any
            # line is published, so `logs -n` shows what came before.
            self.hub.keep_on_disk(TailStore(self.config.state_dir / "logs"))
        except OSError as exc:
            raise StartupError(f"cannot keep log tails in {self.config.state_dir / 'logs'}: "
                               f"{exc.strerror}") from None
        yield

    @contextlib.asynccontextmanager
    async def _instance_lock(self) -> AsyncIterator[None]:
        """One agent per socket and per run dir (where its holder lives): flocks held for the
        agent's life. Two agents sharing a holder would steal each other's dyno events."""
        socket_lock = self.config.socket_path.with_name(self.config.socket_path.name + ".lock")
        fds: list[int] = []
        try:
            for lock_path, what in ((socket_lock, str(self.config.socket_path)),
                                    (self.config.run_dir / "agent.lock",
                                     f"run dir {self.config.run_dir}")):
                fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
                fds.append(fd)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                    raise StartupError(f"another dynoagent (pid {owner}) is already serving "
                                       f"{what}; refusing to start") from None
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            yield
        finally:
            for fd in fds:
                os.close(fd)

    @contextlib.asynccontextmanager
    async def _cgroups(self) -> AsyncIterator[None]:
        try:
            layout = cgroups.detect(root_name=self.config.cgroup_root)
        except cgroups.CgroupError as exc:
            raise StartupError(f"cgroups: {exc}") from None
        self.scope = dynoscope.systemd_mode(layout)
        try:
            if self.scope is not None:
                # The unit's own cgroup keeps no controllers (systemd could not attach the
                # next main process to it): holder and dynos go into a scope of their own,
                # so the holder starts here, before any controller is enabled.
                tree = await self._enter_scope(self.scope)
            else:
                tree = cgroups.Tree(layout)
                if layout.delegated:
                    tree.enter_agent_leaf()
            tree.ensure()
        except cgroups.CgroupError as exc:
            self._close_early_holder()
            raise StartupError(f"cgroups: {exc}") from None
        except BaseException:
            self._close_early_holder()
            raise
        self.cgroup_mode = tree.layout.mode.value
        self.tree = tree
        try:
            yield
            if self.idle_at_exit:
                with contextlib.suppress(cgroups.CgroupError):
                    tree.destroy()
        finally:
            self._close_early_holder()

    async def _enter_scope(self, plan: dynoscope.ScopePlan) -> cgroups.Tree:
        """Start (or find) the holder and put it into the dynos' scope; the tree rooted there."""
        self.holder = await self._connect_holder()
        layout = cgroups.detect(root_name=self.config.cgroup_root, root=plan.cgroup)
        tree = cgroups.Tree(layout)
        await self._place_holder(tree, plan)
        if not tree.layout.delegated:
            # Judged once the scope exists: systemd marks a delegated cgroup (trusted.delegate).
            tree = cgroups.Tree(cgroups.detect(root_name=self.config.cgroup_root,
                                               root=plan.cgroup))
        if not tree.layout.delegated:
            log.warning("%s is not marked delegated (systemd < 251?); using it anyway",
                        plan.cgroup)
            tree = cgroups.Tree(cgroups.detect(root_name=self.config.cgroup_root,
                                               root=plan.cgroup,
                                               delegation_check=lambda path: True))
        return tree

    async def _place_holder(self, tree: cgroups.Tree, plan: dynoscope.ScopePlan) -> None:
        assert self.holder is not None
        try:
            pid = int((await self.holder.ping())["pid"])
            action = await asyncio.to_thread(dynoscope.place_holder, tree, plan, pid)
        except HolderError as exc:
            raise StartupError(f"dyno holder: {exc}") from None
        except dynoscope.ScopeError as exc:
            raise StartupError(f"dyno scope: {exc}") from None
        log.info("dyno holder (pid %d) in %s (%s)", pid, plan.holder_leaf, action.value)

    def _close_early_holder(self) -> None:
        # A holder client the cgroups step connected that the holder step has not taken over.
        if self.holder is not None and not self._holder_taken:
            self.holder.close()
            self.holder = None

    async def _connect_holder(self) -> HolderClient:
        socket_path = str(self.config.run_dir / "holder.sock")
        state_dir = str(self.config.state_dir / "holder")
        try:
            return await HolderClient.ensure_running(socket_path, state_dir,
                                                     timeout_s=HOLDER_START_TIMEOUT_S)
        except HolderError as exc:
            raise StartupError(f"dyno holder: {exc}") from None

    @contextlib.asynccontextmanager
    async def _network(self) -> AsyncIterator[None]:
        prefix, table = instance_names(self.config)
        try:
            network = netns.HostNetwork(netns.HostNetworkConfig(
                state_dir=self.config.state_dir / "network",
                pool=ipaddress.IPv4Network(self.config.address_pool),
                link_prefix=prefix, table=table))
        except netns.NetnsError as exc:
            raise StartupError(f"network: {exc}") from None
        self.network = network
        try:
            yield
            if self.idle_at_exit:
                await asyncio.to_thread(network.sweep, (), ())
        finally:
            # Otherwise links, namespaces and rules stay: the dynos that use them keep running.
            await asyncio.to_thread(network.close)

    @contextlib.asynccontextmanager
    async def _holder(self) -> AsyncIterator[None]:
        # Under systemd the cgroups step has connected it already (to place it).
        if self.holder is None:
            self.holder = await self._connect_holder()
        self._holder_taken = True
        try:
            await self.holder.subscribe()
        except HolderError as exc:
            self.holder.close()
            raise StartupError(f"dyno holder: {exc}") from None
        try:
            yield
            if self.idle_at_exit:
                await self._stop_holder()
        finally:
            self.holder.close()

    async def _stop_holder(self) -> None:
        """The holder holds no dyno: end it (SIGTERM, by the pid it reports) and wait."""
        starting = self._holder_starting
        if starting is not None:
            try:
                async with asyncio.timeout(HOLDER_START_TIMEOUT_S):
                    started = await starting
            except (HolderError, TimeoutError):
                pass
            else:
                assert self.holder is not None
                self.holder.close()
                self.holder = started
        assert self.holder is not None
        try:
            pid = int((await self.holder.ping())["pid"])
            if (await self.holder.list_processes()):
                return
        except HolderError:
            return
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGTERM)
            exited: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            # A pidfd becomes readable when the process exits (Linux 5.3).
            def on_exit() -> None:
                if not exited.done():
                    exited.set_result(None)

            asyncio.get_running_loop().add_reader(pidfd, on_exit)
            try:
                async with asyncio.timeout(5.0):
                    await exited
            except TimeoutError:
                log.warning("the dyno holder (pid %d) did not exit after SIGTERM", pid)
            finally:
                asyncio.get_running_loop().remove_reader(pidfd)
        except ProcessLookupError:
            pass
        finally:
            os.close(pidfd)

    async def _pump_holder_events(self) -> None:
        """Forward the holder's output and exit events; reconnect if the connection drops."""
        assert self.supervisor is not None
        backoff_s = 0.1
        while True:
            holder = self.holder
            assert holder is not None
            try:
                async for event in holder.events():
                    self.supervisor.on_holder_event(event)
                    for listener in self.holder_listeners:
                        listener(event)
                    backoff_s = 0.1
            except ConnectionLost as exc:
                log.warning("lost the dyno holder (%s); reconnecting", exc)
            await asyncio.sleep(backoff_s)
            backoff_s = min(backoff_s * 2, 5.0)
            try:
                holder.close()
                # Shielded: a shutdown that cancels this task still gets the holder it
                # started (`_stop_holder`).
                starting = asyncio.ensure_future(HolderClient.ensure_running(
                    holder.socket_path, str(self.config.state_dir / "holder"),
                    timeout_s=HOLDER_START_TIMEOUT_S))
                self._holder_starting = starting
                try:
                    self.holder = await asyncio.shield(starting)
                finally:
                    if starting.done():
                        self._holder_starting = None
                if self.scope is not None and self.tree is not None:
                    await self._replace_holder(self.tree, self.scope)
                await self.holder.subscribe()
                # A holder that died took its dynos' exit statuses with it: whatever it no
                # longer holds is handled as lost with it (restarted at once, no crash).
                self.supervisor.resync(await self.holder.list_processes())
                # Only now may dynos launch through the new holder: a launch before the list
                # above would be a process the resync does not know, and ended as a stray.
                if self.runtime is not None:
                    self.runtime.holder = self.holder
                self.supervisor.holder_gate.back()
            except HolderError as exc:
                log.error("cannot reach the dyno holder: %s", exc)

    async def _replace_holder(self, tree: cgroups.Tree, plan: dynoscope.ScopePlan) -> None:
        """A holder started again goes into the dynos' scope too (made again if it went away
        with the last dyno, then with its controllers)."""
        try:
            await self._place_holder(tree, plan)
            await asyncio.to_thread(tree.ensure)
        except (StartupError, cgroups.CgroupError) as exc:
            log.error("the dyno holder stays outside %s: %s", plan.cgroup, exc)

    @contextlib.asynccontextmanager
    async def _log_drains(self) -> AsyncIterator[None]:
        """Log drains take lines from the hub before the supervisor publishes any (so a
        restored dyno's first lines reach them too); an app's drains are those its dynos'
        specs name and those the coordinator set (`drains.sync`, kept on disk), looked up
        when its first line comes, at each state change and at each sync that changes them."""
        coordinator_drains = AppDrains(self.config.state_dir / APP_DRAINS_FILE)
        self.app_drains = coordinator_drains

        def app_drains(app: str) -> list[str] | None:
            supervisor = self.supervisor
            if supervisor is None:
                return None
            return coordinator_drains.merged(
                app, [url for spec in supervisor.specs(app) for url in spec.log_drains])

        drains = DrainManager(self.config.state_dir / "drains", self.config.log_drains,
                              app_drains, ca_file=self.config.log_drains_ca_file)
        await drains.start(self.hub)
        self.drains = drains
        coordinator_drains.on_change = drains.refresh
        events = self.bus.subscribe()

        async def follow_changes() -> None:
            async for change in events:
                app = getattr(change, "app", None)
                if app is None:
                    drains.refresh_all()  # changes were lost: look at every app again
                else:
                    drains.refresh(app)

        self._tasks.spawn(follow_changes(), "drains-refresh")
        try:
            yield
        finally:
            events.close()
            await drains.aclose()

    async def _sweep_log_tails(self) -> None:
        """The log tails of apps gone from this host are kept a while, then removed (see
        agent.observability.logtail); an app with a dyno here, even an unparsable record, keeps
        its tail."""
        while True:
            supervisor = self.supervisor
            if supervisor is not None:
                live = {dyno.spec.app for dyno in supervisor.dynos.values()}
                live |= {record.app for record in supervisor.unparsed}
                try:
                    gone = self.hub.sweep_tails(live, time.time())
                except OSError as exc:
                    log.error("cannot sweep the log tails: %s", exc)
                    gone = []
                for app in gone:
                    log.info("removed the log tail of app %s (no dyno here for a while)", app)
            await asyncio.sleep(SWEEP_INTERVAL_S)

    async def _release(self, dyno_id: str, pid: int) -> None:
        if self.holder is not None:
            with contextlib.suppress(HolderError):
                await self.holder.release(dyno_id, pid)

    @contextlib.asynccontextmanager
    async def _supervisor(self) -> AsyncIterator[None]:
        assert self.tree is not None and self.network is not None and self.holder is not None
        config = self.config
        try:
            uids = UidAllocator(str(config.state_dir), quarantine_s=config.uid_quarantine_s)
        except UidAllocationError as exc:
            raise StartupError(f"uids: {exc}") from None
        slugs = SlugStore(config.state_dir / "slugs")
        runtime = HostRuntime(
            stdio=self.stdio, tree=self.tree, network=self.network,
            uids=uids, slugs=slugs,
            holder=self.holder, state_dir=config.state_dir, run_dir=config.run_dir,
            hide_paths=hidden_paths(config, self.config_path),
            slug_roots=SlugRoots.from_config(config))
        records = RecordStore(config.state_dir)
        try:
            # Before any dyno is restored: a restored dyno launches with its record's uid.
            moved_uids = await asyncio.to_thread(
                lambda: runtime.keep_uids(list(records.load_all())))
        except UidAllocationError as exc:
            await slugs.aclose()
            raise StartupError(f"uids: {exc}") from None
        supervisor = Supervisor(config, runtime, records, self.hub,
                                self.bus, release=self._release,
                                sample_interval_s=config.sample_interval_s,
                                record_writer=RecordWriter(records))
        supervisor.warn_host_stack = self.warn_host_stack
        # DNS for the spaces' dynos: bound on a space's gateway before its first launch.
        names = SpaceNames(SpaceResolver(), self.network, supervisor)
        await names.resolver.start()
        runtime.space_ready = names.space_ready
        supervisor.state_listeners.append(names.on_state)
        self.space_names = names
        # With the pidfds of the running dynos' PID 1s: the runtime holds them from now on.
        held = await self.holder.list_processes(pidfds=True)
        runtime.adopt_processes(held)
        self.supervisor = supervisor
        self.runtime = runtime
        self.builder = self.make_builder(supervisor, runtime)
        swept = await asyncio.to_thread(self.builder.sweep)
        if swept:
            log.warning("removed %d build workspaces left by an agent that stopped mid-build",
                        len(swept))
        # Restored dynos resume at once, but none places itself before the sweep is over.
        runtime.hold_placements()
        try:
            restored = supervisor.restore(held, moved_uids)
            await self._sweep(restored)
        finally:
            runtime.release_placements()
        await names.start()
        self._tasks.spawn(self._pump_holder_events(), "holder-events")
        # Build dynos of an agent that died mid-build: nobody waits for their slug any more.
        orphans = [d.id for d in supervisor.dynos.values() if d.spec.type == BUILD_TYPE]
        if orphans:
            log.warning("removing %d build dynos of builds that ended with the last agent",
                        len(orphans))
            self._tasks.spawn(self._remove_dynos(orphans), "orphan-builds")
        self._tasks.spawn(self._sweep_log_tails(), "log-tails")
        try:
            yield
        finally:
            await supervisor.detach_all()
            # Deleted dynos' cgroups and directories still being freed: finished before the
            # agent goes (the sweep at the next start would, but a host left idle should be
            # clean now).
            try:
                async with asyncio.timeout(UNPLACE_AT_EXIT_S):
                    await runtime.unplaced()
            except TimeoutError:
                log.warning("deleted dynos' cgroups still being freed after %gs; the next "
                            "start sweeps what is left", UNPLACE_AT_EXIT_S)
            await slugs.aclose()
            supervisor.state_listeners.remove(names.on_state)
            await names.close()
            self.idle_at_exit = not supervisor.dynos

    async def _remove_dynos(self, ids: list[str]) -> None:
        assert self.supervisor is not None
        for dyno_id in ids:
            with contextlib.suppress(AgentError):
                await self.supervisor.delete_dyno(dyno_id)

    @contextlib.asynccontextmanager
    async def _builds(self) -> AsyncIterator[None]:
        """The registry of requested builds. The agent cancels its running builds as it
        begins to stop (`_cancel_builds`); closing it here again covers a start-up that
        failed after this step."""
        assert self.builder is not None and self.runtime is not None
        builds = Builds(self.builder, self.runtime.slug_roots, self.runtime.slugs)
        self.builds = builds
        try:
            yield
        finally:
            await builds.close()

    def make_builder(self, supervisor: Supervisor, runtime: HostRuntime) -> Builder:
        """Slugs built here go under the first slug root (`<state_dir>/slugs` by default),
        so a release can name them; build caches and fetched buildpacks under state_dir."""
        state = self.config.state_dir
        return Builder(supervisor, runtime,
                       store=self.config.effective_slug_roots[0] / "builds",
                       caches=state / "build-cache", work=self.config.run_dir / "builds",
                       buildpack_cache=state / "buildpacks")

    async def _sweep(self, live_ids: list[str]) -> None:
        """Remove kernel objects of dynos that no record owns (killed mid-creation, say)."""
        assert self.supervisor is not None and self.tree is not None
        assert self.network is not None
        dynos = self.supervisor.dynos
        placements = [d.placement for d in dynos.values() if d.placement]
        placements += [r.placement for r in self.supervisor.unparsed if r.placement]
        live_cgroups = {p.cgroup for p in placements}
        # Listed before the first await: a restored dyno may place itself meanwhile.
        stale_dirs = _stale_dyno_dirs(self.config.run_dir / "dynos",
                                      {Path(p.dyno_dir).name for p in placements})
        for rel in self.tree.list_groups(suffix=".scope"):
            if rel not in live_cgroups:
                log.warning("sweeping cgroup %s: no dyno record owns it", rel)
                group = self.tree.group(rel)
                with contextlib.suppress(cgroups.CgroupError):
                    await group.destroy(timeout_s=5)
        self.tree.sweep_empty(keep=lambda rel: any(c.startswith(rel) for c in live_cgroups))
        await asyncio.to_thread(_remove_dirs, stale_dirs)
        live_ns = {p.netns for p in placements}
        live_spaces = {p.space for p in placements}
        report = await asyncio.to_thread(self.network.sweep, live_spaces, live_ns)
        log.info("sweep done: %s", report)

    @contextlib.asynccontextmanager
    async def _coordinator(self) -> AsyncIterator[None]:
        """The convergence engine, and the link to the coordinator when one is configured.
        The persisted desired set is loaded but not acted on (static stability)."""
        supervisor = self.supervisor
        assert supervisor is not None
        engine = Engine(SupervisorFleet(supervisor), DesiredStore(self.config.state_dir))
        self.engine = engine
        url = self.config.coordinator_url
        if url is None:
            yield
            return

        network = self.network
        assert network is not None

        def underlay() -> str | None:
            return self.config.overlay_address or link.local_address

        def hello() -> dict[str, Any]:
            spaces.new_connection()
            return hello_payload(self.info(), supervisor.list_dynos(), engine.generation,
                                 supervisor.draining,
                                 network=network_payload(network, underlay()))

        def heartbeat() -> dict[str, Any]:
            return {"dynos": supervisor.counts(), "generation": engine.generation,
                    "draining": supervisor.draining}

        logs = LogFeed(self.hub)
        spaces = SpaceSync(network, underlay, self.space_names)
        link = CoordinatorLink(
            url, Requests(supervisor, engine, self.info, builds=self.builds, logs=logs,
                          spaces=spaces.handle,
                          drains=self.app_drains.handle if self.app_drains is not None
                          else None).handle,
            hello, lambda: dyno_metrics(supervisor), heartbeat=heartbeat,
            connection_scope=logs.connection,
            token_file=self.config.coordinator_token_file,
            ca_file=self.config.coordinator_ca_file,
            client_cert_file=self.config.coordinator_client_cert_file,
            client_key_file=self.config.coordinator_client_key_file)
        def publish_state(change: StateChange) -> None:
            dyno = supervisor.dynos.get(change.id)
            placement = dyno.record.placement if dyno is not None else None
            link.publish_state(change, ip=placement.ip if placement is not None else None)

        supervisor.state_listeners.append(publish_state)
        if self.builds is not None:
            self.builds.listeners.append(link.publish_build)
        self.coordinator = link
        link.start()
        try:
            yield
        finally:
            supervisor.state_listeners.remove(publish_state)
            if self.builds is not None:
                self.builds.listeners.remove(link.publish_build)
            await link.close()

    def _bind_socket(self) -> UnixListener:
        path = self.config.socket_path
        try:
            cred = live_peer(path)
        except OSError as exc:
            raise StartupError(f"cannot probe {path}: {exc.strerror}") from None
        if cred is not None:
            raise StartupError(f"{path} is in use by pid {cred.pid}; refusing to start")
        if path.exists() or path.is_symlink():
            log.info("removing stale socket %s", path)
        self._socket_gid = group_id(self.config.socket_group)
        try:
            return listen(path, mode=0o660, gid=self._socket_gid, backlog=128)
        except OSError as exc:
            raise StartupError(f"cannot bind {path}: {exc.strerror}") from None

    @contextlib.asynccontextmanager
    async def _operator_socket(self) -> AsyncIterator[None]:
        listener = self._bind_socket()
        runner = web.AppRunner(build_app(Operator(self)), handle_signals=False, access_log=None,
                               shutdown_timeout=2.0, logger=HTTP_LAYER_LOG)
        try:
            await runner.setup()
            await web.SockSite(runner, listener.sock).start()
            yield
        finally:
            await runner.cleanup()
            listener.unlink()

    @contextlib.asynccontextmanager
    async def _attach_socket(self) -> AsyncIterator[None]:
        assert self.supervisor is not None and self.runtime is not None

        def holder() -> HolderClient:
            assert self.holder is not None
            return self.holder

        server = AttachServer(self.supervisor, self.runtime, holder, self.stdio,
                              self._socket_gid)
        self.holder_listeners.append(server.on_holder_event)
        try:
            async with contextlib.AsyncExitStack() as stack:
                try:
                    await stack.enter_async_context(
                        server.serving(attach_path(self.config.socket_path)))
                except OSError as exc:
                    raise StartupError(f"cannot bind {attach_path(self.config.socket_path)}: "
                                       f"{exc.strerror}") from None
                yield
        finally:
            self.holder_listeners.remove(server.on_holder_event)

    def steps(self) -> list[Step]:
        return [
            Step("directories", self._directories),
            Step("instance lock", self._instance_lock),
            # Under systemd the cgroups step starts the holder (dynoscope).
            Step("cgroups", self._cgroups, START_STEP_TIMEOUT_S + HOLDER_START_TIMEOUT_S),
            Step("network", self._network),
            Step("dyno holder", self._holder, START_STEP_TIMEOUT_S + HOLDER_START_TIMEOUT_S),
            Step("log drains", self._log_drains),
            Step("supervisor", self._supervisor),
            Step("builds", self._builds),
            Step("coordinator", self._coordinator),
            Step("operator socket", self._operator_socket),
            Step("attach socket", self._attach_socket),
        ]

    # -- the whole life ----------------------------------------------------------------------
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._install_signal_handlers(loop)
        if self.warn_host_stack:
            log.warning("the host stack (the default when a spec names no release.stack) shows "
                        "dynos the host's own world-readable files: for development only; "
                        "give production dynos a named stack")
        async with contextlib.AsyncExitStack() as stack:
            for step in self.steps():
                notify.status(f"starting: {step.name}")
                started = time.monotonic()
                try:
                    await asyncio.wait_for(stack.enter_async_context(_StepGuard(self, step)),
                                           step.start_timeout_s)
                except TimeoutError:
                    raise StartupError(f"start-up step '{step.name}' did not finish within "
                                       f"{step.start_timeout_s:g}s") from None
                log.debug("started %s in %.1f ms", step.name,
                          (time.monotonic() - started) * 1000)
                if self._stop.is_set():
                    log.info("stop requested during start-up")
                    break
            else:
                self.state = "ready"
                self._tasks.spawn(self._reload_loop(), "reload")
                interval = notify.watchdog_interval_s()
                if interval is not None:
                    self._tasks.spawn(notify.watchdog_loop(interval), "watchdog")
                notify.ready(f"serving {self.config.socket_path}")
                log.info("dynoagent %s ready on %s", __version__, self.config.socket_path,
                         extra=journal.extra(cgroup_mode=self.cgroup_mode))
                await self._stop.wait()
            self.state = "stopping"
            notify.stopping("shutting down")
            await self._cancel_builds()
            await self.before_shutdown()
            await self._tasks.cancel_all()
        log.info("dynoagent stopped")
        return 0

    async def _cancel_builds(self) -> None:
        """Builds still running are cancelled while everything still works (the holder's
        events tell the supervisor that a build dyno has ended), so each build dyno is
        deleted and its workspace removed: a build does not outlive the agent."""
        if self.builds is None:
            return
        try:
            async with asyncio.timeout(self.stop_step_timeout_s):
                await self.builds.close()
        except TimeoutError:
            log.error("builds still running after %gs; the next start sweeps their "
                      "workspaces", self.stop_step_timeout_s)

    async def before_shutdown(self) -> None:
        """Runs while everything still works (holder events included), before any step is
        undone: standalone mode stops its dynos here. The daemon itself leaves them running."""

    @property
    def stop_step_timeout_s(self) -> float:
        return FORCED_STOP_STEP_TIMEOUT_S if self._forced else STOP_STEP_TIMEOUT_S


class _StepGuard(contextlib.AbstractAsyncContextManager[None]):
    """Runs a step's shutdown half under the daemon's current stop deadline."""

    def __init__(self, daemon: Daemon, step: Step) -> None:
        self._daemon = daemon
        self._step = step
        self._cm = step.run()

    async def __aenter__(self) -> None:
        await self._cm.__aenter__()

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        timeout = self._daemon.stop_step_timeout_s
        try:
            return await asyncio.wait_for(self._cm.__aexit__(*exc_info), timeout)
        except TimeoutError:
            log.error("shutdown step '%s' did not finish within %gs", self._step.name, timeout)
            return None


class Operator:
    """The operator API's view of the agent: the daemon's info, the supervisor's dynos."""

    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon

    @property
    def _sup(self) -> Supervisor:
        if self._daemon.supervisor is None:
            raise NotReady("the agent is still starting")
        return self._daemon.supervisor

    @property
    def socket_gid(self) -> int | None:
        return self._daemon.socket_gid

    @property
    def log_hub(self) -> LogHub:
        return self._daemon.hub

    def info(self) -> dict[str, Any]:
        return self._daemon.info()

    def list_dynos(self, app: str | None = None) -> list[dict[str, Any]]:
        return self._sup.list_dynos(app)

    def list_dynos_json(self, app: str | None = None) -> str:
        return self._sup.list_dynos_json(app)

    def get_dyno(self, ref: str, app: str | None = None) -> dict[str, Any]:
        return self._sup.get_dyno(ref, app)

    async def create_dyno(self, body: Any) -> dict[str, Any]:
        """Through the convergence engine, like the coordinator's `dyno.start`: one engine
        whatever the source, so the desired set it keeps includes what operators started."""
        engine = self._daemon.engine
        if engine is None or not isinstance(body, dict):
            return await self._sup.create_dyno(body)
        spec = await engine.start({"id": str(uuid.uuid4()), **body})
        return self._sup.find(spec.id).status()

    async def restart_dyno(self, ref: str, app: str | None = None) -> dict[str, Any]:
        if self._daemon.formation is not None:
            # Standalone mode: a restart picks up what was changed in the app's .env.
            return await self._daemon.formation.restart(ref, app)
        return await self._sup.restart_dyno(ref, app)

    async def stop_dyno(self, ref: str, app: str | None = None) -> dict[str, Any]:
        return await self._sup.stop_dyno(ref, app)

    async def signal_dyno(self, ref: str, signal: str, app: str | None = None) -> dict[str, Any]:
        return await self._sup.signal_dyno(ref, signal, app)

    async def delete_dyno(self, ref: str, app: str | None = None) -> None:
        await self._sup.delete_dyno(ref, app)

    def subscribe_events(self) -> EventFollower:
        return self._daemon.bus.subscribe()

    def _formation(self) -> Formation:
        if self._daemon.formation is None:
            raise Conflict("this agent runs no formation of its own: scale works in standalone "
                           "mode (dynoagent up); here the coordinator decides the formation")
        return self._daemon.formation

    def get_formation(self, app: str | None = None) -> dict[str, Any]:
        return self._formation().describe(app)

    async def scale(self, app: str | None, items: Any) -> dict[str, Any]:
        return await self._formation().scale(app, items)

    def metrics_text(self) -> str:
        names = self._daemon.space_names
        extra = [] if names is None else [names.metrics_family()]
        if self._daemon.drains is not None:
            extra += self._daemon.drains.metrics_families()
        return self._sup.metrics_text(extra)

    @property
    def _builds(self) -> Builds:
        if self._daemon.builds is None:
            raise NotReady("the agent is still starting")
        return self._daemon.builds

    async def start_build(self, body: Any) -> dict[str, Any]:
        return await self._builds.start(body)

    def get_build(self, build_id: str) -> dict[str, Any]:
        return self._builds.get(build_id)

    def list_builds(self, app: str | None = None) -> list[dict[str, Any]]:
        return self._builds.list(app)


def _stale_dyno_dirs(root: Path, live: set[str]) -> list[Path]:
    """The runtime directories of dynos no record places (a delete the agent answered,
    then died before freeing them)."""
    try:
        return [entry for entry in root.iterdir() if entry.name not in live]
    except FileNotFoundError:
        return []


def _remove_dirs(paths: list[Path]) -> None:
    for path in paths:
        log.warning("sweeping %s: no dyno record owns it", path)
        shutil.rmtree(path, ignore_errors=True)
