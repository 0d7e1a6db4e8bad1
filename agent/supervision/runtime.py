"""The host side of a dyno: placing it (cgroup, network namespace, address, user, slug),
launching it through the holder, signalling, sampling and removing it.

This is the only module of the supervisor that touches the kernel; `Dyno` and `Supervisor`
use it through the `Runtime` protocol so unit tests can run them on a fake.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import logging
import os
import resource
import shutil
import signal
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

import cgroups
import netns
from agent.holder import ConnectionLost, HeldProcess, HolderClient, HolderError, HolderTimeout
from agent.kernelnames import cgroup_rel, hostname, netns_name
from agent.launcher import LauncherError, LaunchRequest, UidAllocator
from agent.launcher.launch import proc_start_time
from agent.launcher.seccomp import process_mode as seccomp_process_mode
from agent.launcher.uids import forget_legacy_table
from agent.sizes import Size
from agent.slugs.roots import SlugPathRefused, SlugRoots
from agent.slugs.store import SlugError, SlugStore, stat_local
from agent.spec import BUILD_TYPE, HOST_STACK, DynoSpec, SlugSource
from agent.startup import command_argv
from agent.supervision.pidfds import Pidfds
from agent.supervision.records import Placement, Stored

log = logging.getLogger(__name__)
_T = TypeVar("_T")

REAPER = "/usr/bin/tini"
BOOT_PROBE_TIMEOUT_S = 0.5
# The placement's steps that run at the same time, in the order of their results (their
# timings overlap: a start waits for the slowest, not for their sum).
PLACED_AT_ONCE = ("uid", "dir", "cgroup", "netns")
# Threads that free dynos' cgroups, users and runtime dirs: enough to overlap the kernel's
# waits, few enough that a mass delete does not crowd the loop's thread out of the GIL.
TEARDOWN_THREADS = 4
# A pass over the host's uid registry reads and rewrites all of it (some 15 ms at 3,000 entries,
# the GIL held throughout; freed uids stay in it for their quarantine): a mass delete frees
# its uids in two passes a second, not one per dyno.
UID_RELEASE_INTERVAL_S = 0.5

# Dynos' sample files kept open (HostRuntime.sample) take at most this share of the agent's
# open-file limit (the systemd unit's 1,048,576: any number of dynos; a shell's 1,024: 73 of
# them), SAMPLE_FILES_MAX fds a dyno; the others' samples open, read and close each file.
SAMPLE_FDS_SHARE = 0.5
SAMPLE_FILES_MAX = 7


@dataclass(frozen=True)
class BuildMounts:
    """What a build dyno sees besides its stack: `app_dir` (a host directory) read-write at
    /app, and `binds` (source, name, writable) at /tmp/<name>. The trees in `owned` become
    the dyno user's just before its process starts (its uid is known only once placed)."""

    app_dir: str
    binds: tuple[tuple[str, str, bool], ...] = ()
    owned: tuple[str, ...] = ()


class DynoStartError(Exception):
    """Placing or launching a dyno failed; `line` is what the dyno's log should say."""

    def __init__(self, line: str) -> None:
        super().__init__(line)
        self.line = line


class HolderUnavailable(DynoStartError):
    """The launch never reached a holder: it died (or is being replaced). Not the app's doing:
    the dyno waits for the holder to be back and launches again, with no crash counted."""


@dataclass(frozen=True)
class Launch:
    pid: int
    start_time: int
    timings_ms: Mapping[str, float]


class Closable(Protocol):
    def close(self) -> None: ...


class LaunchStdio(Protocol):
    """The stdio of an attached one-off's launch (`dynoctl run`, agent.api.attach): pipe
    ends of its own, or the (rows, columns) of a pty the holder makes in the dyno."""

    @property
    def pipes(self) -> tuple[int, int, int] | None: ...

    @property
    def tty(self) -> tuple[int, int] | None: ...

    def deliver_pty(self, master: int) -> None:
        """The master of the pty made for the launch; owned by this from now on."""

    def close(self) -> None:
        """The launch is over: close what the holder did not take (it copies the pipes)."""


class StdioSource(Protocol):
    def take(self, dyno_id: str) -> LaunchStdio | None:
        """The stdio a caller waits to attach to this dyno's launch, or None (the holder
        keeps the output, as for every other dyno)."""


