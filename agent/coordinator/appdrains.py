"""`drains.sync` (docs/protocol.md §4): the log drains the coordinator sets per app
(`dynocoord drains:add`), apart from the dynos' specs, so that adding or removing one restarts
no dyno. Each request is the complete map for the apps this host runs; it is kept in
`<state_dir>/app-drains.json` (written atomically), so that an agent restarted before the
coordinator reconnects sends an app's lines on to the same drains."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from agent import errors
from agent.atomicfile import write_atomically
from agent.coordinator.frames import msgpack_kind
from agent.drainurl import DrainUrlError, parse_drain_list
from agent.errors import excerpt
from agent.spec import APP

log = logging.getLogger(__name__)

MAX_APPS = 10_000  # far more apps than one host runs; a bigger map is a bogus request
FILE_NAME = "app-drains.json"


def parse(params: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
    """The request's params, checked; `errors.BadRequest` names the first offending field."""
    for key in params:
        if key != "apps":
            raise errors.BadRequest(f"p: unknown key {excerpt(key)} (known keys: apps)")
    if "apps" not in params:
        raise errors.BadRequest("p.apps: is required")
    apps = params["apps"]
    if not isinstance(apps, dict):
        raise errors.BadRequest(f"p.apps: must be a map, got {msgpack_kind(apps)}")
    if len(apps) > MAX_APPS:
        raise errors.BadRequest(f"p.apps: at most {MAX_APPS} apps, got {len(apps)}")
    out: dict[str, tuple[str, ...]] = {}
    for app, urls in apps.items():
        if not isinstance(app, str) or not APP.fullmatch(app):
            raise errors.BadRequest(f"p.apps: key must be an app name matching {APP.pattern}, "
                                    f"got {excerpt(app)}")
        try:
            out[app] = tuple(d.url for d in parse_drain_list(urls))
        except DrainUrlError as exc:
            raise errors.BadRequest(f"p.apps.{app}: {exc}") from None
    return {app: urls for app, urls in out.items() if urls}


class AppDrains:
    """The coordinator's drains of each app, as the last `drains.sync` gave them (and as
    kept on disk from the agent before). `on_change(app)` is called for every app whose
    drains a sync changed (the drain manager's `refresh`)."""

    def __init__(self, path: Path | None,
                 on_change: Callable[[str], object] | None = None) -> None:
        self.path = path  # None: not kept (tests, tools)
        self.on_change = on_change
        self.apps: dict[str, tuple[str, ...]] = self._load()

    def _load(self) -> dict[str, tuple[str, ...]]:
        if self.path is None:
            return {}
        try:
            data = json.loads(self.path.read_bytes())
            return parse(data)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, errors.AgentError) as exc:
            log.warning("%s: unreadable, no coordinator drains until it reconnects: %s",
                        self.path, exc)
            return {}

    def get(self, app: str) -> tuple[str, ...]:
        return self.apps.get(app, ())

    def merged(self, app: str, spec_urls: Iterable[str]) -> list[str]:
        """The drains of `app`: its specs' (in order), then the coordinator's; each once."""
        return list(dict.fromkeys([*spec_urls, *self.get(app)]))

    def _save(self, apps: Mapping[str, tuple[str, ...]]) -> None:
        if self.path is None:
            return
        data = json.dumps({"apps": {a: list(u) for a, u in sorted(apps.items())}},
                          separators=(",", ":")).encode()
        try:
            write_atomically(self.path, data)
        except OSError as exc:
            raise errors.AgentError(f"cannot keep the app drains in {self.path}: "
                                    f"{exc.strerror}") from None

    async def handle(self, params: dict[str, Any]) -> dict[str, Any]:
        apps = parse(params)
        changed = sorted(app for app in {*apps, *self.apps}
                         if apps.get(app, ()) != self.apps.get(app, ()))
        if changed:
            self._save(apps)
        self.apps = apps
        for app in changed:
            if self.on_change is not None:
                self.on_change(app)
        return {"apps": sorted(apps), "changed": changed}
