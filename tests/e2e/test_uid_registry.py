"""DESIGN §11, uids: two real agents side by side never give two dynos the same uid (the
registry is host-wide), a restarted agent keeps its dynos' uids, and a deleted dyno's uid is
kept out of use (in quarantine in the registry, for every agent)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from agent.launcher.uids import REGISTRY_PATH
from tests.e2e.test_supervision import agent_in_host, app_texts, spec, wait_state
from tests.support.agentproc import AgentProcess
from tests.support.names import unique
from tests.support.testhost import new_test_host
from tests.support.wait import wait_for

# Says its uid from inside the dyno, then stays up.
WHOAMI = "echo uid=$(id -u) gid=$(id -g); exec sleep 1000"


def uid_inside(agent: AgentProcess, app: str, name: str) -> tuple[int, int]:
    """The (uid, gid) the dyno's own `id` printed."""
    def said() -> tuple[int, int] | None:
        for text in app_texts(agent, app, name):
            if text.startswith("uid="):
                uid, gid = (int(part.split("=")[1]) for part in text.split())
                return uid, gid
        return None
    found = wait_for(said, 20, interval_s=0.05, what=f"{name} says its uid")
    assert found is not None
    return found


def registry_entry(uid: int) -> dict[str, Any] | None:
    uids: dict[str, list[Any]] = json.loads(Path(REGISTRY_PATH).read_text())["uids"]
    entry = uids.get(str(uid))
    return None if entry is None else dict(zip(("owner", "dyno", "free_at"), entry,
                                               strict=True))


def test_two_agents_side_by_side_never_share_a_uid_and_keep_theirs_across_a_restart(
        slug: Path) -> None:
    app = unique("tu", 8)
    with new_test_host() as host_one, new_test_host() as host_two, \
            agent_in_host(host_one, address_pool="10.91.0.0/16",
                          slug_roots=[str(slug)]) as one, \
            agent_in_host(host_two, address_pool="10.92.0.0/16",
                          slug_roots=[str(slug)]) as two:
        created: list[tuple[AgentProcess, str, str]] = []
        # Interleaved, as two agents placing at the same time would.
        for n in range(1, 4):
            for agent in (one, two):
                name = f"worker.{n}"
                dyno_id = agent.api("POST", "/v1/dynos", spec(app, name, WHOAMI, slug),
                                    expect=201)["id"]
                created.append((agent, dyno_id, name))
        seen: dict[str, tuple[int, int]] = {}
        for agent, dyno_id, name in created:
            status = wait_state(agent, dyno_id, "up", 30)
            inside = uid_inside(agent, app, name)
            assert inside == (status["uid"], status["uid"]), (status, inside)
            seen[f"{agent.name}/{name}"] = inside
        uids = [uid for uid, _ in seen.values()]
        assert len(set(uids)) == len(uids) == 6, f"two dynos share a uid: {seen}"
        for agent, dyno_id, _ in created:
            entry = registry_entry(agent.api("GET", f"/v1/dynos/{dyno_id}")["uid"])
            assert entry is not None and entry["free_at"] is None
            assert entry["owner"] == str(Path(agent.settings["state_dir"]).resolve())
            assert entry["dyno"] == dyno_id

        # A restarted agent adopts its dynos with the uids the registry holds for them.
        assert one.proc is not None
        one.proc.kill()
        one.wait(10)
        one.start()
        for agent, dyno_id, name in created:
            status = wait_state(agent, dyno_id, "up", 30)
            assert status["uid"] == seen[f"{agent.name}/{name}"][0]

        # A deleted dyno's uid stays registered, in quarantine, so no agent takes it.
        _, gone_id, gone_name = created[0]
        gone_uid = seen[f"{one.name}/{gone_name}"][0]
        one.api("DELETE", f"/v1/dynos/{gone_id}", expect=204)
        entry = wait_for(lambda: (registry_entry(gone_uid) or {}).get("free_at"), 20,
                         what="the deleted dyno's uid in quarantine")
        assert entry is not None
        again = two.api("POST", "/v1/dynos", spec(app, "worker.9", WHOAMI, slug),
                        expect=201)["id"]
        assert wait_state(two, again, "up", 30)["uid"] not in uids
