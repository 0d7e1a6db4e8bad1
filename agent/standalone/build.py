"""`dynoagent build DIR`: one build on this machine, in a build dyno of a private agent (its
own run dir, cgroup root and addresses, like `dynoagent up`), with the output streamed to
the terminal; the slug is kept in the build cache under /var/cache/dynoagent, so `up` and
the next `build` of the same source find it, and copied to `-o SLUG.tgz` when asked."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import shutil
import sys
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO

from agent import errors
from agent.builds import Builder, BuildRequest, BuildResult
from agent.config import Config
from agent.daemon.service import Daemon, Step
from agent.observability.logs import Follower, LogLine, LogSource
from agent.supervision.reconcile import Engine, SupervisorFleet
from agent.supervision.runtime import HostRuntime
from agent.supervision.supervisor import Supervisor

CACHE_BASE = Path("/var/cache/dynoagent")
BUILD_RUN_BASE = Path("/run/dynoagent-build")
# Lines of the build dyno that say nothing to someone watching a build.
_QUIET_AGENT_PREFIXES = ("Starting process with command", "State changed from")


def app_slugs(app: str, base: Path = CACHE_BASE) -> Path:
    """Where the slugs built for `app` on this machine are kept (a slug root of `up`)."""
    return base / "apps" / app / "slugs"


def local_builder(supervisor: Supervisor, runtime: HostRuntime, config: Config, app: str,
                  base: Path = CACHE_BASE) -> Builder:
    """The builder of `up` and `build`: slugs, build caches and fetched buildpacks outlive
    the run (a private agent's state dir does not)."""
    return Builder(supervisor, runtime, store=app_slugs(app, base),
                   caches=base / "build-cache", work=config.run_dir / "builds",
                   buildpack_cache=base / "buildpacks")


def build_config(app: str, standalone: Config) -> Config:
    """`up`'s private configuration moved aside (run dir, cgroup root, the last /24 of the
    app's addresses), so that a build runs next to a running `up` of the same app."""
    run_dir = BUILD_RUN_BASE / app
    pool = ipaddress.IPv4Network(standalone.address_pool)
    last = list(pool.subnets(new_prefix=24))[-1]
    return replace(standalone, run_dir=run_dir, state_dir=run_dir / "state",
                   socket=run_dir / "dynoagent.sock", cgroup_root=f"dynoagent-build-{app}",
                   address_pool=str(last))


class BuildPrinter:
    """The build's lines as they come, without the dyno prefix of `up` (like Heroku's build
    output); platform lines that matter (exit status, memory) keep their label."""

    def __init__(self, out: TextIO) -> None:
        self.out = out

    def render(self, line: LogLine) -> str | None:
        if line.source is LogSource.AGENT:
            if line.text.startswith(_QUIET_AGENT_PREFIXES) or line.text.startswith("source="):
                return None
            return f"       [{line.dyno}] {line.text}"
        return line.text

    def write(self, text: str) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.out.write(text + "\n")
            self.out.flush()

    async def follow(self, follower: Follower) -> None:
        # Written at once, in order with the result printed after the build: a build's
        # output is a few lines a second, and the terminal is the whole point of the command.
        async for line in follower:
            text = self.render(line)
            if text is not None:
                self.write(text)

    def drain(self, follower: Follower) -> None:
        while (line := follower.get_nowait()) is not None:
            text = self.render(line)
            if text is not None:
                self.write(text)


class BuildDaemon(Daemon):
    """A private agent whose last step runs one build and then stops the agent."""

    def __init__(self, config: Config, request: BuildRequest, *, out: TextIO = sys.stdout,
                 output: Path | None = None, as_json: bool = False,
                 cache_base: Path | None = CACHE_BASE, remove_run_dir: bool = True) -> None:
        super().__init__(config, None)
        self.warn_host_stack = False
        self.request = request
        self.out = out
        self.output = output
        self.as_json = as_json
        self.cache_base = cache_base
        self.remove_run_dir = remove_run_dir
        self.printer = BuildPrinter(sys.stderr if as_json else out)
        self.result: BuildResult | None = None
        self.exit_code = 1
        self._main: asyncio.Task[None] | None = None

    def make_builder(self, supervisor: Supervisor, runtime: HostRuntime) -> Builder:
        """With a config of its own (--config), the agent's own places; else the machine's
        build cache."""
        if self.cache_base is None:
            return super().make_builder(supervisor, runtime)
        return local_builder(supervisor, runtime, self.config, self.request.app,
                             self.cache_base)

    def steps(self) -> list[Step]:
        return [*super().steps(), Step("build", self._build_step)]

    @contextlib.asynccontextmanager
    async def _coordinator(self) -> AsyncIterator[None]:
        assert self.supervisor is not None
        self.engine = Engine(SupervisorFleet(self.supervisor))
        yield

    @contextlib.asynccontextmanager
    async def _build_step(self) -> AsyncIterator[None]:
        follower = self.hub.subscribe(self.request.app)
        printer = asyncio.create_task(self.printer.follow(follower), name="build-printer")
        self._main = asyncio.create_task(self._build(), name="build-main")
        try:
            yield
        finally:
            await self._cancel_main()
            self.printer.drain(follower)
            follower.close()
            await asyncio.gather(printer, return_exceptions=True)

    async def _build(self) -> None:
        assert self.builder is not None
        try:
            result = await self.builder.build(self.request)
            if self.output is not None:
                await asyncio.to_thread(_copy_slug, result.slug_path, self.output)
            self.result = result
            self.exit_code = 0
            await asyncio.sleep(0.05)  # the printer takes the build's last lines first
            self._report(result)
        except errors.AgentError as exc:
            self.printer.write(f" !     Build failed: {exc.message}")
            self.exit_code = 1
        except OSError as exc:
            self.printer.write(f" !     Build failed: {exc}")
            self.exit_code = 1
        finally:
            self.request_stop("build done")

    def _report(self, result: BuildResult) -> None:
        if self.as_json:
            body: dict[str, Any] = result.to_dict()
            if self.output is not None:
                body["output"] = str(self.output)
            self.out.write(json.dumps(body, indent=2) + "\n")
            self.out.flush()
            return
        where = self.output if self.output is not None else result.slug_path
        types = ", ".join(f"{k}: {v}" for k, v in result.process_types.items()) or "none"
        self.printer.write(f"-----> Slug {where}\n       sha256 {result.sha256}\n"
                           f"       default process types: {types}")

    async def _cancel_main(self) -> None:
        if self._main is not None and not self._main.done():
            self._main.cancel()
            await asyncio.gather(self._main, return_exceptions=True)

    async def before_shutdown(self) -> None:
        await self._cancel_main()
        if self.supervisor is not None and self.supervisor.dynos:
            await self.supervisor.stop_all()

    async def run(self) -> int:
        await super().run()
        if self.remove_run_dir and self.idle_at_exit:
            await asyncio.to_thread(shutil.rmtree, self.config.run_dir, True)
            with contextlib.suppress(OSError):
                os.rmdir(BUILD_RUN_BASE)  # only when no other build runs
        return self.exit_code


def _copy_slug(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    shutil.copyfile(source, partial)
    partial.replace(target)