class Runtime(Protocol):
    async def place(self, spec: DynoSpec,
                    timings: dict[str, float] | None = None) -> Placement:
        """Create what the dyno needs; `timings` gets each phase's wall time (ms)."""

    async def launch(self, spec: DynoSpec, placement: Placement,
                     env: Mapping[str, str]) -> Launch: ...

    async def signal_all_async(self, placement: Placement, sig: signal.Signals) -> int:
        """Signal every process of the dyno, with the cgroup and /proc reads off the loop."""

    def kill(self, placement: Placement) -> None:
        """Start killing the dyno (never blocks); wait_empty says when it is done."""

    def emptied(self, placement: Placement) -> bool:
        """Whether the dyno's cgroup is empty and no kill of it is under way (one read of
        cgroup.events: cheap enough for the loop); else wait_empty says when it is."""

    async def populated_async(self, placement: Placement) -> bool: ...

    async def placement_intact_async(self, placement: Placement) -> bool:
        """Whether what `place` made for the dyno is all still there: after a reboot its
        namespace, runtime dir and cgroup are gone while its record names them."""

    async def wait_empty(self, placement: Placement, timeout_s: float) -> bool: ...

    def stats(self, placement: Placement) -> cgroups.Stats | None: ...

    async def stats_async(self, placement: Placement) -> cgroups.Stats | None: ...

    async def sample_async(self, placement: Placement) -> cgroups.Stats | None:
        """A periodic sample (`cgroups.Group.sample`: no limits, no pressure). None when the
        group is gone."""

    def counters(self, placement: Placement) -> cgroups.Stats | None:
        """The OOM-kill count and memory peak alone (`cgroups.Group.counters`): cheap
        enough for the loop; None when the group is gone."""

    def watch_oom_kills(self, placement: Placement,
                        on_kill: Callable[[int], None]) -> Closable | None: ...

    def watch_listens(self, placement: Placement,
                      on_listen: Callable[[int], None]) -> Closable | None:
        """Call `on_listen(port)` on the loop whenever a process of the dyno starts to listen
        on a TCP port, until closed; None when the kernel cannot tell (then only probes
        do)."""

    async def accepting(self, ip: str, port: int) -> bool: ...

    async def unplace(self, placement: Placement) -> None: ...

    def unplace_later(self, placement: Placement) -> None:
        """unplace() in the background: a deleted dyno is gone once its processes are and
        its record is; its kernel objects follow (a place of the same id waits for them,
        and the sweep at start removes what an agent killed meanwhile left)."""

    def pid_alive(self, pid: int, start_time: int) -> bool: ...

    def seccomp_mode(self, pid: int, start_time: int) -> int | None: ...


def dyno_limits(size: Size, mode: cgroups.Mode) -> cgroups.Limits:
    """The cgroup limits of a dyno of `size`. The kill point is the hard limit (memory.max,
    memory.limit_in_bytes): there the kernel OOM-kills, and that is R15.

    The quota is written only on hybrid, as the v1 soft limit (reclaimed first under host
    pressure; it never slows the dyno). On v2 its counterpart, memory.high, throttles every
    allocation above it, and with no swap to reclaim into, a dyno past its quota is held
    there (2 s per allocation once some 10 % over) and never reaches the kill point: no R15,
    a dyno that crawls. R14 is the agent's, from its samples, in both modes.
    """
    return cgroups.Limits(
        memory_high_bytes=size.memory_quota_bytes if mode is cgroups.Mode.HYBRID else None,
        memory_max_bytes=size.kill_at_bytes, swap_allowed=False,
        cpu_weight=size.cpu_weight, cpu_max_cpus=size.cpu_max_cpus, pids_max=size.pids_max)


