"""The formation seam: what `GET` and `POST /v1/formation` need of an agent that runs a
formation of its own. Standalone mode implements it and hands it to the daemon, which therefore
never imports standalone mode; an agent driven by a coordinator has none.
"""

from __future__ import annotations

from typing import Any, Protocol


class Formation(Protocol):
    """One app's formation, changed by `dynoctl scale`; `dynoctl restart` goes through it too.
    Its methods raise AgentError subclasses only (`not_found` for another app, `bad_request`
    for malformed items)."""

    def describe(self, app: str | None = None) -> dict[str, Any]:
        """`{"app", "generation", "formation": [{"type", "quantity", "size", "command"}]}`."""
        ...

    async def scale(self, app: str | None, items: Any) -> dict[str, Any]:
        """Apply `TYPE=N[:SIZE]` items, all checked before anything changes; returns
        `describe()` plus the convergence `report`."""
        ...

    async def restart(self, ref: str, app: str | None = None) -> dict[str, Any]:
        """Restart a dyno (any dyno of the agent, formation or not) with the formation's
        current config vars; its status afterwards."""
        ...
