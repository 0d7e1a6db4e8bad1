"""The drains of this host: one per app and URL named in its dynos' specs (`log_drains`),
plus the host-wide ones of the config (every app's lines). The manager is the log hub's sink
for them: it routes each line to its app's drains, starts and retires drains as specs come and
go, restores the spools an agent before it left, and renders their counters for /metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from pathlib import Path

from agent.drains.drain import DEFAULT_CAPACITY, Block, Drain
from agent.drains.senders import make_sender
from agent.drains.spool import Spool
from agent.drainurl import DrainUrl, DrainUrlError, parse_drain_url
from agent.observability import metrics
from agent.observability.logs import LogHub, LogLine

log = logging.getLogger(__name__)

# The drain URLs the dynos of an app want now; None while that is not known yet (the agent is
# starting: its dynos are not restored).
AppDrains = Callable[[str], Iterable[str] | None]


class DrainManager:
    app: str | None = None  # the hub's filters: every line
    dyno: str | None = None

    def __init__(self, directory: Path | None, host_drains: Iterable[DrainUrl] = (),
                 app_drains: AppDrains = lambda app: (), *, ca_file: Path | None = None,
                 capacity: int = DEFAULT_CAPACITY) -> None:
        self.directory = directory  # None: no spools (tests, tools)
        self.app_drains = app_drains
        self.ca_file = ca_file
        self.capacity = capacity
        self._host_urls = tuple(host_drains)
        self._drains: dict[str, Drain] = {}  # by token
        self._routes: dict[str, list[Drain]] = {}  # app -> its wanted drains, host-wide too
        self._host: list[Drain] = []
        self._hub: LogHub | None = None
        self._reaper: asyncio.Task[None] | None = None

    # -- the hub's side ---------------------------------------------------------------------
    def offer(self, line: LogLine) -> bool:
        drains = self._routes.get(line.app)
        if drains is None:
            drains = self.refresh(line.app)
        kept = True
        for drain in drains:
            if not drain.offer(line):
                kept = False
        return kept

    def offer_block(self, block: Block) -> int:
        """A whole pipe read at once (a hub that publishes blocks); how many lines every
        drain kept."""
        drains = self._routes.get(block.app)
        if drains is None:
            drains = self.refresh(block.app)
        kept = len(block.texts)
        for drain in drains:
            kept = min(kept, drain.offer_block(block))
        return kept

    def close(self) -> None:
        """The hub's close: lines stop coming (the drains end in `aclose`)."""
        self._hub = None

    # -- drains -----------------------------------------------------------------------------
    def _make(self, url: DrainUrl, app: str | None) -> Drain:
        token = url.token(app)
        drain = self._drains.get(token)
        if drain is not None:
            return drain
        spool = None
        if self.directory is not None:
            Spool.write_meta(self.directory / token, app, url.url)
            spool = Spool(self.directory / token)
        drain = Drain(url, app, make_sender(url, token, self.ca_file), spool=spool,
                      capacity=self.capacity)
        if spool is not None:
            drain.restore(spool.load())
        self._drains[token] = drain
        drain.start()
        log.info("log drain %s for %s: %s", token, app or "every app", url.redacted)
        return drain

    def refresh(self, app: str) -> list[Drain]:
        """The drains of `app` as its dynos' specs name them now (new ones started, ones no
        longer named retired: they end once they have sent what they hold)."""
        urls = self.app_drains(app)
        if urls is None:
            # Not known yet: the drains of the agent before keep the app's lines meanwhile.
            return [d for d in self._drains.values() if d.app == app] + self._host
        wanted: list[Drain] = []
        for raw in dict.fromkeys(urls):
            try:
                url = parse_drain_url(raw)
            except DrainUrlError:
                continue  # specs are validated at the edge; a stale one is skipped
            drain = self._make(url, app)
            drain.retiring = False
            drain.start()  # again, if it had ended while retired
            wanted.append(drain)
        for drain in self._routes.get(app, ()):
            if drain not in wanted and drain.app == app:
                drain.retiring = True
                drain._ready.set()
        self._routes[app] = wanted + self._host
        return self._routes[app]

    def refresh_all(self) -> None:
        for app in list(self._routes):
            self.refresh(app)

    async def start(self, hub: LogHub) -> None:
        """Restore the spools left by the agent before, start the host-wide drains and take
        lines from `hub`."""
        if self.directory is not None:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            for path in sorted(self.directory.iterdir()):
                meta = Spool.read_meta(path) if path.is_dir() else None
                if meta is None:
                    continue
                app, raw = meta
                try:
                    url = parse_drain_url(raw)
                except DrainUrlError:
                    continue
                if url.token(app) != path.name:
                    continue
                drain = self._make(url, app)
                drain.retiring = True  # until a spec or the config names it again
                if drain.queued:
                    log.info("log drain %s: %d lines from before this agent to send",
                             drain.token, drain.queued)
        for url in self._host_urls:
            drain = self._make(url, None)
            drain.retiring = False
            self._host.append(drain)
        self._hub = hub
        hub.attach(self)
        self._reaper = asyncio.create_task(self._reap(), name="drains-reaper")

    async def _reap(self) -> None:
        """Drains retired and done: their spool and counters go."""
        while True:
            await asyncio.sleep(1.0)
            for token, drain in list(self._drains.items()):
                if drain.retiring and drain.app is not None and drain.app not in self._routes:
                    self.refresh(drain.app)  # restored at start: is it wanted after all?
                    if drain.app not in self._routes:
                        continue  # not known yet
                if drain.retiring and drain.done and drain.idle:
                    # No await before the directory is gone: a drain made again for the same
                    # app and URL starts a new one.
                    del self._drains[token]
                    drain.remove_spool()
                    await drain.aclose()

    async def aclose(self) -> None:
        if self._hub is not None:
            self._hub.detach(self)
            self._hub = None
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        for drain in self._drains.values():
            await drain.aclose()
        self._drains.clear()
        self._routes.clear()

    @property
    def drains(self) -> list[Drain]:
        return list(self._drains.values())

    def metrics_families(self) -> list[metrics.MetricFamily]:
        drains = sorted(self._drains.values(), key=lambda d: (d.app or "", d.url.redacted))

        def family(name: str, text: str, kind: metrics.MetricType, value: Callable[[Drain], int]
                   ) -> metrics.MetricFamily:
            return metrics.MetricFamily(name, text, kind, tuple(
                metrics.Sample(d.label, float(value(d))) for d in drains))

        counter, gauge = metrics.MetricType.COUNTER, metrics.MetricType.GAUGE
        return [
            family("dynoagent_drain_lines_emitted_total",
                   "Lines offered to the log drain (restored from its spool at start too).",
                   counter, lambda d: d.emitted),
            family("dynoagent_drain_lines_delivered_total",
                   "Lines the drain's receiver took.", counter, lambda d: d.delivered),
            family("dynoagent_drain_lines_dropped_total",
                   "Lines the drain could not keep or deliver (reported in it as L10).",
                   counter, lambda d: d.dropped),
            family("dynoagent_drain_retries_total",
                   "Failed deliveries to the drain's receiver, each retried after a backoff.",
                   counter, lambda d: d.retries),
            family("dynoagent_drain_lines_queued", "Lines waiting for the drain's receiver.",
                   gauge, lambda d: d.queued),
        ]