def process_start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat: with the pid, the identity of a process across pid reuse."""
    try:
        return proc_start_time(pid)
    except OSError:
        return None


class HostRuntime:
    """Composes the cgroups and netns libraries, the uid allocator, the slug store and the
    holder into the operations the supervisor needs."""

    def __init__(self, *, tree: cgroups.Tree, network: netns.HostNetwork, uids: UidAllocator,
                 slugs: SlugStore, holder: HolderClient, state_dir: Path, run_dir: Path,
                 hide_paths: tuple[str, ...], slug_roots: SlugRoots,
                 stdio: StdioSource | None = None) -> None:
        self.tree = tree
        self.stdio = stdio
        self.slug_roots = slug_roots
        self.network = network
        self.uids = uids
        self.slugs = slugs
        self.holder = holder
        self.state_dir = state_dir
        self.run_dir = run_dir
        self.hide_paths = hide_paths
        # Called with a dyno's space before each launch: the space's resolver listens before
        # the dyno's first lookup, on the address returned (the dyno's nameserver), or None
        # (the dyno keeps the host's resolvers).
        self.space_ready: Callable[[str], Awaitable[str | None]] | None = None
        # Namespace deletions under way (30-45 ms in the kernel, off the critical path): a
        # dyno placed again under the same id waits for its old namespace to be gone.
        self._teardowns: dict[str, concurrent.futures.Future[None]] = {}
        # Closed (by the daemon) while its start-up sweep runs: see hold_placements.
        self._placements_open: asyncio.Event | None = None
        # Dynos being unplaced in the background (unplace_later), by id.
        self._unplacing: dict[str, asyncio.Future[None]] = {}
        self._uid_releasing: dict[str, asyncio.Future[None]] = {}
        self._teardown_pool = concurrent.futures.ThreadPoolExecutor(
            TEARDOWN_THREADS, thread_name_prefix="teardown")
        # One read and rewrite of the host's uid registry for all the dynos freed meanwhile,
        # not one per dyno: a mass delete would spend its threads' time (and the loop's
        # share of the GIL) re-encoding the registry.
        self._uid_releases = BatchedCalls(self.uids.release_many if uids is not None
                                          else _no_uids, self._teardown_pool,
                                          UID_RELEASE_INTERVAL_S)
        # Listens of web dynos while they boot; None once the kernel refused (no BPF), or
        # with DYNOAGENT_LISTEN_EVENTS=0 (probes only: how `make bench` compares the two).
        self._listens: cgroups.ListenWatch | None = (
            None if os.environ.get("DYNOAGENT_LISTEN_EVENTS") == "0" else cgroups.ListenWatch())
        # The control files of every dyno sampled, open from its first sample until it is
        # unplaced (by cgroup): a sample reads them again, with one pread(2) each.
        self._sample_files: dict[str, cgroups.SampleFiles] = {}
        # The fds they hold, and how many they may: a share of the open-file limit, the rest
        # left to what must not fail for want of an fd (launches, pidfds, watches, sockets).
        self._sample_fds = 0
        self._sample_fd_budget = _sample_fd_budget()
        # The pidfd of every running dyno's PID 1 (launched, or adopted at start).
        self.pidfds = Pidfds()
        # Cgroup kills under way on a thread (the freeze fallback may take seconds): a launch
        # into the same cgroup waits for them, or a late kill would end the new process.
        self._kills: dict[str, asyncio.Future[None]] = {}
        # Build dynos' mounts, by dyno id, registered by the builder before it creates one.
        self.builds: dict[str, BuildMounts] = {}

    def group(self, placement: Placement) -> cgroups.Group:
        return self.tree.group(placement.cgroup)

    def limits(self, spec: DynoSpec) -> cgroups.Limits:
        return dyno_limits(spec.size, self.tree.layout.mode)

    def _stack_dir(self, spec: DynoSpec) -> str:
        stack = spec.release.stack
        if stack == HOST_STACK:
            return "/"
        path = self.state_dir / "stacks" / stack
        if not path.is_dir():
            raise DynoStartError(f"Error: stack {stack!r} is not installed on this host "
                                f"({path} is missing)")
        return str(path)

    def _slug_source(self, spec: DynoSpec) -> SlugSource:
        """The release's slug, a local path checked again and resolved: the edge checked it
        when the spec arrived, but a record may predate the roots, and a symlink on the way
        may have changed since. The resolved path is what gets mounted."""
        source = spec.release.slug
        if source.path is None:
            return source
        try:
            return SlugSource(path=self.slug_roots.resolve(source.path))
        except SlugPathRefused as exc:
            raise DynoStartError(f"Error: slug refused: {exc}") from None

    def _slug_and_stack(self, spec: DynoSpec) -> tuple[SlugSource, os.stat_result | None]:
        """_slug_source(), the stat of a local slug (for SlugStore.resolve) and _stack_dir():
        what a start checks before the slug is resolved, in one trip to a thread (blocks)."""
        source = self._slug_source(spec)
        info = None if source.path is None else stat_local(source.path)
        self._stack_dir(spec)
        return source, info

    async def place(self, spec: DynoSpec,
                    timings: dict[str, float] | None = None) -> Placement:
        """Create everything the dyno needs before its process; undo it all on failure.

        Any failure is a DynoStartError: the dyno crashes with the reason in its log and is
        started again on Heroku's schedule, instead of sitting in `starting` while its
        supervision retries an error that may never go away (a refused name, say).

        `timings` (when given) gets the wall time of each phase in ms, in order: slug, uid,
        dir, cgroup, netns (what a start spends before its launch, for `dynoctl inspect`)."""
        try:
            return await self._place(spec, {} if timings is None else timings)
        except DynoStartError:
            raise
        except Exception as exc:
            log.error("placing dyno %s failed", spec.id, exc_info=exc)
            raise DynoStartError(f"Error: the dyno could not be placed: "
                                 f"{type(exc).__name__}: {exc}") from None

    def hold_placements(self) -> None:
        """No placement begins until `release_placements`. An agent starting up closes this
        while it sweeps what no record owns: a restored dyno whose last agent died while
        placing it would otherwise race the sweep, finding its namespace still there (and
        crashing), or having the one it just made swept."""
        self._placements_open = asyncio.Event()

    def release_placements(self) -> None:
        if self._placements_open is not None:
            self._placements_open.set()
            self._placements_open = None

    async def _place(self, spec: DynoSpec, timings: dict[str, float]) -> Placement:
        mark = time.perf_counter()
        if self._placements_open is not None:
            await self._placements_open.wait()
        # The same id deleted a moment ago: its uid, cgroup and directory go first.
        await self.unplaced(spec.id)
        async with contextlib.AsyncExitStack() as undo:
            try:
                source, info = await asyncio.to_thread(self._slug_and_stack, spec)
                slug_dir = await self.slugs.resolve(source, info)
            except SlugError as exc:
                raise DynoStartError(str(exc)) from None
            timings["slug"] = (time.perf_counter() - mark) * 1e3
            # The uid, the directory, the cgroup and the network namespace do not depend on
            # each other: made at once, each on its own thread, so the start waits for the
            # slowest of them, not for their sum. Each phase's time is its own (they overlap).
            uid_r, dir_r, cgroup_r, netns_r = await asyncio.gather(
                _timed(self._place_uid(spec, undo)), _timed(self._place_dir(spec, undo)),
                _timed(self._place_cgroup(spec, undo)), _timed(self._place_netns(spec, undo)),
                return_exceptions=True)
            for phase, result in zip(PLACED_AT_ONCE, (uid_r, dir_r, cgroup_r, netns_r),
                                     strict=True):
                if not isinstance(result, BaseException):
                    timings[phase] = result[1]
            # The first failure is raised once every step has ended; the stack undoes what
            # the others made.
            if isinstance(uid_r, BaseException):
                raise uid_r
            if isinstance(dir_r, BaseException):
                raise dir_r
            if isinstance(cgroup_r, BaseException):
                raise cgroup_r
            if isinstance(netns_r, BaseException):
                raise netns_r
            (uid, gid), dyno_dir, rel, (name, attachment) = (
                uid_r[0], dir_r[0], cgroup_r[0], netns_r[0])
            placement = Placement(cgroup=rel, netns=name, netns_path=str(attachment.path),
                                  space=spec.space, ip=str(attachment.address.ip), uid=uid,
                                  gid=gid, slug_dir=str(slug_dir), dyno_dir=str(dyno_dir))
            undo.pop_all()
            return placement
        raise AssertionError("unreachable")  # pragma: no cover

    async def _place_uid(self, spec: DynoSpec,
                         undo: contextlib.AsyncExitStack) -> tuple[int, int]:
        try:
            uid, gid = await asyncio.to_thread(self.uids.allocate, spec.id)
        except LauncherError as exc:
            raise DynoStartError(f"Error: no user for the dyno: {exc}") from None
        undo.push_async_callback(asyncio.to_thread, self.uids.release, spec.id)
        return uid, gid

    async def _place_dir(self, spec: DynoSpec, undo: contextlib.AsyncExitStack) -> Path:
        dyno_dir = self.run_dir / "dynos" / spec.id
        try:
            await asyncio.to_thread(dyno_dir.mkdir, parents=True, exist_ok=True, mode=0o711)
        except OSError as exc:
            raise DynoStartError(f"Error: cannot create {dyno_dir}: {exc.strerror}") from None
        undo.push_async_callback(asyncio.to_thread, shutil.rmtree, dyno_dir, True)
        return dyno_dir

    async def _place_cgroup(self, spec: DynoSpec, undo: contextlib.AsyncExitStack) -> str:
        rel = cgroup_rel(spec.app, spec.id)
        try:
            group = await asyncio.to_thread(self.tree.create_group, rel, self.limits(spec))
        except cgroups.CgroupError as exc:
            raise DynoStartError(f"Error: cannot create the dyno's cgroup: {exc}") from None
        undo.push_async_callback(asyncio.to_thread, _remove_group_quietly, group)
        return rel

    async def _place_netns(self, spec: DynoSpec, undo: contextlib.AsyncExitStack
                           ) -> tuple[str, netns.Attachment]:
        name = netns_name(spec.id)
        await self._teardown_done(name)
        try:
            attachment = await asyncio.to_thread(self.network.create_attached, spec.space, name)
        except netns.NetnsError as exc:
            raise DynoStartError(f"Error: cannot set up the dyno's network: {exc}") from None
        undo.callback(self._destroy_netns_later, spec.space, name)
        return name, attachment

    async def launch(self, spec: DynoSpec, placement: Placement,
                     env: Mapping[str, str]) -> Launch:
        stdio = self.stdio.take(spec.id) if self.stdio is not None else None
        try:
            return await self._launch(spec, placement, env, stdio)
        finally:
            if stdio is not None:
                # Also after a failure: a session must not wait for output on pipe ends
                # that nothing will ever write to or close.
                stdio.close()

    async def _launch(self, spec: DynoSpec, placement: Placement, env: Mapping[str, str],
                      stdio: LaunchStdio | None) -> Launch:
        nameserver = None
        if self.space_ready is not None:
            nameserver = await self.space_ready(placement.space)
        request = await asyncio.to_thread(self._launch_request, spec, placement, env,
                                          nameserver)
        await self._kills_done(placement)
        try:
            launched = await self.holder.launch(
                request, stdio=None if stdio is None else stdio.pipes,
                tty=None if stdio is None else stdio.tty)
        except HolderTimeout as exc:
            # The holder may still start it: empty the cgroup so that no untracked process
            # runs beside the next attempt.
            await self.kill_async(placement)
            raise DynoStartError(f"Error: the dyno's process did not start in time: {exc}") \
                from None
        except ConnectionLost as exc:
            # The holder may have started it before it died: nothing could follow that
            # process any more, so it must not run beside the next attempt.
            if await self.populated_async(placement):
                await self.kill_async(placement)
            raise HolderUnavailable(f"Error: the host's process holder is gone ({exc}); the "
                                    "process starts once it is back") from None
        except HolderError as exc:
            raise DynoStartError(f"Error: the dyno's process could not be started: {exc}") from None
        # Held while the process runs: signals to it go by pidfd, never by a reusable pid.
        self.pidfds.hold(spec.id, launched.pid, launched.start_time, launched.pidfd)
        if stdio is not None and launched.tty_master is not None:
            stdio.deliver_pty(launched.tty_master)
        return Launch(launched.pid, launched.start_time, launched.timings_ms)

    def _launch_request(self, spec: DynoSpec, placement: Placement,
                        env: Mapping[str, str], nameserver: str | None = None) -> LaunchRequest:
        """The holder's request (blocks: it resolves paths; run it on a thread)."""
        # A placement outlives restarts (of the dyno and of the agent): a record made before
        # the slug roots, or before they changed, must not launch its slug again.
        self._slug_source(spec)
        build = self.builds.get(spec.id)
        if spec.type == BUILD_TYPE:
            if build is None:
                raise DynoStartError("Error: the build of this dyno is gone (the agent that ran "
                                     "it restarted); start the build again")
            for tree in build.owned:
                _chown_tree(tree, placement.uid, placement.gid)
        else:
            build = None
        return LaunchRequest(
            dyno_id=spec.id, hostname=hostname(spec.id),
            # A build compiles /app: the start-up is the built app's, not the build's.
            argv=command_argv(spec.command, profile=build is None),
            env=tuple(env.items()), uid=placement.uid, gid=placement.gid,
            stack_dir=self._stack_dir(spec), slug_dir=placement.slug_dir,
            dyno_dir=placement.dyno_dir,
            writable_limit_bytes=spec.size.memory_quota_bytes,
            nofile_limit=spec.size.nofile,
            cgroup_procs=self.group(placement).procs_paths(), netns_path=placement.netns_path,
            private_ip=placement.ip, nameserver=nameserver,
            hide_paths=self.hide_paths, reaper=REAPER,
            app_dir=None if build is None else build.app_dir,
            binds=() if build is None else build.binds)

    def adopt_processes(self, held: Iterable[HeldProcess]) -> None:
        """At start: hold the pidfds of the dynos' running PID 1s that the holder listed
        (`list_processes(pidfds=True)`); close every other pidfd of the list."""
        for process in held:
            if process.pidfd is None:
                continue
            if process.kind == "launch" and process.running:
                self.pidfds.hold(process.dyno_id, process.pid, process.start_time,
                                 process.pidfd)
            else:
                with contextlib.suppress(OSError):
                    os.close(process.pidfd)

    def _destroy_netns_later(self, space: str, name: str) -> None:
        future = self.network.destroy_later(space, name)
        self._teardowns[name] = future
        future.add_done_callback(lambda _f: self._teardowns.pop(name, None))

    async def _teardown_done(self, name: str) -> None:
        future = self._teardowns.get(name)
        if future is not None:
            await _quietly(asyncio.wrap_future(future))

    def signal_all(self, placement: Placement, sig: signal.Signals) -> int:
        """Signal every process of the dyno; returns how many were signalled. Reads the
        cgroup (and /proc for processes not launched here): prefer signal_all_async.

        The reaper (the dyno's PID 1) is left out: it forwards what it receives to its child,
        which would then get the signal twice (an app whose SIGTERM handler takes a while
        would run it twice over).
        """
        return _signal_members(self.group(placement), sig,
                               self.pidfds.pids(_dyno_id(placement)))

    async def signal_all_async(self, placement: Placement, sig: signal.Signals) -> int:
        return await asyncio.to_thread(_signal_members, self.group(placement), sig,
                                       self.pidfds.pids(_dyno_id(placement)))

    def kill(self, placement: Placement) -> None:
        """SIGKILL the dyno's PID 1 by its pidfd at once (the kernel then kills its whole
        pid namespace), and every process of its cgroup on a thread: cgroup.kill is one
        write, but its fallback (no cgroup.kill before 5.14) freezes and polls."""
        self.pidfds.signal(_dyno_id(placement), signal.SIGKILL)
        key = placement.cgroup
        pending = self._kills.get(key)
        if pending is not None and not pending.done():
            return  # a kill of the whole cgroup is under way; it catches what is there
        future = asyncio.ensure_future(asyncio.to_thread(self._kill_group, placement))
        self._kills[key] = future

        def done(f: asyncio.Future[None]) -> None:
            if self._kills.get(key) is f:
                del self._kills[key]
            if not f.cancelled() and f.exception() is not None:
                log.error("killing cgroup %s failed", key, exc_info=f.exception())

        future.add_done_callback(done)

    async def kill_async(self, placement: Placement) -> None:
        self.kill(placement)
        await self._kills_done(placement)

    async def _kills_done(self, placement: Placement) -> None:
        pending = self._kills.get(placement.cgroup)
        if pending is not None:
            await _quietly(pending)

    def _kill_group(self, placement: Placement) -> None:
        group = self.group(placement)
        try:
            if group.exists():
                group.kill()
        except cgroups.CgroupError as exc:
            # Reported, not raised: the caller waits for the cgroup to empty and tries again.
            log.error("cannot kill cgroup %s: %s", placement.cgroup, exc)

    def populated(self, placement: Placement) -> bool:
        group = self.group(placement)
        try:
            return group.exists() and group.populated()
        except cgroups.NotFound:
            return False

    async def populated_async(self, placement: Placement) -> bool:
        return await asyncio.to_thread(self.populated, placement)

    def placement_intact(self, placement: Placement) -> bool:
        return (os.path.exists(placement.netns_path) and os.path.isdir(placement.dyno_dir)
                and self.group(placement).exists())

    async def placement_intact_async(self, placement: Placement) -> bool:
        return await asyncio.to_thread(self.placement_intact, placement)

    def emptied(self, placement: Placement) -> bool:
        pending = self._kills.get(placement.cgroup)
        return (pending is None or pending.done()) and not self.populated(placement)

    async def wait_empty(self, placement: Placement, timeout_s: float) -> bool:
        # A kill under way (its thread may still write cgroup.kill, or signal pid by pid)
        # ends first: it would end the next process launched into the group too.
        await self._kills_done(placement)
        if not await self.populated_async(placement):
            return True  # the common case after an exit: no watch to make and close
        group = self.group(placement)
        try:
            async with group.watch() as watch:
                if not watch.populated:
                    return True
                await watch.wait_for(cgroups.EventKind.EMPTY, timeout_s)
                return True
        except (TimeoutError, cgroups.Timeout):
            return not await self.populated_async(placement)
        except cgroups.NotFound:
            return True

    def stats(self, placement: Placement) -> cgroups.Stats | None:
        try:
            return self.group(placement).stats()
        except cgroups.CgroupError:
            return None

    async def stats_async(self, placement: Placement) -> cgroups.Stats | None:
        return await asyncio.to_thread(self.stats, placement)

    async def sample_async(self, placement: Placement) -> cgroups.Stats | None:
        return self.sample(placement)

    def sample(self, placement: Placement) -> cgroups.Stats | None:
        """A periodic sample, read on the loop through the dyno's control files kept open
        (opened at its first sample, closed when it is unplaced): seven pread(2)s, some 50 us
        in all, where a trip to a thread cost more agent CPU than the reads it carried (1,000
        dynos sampled every 20 s: 1.1 % of a core in the threads, batched a tick at a time).
        None when its group is gone."""
        cgroup = placement.cgroup
        files = self._sample_files.get(cgroup)
        try:
            if files is not None:
                try:
                    return files.read()
                except cgroups.NotFound:
                    # Removed; perhaps made again since, which the files opened next follow.
                    self._forget_samples(placement)
            group = self.group(placement)
            if self._sample_fds + SAMPLE_FILES_MAX > self._sample_fd_budget:
                return group.sample()  # past the budget: open, read and close each file
            try:
                files = group.sample_files()
            except cgroups.CgroupError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    return group.sample()  # no fd to spare
                raise
            self._sample_files[cgroup] = files
            self._sample_fds += files.fds
            return files.read()
        except cgroups.CgroupError:
            return None

    def _forget_samples(self, placement: Placement) -> None:
        files = self._sample_files.pop(placement.cgroup, None)
        if files is not None:
            self._sample_fds -= files.fds
            files.close()

    def counters(self, placement: Placement) -> cgroups.Stats | None:
        try:
            return self.group(placement).counters()
        except cgroups.CgroupError:
            return None

    def watch_oom_kills(self, placement: Placement,
                        on_kill: Callable[[int], None]) -> Closable | None:
        """Call `on_kill(count)` on the loop whenever the kernel OOM-kills a process of the
        dyno (count: the cgroup's oom_kill counter), until closed. v2: inotify on
        memory.events; hybrid: an eventfd on the v1 memory.oom_control. None (logged) when
        the group cannot be watched: the exit path still reads the counter."""

        def on_event(event: cgroups.GroupEvent) -> None:
            if event.kind is cgroups.EventKind.OOM_KILL:
                on_kill(event.count)

        watch = self.group(placement).watch(on_event=on_event)
        try:
            watch.start()
        except cgroups.CgroupError as exc:
            log.error("cannot watch cgroup %s for OOM kills: %s", placement.cgroup, exc)
            return None
        return watch

    def watch_listens(self, placement: Placement,
                      on_listen: Callable[[int], None]) -> Closable | None:
        # A sock_ops program on the dyno's cgroup v2 group (cgroups.listens).
        if self._listens is None:
            return None
        group = self.group(placement)
        try:
            return self._listens.watch(str(group.layout.unified.fs.path(group.rel)),
                                       on_listen)
        except cgroups.ListenWatchUnavailable as exc:
            log.warning("listens are not heard from the kernel here (%s): web dynos are up "
                        "at the first probe that connects", exc)
            self._listens = None
        except OSError as exc:
            log.error("cannot hear %s listen: %s", placement.cgroup, exc)
        return None

    async def accepting(self, ip: str, port: int) -> bool:
        try:
            async with asyncio.timeout(BOOT_PROBE_TIMEOUT_S):
                _reader, writer = await asyncio.open_connection(ip, port)
        except (OSError, TimeoutError):
            return False
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True

    async def unplace(self, placement: Placement) -> None:
        """Free what `place` made, off the loop: the cgroup, user and runtime dir on the
        teardown threads (a few at a time, however many dynos go at once: a mass delete
        must leave the loop free to answer), the namespace later still, on the network's
        own teardown thread."""
        dyno_id = _dyno_id(placement)
        self.pidfds.forget(dyno_id)
        self._forget_samples(placement)
        await self._kills_done(placement)
        await asyncio.wrap_future(self._teardown_pool.submit(self._unplace_blocking,
                                                             placement))
        self._release_uid_later(dyno_id)
        self._destroy_netns_later(placement.space, placement.netns)

    def _release_uid_later(self, dyno_id: str) -> None:
        """The uid goes back with the next batch of releases (UID_RELEASE_INTERVAL_S apart).
        Nothing waits for that but a place of the same id (`unplaced`): a completed one-off
        waited for it with one of the agent's few exit slots (MAX_CONCURRENT_EXITS) held, so
        in a run of `dynoctl run`s every other one's exit waited up to half a second."""
        _after_previous(self._uid_releasing, dyno_id, lambda: self._uid_releases.call(dyno_id),
                        # Left to the reconcile at the next start (no record names it).
                        f"freeing the uid of dyno {dyno_id} failed")

    def unplace_later(self, placement: Placement) -> None:
        dyno_id = _dyno_id(placement)
        _after_previous(self._unplacing, dyno_id, lambda: self.unplace(placement),
                        # Left to the sweep at the next start (no record owns them any more).
                        f"freeing what dyno {dyno_id} used failed")

    async def unplaced(self, dyno_id: str | None = None) -> None:
        """Once the background unplacing of `dyno_id` (of every dyno: None) is over."""
        if dyno_id is not None:
            for waiting in (self._unplacing, self._uid_releasing):
                pending = waiting.get(dyno_id)
                if pending is not None:
                    await _quietly(pending)
            return
        for future in [*self._unplacing.values(), *self._uid_releasing.values()]:
            await _quietly(future)

    def _unplace_blocking(self, placement: Placement) -> None:
        self.group(placement).destroy_blocking(timeout_s=10)
        shutil.rmtree(placement.dyno_dir, True)

    def pid_alive(self, pid: int, start_time: int) -> bool:
        alive = self.pidfds.alive(pid, start_time)
        if alive is not None:
            return alive
        return process_start_time(pid) == start_time

    def seccomp_mode(self, pid: int, start_time: int) -> int | None:
        """The process's `Seccomp:` mode (2: filtered), None once it is gone."""
        mode = seccomp_process_mode(pid)
        # Read first, then check identity: a pid reused in between is caught.
        return mode if self.pid_alive(pid, start_time) else None

    def keep_uids(self, records: Iterable[Stored]) -> dict[str, int]:
        """At start, before any dyno is restored: the host-wide uid registry gets back the
        uids the records name (after a reboot it is empty) and frees this agent's others. A
        dyno whose uid another agent's dyno holds (both were placed before the registry
        existed) gets a fresh one, returned here for the supervisor to put in its record; a
        process it still runs keeps the old uid until its next start."""
        forget_legacy_table(str(self.state_dir))
        placed = {r.id: r.placement for r in records if r.placement is not None}
        moved = self.uids.reconcile({dyno_id: placement.uid
                                     for dyno_id, placement in placed.items()})
        for dyno_id, uid in moved.items():
            log.warning("dyno %s: uid %d is another dyno's; it gets uid %d from its next start",
                        dyno_id, placed[dyno_id].uid, uid)
        return moved


