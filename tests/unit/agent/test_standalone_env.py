"""`dynoagent up` reads its .env again when `dynoctl restart` or `scale` (re)starts dynos: the
formation controller on the real engine with a fake fleet and supervisor."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent import errors
from agent.sizes import DEFAULT_SIZES
from agent.spec import DynoSpec, parse_spec
from agent.standalone import up as standalone
from agent.standalone.procfile import parse_procfile
from agent.supervision.reconcile import Engine, Observed

PROCFILE = parse_procfile("web: python3 web.py\nworker: python3 worker.py\n")


@dataclass
class FoundDyno:
    spec: DynoSpec

    def status(self) -> dict[str, Any]:
        return {"id": self.spec.id}


class Fleet:
    """The engine's fleet and the supervisor's operations the controller uses, over one dict."""

    def __init__(self) -> None:
        self.dynos: dict[str, Observed] = {}
        self.calls: list[tuple[str, str]] = []

    # -- the Fleet of the engine
    def parse(self, body: Any) -> DynoSpec:
        return parse_spec(body)

    def observe(self) -> dict[str, Observed]:
        return dict(self.dynos)

    def observe_one(self, dyno_id: str) -> Observed | None:
        return self.dynos.get(dyno_id)

    async def start(self, spec: DynoSpec) -> None:
        self.calls.append(("start", spec.name))
        self.dynos[spec.id] = Observed(spec, True, False)

    async def resume(self, dyno_id: str) -> None:
        raise AssertionError("not in these tests")

    async def remove(self, dyno_id: str) -> None:
        self.calls.append(("remove", self.dynos.pop(dyno_id).spec.name))

    # -- the supervisor
    def find(self, ref: str, app: str | None = None) -> FoundDyno:
        for observed in self.dynos.values():
            if ref in (observed.spec.id, observed.spec.name):
                return FoundDyno(observed.spec)
        raise errors.NotFound(ref)

    async def restart_dyno(self, ref: str, app: str | None = None) -> dict[str, Any]:
        spec = self.find(ref, app).spec
        self.calls.append(("restart", spec.name))
        return {"id": spec.id}

    async def delete_dyno(self, ref: str, app: str | None = None) -> None:
        await self.remove(self.find(ref, app).spec.id)


def controller(fleet: Fleet, env_path: Path) -> standalone.FormationController:
    env_path.write_text("GREETING=hi\n")
    source = standalone.AppSource(Path("/srv/hello"), "hello", PROCFILE, {"GREETING": "hi"},
                                  env_path)
    formation = standalone.initial_formation(PROCFILE, [], DEFAULT_SIZES)
    return standalone.FormationController(source, formation, Engine(fleet), fleet,
                                          DEFAULT_SIZES)


def env_of(fleet: Fleet, name: str) -> dict[str, str]:
    return next(dict(o.spec.env) for o in fleet.dynos.values() if o.spec.name == name)


async def test_restart_after_an_env_edit_starts_that_dyno_with_the_new_config_vars(
        tmp_path: Path) -> None:
    fleet = Fleet()
    ctrl = controller(fleet, tmp_path / ".env")
    await ctrl.converge()
    fleet.calls.clear()
    # .env unchanged: a plain restart.
    assert await ctrl.restart("web.1") == {"id": "hello-web-1"}
    assert fleet.calls == [("restart", "web.1")]
    fleet.calls.clear()
    (tmp_path / ".env").write_text("GREETING=edited\nNEW=1\n")
    assert await ctrl.restart("hello-web-1") == {"id": "hello-web-1"}
    assert fleet.calls == [("remove", "web.1"), ("start", "web.1")]
    assert env_of(fleet, "web.1") == {"GREETING": "edited", "NEW": "1"}
    assert env_of(fleet, "worker.1") == {"GREETING": "hi"}  # not restarted: as it was
    # A converge (as a scale makes) brings the dynos not restarted since to the new .env.
    fleet.calls.clear()
    await ctrl.converge()
    assert fleet.calls == [("remove", "worker.1"), ("start", "worker.1")]
    assert env_of(fleet, "worker.1") == {"GREETING": "edited", "NEW": "1"}


async def test_scale_starts_new_dynos_with_the_env_as_it_is_now(tmp_path: Path) -> None:
    fleet = Fleet()
    ctrl = controller(fleet, tmp_path / ".env")
    await ctrl.converge()
    (tmp_path / ".env").write_text("GREETING=scaled\n")
    await ctrl.scale(None, ["web=2"])
    assert env_of(fleet, "web.2") == {"GREETING": "scaled"}


async def test_a_broken_env_refuses_the_restart_and_changes_nothing(tmp_path: Path) -> None:
    fleet = Fleet()
    ctrl = controller(fleet, tmp_path / ".env")
    await ctrl.converge()
    fleet.calls.clear()
    (tmp_path / ".env").write_text("1BAD=x\n")
    with pytest.raises(errors.BadRequest, match=r"\.env:1: .*nothing was changed"):
        await ctrl.restart("web.1")
    assert fleet.calls == [] and env_of(fleet, "web.1") == {"GREETING": "hi"}