def _after_previous(running: dict[str, asyncio.Future[None]], key: str,
                    work: Callable[[], Awaitable[None]], failure: str) -> None:
    """Run `work()` in the background once the task `running[key]` (if any) is over, as
    `running[key]` until it is; a failure is logged as `failure: <error>`."""
    previous = running.get(key)

    async def run() -> None:
        if previous is not None:
            await _quietly(previous)
        try:
            await work()
        except Exception as exc:
            log.error("%s: %s", failure, exc)

    task = asyncio.ensure_future(run())
    running[key] = task

    def done(_task: asyncio.Future[None]) -> None:
        if running.get(key) is task:
            del running[key]
    task.add_done_callback(done)


class BatchedCalls:
    """Calls of a blocking `fn(items)` on `executor`, one batch at a time: whatever is asked
    for while a batch runs goes in the next one. `call` returns once its item's batch has."""

    def __init__(self, fn: Callable[[list[str]], None],
                 executor: concurrent.futures.Executor, min_interval_s: float = 0.0) -> None:
        self._fn = fn
        self._executor = executor
        # Between the starts of two batches: items asked for meanwhile wait and go together.
        self._min_interval_s = min_interval_s
        self._last_start: float | None = None
        self._queued: list[tuple[str, asyncio.Future[None]]] = []
        self._drainer: asyncio.Task[None] | None = None

    async def call(self, item: str) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queued.append((item, future))
        if self._drainer is None:
            self._drainer = asyncio.ensure_future(self._drain())
        await asyncio.shield(future)

    async def _drain(self) -> None:
        batch: list[tuple[str, asyncio.Future[None]]] = []
        loop = asyncio.get_running_loop()
        try:
            while self._queued:
                if self._last_start is not None:
                    await asyncio.sleep(self._last_start + self._min_interval_s - loop.time())
                self._last_start = loop.time()
                batch, self._queued = self._queued, []
                try:
                    await asyncio.wrap_future(self._executor.submit(
                        self._fn, [item for item, _future in batch]))
                except Exception as exc:
                    for _item, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                else:
                    for _item, future in batch:
                        if not future.done():
                            future.set_result(None)
        finally:
            self._drainer = None
            for _item, future in batch + self._queued:
                future.cancel()  # a no-op once done; a cancelled drain leaves no one waiting
            self._queued = []


def _sample_fd_budget() -> int:
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 30
    return int(soft * SAMPLE_FDS_SHARE)


def _no_uids(_dyno_ids: list[str]) -> None:
    """A runtime made without a uid allocator (tests of other parts) frees no uid."""


def _dyno_id(placement: Placement) -> str:
    return placement.dyno_dir.rsplit("/", 1)[-1]


def _signal_members(group: cgroups.Group, sig: signal.Signals, reapers: frozenset[int]) -> int:
    """Signal every process of `group` but the dyno's reapers (its PID 1s): `reapers`, the
    pids whose pidfds are held, or, for a process not launched by this agent, whichever is
    PID 1 of its pid namespace. Each process is pinned by a pidfd and signalled only if it
    is still listed in the group after that: a pid freed and reused in between is never
    signalled. Blocks (cgroup and /proc reads): on a thread, or in sync callers only."""
    try:
        listed = group.pids()
    except cgroups.CgroupError as exc:
        log.error("cannot list the processes of %s: %s", group.rel, exc)
        return 0
    pinned: dict[int, int] = {}
    try:
        for pid in listed:
            if pid in reapers or (not reapers and _is_pid_namespace_init(pid)):
                continue
            with contextlib.suppress(ProcessLookupError):
                pinned[pid] = os.pidfd_open(pid)
        if not pinned:
            return 0
        try:
            members = set(group.pids())
        except cgroups.CgroupError:
            members = set()
        count = 0
        for pid, pidfd in pinned.items():
            if pid not in members:
                continue
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, sig)
                count += 1
        return count
    finally:
        for pidfd in pinned.values():
            os.close(pidfd)


def _is_pid_namespace_init(pid: int) -> bool:
    """Whether the process is PID 1 of its own pid namespace (NSpid's last field)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    for line in status.splitlines():
        if line.startswith("NSpid:"):
            return line.split()[-1] == "1"
    return False


def _chown_tree(top: str, uid: int, gid: int) -> None:
    """Give a build's directory tree to its dyno user; symlinks themselves, never followed."""
    os.lchown(top, uid, gid)
    for parent, dirs, files in os.walk(top):
        for name in (*dirs, *files):
            os.lchown(os.path.join(parent, name), uid, gid)


def _remove_group_quietly(group: cgroups.Group) -> None:
    try:
        if group.populated():
            group.kill()
        group.remove(timeout_s=5)
    except cgroups.CgroupError as exc:
        if exc.errno != errno.ENOENT:
            log.warning("could not remove half-made cgroup %s: %s", group.name, exc)


async def _quietly(future: asyncio.Future[None]) -> None:
    """Wait for `future` without taking its outcome, nor cancelling it when cancelled."""
    with contextlib.suppress(Exception):
        await asyncio.shield(future)


async def _timed(step: Awaitable[_T]) -> tuple[_T, float]:
    """What `step` gives, with how long it took (ms)."""
    started = time.perf_counter()
    result = await step
    return result, (time.perf_counter() - started) * 1e3
